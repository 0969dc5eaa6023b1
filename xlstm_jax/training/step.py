"""One training step of the xLSTM language model: loss, gradients (accumulated over micro-batches), update.

The step is a pure function ``train_step(state, batch) -> (state, metrics)`` of a :class:`TrainState` and a
batch, jitted once with the state donated (its buffers are reused for the new state) and, on a mesh, with
explicit shardings. A batch is a dict of (B, S) arrays::

    input_ids    int32    the tokens the model reads
    targets      int32    the next token of each position
    segment_ids  int32    which packed document a position belongs to (0: padding)
    loss_mask    float32  1 where the target counts, 0 at padding and where the target starts a new document

The loss is the next-token cross-entropy in float32, ``sum(mask * nll) / sum(mask)`` over the whole global
batch: with gradient accumulation the micro-batches' loss sums, gradients and token counts are summed and
divided once, so ``accum_steps`` micro-batches of B/accum_steps rows give the step of one batch of B rows (up
to float32 rounding). Parameters and optimiser state keep their dtype (float32 for training); the model's
``config.dtype`` (e.g. bfloat16) is the compute dtype and its logits are float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = [
    "BATCH_KEYS",
    "TrainState",
    "check_batch",
    "create_train_state",
    "cross_entropy",
    "global_norm",
    "make_train_step",
    "train_state_shardings",
]

BATCH_KEYS = {"input_ids": jnp.integer, "targets": jnp.integer, "segment_ids": jnp.integer, "loss_mask": jnp.floating}


class TrainState(flax.struct.PyTreeNode):
    """What a training run carries from step to step (a pytree; checkpointed whole).

    Attributes:
        step: Optimiser steps taken, int32 scalar.
        params: The model's parameters (float32 in training).
        opt_state: The optimiser's state (its moments have the parameters' dtype).
        rng: The run's PRNG key (``jax.random.PRNGKey`` form, uint32 (2,)); kept and checkpointed for the
            stochastic parts of a run (the model itself draws nothing).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def create_train_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array | int) -> TrainState:
    """The state at step 0: ``params``, ``optimizer.init(params)`` and the key ``rng`` (or a seed).

    Every leaf is a committed (non-weakly-typed) array, so the state that ``train_step`` returns has exactly
    the input's types and the step compiles once.
    """
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    rng = jnp.asarray(rng)
    if rng.dtype != jnp.uint32 or rng.shape != (2,):
        raise ValueError(
            f"rng must be a jax.random.PRNGKey (uint32 (2,)) or an int seed, got dtype={rng.dtype} shape={rng.shape}"
        )
    params = jax.tree.map(jnp.asarray, params)
    opt_state = jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), optimizer.init(params))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=rng)


def train_state_shardings(
    state: TrainState, config: Any, mesh: Any, optimizer: optax.GradientTransformation
) -> TrainState:
    """The shardings of a training state on ``mesh``: a ``TrainState`` of ``NamedSharding``.

    Parameters follow the model's rules (:func:`xlstm_jax.models.xlstm_parallel.sharding.param_specs`); each
    optimiser-state entry of a parameter (Adam's moments) takes its parameter's sharding
    (``optax.tree_map_params``); the step counter, the optimiser's counters and the key are replicated.

    Args:
        state: The state or its shapes (``jax.eval_shape`` of :func:`create_train_state`).
        config: The model config (``xLSTMLMConfig``).
        mesh: The ``(data, fsdp, tensor)`` mesh.
        optimizer: The optimiser the state was made with.

    Example:
        >>> shardings = train_state_shardings(jax.eval_shape(lambda: state), config, mesh, optimizer)
        >>> step = make_train_step(model, optimizer, state_shardings=shardings, batch_sharding=batch_sharding(mesh))
        >>> with jax.set_mesh(mesh):
        ...     state, metrics = step(jax.device_put(state, shardings), batch)
    """
    from jax.sharding import NamedSharding, PartitionSpec

    from xlstm_jax.models.xlstm_parallel.sharding import param_specs

    def is_spec(x: Any) -> bool:
        return isinstance(x, PartitionSpec)

    specs = param_specs(state.params, config, mesh)
    opt_specs = optax.tree_map_params(
        optimizer,
        lambda _, spec: spec,
        state.opt_state,
        specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=is_spec,
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        step=replicated,
        params=jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=is_spec),
        opt_state=jax.tree.map(lambda spec: NamedSharding(mesh, spec), opt_specs, is_leaf=is_spec),
        rng=replicated,
    )


def cross_entropy(
    logits: jax.Array,  # (B, S, V) float32
    targets: jax.Array,  # (B, S) int
    loss_mask: jax.Array,  # (B, S) float
) -> tuple[jax.Array, jax.Array]:
    """Masked next-token cross-entropy: ``(sum of mask * -log softmax(logits)[target], sum of mask)``.

    Computed in float32 (or the logits' dtype if wider) with a stable log-softmax (the max subtracted before
    the exponentials). The mean loss is the first over the second, taken over the whole global batch.

    Args:
        logits: (B, S, V) floating.
        targets: (B, S) integer token ids in [0, V).
        loss_mask: (B, S) weights, 1 where a target counts and 0 where it does not.

    Returns:
        ``(sum_loss, token_count)``, two float32 scalars.

    Raises:
        ValueError: shapes that do not fit, or non-integer targets.
    """
    if logits.ndim != 3 or tuple(targets.shape) != tuple(logits.shape[:2]) or targets.shape != loss_mask.shape:
        raise ValueError(
            f"logits.shape={tuple(logits.shape)} must be (B, S, V) with targets.shape={tuple(targets.shape)} and "
            f"loss_mask.shape={tuple(loss_mask.shape)} both (B, S)"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype={targets.dtype}")
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    logits = logits.astype(dtype)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # (B, S), stable: max-shifted
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask.astype(dtype)
    return jnp.sum((log_z - target_logit) * mask), jnp.sum(mask)


def global_norm(tree: Any) -> jax.Array:
    """``sqrt(sum of squares)`` over every leaf of ``tree``, in float32 (or wider), as a scalar."""
    squares = [jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares)).astype(jnp.float32)


