"""Text generation with the xLSTM language model: one prefill call, then a jitted decode loop.

1. **Prefill**: the whole (left-padded) prompt batch runs through the model once with the prefill
   backend (``runtime.prefill_backend``, the chunkwise form by default), which returns the states of every
   block after the prompt and the logits of its last position.
2. **Decode**: ``lax.while_loop`` repeats *sample a token, feed it through the model with the one-token
   decode step* (``runtime.step_backend``) until ``max_new_tokens`` or until every sequence has emitted a
   stop token. The loop is one compiled program: shapes do not change from token to token, so nothing is
   recompiled per token, and the state buffers are donated so that XLA updates them in place.

Prompts of different lengths are padded on the left. Padded positions get input gate ``-inf``
(``PAD_IGATE``, see the mLSTM layer) and forget gate ``+inf``, an exact no-op step of the
cell, so a padded prompt leaves the same states as the unpadded one; all prompts then end at the last
position and decode in lockstep. A sequence that has emitted a stop token gets ``pad_token_id`` from then
on, and its state is frozen the same way.

Sampling (``SamplingConfig``): greedy (``temperature=0``), or temperature with optional top-k and top-p
filtering, from an explicit PRNG key: the key of step t is ``fold_in(key, t)``, so a run is reproducible
and the streaming path (:func:`stream`) draws exactly the tokens of :func:`generate`.

Example:
    >>> config, params = load_hf("xLSTM-7b")
    >>> out = generate(config, params, [[1, 2, 3], [4, 5]], max_new_tokens=32,
    ...                sampling=SamplingConfig(temperature=0.7, top_p=0.9), key=jax.random.key(0))
    >>> out.tokens.shape, out.num_generated
    ((2, 32), Array([32, 32], dtype=int32))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.model import ModelStates, xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig

__all__ = ["GenerationResult", "SamplingConfig", "generate", "pad_prompts", "prefill", "sample_logits", "stream"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn from the logits.

    Attributes:
        temperature: 0 for greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: Keep only the k most likely tokens (0: all). Ties with the k-th are kept.
        top_p: Keep the smallest set of most likely tokens whose probability reaches top_p (1: all);
            the most likely token is always kept. Applied after top_k.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t = self.temperature
        if not (isinstance(t, int | float) and math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_logits(
    logits: jax.Array,  # (B, V) float
    key: jax.Array,  # a PRNG key (unused when greedy)
    sampling: SamplingConfig,
) -> jax.Array:
    """Draws one token per row; returns (B,) int32."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # (B, V) descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
        keep = jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True)  # >= 1: the first has mass 0
        threshold = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)  # smallest kept logit
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_token_id: int, multiple_of: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads prompts of different lengths into one batch.

    Args:
        prompts: B token-id lists, each of length at least 1.
        pad_token_id: The id placed at padded positions (any valid id: those positions are no-op steps).
        multiple_of: Pad the common length up to a multiple of this (fewer distinct prefill shapes,
            hence fewer compilations; chunk-aligned lengths for the chunkwise form).

    Returns:
        ``input_ids`` (B, S) int32 and ``valid`` (B, S) bool, False at padded positions.

    Raises:
        ValueError: no prompts, an empty prompt, or multiple_of < 1.
    """
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    lengths = [len(p) for p in prompts]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"prompts must be a non-empty list of non-empty token lists, got lengths {lengths}")
    S = -(-max(lengths) // multiple_of) * multiple_of
    ids = np.full((len(prompts), S), pad_token_id, np.int32)
    valid = np.zeros((len(prompts), S), bool)
    for b, p in enumerate(prompts):
        ids[b, S - len(p) :] = np.asarray(p, np.int32)
        valid[b, S - len(p) :] = True
    return ids, valid


class GenerationResult(NamedTuple):
    """What :func:`generate` returns.

    Attributes:
        tokens: (B, N) int32, N = max_new_tokens; after a sequence's stop token, ``pad_token_id``.
        num_generated: (B,) int32, the tokens of each sequence up to and including its stop token.
        logits: (B, N, V) float32, the logits each token was drawn from (only with ``return_logits``;
            rows after a sequence's stop token, and steps after every sequence stopped, are zero).
        states: The model states after feeding every generated token (up to the stop token) back in.
    """

    tokens: jax.Array
    num_generated: jax.Array
    logits: jax.Array | None
    states: ModelStates


class _Carry(NamedTuple):
    """The decode loop's state; everything but ``states`` is small."""

    t: jax.Array  # () int32, the step
    states: ModelStates
    logits: jax.Array  # (B, V) float32, to draw token t from
    done: jax.Array  # (B,) bool, has emitted a stop token
    tokens: jax.Array  # (B, N) int32
    num_generated: jax.Array  # (B,) int32
    all_logits: jax.Array | None  # (B, N, V) float32 or None


@functools.partial(jax.jit, static_argnames=("config", "runtime"))
def _prefill(config: xLSTMLMConfig, runtime: RuntimeConfig, params: Any, input_ids: jax.Array, valid: jax.Array | None):
    logits, states = xLSTMLMModel(config, runtime).apply(
        {"params": params}, input_ids, None, valid, return_states=True, last_only=True
    )
    return logits[:, 0], states


def prefill(
    config: xLSTMLMConfig,
    params: Any,
    input_ids: jax.Array,  # (B, S) int
    valid: jax.Array | None = None,  # (B, S) bool, False at (left) padding
    *,
    runtime: RuntimeConfig = RuntimeConfig(),
) -> tuple[jax.Array, ModelStates]:
    """Runs the prompt through the model once with the prefill backend (jitted).

    Returns:
        The logits of the last position (B, V) float32 and the states of every block (``ModelStates``).
    """
    valid = None if valid is None else jnp.asarray(valid)
    return _prefill(config, runtime, params, jnp.asarray(input_ids, jnp.int32), valid)


def _sample_part(sampling: SamplingConfig, pad_token_id: int, carry: _Carry, key: jax.Array, stop: jax.Array):
    """Draws token t from ``carry.logits``; returns it and the carry with the token recorded."""
    token = sample_logits(carry.logits, jax.random.fold_in(key, carry.t), sampling)
    token = jnp.where(carry.done, pad_token_id, token)
    all_logits = carry.all_logits
    if all_logits is not None:
        row = jnp.where(carry.done[:, None], 0.0, carry.logits)
        all_logits = jax.lax.dynamic_update_index_in_dim(all_logits, row, carry.t, axis=1)
    carry = carry._replace(
        tokens=jax.lax.dynamic_update_index_in_dim(carry.tokens, token, carry.t, axis=1),
        num_generated=carry.num_generated + (~carry.done).astype(jnp.int32),
        all_logits=all_logits,
    )
    return token, carry


def _step_part(
    config: xLSTMLMConfig, runtime: RuntimeConfig, params: Any, carry: _Carry, token: jax.Array, stop: jax.Array
) -> _Carry:
    """Feeds token t through the model (a no-op step for finished sequences) and advances t."""
    live = ~carry.done
    logits, states = xLSTMLMModel(config, runtime).apply(
        {"params": params}, token[:, None], carry.states, live[:, None], decode=True, return_states=True
    )
    done = carry.done | jnp.isin(token, stop)
    return carry._replace(t=carry.t + 1, states=states, logits=logits[:, 0], done=done)


@functools.partial(
    jax.jit,
    static_argnames=("config", "runtime", "sampling", "max_new_tokens", "pad_token_id", "return_logits"),
    donate_argnames=("states",),
)
def _decode_loop(
    config: xLSTMLMConfig,
    runtime: RuntimeConfig,
    sampling: SamplingConfig,
    max_new_tokens: int,
    pad_token_id: int,
    return_logits: bool,
    params: Any,
    states: ModelStates,
    logits: jax.Array,
    key: jax.Array,
    stop: jax.Array,
) -> _Carry:
    carry = _initial_carry(states, logits, max_new_tokens, return_logits)

    def cond(c: _Carry) -> jax.Array:
        return (c.t < max_new_tokens) & ~jnp.all(c.done)

    def body(c: _Carry) -> _Carry:
        token, c = _sample_part(sampling, pad_token_id, c, key, stop)
        return _step_part(config, runtime, params, c, token, stop)

    return jax.lax.while_loop(cond, body, carry)


def _initial_carry(states: ModelStates, logits: jax.Array, max_new_tokens: int, return_logits: bool) -> _Carry:
    B, V = logits.shape
    return _Carry(
        t=jnp.zeros((), jnp.int32),
        states=ModelStates(*states),
        logits=logits.astype(jnp.float32),
        done=jnp.zeros((B,), bool),
        tokens=jnp.zeros((B, max_new_tokens), jnp.int32),
        num_generated=jnp.zeros((B,), jnp.int32),
        all_logits=jnp.zeros((B, max_new_tokens, V), jnp.float32) if return_logits else None,
    )


def _prepare(
    config: xLSTMLMConfig,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    max_new_tokens: int,
    sampling: SamplingConfig,
    key: jax.Array | None,
    stop_tokens: Sequence[int] | None,
    pad_token_id: int | None,
    pad_to_multiple_of: int,
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array, int]:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if key is None:
        if not sampling.greedy:
            raise ValueError(f"sampling with temperature={sampling.temperature} needs an explicit PRNG key")
        key = jax.random.key(0)  # unused by greedy decoding
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    if stop_tokens is None:
        stop_tokens = () if config.eos_token_id is None else (config.eos_token_id,)
    bad = [t for t in (*stop_tokens, pad_token_id) if not 0 <= int(t) < config.vocab_size]
    if bad:
        raise ValueError(f"stop_tokens and pad_token_id must be token ids in [0, {config.vocab_size}), got {bad}")
    if isinstance(prompts, np.ndarray | jax.Array):
        if prompts.ndim != 2 or prompts.shape[1] < 1:
            raise ValueError(f"a prompt array must be (B, S) with S >= 1, got shape {tuple(prompts.shape)}")
        prompts = np.asarray(prompts).tolist()
    ids, valid = pad_prompts(prompts, pad_token_id, pad_to_multiple_of)
    if int(ids.max()) >= config.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"prompt token ids must lie in [0, {config.vocab_size})")
    valid_arg = None if valid.all() else jnp.asarray(valid)
    return jnp.asarray(ids), valid_arg, key, jnp.asarray(stop_tokens, jnp.int32).reshape(-1), int(pad_token_id)


