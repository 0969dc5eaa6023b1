"""mLSTM backends: thin Flax modules around the pure forms of the cell in :mod:`xlstm_jax.mlstm`."""

from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.chunkwise import (
    mLSTMBackendChunkwise,
    mLSTMBackendChunkwiseConfig,
)
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.chunkwise_mosaic import (
    mLSTMBackendChunkwiseMosaic,
    mLSTMBackendChunkwiseMosaicConfig,
)
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, mLSTMBackendConfig
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.parallel import (
    mLSTMBackendParallel,
    mLSTMBackendParallelConfig,
)
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent import (
    mLSTMBackendRecurrent,
    mLSTMBackendRecurrentConfig,
)
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent_pallas import (
    mLSTMBackendRecurrentPallas,
    mLSTMBackendRecurrentPallasConfig,
)
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.registry import BACKENDS, create_mlstm_backend

__all__ = [
    "BACKENDS",
    "create_mlstm_backend",
    "mLSTMBackend",
    "mLSTMBackendChunkwise",
    "mLSTMBackendChunkwiseConfig",
    "mLSTMBackendChunkwiseMosaic",
    "mLSTMBackendChunkwiseMosaicConfig",
    "mLSTMBackendConfig",
    "mLSTMBackendParallel",
    "mLSTMBackendParallelConfig",
    "mLSTMBackendRecurrent",
    "mLSTMBackendRecurrentConfig",
    "mLSTMBackendRecurrentPallas",
    "mLSTMBackendRecurrentPallasConfig",
]