def check_batch(batch: Mapping[str, jax.Array], accum_steps: int) -> tuple[int, int]:
    """Checks a training batch (see the module docstring); returns (B, S).

    Raises:
        TypeError: ``batch`` is not a mapping, or an array has the wrong dtype kind.
        ValueError: a key is missing, shapes differ, or B is not divisible by ``accum_steps``.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of (B, S) arrays {sorted(BATCH_KEYS)}, got {type(batch).__name__}")
    missing = sorted(set(BATCH_KEYS) - set(batch))
    if missing:
        raise ValueError(f"batch lacks {missing}; a training batch holds {sorted(BATCH_KEYS)}")
    shapes = {k: tuple(batch[k].shape) for k in BATCH_KEYS}
    shape = shapes["input_ids"]
    if len(shape) != 2 or any(s != shape for s in shapes.values()):
        raise ValueError(f"batch arrays must all be (B, S), got shapes {shapes}")
    for key, kind in BATCH_KEYS.items():
        if not jnp.issubdtype(batch[key].dtype, kind):
            raise TypeError(f"batch[{key!r}] must be {kind.__name__}, got dtype={batch[key].dtype}")
    if shape[0] % accum_steps:
        raise ValueError(f"the batch size B={shape[0]} must be divisible by accum_steps={accum_steps}")
    return shape


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    schedule: optax.Schedule | None = None,
    accum_steps: int = 1,
    state_shardings: Any = None,
    batch_sharding: Any = None,
    donate: bool = True,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted ``train_step(state, batch) -> (state, metrics)``.

    Args:
        model: The language model (``xLSTMLMModel``); its config's ``dtype`` is the compute dtype and its
            runtime chooses the prefill form and the blocks' rematerialisation.
        optimizer: The gradient transformation (``make_optimizer``), the one ``state.opt_state`` was made with.
        schedule: The learning rate per step (``make_schedule``), reported as the ``learning_rate`` metric (the
            rate of the update this step makes); None: the metric is left out.
        accum_steps: Micro-batches per step: the batch's B rows are split into ``accum_steps`` consecutive
            groups of B / accum_steps, run one after another under ``lax.scan``, and their loss sums, gradients
            and token counts summed before the one division and update.
        state_shardings: Shardings of the state (a ``TrainState`` of shardings, or a prefix such as one sharding),
            for both the input and the returned state. Give both shardings or neither (then the arrays stay
            where they are).
        batch_sharding: Sharding of each batch array (or a dict of them).
        donate: Donate the input state's buffers to the new state (then the input state must not be used
            again).

    On a mesh, give the shardings (:func:`train_state_shardings`, ``sharding.batch_sharding``) and call the
    step under ``with jax.set_mesh(mesh):``, so that the model lays its activations out on the mesh.

    Returns:
        The jitted step. ``metrics``: ``loss`` (the mean over the batch's counted tokens), ``grad_norm`` (global
        norm of the mean gradient, before clipping), ``tokens`` (the number of counted tokens) and
        ``learning_rate``, all float32 scalars. A batch without any counted token leaves the loss at 0 and the
        gradient at 0 (AdamW still applies weight decay).

    Raises:
        ValueError: ``accum_steps`` is not a positive int, one of the two shardings is given without the
            other; at the first call, a batch that does not fit (see ``check_batch``).
    """
    if not isinstance(accum_steps, int) or isinstance(accum_steps, bool) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive int, got accum_steps={accum_steps!r}")
    if (state_shardings is None) != (batch_sharding is None):
        raise ValueError(
            "give both state_shardings and batch_sharding or neither, got "
            f"state_shardings={'None' if state_shardings is None else 'given'}, "
            f"batch_sharding={'None' if batch_sharding is None else 'given'}"
        )

    def loss_and_grad(params: Any, micro: Mapping[str, jax.Array]) -> tuple[tuple[jax.Array, jax.Array], Any]:
        def loss_sum(params: Any) -> tuple[jax.Array, jax.Array]:
            logits = model.apply({"params": params}, micro["input_ids"], segment_ids=micro["segment_ids"])
            return cross_entropy(logits, micro["targets"], micro["loss_mask"])

        (total, count), grads = jax.value_and_grad(loss_sum, has_aux=True)(params)
        return (total, count), grads

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        B, S = check_batch(batch, accum_steps)
        batch = {k: batch[k] for k in BATCH_KEYS}
        if accum_steps == 1:
            (total, count), grads = loss_and_grad(state.params, batch)
        else:
            micro = {k: v.reshape(accum_steps, B // accum_steps, S) for k, v in batch.items()}

            def body(carry: Any, mb: Mapping[str, jax.Array]) -> tuple[Any, None]:
                (total, count), grads = loss_and_grad(state.params, mb)
                acc_total, acc_count, acc_grads = carry
                return (acc_total + total, acc_count + count, jax.tree.map(jnp.add, acc_grads, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
            (total, count, grads), _ = jax.lax.scan(body, init, micro)
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: (g / denominator).astype(g.dtype), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": (total / denominator).astype(jnp.float32),
            "grad_norm": global_norm(grads),
            "tokens": count.astype(jnp.float32),
        }
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    jit_kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if state_shardings is not None:
        jit_kwargs["in_shardings"] = (state_shardings, batch_sharding)
        jit_kwargs["out_shardings"] = (state_shardings, None)
    return jax.jit(train_step, **jit_kwargs)