def generate(
    config: xLSTMLMConfig,
    params: Any,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    max_new_tokens: int,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
    stop_tokens: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    pad_to_multiple_of: int = 1,
    return_logits: bool = False,
    runtime: RuntimeConfig = RuntimeConfig(),
) -> GenerationResult:
    """Generates up to ``max_new_tokens`` tokens after each prompt.

    Args:
        config: The model config.
        params: The model parameters (laid out for ``runtime.scan_blocks``).
        prompts: B token-id lists (any lengths >= 1; left-padded), or an int array (B, S).
        max_new_tokens: N, the number of decode steps at most.
        sampling: Greedy by default.
        key: PRNG key; required unless greedy.
        stop_tokens: Ids that end a sequence (kept in the output); None for ``config.eos_token_id``.
        pad_token_id: Id for padding and for the positions after a stop token; None for the config's.
        pad_to_multiple_of: See :func:`pad_prompts`.
        return_logits: Also return the (B, N, V) logits each token was drawn from.
        runtime: How the model runs: the prefill backend, then the decode step (``RuntimeConfig``).

    Returns:
        A :class:`GenerationResult`.

    Raises:
        ValueError: bad prompts, token ids out of range, max_new_tokens < 1, or sampling without a key.
    """
    ids, valid, key, stop, pad = _prepare(
        config, prompts, max_new_tokens, sampling, key, stop_tokens, pad_token_id, pad_to_multiple_of
    )
    logits, states = _prefill(config, runtime, params, ids, valid)
    carry = _decode_loop(
        config, runtime, sampling, max_new_tokens, pad, return_logits, params, states, logits, key, stop
    )
    return GenerationResult(carry.tokens, carry.num_generated, carry.all_logits, carry.states)


