"""The registry of the mLSTM forms as backends, by name: ``create_mlstm_backend("recurrent", use_scan=True)``.

Each entry is a subclass of the generic backend that names its pure function and config class; a new form
adds its declaration module and one line here.
"""

from __future__ import annotations

from typing import Any

from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.chunkwise import mLSTMBackendChunkwise
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.chunkwise_mosaic import mLSTMBackendChunkwiseMosaic
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.parallel import mLSTMBackendParallel
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent import mLSTMBackendRecurrent
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent_pallas import mLSTMBackendRecurrentPallas

__all__ = ["BACKENDS", "create_mlstm_backend"]

# Name -> backend class.
BACKENDS: dict[str, type[mLSTMBackend]] = {
    "recurrent": mLSTMBackendRecurrent,
    "parallel_stabilized": mLSTMBackendParallel,
    "chunkwise": mLSTMBackendChunkwise,
    "chunkwise_mosaic": mLSTMBackendChunkwiseMosaic,
    "recurrent_pallas": mLSTMBackendRecurrentPallas,
}


def create_mlstm_backend(name_or_config: Any, **config_kwargs: Any) -> mLSTMBackend:
    """Builds a backend from its registry name and config fields, or from a config object.

    Args:
        name_or_config: A name in ``BACKENDS`` (then ``config_kwargs`` are the config's fields), or an
            instance of one backend's ``config_class`` (then no ``config_kwargs``).
        **config_kwargs: Fields of the backend's config dataclass.

    Raises:
        ValueError: unknown name or config type, or config_kwargs given with a config object.
        TypeError: a field that the config does not have.
    """
    if isinstance(name_or_config, str):
        if name_or_config not in BACKENDS:
            raise ValueError(f"unknown mLSTM backend {name_or_config!r}; known backends: {sorted(BACKENDS)}")
        cls = BACKENDS[name_or_config]
        return cls(config=cls.config_class(**config_kwargs))
    for cls in BACKENDS.values():
        if type(name_or_config) is cls.config_class:
            if config_kwargs:
                raise ValueError(f"config_kwargs {sorted(config_kwargs)} cannot be given with a config object")
            return cls(config=name_or_config)
    raise ValueError(
        f"no backend takes a config of type {type(name_or_config).__name__}; known backends: {sorted(BACKENDS)}"
    )
