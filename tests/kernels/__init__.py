"""Tests of the fused Pallas kernels (``xlstm_jax.kernels``).

The same tests run in Pallas interpret mode on a machine without a GPU (CI) and compiled (Triton) when JAX's
default backend is a GPU: ``INTERPRET`` is passed as the kernels' ``interpret`` argument.
"""

import jax

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
