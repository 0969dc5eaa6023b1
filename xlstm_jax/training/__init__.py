"""Training of the xLSTM language model: optimiser, train step, initialisation, checkpoints.

``init_params`` (or ``load_hf`` to fine-tune) -> ``create_train_state`` -> ``make_train_step`` -> a loop that
saves with ``TrainCheckpointer`` and ends with ``export_hf``.
"""

from xlstm_jax.training.checkpoint import DamagedCheckpointWarning, TrainCheckpointer, export_hf
from xlstm_jax.training.init import init_params
from xlstm_jax.training.optim import OptimizerConfig, decay_mask, make_optimizer, make_schedule
from xlstm_jax.training.step import (
    TrainState,
    create_train_state,
    cross_entropy,
    make_train_step,
    model_loss,
    train_state_shardings,
)

__all__ = [
    "DamagedCheckpointWarning",
    "OptimizerConfig",
    "TrainCheckpointer",
    "TrainState",
    "create_train_state",
    "cross_entropy",
    "decay_mask",
    "export_hf",
    "init_params",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "model_loss",
    "train_state_shardings",
]
