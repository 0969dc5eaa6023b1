"""The recurrent mLSTM backend on the fused Pallas sequence kernel (``"recurrent_pallas"``).

Declares the backend around :func:`xlstm_jax.kernels.recurrent_sequence_pallas`: the function of the
documented recurrent backend with float32 states, one kernel launch per call instead of several XLA kernels
per time step (on Hopper the Mosaic GPU chunkwise kernel where it covers the call). Without a GPU it runs the
XLA recurrent form unless ``interpret=True``. Head sizes the kernel does not cover
(``xlstm_jax.kernels.config.kernel_supports_head_dims``) raise a ValueError on every platform: choosing this
backend asks for the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from xlstm_jax.kernels.config import STEP_BACKENDS, SequenceKernelConfig
from xlstm_jax.kernels.recurrent_sequence import recurrent_sequence_pallas
from xlstm_jax.mlstm.checks import resolve_state_dtype
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, mLSTMBackendConfig
from xlstm_jax.models.xlstm_parallel.sharding import shard_map_sequence_form

__all__ = ["mLSTMBackendRecurrentPallas", "mLSTMBackendRecurrentPallasConfig"]


@dataclass(frozen=True)
class mLSTMBackendRecurrentPallasConfig(mLSTMBackendConfig):
    """Settings of the fused recurrent backend (frozen, hashable).

    Attributes:
        context_length: The model's context length (-1: not set); set by ``assign_model_config_params``.
        eps: Added to the normaliser after the max. Defaults to 1e-6.
        state_dtype: None or ``"float32"``: the kernel keeps its states in float32.
        kernel_config: Block sizes (a frozen, hashable dataclass), or None for the tuned default of the
            head shape, ``SequenceKernelConfig.get_default(DHQK, DHV)``.
        interpret: None: the compiled kernel on a GPU and the XLA recurrent form elsewhere; True: Pallas
            interpret mode (slow; for tests); False: the compiled kernel (raises without a GPU).
        kernel_backend: The kernel's ``backend``: ``"auto"`` (the Mosaic GPU chunkwise kernel on Hopper where it
            covers the call, the Triton kernel otherwise), ``"triton"`` or ``"mosaic"``.
    """

    kernel_config: SequenceKernelConfig | None = None
    interpret: bool | None = None
    kernel_backend: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if resolve_state_dtype(self.state_dtype) not in (None, jnp.dtype(jnp.float32)):
            raise ValueError(f"the recurrent_pallas backend keeps its states in float32; got {self.state_dtype=}")
        if self.kernel_config is not None and not isinstance(self.kernel_config, SequenceKernelConfig):
            raise TypeError(
                f"kernel_config must be a SequenceKernelConfig or None, got {type(self.kernel_config).__name__}"
            )
        if self.interpret is not None and not isinstance(self.interpret, bool):
            raise TypeError(f"interpret must be None or a bool, got {self.interpret!r}")
        if self.kernel_backend not in STEP_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {STEP_BACKENDS}, got {self.kernel_backend!r}")

    def form_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``recurrent_sequence_pallas`` (``kernel_config`` is its ``config``,
        ``kernel_backend`` its ``backend``)."""
        kwargs = super().form_kwargs()
        kwargs["config"] = kwargs.pop("kernel_config")
        kwargs["backend"] = kwargs.pop("kernel_backend")
        return kwargs


class mLSTMBackendRecurrentPallas(mLSTMBackend):
    """The mLSTM in recurrent form in one fused Pallas kernel (``recurrent_sequence_pallas``).

    Example:
        >>> backend = mLSTMBackendRecurrentPallas(config=mLSTMBackendRecurrentPallasConfig())
        >>> h = backend(q, k, v, i, f)  # (B, NH, S, DHV)
    """

    config: mLSTMBackendRecurrentPallasConfig
    config_class = mLSTMBackendRecurrentPallasConfig
    form = staticmethod(shard_map_sequence_form(recurrent_sequence_pallas))  # per device under a mesh

    @property
    def can_vmap_over_heads(self) -> bool:
        """False: the kernel takes the heads dimension as part of its grid and is not tested under vmap."""
        return False
