"""Fused GPU kernels for the mLSTM in JAX Pallas (Triton lowering): the decode step and the whole sequence.

On a machine without a GPU both fall back to the XLA recurrent form (``interpret=None``) or run in Pallas
interpret mode (``interpret=True``).
"""

from xlstm_jax.kernels.config import SequenceKernelConfig, StepKernelConfig
from xlstm_jax.kernels.recurrent_sequence import recurrent_sequence_pallas
from xlstm_jax.kernels.recurrent_step import recurrent_step_pallas, recurrent_step_pallas_stacked

__all__ = [
    "SequenceKernelConfig",
    "StepKernelConfig",
    "recurrent_sequence_pallas",
    "recurrent_step_pallas",
    "recurrent_step_pallas_stacked",
]
