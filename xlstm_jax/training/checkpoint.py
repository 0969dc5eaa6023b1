"""Checkpoints of a training run (Orbax) and the export of its model to Hugging Face safetensors.

A checkpoint is one Orbax step directory ``<directory>/<step>/`` with two items: ``state``, the whole
:class:`~xlstm_jax.training.step.TrainState` (step, parameters, optimiser state, PRNG key; Orbax's
``StandardSave``, each array written from where it lies on the mesh), and ``data``, the data pipeline's state
as JSON (whatever JSON-able dict the loader gives, e.g. its position). Saving runs every ``save_every`` steps
and keeps the newest ``max_to_keep`` checkpoints; writes run in the background (the arrays are copied off
the devices before :meth:`TrainCheckpointer.save` returns, so the next step may donate them) and a final save
waits for them.

Restoring checks the newest checkpoint before trusting it: Orbax's commit marker (``commit_success.txt``)
and the commit time in ``_CHECKPOINT_METADATA``, both written only once every file of the step is, then the
restore itself (a truncated or missing array file fails there), then the restored step number. A checkpoint
that fails is reported with a :class:`DamagedCheckpointWarning` naming the step and what is wrong, renamed to
``<step>.damaged`` (so a later save of that step does not collide with it) and the previous one is tried.
A restored run continues bit for bit: the same arrays, the same step, the same key and the same data position.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.hf import save_hf
from xlstm_jax.training.step import TrainState

__all__ = ["DamagedCheckpointWarning", "TrainCheckpointer", "export_hf"]

logger = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"
STEP_METADATA = "_CHECKPOINT_METADATA"
ITEMS = ("state", "data")


class DamagedCheckpointWarning(UserWarning):
    """A checkpoint was found damaged or incomplete and skipped."""


def _abstract(target: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``target``'s leaves, placed on ``shardings`` (a matching tree) or where they lie."""

    def one(leaf: Any, sharding: Any) -> jax.ShapeDtypeStruct:
        if sharding is None and isinstance(leaf, jax.Array):
            sharding = leaf.sharding
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    if shardings is None:
        return jax.tree.map(lambda leaf: one(leaf, None), target)
    return jax.tree.map(one, target, shardings)


