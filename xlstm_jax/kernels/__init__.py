"""Fused GPU kernels in JAX Pallas (Triton lowering; the decode step also in Mosaic GPU for Hopper): the mLSTM
decode step and whole sequence, and the residual add with the RMSNorm (and mLSTM gate product) after it for
the model's decode step.

On a machine without a GPU the kernels fall back to XLA (``interpret=None``) or run in Pallas
interpret mode (``interpret=True``).
"""

from xlstm_jax.kernels.add_rms_norm import add_rms_norm_pallas
from xlstm_jax.kernels.config import SequenceKernelConfig, StepKernelConfig
from xlstm_jax.kernels.recurrent_sequence import recurrent_sequence_pallas
from xlstm_jax.kernels.recurrent_step import recurrent_step_pallas, recurrent_step_pallas_stacked

__all__ = [
    "SequenceKernelConfig",
    "StepKernelConfig",
    "add_rms_norm_pallas",
    "recurrent_sequence_pallas",
    "recurrent_step_pallas",
    "recurrent_step_pallas_stacked",
]
