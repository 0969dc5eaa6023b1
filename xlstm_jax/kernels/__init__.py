"""Fused GPU kernels for the mLSTM in JAX Pallas (Triton lowering): the decode step, the whole sequence, and
the vector-matrix product of batch-1 decoding.

On a machine without a GPU the kernels fall back to XLA (``interpret=None``) or run in Pallas
interpret mode (``interpret=True``).
"""

from xlstm_jax.kernels.config import GemvConfig, SequenceKernelConfig, StepKernelConfig
from xlstm_jax.kernels.gemv import gemv_pallas
from xlstm_jax.kernels.recurrent_sequence import recurrent_sequence_pallas
from xlstm_jax.kernels.recurrent_step import recurrent_step_pallas, recurrent_step_pallas_stacked

__all__ = [
    "GemvConfig",
    "SequenceKernelConfig",
    "StepKernelConfig",
    "gemv_pallas",
    "recurrent_sequence_pallas",
    "recurrent_step_pallas",
    "recurrent_step_pallas_stacked",
]
