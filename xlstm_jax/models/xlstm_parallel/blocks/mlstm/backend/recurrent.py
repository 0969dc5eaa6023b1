"""The documented recurrent mLSTM backend (public contract; see ``shared/spec/recurrent_backend.rst``).

The math lives in :mod:`xlstm_jax.mlstm.recurrent`; this module re-exports its two functions under the
documented names and declares the backend and its config (the call is the generic one of
:class:`~xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config.mLSTMBackend`). The backend runs
:func:`~xlstm_jax.mlstm.recurrent.recurrent_sequence_segments_fw`, the documented ``recurrent_sequence_fw``
with packed documents (``segment_ids``), so that the documented function keeps its signature.
"""

from __future__ import annotations

from dataclasses import dataclass

from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw, recurrent_sequence_segments_fw, recurrent_step_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import check_bool, mLSTMBackend, mLSTMBackendConfig

__all__ = ["mLSTMBackendRecurrent", "mLSTMBackendRecurrentConfig", "recurrent_sequence_fw", "recurrent_step_fw"]


@dataclass(frozen=True)
class mLSTMBackendRecurrentConfig(mLSTMBackendConfig):
    """Settings of the recurrent backend (frozen, hashable).

    Attributes:
        context_length: The model's context length (-1: not set); set by ``assign_model_config_params``.
        eps: Added to the normaliser after the max. Defaults to 1e-6.
        state_dtype: Name of the state dtype (e.g. ``"float32"``), or None for the rule of
            ``recurrent_sequence_fw``.
        use_scan: Loop over time with ``jax.lax.scan`` instead of an unrolled Python loop.
    """

    use_scan: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("use_scan", self.use_scan)


class mLSTMBackendRecurrent(mLSTMBackend):
    """The mLSTM in recurrent form, one step per time step (``recurrent_sequence_fw``, with ``segment_ids``).

    Example:
        >>> backend = mLSTMBackendRecurrent(config=mLSTMBackendRecurrentConfig(use_scan=True))
        >>> h = backend(q, k, v, i, f)  # (B, NH, S, DHV)
    """

    config: mLSTMBackendRecurrentConfig
    config_class = mLSTMBackendRecurrentConfig
    form = staticmethod(recurrent_sequence_segments_fw)

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmaped over the heads dimension.

        The backend was not written to be independent of the heads dimension, and thus cannot be vmapped.

        Returns:
            bool: False
        """
        return False
