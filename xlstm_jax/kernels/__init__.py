"""Fused GPU kernels for the mLSTM in JAX Pallas (Triton lowering): the decode step, the whole sequence, and
the decode-step matrix product with its norm, activation and residual (experimental: slower than XLA's
product so far, see ``docs/design.md``).

On a machine without a GPU the kernels fall back to XLA (``interpret=None``) or run in Pallas
interpret mode (``interpret=True``).
"""

from xlstm_jax.kernels.config import DecodeMatmulConfig, SequenceKernelConfig, StepKernelConfig
from xlstm_jax.kernels.decode_matmul import decode_matmul_pallas
from xlstm_jax.kernels.recurrent_sequence import recurrent_sequence_pallas
from xlstm_jax.kernels.recurrent_step import recurrent_step_pallas, recurrent_step_pallas_stacked

__all__ = [
    "DecodeMatmulConfig",
    "SequenceKernelConfig",
    "StepKernelConfig",
    "decode_matmul_pallas",
    "recurrent_sequence_pallas",
    "recurrent_step_pallas",
    "recurrent_step_pallas_stacked",
]