@functools.partial(jax.jit, static_argnames=("sampling", "pad_token_id"))
def _sample_jit(sampling, pad_token_id, carry, key, stop):
    return _sample_part(sampling, pad_token_id, carry, key, stop)


@functools.partial(jax.jit, static_argnames=("config", "runtime"), donate_argnames=("carry",))
def _step_jit(config, runtime, params, carry, token, stop):
    return _step_part(config, runtime, params, carry, token, stop)


def stream(
    config: xLSTMLMConfig,
    params: Any,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    max_new_tokens: int,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
    stop_tokens: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    pad_to_multiple_of: int = 1,
    runtime: RuntimeConfig = RuntimeConfig(),
) -> Iterator[np.ndarray]:
    """Like :func:`generate`, but yields each step's tokens (B,) as soon as they are drawn.

    Each step is the same sample-then-feed body as the loop of :func:`generate`, jitted once and called
    from Python with the carry donated (no recompilation per token); the next step is dispatched before
    the drawn tokens are copied to the host, so the device does not wait for the caller. It stops after
    ``max_new_tokens`` steps or once every sequence has emitted a stop token (its tokens included).
    """
    ids, valid, key, stop, pad = _prepare(
        config, prompts, max_new_tokens, sampling, key, stop_tokens, pad_token_id, pad_to_multiple_of
    )
    logits, states = _prefill(config, runtime, params, ids, valid)
    carry = _initial_carry(states, logits, max_new_tokens, False)
    done = np.zeros(ids.shape[0], bool)
    for t in range(max_new_tokens):
        token, carry = _sample_jit(sampling, pad, carry, key, stop)
        if t + 1 < max_new_tokens:
            carry = _step_jit(config, runtime, params, carry, token, stop)
        token = np.asarray(token)
        yield token
        done |= np.isin(token, np.asarray(stop))
        if done.all():
            return
