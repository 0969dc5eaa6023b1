"""The mLSTM cell as pure JAX functions (no Flax): one form per module; packed documents in ``segments``."""

from xlstm_jax.mlstm.chunkwise import chunkwise_fw
from xlstm_jax.mlstm.parallel import parallel_stabilized_fw
from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw, recurrent_sequence_segments_fw, recurrent_step_fw

__all__ = [
    "chunkwise_fw",
    "parallel_stabilized_fw",
    "recurrent_sequence_fw",
    "recurrent_sequence_segments_fw",
    "recurrent_step_fw",
]
