"""Test setup: makes ``tests/`` importable as a package root for the shared helpers, and sizes XLA's CPU pool.

Mosaic GPU interpret mode runs each warpgroup thread of a kernel on XLA's CPU thread pool, which XLA sizes from the
``NPROC`` environment variable (else the CPUs): two warpgroups need three pool threads
(:func:`xlstm_jax.kernels.mosaic.require_mosaic_interpreter`), more than a 2-CPU machine gives. It is set here,
before any test module starts JAX; the tests' subprocesses inherit it.
"""

import os

os.environ.setdefault("NPROC", "4")
