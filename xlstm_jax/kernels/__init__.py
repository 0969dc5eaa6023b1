"""Fused GPU kernels in JAX Pallas: the mLSTM decode step and whole sequence, the chunkwise forward
(:mod:`xlstm_jax.kernels.chunkwise_mosaic`), the mLSTM layer's read-out after a decode step (per-head norm and
output gate), and the residual add with the RMSNorm (and mLSTM gate product) after it for the model's decode step.
Mosaic GPU kernels on Hopper (the decode step, the chunkwise forward, the norms), Triton kernels elsewhere.

On a machine without a GPU the Triton kernels run in Pallas interpret mode (``interpret=True``) and the Mosaic
GPU kernels in JAX's Mosaic GPU interpreter where it exists; the step, sequence and residual-norm functions also
compute the same in XLA there (``interpret=None``).
"""

from xlstm_jax.kernels.add_rms_norm import add_rms_norm_pallas
from xlstm_jax.kernels.config import SequenceKernelConfig, StepKernelConfig
from xlstm_jax.kernels.head_norm import head_norm_gate_pallas
from xlstm_jax.kernels.recurrent_sequence import recurrent_sequence_pallas
from xlstm_jax.kernels.recurrent_step import recurrent_step_kernel, recurrent_step_pallas

__all__ = [
    "SequenceKernelConfig",
    "StepKernelConfig",
    "add_rms_norm_pallas",
    "head_norm_gate_pallas",
    "recurrent_sequence_pallas",
    "recurrent_step_kernel",
    "recurrent_step_pallas",
]
