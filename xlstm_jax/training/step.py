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
``config.dtype`` (e.g. bfloat16) is the compute dtype. The loss reads the LM head's logits in that dtype, before
the output soft cap, and applies the cap and the log-softmax in float32 inside its own passes
(:func:`cross_entropy`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from xlstm_jax.models.xlstm_parallel.blocks.mlstm.layer import soft_cap

__all__ = [
    "BATCH_KEYS",
    "TrainState",
    "check_batch",
    "create_train_state",
    "cross_entropy",
    "global_norm",
    "make_train_step",
    "model_loss",
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
    logits: jax.Array,  # (B, S, V) floating
    targets: jax.Array,  # (B, S) int
    loss_mask: jax.Array,  # (B, S) float
    *,
    soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Masked next-token cross-entropy: ``(sum of mask * -log softmax(z)[target], sum of mask)``, where z is the
    logits, or ``soft_cap * tanh(logits / soft_cap)`` with a ``soft_cap`` (the model's ``output_logit_soft_cap``,
    for its ``raw_logits``).

    Computed in float32 (or the logits' dtype if wider) from logits of any float dtype, which are never copied in
    that precision: each pass reads the logits as they are and converts them inside it, and the gradient is one
    pass (``custom_vjp``) that writes d logits in the logits' dtype. The log-sum-exp is shifted by the row's
    maximum, or by ``soft_cap`` where it is at most :data:`CAP_SHIFT_MAX`: capped logits are at most ``soft_cap``,
    so then one pass over the logits computes it. The mean loss is the first output over the second, taken over
    the whole global batch.

    Args:
        logits: (B, S, V) floating.
        targets: (B, S) integer token ids in [0, V).
        loss_mask: (B, S) weights, 1 where a target counts and 0 where it does not.
        soft_cap: None, or a positive finite float: the cap applied to the logits before the softmax.

    Returns:
        ``(sum_loss, token_count)``, two float32 scalars (float64 for float64 logits).

    Raises:
        ValueError: shapes that do not fit, non-integer targets, non-float logits, or a soft_cap that is not a
            positive finite number.
    """
    if logits.ndim != 3 or tuple(targets.shape) != tuple(logits.shape[:2]) or targets.shape != loss_mask.shape:
        raise ValueError(
            f"logits.shape={tuple(logits.shape)} must be (B, S, V) with targets.shape={tuple(targets.shape)} and "
            f"loss_mask.shape={tuple(loss_mask.shape)} both (B, S)"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype={targets.dtype}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be floating, got dtype={logits.dtype}")
    if soft_cap is not None and (
        isinstance(soft_cap, bool) or not isinstance(soft_cap, int | float) or not 0 < soft_cap < float("inf")
    ):
        raise ValueError(f"soft_cap must be None or a positive finite number, got soft_cap={soft_cap!r}")
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    return _cross_entropy(logits, targets.astype(jnp.int32), loss_mask.astype(dtype), soft_cap)


# The soft cap shifts the log-sum-exp where exp(-2 * cap), its smallest term, is a normal float32 (above 1e-38).
CAP_SHIFT_MAX = 40.0


def _capped(logits: jax.Array, cap: float | None, dtype: Any) -> jax.Array:
    z = logits.astype(dtype)
    return z if cap is None else soft_cap(z, cap)


def _log_normaliser(z: jax.Array, cap: float | None) -> jax.Array:
    """``log sum exp z`` over the last axis, shifted by the cap (one pass) or by the row's maximum."""
    shift = cap if cap is not None and cap <= CAP_SHIFT_MAX else jnp.max(z, axis=-1, keepdims=True)
    return (jnp.log(jnp.sum(jnp.exp(z - shift), axis=-1, keepdims=True)) + shift)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array, cap: float | None):
    return _cross_entropy_fwd(logits, targets, mask, cap)[0]


def _cross_entropy_fwd(logits, targets, mask, cap):
    z = _capped(logits, cap, mask.dtype)
    log_z = _log_normaliser(z, cap)  # (B, S)
    target_logit = _capped(jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], cap, mask.dtype)
    nll = log_z - target_logit
    return (jnp.sum(nll * mask), jnp.sum(mask)), (logits, targets, mask, log_z, nll)


def _cross_entropy_bwd(cap, residuals, cotangents):
    logits, targets, mask, log_z, nll = residuals
    g = cotangents[0]  # the token count does not depend on the logits or the targets
    # The barrier keeps XLA from merging this z with the forward's (the same expression), which would make the
    # forward write z in float32 for this pass to read back: recomputing it from the logits costs nothing extra.
    z = _capped(jax.lax.optimization_barrier(logits), cap, mask.dtype)
    target = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None]
    d = jnp.exp(z - log_z[..., None]) - target.astype(z.dtype)  # softmax minus one-hot
    if cap is not None:
        d = d * (1 - jnp.square(z / cap))  # through cap * tanh(x / cap)
    d_logits = (g * mask)[..., None] * d
    return d_logits.astype(logits.dtype), None, g * nll + cotangents[1]


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def model_loss(model: nn.Module, params: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``cross_entropy`` of the language model (``xLSTMLMModel``) on a batch (:data:`BATCH_KEYS`): its raw
    logits, capped inside the loss with the config's ``output_logit_soft_cap``. Returns ``(sum_loss, count)``."""
    ids, segments = batch["input_ids"], batch["segment_ids"]
    logits = model.apply({"params": params}, ids, segment_ids=segments, raw_logits=True)
    cap = model.config.output_logit_soft_cap
    return cross_entropy(logits, batch["targets"], batch["loss_mask"], soft_cap=cap)


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
        return jax.value_and_grad(model_loss, argnums=1, has_aux=True)(model, params, micro)  # ((total, count), grads)

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