def _as_dict(state: Any) -> dict[str, Any]:
    """The state's fields as a dict (what is written: Orbax stores nested dicts and lists by their keys)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


class TrainCheckpointer:
    """Saves and restores training checkpoints in ``directory`` (see the module docstring).

    Args:
        directory: Where the step directories live (created if needed).
        save_every: Save when the state's step is a multiple of this (and at a forced or final save).
        max_to_keep: Number of newest checkpoints kept; older ones are deleted.
        async_save: Write in the background (the final save waits).

    Raises:
        ValueError: ``save_every`` or ``max_to_keep`` is not a positive int.

    Example:
        >>> with TrainCheckpointer("ckpt", save_every=1000, max_to_keep=3) as ckpt:
        ...     state, data_state = ckpt.restore_latest(state) or (state, None)
        ...     for ...:
        ...         state, metrics = train_step(state, batch)
        ...         ckpt.save(state, loader.state())
        ...     ckpt.save(state, loader.state(), final=True)
    """

    def __init__(self, directory: str | Path, *, save_every: int, max_to_keep: int, async_save: bool = True):
        import orbax.checkpoint as ocp

        for name, value in (("save_every", save_every), ("max_to_keep", max_to_keep)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(  # when to save is decided here (save): every step may save
            save_interval_steps=1,
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """The steps of the checkpoints in the directory (as Orbax lists them, damaged ones included), sorted."""
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState, data_state: Mapping[str, Any] | None = None, *, final: bool = False) -> bool:
        """Saves ``state`` and the data pipeline's state if its step is due (or always with ``final``).

        Args:
            state: The training state; its ``step`` names the checkpoint.
            data_state: The data pipeline's state, a JSON-able dict (None: ``{}``).
            final: Save whatever the step, and wait until every write is finished before returning.

        Returns:
            Whether a checkpoint was written (or started).

        Raises:
            TypeError: ``state`` is not a ``TrainState`` or ``data_state`` is not JSON-able.
        """
        if not isinstance(state, TrainState):
            raise TypeError(f"state must be a TrainState, got {type(state).__name__}")
        data_state = {} if data_state is None else dict(data_state)
        try:
            json.dumps(data_state)
        except TypeError as error:
            raise TypeError(f"data_state must be a JSON-able dict: {error}") from None
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps() or not (final or step % self.save_every == 0):
            if final:
                self._manager.wait_until_finished()
            return False
        ocp = self._ocp
        args = ocp.args.Composite(state=ocp.args.StandardSave(_as_dict(state)), data=ocp.args.JsonSave(data_state))
        saved = self._manager.save(step, args=args, force=True)
        if final:
            self._manager.wait_until_finished()
        return bool(saved)

    def wait_until_finished(self) -> None:
        """Blocks until the background writes are done."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def _problem(self, step: int) -> str | None:
        """What is wrong with the step directory before reading its arrays (None: nothing seen)."""
        path = self.directory / str(step)
        if not path.is_dir():
            return f"{path} is not a directory"
        if not (path / COMMIT_MARKER).is_file():
            return f"{path} has no {COMMIT_MARKER}: the save did not finish (Orbax writes it last)"
        try:
            meta = json.loads((path / STEP_METADATA).read_text())
        except (OSError, json.JSONDecodeError) as error:
            return f"{path / STEP_METADATA} is missing or not JSON: {error}"
        if not isinstance(meta, dict) or not meta.get("commit_timestamp_nsecs"):
            return f"{path / STEP_METADATA} has no commit time: the save did not finish"
        absent = [item for item in ITEMS if not (path / item).is_dir()]
        if absent:
            return f"{path} lacks the item directories {absent}"
        return None

    def restore(self, step: int, target: TrainState, *, shardings: Any = None) -> tuple[TrainState, dict[str, Any]]:
        """Restores checkpoint ``step`` onto ``target``'s structure, shapes and dtypes.

        Args:
            step: The checkpoint's step.
            target: A ``TrainState`` of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``) with
                the run's structure: what the checkpoint must match.
            shardings: Shardings for the restored arrays (a tree matching ``target``), e.g. the train step's
                state shardings on a mesh; None: each array where ``target``'s lies (its ``sharding``), else the
                default device.

        Returns:
            ``(state, data_state)``.

        Raises:
            ValueError: the checkpoint is damaged, incomplete or does not match ``target`` (what and where).
        """
        problem = self._problem(step)
        if problem is not None:
            raise ValueError(f"checkpoint {step}: {problem}")
        ocp = self._ocp
        abstract = _abstract(target, shardings)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_as_dict(abstract)), data=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as error:  # tensorstore and Orbax raise several types for a damaged file
            raise ValueError(
                f"checkpoint {step} in {self.directory} could not be read: {type(error).__name__}: {error}"
            ) from error
        # Orbax returns the optimiser's named tuples as plain tuples: the leaves, in the same order, go back
        # into the run's own structure.
        leaves = jax.tree.leaves([restored.state[k] for k in ("step", "params", "opt_state", "rng")])
        treedef = jax.tree.structure(abstract)
        if len(leaves) != treedef.num_leaves:
            raise ValueError(f"checkpoint {step} holds {len(leaves)} arrays, the run's state {treedef.num_leaves}")
        state = jax.tree.unflatten(treedef, leaves)
        if int(jax.device_get(state.step)) != step:
            raise ValueError(f"checkpoint {step} holds step={int(jax.device_get(state.step))}")
        return state, dict(restored.data or {})

    def restore_latest(self, target: TrainState, *, shardings: Any = None) -> tuple[TrainState, dict[str, Any]] | None:
        """Restores the newest sound checkpoint (see :meth:`restore` for the arguments).

        A checkpoint that fails the checks is reported (:class:`DamagedCheckpointWarning` and the log, naming
        the step and what is wrong), moved aside to ``<step>.damaged`` and the one before it is tried.

        Returns:
            ``(state, data_state)``, or None where the directory holds no checkpoint.

        Raises:
            ValueError: checkpoints exist but none can be restored (each one's problem listed).
        """
        problems = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return self.restore(step, target, shardings=shardings)
            except ValueError as error:
                problems.append(str(error))
                message = f"skipping damaged checkpoint: {error}; trying the previous one"
                logger.warning(message)
                warnings.warn(message, DamagedCheckpointWarning, stacklevel=2)
                self._set_aside(step)
        if problems:
            raise ValueError("no checkpoint could be restored:\n  " + "\n  ".join(problems))
        return None

    def _set_aside(self, step: int) -> None:
        """Renames a damaged step directory to ``<step>.damaged`` (``.damaged.N`` if taken) on the main process."""
        path = self.directory / str(step)
        if jax.process_index() == 0 and path.exists():
            aside = path.with_name(f"{step}.damaged")
            n = 1
            while aside.exists():
                aside, n = path.with_name(f"{step}.damaged.{n}"), n + 1
            path.rename(aside)
        self._manager.reload()


def export_hf(params: Any, config: xLSTMLMConfig, out_dir: str | Path) -> None:
    """Writes the trained model as a Hugging Face xLSTM directory (``config.json`` and safetensors).

    A thin front of :func:`~xlstm_jax.models.xlstm_parallel.hf.save_hf`: the arrays are gathered from the
    devices and written in their dtype (``config.param_dtype``, which ``config.json`` records). Fine-tuning
    starts from such a directory with ``load_hf(out_dir, dtype=..., param_dtype="float32")``.

    Raises:
        TypeError, ValueError, OSError: as ``save_hf``.
    """
    save_hf(out_dir, config, jax.device_get(params))
