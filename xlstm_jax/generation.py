"""Text generation with the xLSTM language model: one prefill call, then a jitted decode loop.

1. **Prefill** (:func:`prefill`): the whole (left-padded) prompt batch runs through the model once with the
   prefill backend (``runtime.prefill_backend``, by default the chunkwise form, as a Mosaic GPU kernel on
   Hopper), which returns the states of every block after the prompt and the logits of its last position.
2. **Decode**: repeat *draw a token, feed it through the model with the one-token decode step*
   (``runtime.step_backend``) until ``max_new_tokens`` tokens or until every sequence has emitted a stop
   token. :func:`generate` runs the whole loop as one ``lax.while_loop`` program; :func:`stream` calls the
   same step from Python and yields each token as it comes. Shapes do not change from token to token, so
   nothing is recompiled per token, and the state buffers are donated so that XLA updates them in place.

Neither recompiles when only ``max_new_tokens`` changes. The step that :func:`stream` repeats carries
nothing whose size depends on ``max_new_tokens`` (a step costs the same at 64 tokens and at 10^6), and
:func:`generate` writes its tokens into a buffer whose length is ``max_new_tokens`` rounded up to a power
of two (at least ``MIN_TOKEN_BUFFER``), with the step count a runtime value: one compiled loop serves every
``max_new_tokens`` of a bucket, and the returned arrays have exactly ``max_new_tokens`` columns.

Prompts of different lengths are padded on the left. Padded positions get input gate ``-inf``
(``PAD_IGATE``, see the mLSTM layer) and forget gate ``+inf``, an exact no-op step of the
cell, so a padded prompt leaves the same states as the unpadded one; all prompts then end at the last
position and decode in lockstep. A sequence that has emitted a stop token gets ``pad_token_id`` from then
on, and its state is frozen the same way.

A prompt may hold several packed documents (``segment_ids``): each starts from zero states, as if run alone,
and generation continues the prompt's last document.

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

from xlstm_jax.models.xlstm_parallel.config import _is_int, xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.model import ModelStates, xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig

__all__ = [
    "MAX_NEW_TOKENS",
    "MIN_TOKEN_BUFFER",
    "GenerationResult",
    "SamplingConfig",
    "generate",
    "pad_prompts",
    "prefill",
    "filter_logits",
    "sample_logits",
    "stream",
]

# The decode step counter is int32 (it also seeds each step's key through ``fold_in``).
MAX_NEW_TOKENS = 2**31 - 1
# The shortest token buffer of :func:`generate`; longer ones are powers of two.
MIN_TOKEN_BUFFER = 16


def _is_number(x: Any) -> bool:
    """A Python or NumPy real number, not a bool."""
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool | np.bool_)


def _check_max_new_tokens(max_new_tokens: Any) -> int:
    """``max_new_tokens`` as an int in [1, MAX_NEW_TOKENS].

    Raises:
        TypeError: not an int (a float or a bool).
        ValueError: out of range.
    """
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__} {max_new_tokens!r}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(
            f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}] (the step counter is int32), got {max_new_tokens}"
        )
    return int(max_new_tokens)


def _token_buffer_length(max_new_tokens: int) -> int:
    """The token buffer of :func:`generate`: ``max_new_tokens`` rounded up to a power of two >= MIN_TOKEN_BUFFER."""
    return max(MIN_TOKEN_BUFFER, 1 << (max_new_tokens - 1).bit_length())


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
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not _is_number(value):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
            object.__setattr__(self, name, float(value))
        if not _is_int(self.top_k):
            raise TypeError(f"top_k must be an int, got {type(self.top_k).__name__} {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(
    logits: jax.Array,  # (B, V) float
    temperature: float | jax.Array,  # a float, or (B,) per row; rows with 0 (greedy) are not scaled
    top_k: int | jax.Array,  # an int, or (B,) per row; 0 = off
    top_p: float | jax.Array,  # a float, or (B,) per row; 1 = off
) -> jax.Array:
    """The logits a token is drawn from: scaled by 1/temperature, then -inf outside the top k and outside the
    smallest set of most likely tokens whose probability reaches top_p; (B, V) float32.

    Each setting is one value for every row or one per row (the serving engine's slots). A Python 0 for
    ``top_k`` or 1 for ``top_p`` skips that filter at trace time.
    """
    B, V = logits.shape
    rows = lambda value, dtype: jnp.broadcast_to(jnp.asarray(value, dtype), (B,))[:, None]
    temperature = rows(temperature, jnp.float32)
    x = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    if not (isinstance(top_k, int) and top_k == 0):
        k = rows(top_k, jnp.int32)
        descending = jnp.sort(x, axis=-1)[:, ::-1]
        kth = jnp.take_along_axis(descending, jnp.clip(k, 1, V) - 1, axis=-1)  # the k-th largest logit
        x = jnp.where((k > 0) & (k < V) & (x < kth), -jnp.inf, x)
    if not (isinstance(top_p, float | int) and top_p >= 1):
        p = rows(top_p, jnp.float32)
        descending = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
        keep = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # >= 1: the first has mass 0
        threshold = jnp.take_along_axis(descending, keep - 1, axis=-1)  # smallest kept logit
        x = jnp.where((p < 1) & (x < threshold), -jnp.inf, x)
    return x


def sample_logits(
    logits: jax.Array,  # (B, V) float
    key: jax.Array,  # a PRNG key (unused when greedy)
    sampling: SamplingConfig,
) -> jax.Array:
    """Draws one token per row; returns (B,) int32."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _token_lists(prompts: Any) -> list[list[int]]:
    """``prompts`` as B lists of Python ints, each checked to be an integer (not a bool, float or str).

    Raises:
        TypeError: text, non-integer ids, or not a list of B token-id lists (or an int array (B, S)).
        ValueError: an array that is not (B, S).
    """
    expected = "prompts must be token ids: B lists of ints, or an integer array (B, S)"
    if isinstance(prompts, str | bytes):
        raise TypeError(f"{expected}, got text ({type(prompts).__name__}); encode it with the model's tokenizer first")
    if isinstance(prompts, np.ndarray | jax.Array):
        if prompts.dtype == bool or not np.issubdtype(prompts.dtype, np.integer):
            raise TypeError(f"{expected}, got an array of dtype {prompts.dtype}")
        if prompts.ndim != 2:
            raise ValueError(f"{expected}, got an array of shape {tuple(prompts.shape)}")
        return np.asarray(prompts).tolist()
    if not isinstance(prompts, Sequence):
        raise TypeError(f"{expected}, got {type(prompts).__name__}")
    lists = []
    for b, prompt in enumerate(prompts):
        if isinstance(prompt, str | bytes):
            raise TypeError(f"{expected}, got text at prompts[{b}]; encode it with the model's tokenizer first")
        if isinstance(prompt, np.ndarray | jax.Array):
            if prompt.dtype == bool or not np.issubdtype(prompt.dtype, np.integer) or prompt.ndim != 1:
                raise TypeError(
                    f"{expected}, got an array of dtype {prompt.dtype} and shape {prompt.shape} at prompts[{b}]"
                )
            prompt = np.asarray(prompt).tolist()
        elif not isinstance(prompt, Sequence):
            raise TypeError(f"{expected}, got {type(prompt).__name__} {prompt!r} at prompts[{b}] (one level too flat?)")
        for s, token in enumerate(prompt):
            if not _is_int(token):
                raise TypeError(f"{expected}, got {type(token).__name__} {token!r} at prompts[{b}][{s}]")
        lists.append([int(token) for token in prompt])
    return lists


def _check_token_range(prompts: list[list[int]], upper: int, what: str) -> None:
    """Raises ValueError naming the first id of ``prompts`` outside [0, upper) (``what`` names ``upper``)."""
    bad = [
        (b, s, token) for b, prompt in enumerate(prompts) for s, token in enumerate(prompt) if not 0 <= token < upper
    ]
    if bad:
        b, s, token = bad[0]
        raise ValueError(
            f"prompt token ids must lie in [0, {upper}) ({what}); prompts[{b}][{s}] is {token} "
            f"({len(bad)} ids out of range)"
        )


def pad_prompts(
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array, pad_token_id: int, multiple_of: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads prompts of different lengths into one batch.

    Args:
        prompts: B token-id lists, each of length at least 1, or an integer array (B, S).
        pad_token_id: The id placed at padded positions (any valid id: those positions are no-op steps).
        multiple_of: Pad the common length up to a multiple of this (fewer distinct prefill shapes,
            hence fewer compilations; chunk-aligned lengths for the chunkwise form).

    Returns:
        ``input_ids`` (B, S) int32 and ``valid`` (B, S) bool, False at padded positions.

    Raises:
        TypeError: prompts that are not token ids (text, floats, bools, a flat list), or a non-int
            ``pad_token_id`` or ``multiple_of``.
        ValueError: no prompts, an empty prompt, a negative id or one beyond int32, or multiple_of < 1.
    """
    if not _is_int(multiple_of):
        raise TypeError(f"multiple_of must be an int, got {type(multiple_of).__name__} {multiple_of!r}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    if not _is_int(pad_token_id):
        raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__} {pad_token_id!r}")
    prompts = _token_lists(prompts)
    _check_token_range(prompts, 2**31, "int32")
    lengths = [len(p) for p in prompts]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"prompts must be a non-empty list of non-empty token lists, got lengths {lengths}")
    S = -(-max(lengths) // multiple_of) * multiple_of
    ids = np.full((len(prompts), S), pad_token_id, np.int32)
    valid = np.zeros((len(prompts), S), bool)
    for b, p in enumerate(prompts):
        ids[b, S - len(p) :] = p
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


class _DecodeState(NamedTuple):
    """What one decode step reads and writes: nothing in it depends on max_new_tokens."""

    t: jax.Array  # () int32, the step
    states: ModelStates
    logits: jax.Array  # (B, V) float32, to draw token t from
    done: jax.Array  # (B,) bool, has emitted a stop token


class _Carry(NamedTuple):
    """The state of :func:`generate`'s loop: the decode state and what it records, T = the buffer length."""

    decode: _DecodeState
    tokens: jax.Array  # (B, T) int32
    num_generated: jax.Array  # (B,) int32
    all_logits: jax.Array | None  # (B, T, V) float32 or None


@functools.partial(jax.jit, static_argnames=("config", "runtime"))
def _prefill(
    config: xLSTMLMConfig,
    runtime: RuntimeConfig,
    params: Any,
    input_ids: jax.Array,
    valid: jax.Array | None,
    segment_ids: jax.Array | None = None,
):
    logits, states = xLSTMLMModel(config, runtime).apply(
        {"params": params}, input_ids, None, valid, segment_ids=segment_ids, return_states=True, last_only=True
    )
    return logits[:, 0], states


def prefill(
    config: xLSTMLMConfig,
    params: Any,
    input_ids: jax.Array,  # (B, S) int
    valid: jax.Array | None = None,  # (B, S) bool, False at (left) padding
    *,
    segment_ids: jax.Array | None = None,  # (B, S) int, packed documents
    runtime: RuntimeConfig = RuntimeConfig(),
) -> tuple[jax.Array, ModelStates]:
    """Runs the prompt through the model once with the prefill backend (jitted).

    Args:
        config: The model config.
        params: The model parameters (laid out for ``runtime.scan_blocks``).
        input_ids: (B, S) int token ids, e.g. from :func:`pad_prompts`.
        valid: (B, S) bool, False at (left) padding; None when nothing is padded.
        segment_ids: (B, S) int document ids of packed prompts, or None: a position whose id differs from the
            previous one starts a document from zero states; the states returned are those of each row's last
            document. Give padded positions the id of the row's first document (padding is a no-op step).
        runtime: How the model runs (``RuntimeConfig``).

    Returns:
        The logits of the last position (B, V) float32 and the states of every block (``ModelStates``).

    Raises:
        ValueError: segment_ids (or valid) is not (B, S) of input_ids, or segment_ids is not integer.
    """
    valid = None if valid is None else jnp.asarray(valid)
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
    return _prefill(config, runtime, params, jnp.asarray(input_ids, jnp.int32), valid, segment_ids)


def _initial_state(states: ModelStates, logits: jax.Array) -> _DecodeState:
    return _DecodeState(
        t=jnp.zeros((), jnp.int32),
        states=ModelStates(*states),
        logits=logits.astype(jnp.float32),
        done=jnp.zeros(logits.shape[:1], bool),
    )


def _draw(sampling: SamplingConfig, pad_token_id: int, state: _DecodeState, key: jax.Array) -> jax.Array:
    """Token t (B,) int32, drawn from ``state.logits``; ``pad_token_id`` for finished sequences."""
    token = sample_logits(state.logits, jax.random.fold_in(key, state.t), sampling)
    return jnp.where(state.done, pad_token_id, token)


def _feed(
    config: xLSTMLMConfig,
    runtime: RuntimeConfig,
    params: Any,
    state: _DecodeState,
    token: jax.Array,  # (B,) int32
    stop: jax.Array,  # (K,) int32
) -> _DecodeState:
    """Feeds token t through the model (a no-op step for finished sequences) and advances t."""
    live = ~state.done
    logits, states = xLSTMLMModel(config, runtime).apply(
        {"params": params}, token[:, None], state.states, live[:, None], decode=True, return_states=True
    )
    done = state.done | jnp.isin(token, stop)
    return _DecodeState(t=state.t + 1, states=states, logits=logits[:, 0], done=done)


@functools.partial(
    jax.jit,
    static_argnames=("config", "runtime", "sampling", "buffer_length", "pad_token_id", "return_logits"),
    donate_argnames=("states",),
)
def _decode_loop(
    config: xLSTMLMConfig,
    runtime: RuntimeConfig,
    sampling: SamplingConfig,
    buffer_length: int,
    pad_token_id: int,
    return_logits: bool,
    params: Any,
    states: ModelStates,
    logits: jax.Array,  # (B, V)
    key: jax.Array,
    stop: jax.Array,  # (K,) int32
    max_new_tokens: jax.Array,  # () int32, <= buffer_length
) -> _Carry:
    """:func:`generate`'s loop: at most ``max_new_tokens`` steps, recorded in buffers of ``buffer_length``."""
    B, V = logits.shape
    carry = _Carry(
        decode=_initial_state(states, logits),
        tokens=jnp.zeros((B, buffer_length), jnp.int32),
        num_generated=jnp.zeros((B,), jnp.int32),
        all_logits=jnp.zeros((B, buffer_length, V), jnp.float32) if return_logits else None,
    )

    def cond(c: _Carry) -> jax.Array:
        return (c.decode.t < max_new_tokens) & ~jnp.all(c.decode.done)

    def body(c: _Carry) -> _Carry:
        state = c.decode
        token = _draw(sampling, pad_token_id, state, key)
        all_logits = c.all_logits
        if all_logits is not None:
            row = jnp.where(state.done[:, None], 0.0, state.logits)
            all_logits = jax.lax.dynamic_update_index_in_dim(all_logits, row, state.t, axis=1)
        return _Carry(
            decode=_feed(config, runtime, params, state, token, stop),
            tokens=jax.lax.dynamic_update_index_in_dim(c.tokens, token, state.t, axis=1),
            num_generated=c.num_generated + (~state.done).astype(jnp.int32),
            all_logits=all_logits,
        )

    return jax.lax.while_loop(cond, body, carry)


def _check_key(key: Any, sampling: SamplingConfig) -> jax.Array:
    if key is None:
        if not sampling.greedy:
            raise ValueError(f"sampling with temperature={sampling.temperature} needs an explicit PRNG key")
        return jax.random.key(0)  # unused by greedy decoding
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = isinstance(key, jax.Array | np.ndarray) and key.dtype == np.uint32 and key.ndim == 1
    if not ((typed and key.ndim == 0) or raw):
        raise TypeError(
            f"key must be one PRNG key, e.g. jax.random.key(seed), got {type(key).__name__} "
            f"{getattr(key, 'dtype', '')}{list(getattr(key, 'shape', ()))}"
        )
    return key


def _prompt_segments(segment_ids: Any, prompts: list[list[int]], S: int) -> jax.Array | None:
    """The document ids of the prompts, left-padded like them to (B, S) int32 (None stays None).

    Each row is relabelled 0, 1, 2, ... by document (only where an id changes matters, so any integer ids
    fit in int32); padded positions get the label of the row's first document, so that padding stays a no-op
    step before it rather than a document of its own.

    Raises:
        TypeError: not integer ids (an integer array (B, S), or B lists of ints).
        ValueError: a shape or row length that does not match the prompts.
    """
    if segment_ids is None:
        return None
    lengths = [len(p) for p in prompts]
    if len(set(lengths)) == 1:
        expected = f"the prompts' (B, S)={(len(prompts), lengths[0])}"
    else:
        expected = f"one id per prompt token, B={len(prompts)} rows of lengths {lengths}"
    if isinstance(segment_ids, np.ndarray | jax.Array):
        if segment_ids.dtype == bool or not np.issubdtype(segment_ids.dtype, np.integer):
            raise TypeError(f"segment_ids must be integer ids, got an array of dtype {segment_ids.dtype}")
        if segment_ids.ndim != 2:
            raise ValueError(f"segment_ids.shape={tuple(segment_ids.shape)} must be {expected}")
        rows = np.asarray(segment_ids).tolist()
    elif isinstance(segment_ids, Sequence) and not isinstance(segment_ids, str | bytes):
        rows = []
        for b, row in enumerate(segment_ids):
            if isinstance(row, np.ndarray | jax.Array):
                row = np.asarray(row).tolist() if np.issubdtype(row.dtype, np.integer) and row.ndim == 1 else None
            if not isinstance(row, Sequence) or isinstance(row, str | bytes) or not all(_is_int(t) for t in row):
                raise TypeError(f"segment_ids must be B lists of int ids or an integer array, got {row!r} at row {b}")
            rows.append([int(t) for t in row])
    else:
        raise TypeError(
            f"segment_ids must be an integer array (B, S) or B lists of ints, got {type(segment_ids).__name__}"
        )
    if [len(r) for r in rows] != lengths:
        shape = (len(rows), len(rows[0])) if rows and len({len(r) for r in rows}) == 1 else [len(r) for r in rows]
        raise ValueError(f"segment_ids has shape {shape} but must be {expected}")
    out = np.zeros((len(rows), S), np.int32)
    for b, row in enumerate(rows):
        row = np.asarray(row, object)
        out[b, S - len(row) :] = np.concatenate([[0], np.cumsum(row[1:] != row[:-1])]).astype(np.int32)
    return jnp.asarray(out)


def _prepare(
    config: xLSTMLMConfig,
    prompts: Any,
    max_new_tokens: Any,
    sampling: SamplingConfig,
    key: jax.Array | None,
    stop_tokens: Sequence[int] | None,
    pad_token_id: int | None,
    pad_to_multiple_of: int,
    runtime: RuntimeConfig,
    segment_ids: Any = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array, jax.Array, int, int]:
    """Checks the arguments of :func:`generate` and :func:`stream` and turns them into arrays."""
    if not isinstance(config, xLSTMLMConfig):
        raise TypeError(f"config must be an xLSTMLMConfig, got {type(config).__name__}")
    if not isinstance(runtime, RuntimeConfig):
        raise TypeError(f"runtime must be a RuntimeConfig, got {type(runtime).__name__}")
    max_new_tokens = _check_max_new_tokens(max_new_tokens)
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    key = _check_key(key, sampling)
    V = config.vocab_size
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    if stop_tokens is None:
        stop_tokens = () if config.eos_token_id is None else (config.eos_token_id,)
    if isinstance(stop_tokens, str | bytes) or not isinstance(stop_tokens, Sequence | np.ndarray):
        raise TypeError(f"stop_tokens must be a sequence of token ids, got {type(stop_tokens).__name__}")
    stop_tokens = np.asarray(stop_tokens).reshape(-1).tolist() if isinstance(stop_tokens, np.ndarray) else stop_tokens
    for name, ids in (("stop_tokens", stop_tokens), ("pad_token_id", [pad_token_id])):
        wrong = [t for t in ids if not _is_int(t)]
        if wrong:
            raise TypeError(f"{name} must be int token ids, got {wrong}")
        bad = [int(t) for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"stop_tokens and pad_token_id must be token ids in [0, {V}), got {name}={bad}")
    prompts = _token_lists(prompts)
    _check_token_range(prompts, V, "vocab_size")
    ids, valid = pad_prompts(prompts, int(pad_token_id), pad_to_multiple_of)
    segments = _prompt_segments(segment_ids, prompts, ids.shape[1])
    valid_arg = None if valid.all() else jnp.asarray(valid)
    stop = jnp.asarray(stop_tokens, jnp.int32).reshape(-1)
    return jnp.asarray(ids), valid_arg, segments, key, stop, int(pad_token_id), max_new_tokens


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
    segment_ids: Sequence[Sequence[int]] | np.ndarray | jax.Array | None = None,
) -> GenerationResult:
    """Generates up to ``max_new_tokens`` tokens after each prompt.

    The decode loop is compiled once per power-of-two bucket of ``max_new_tokens`` (see the module
    docstring): its buffers hold ``max(MIN_TOKEN_BUFFER, next power of two)`` tokens (and logits with
    ``return_logits``), of which the first ``max_new_tokens`` are returned.

    Args:
        config: The model config.
        params: The model parameters (laid out for ``runtime.scan_blocks``).
        prompts: B token-id lists (any lengths >= 1; left-padded), or an integer array (B, S).
        max_new_tokens: N, the number of decode steps at most: an int in [1, MAX_NEW_TOKENS].
        sampling: Greedy by default.
        key: PRNG key (``jax.random.key(seed)``); required unless greedy.
        stop_tokens: Ids that end a sequence (kept in the output); None for ``config.eos_token_id``.
        pad_token_id: Id for padding and for the positions after a stop token; None for the config's.
        pad_to_multiple_of: See :func:`pad_prompts`.
        return_logits: Also return the (B, N, V) logits each token was drawn from.
        runtime: How the model runs: the prefill backend, then the decode step (``RuntimeConfig``).
        segment_ids: Document ids of packed prompts, shaped like ``prompts`` (an integer array (B, S), or one
            list per prompt of its length), or None for one document per prompt. Each document starts from zero
            states, as if run alone; generation continues each prompt's last document.

    Returns:
        A :class:`GenerationResult`: tokens (B, N) int32, num_generated (B,) int32, logits (B, N, V)
        float32 or None, and the states after the last fed token.

    Raises:
        TypeError: prompts that are not token ids (text, floats, bools, wrong nesting), a max_new_tokens that
            is not an int, or a key that is not a PRNG key.
        ValueError: empty prompts, token ids out of range, max_new_tokens out of range, sampling without
            a key, or segment_ids whose shape does not match the prompts.
    """
    ids, valid, segments, key, stop, pad, max_new_tokens = _prepare(
        config, prompts, max_new_tokens, sampling, key, stop_tokens, pad_token_id, pad_to_multiple_of, runtime,
        segment_ids,
    )  # fmt: skip
    if not isinstance(return_logits, bool):
        raise TypeError(f"return_logits must be a bool, got {return_logits!r}")
    logits, states = _prefill(config, runtime, params, ids, valid, segments)
    buffer_length = _token_buffer_length(max_new_tokens)
    carry = _decode_loop(
        config,
        runtime,
        sampling,
        buffer_length,
        pad,
        return_logits,
        params,
        states,
        logits,
        key,
        stop,
        np.int32(max_new_tokens),
    )
    tokens = carry.tokens if buffer_length == max_new_tokens else carry.tokens[:, :max_new_tokens]
    all_logits = carry.all_logits
    if all_logits is not None and buffer_length != max_new_tokens:
        all_logits = all_logits[:, :max_new_tokens]
    return GenerationResult(tokens, carry.num_generated, all_logits, carry.decode.states)


@functools.partial(jax.jit, static_argnames=("sampling", "pad_token_id"))
def _sample_jit(sampling: SamplingConfig, pad_token_id: int, state: _DecodeState, key: jax.Array) -> jax.Array:
    return _draw(sampling, pad_token_id, state, key)


@functools.partial(jax.jit, static_argnames=("config", "runtime"), donate_argnames=("state",))
def _step_jit(
    config: xLSTMLMConfig, runtime: RuntimeConfig, params: Any, state: _DecodeState, token: jax.Array, stop: jax.Array
) -> _DecodeState:
    return _feed(config, runtime, params, state, token, stop)


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
    segment_ids: Sequence[Sequence[int]] | np.ndarray | jax.Array | None = None,
) -> Iterator[np.ndarray]:
    """Like :func:`generate`, but yields each step's tokens (B,) int32 as soon as they are drawn.

    The arguments are checked when ``stream`` is called (the same checks as :func:`generate`, same
    exceptions); the prompt runs when the first token is asked for. Each step is the same draw-then-feed
    body as the loop of :func:`generate`, jitted once and called from Python with its state donated; the
    state holds only the model states, the last logits (B, V) and per-sequence flags, so a step costs the
    same whatever ``max_new_tokens`` is, and nothing is recompiled when it changes. The next step is
    dispatched before the drawn tokens are copied to the host, so the device does not wait for the caller.
    It stops after ``max_new_tokens`` steps or once every sequence has emitted a stop token (its tokens
    included). ``segment_ids`` are packed prompts' document ids, as for :func:`generate`.

    Returns:
        An iterator of (B,) int32 NumPy arrays, one per step.
    """
    ids, valid, segments, key, stop, pad, max_new_tokens = _prepare(
        config, prompts, max_new_tokens, sampling, key, stop_tokens, pad_token_id, pad_to_multiple_of, runtime,
        segment_ids,
    )  # fmt: skip
    return _stream(config, params, ids, valid, segments, max_new_tokens, sampling, key, stop, pad, runtime)


def _stream(
    config, params, ids, valid, segments, max_new_tokens, sampling, key, stop, pad, runtime
) -> Iterator[np.ndarray]:
    logits, states = _prefill(config, runtime, params, ids, valid, segments)
    state = _initial_state(states, logits)
    stop_host = np.asarray(stop)
    done = np.zeros(ids.shape[0], bool)
    for t in range(max_new_tokens):
        token = _sample_jit(sampling, pad, state, key)
        if t + 1 < max_new_tokens:
            state = _step_jit(config, runtime, params, state, token, stop)
        token = np.asarray(token)
        yield token
        done |= np.isin(token, stop_host)
        if done.all():
            return
