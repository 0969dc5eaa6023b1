"""A continuous-batching serving engine: a fixed number of decode slots, chunked prefill, a prefix-state cache.

The engine keeps the states of ``num_slots`` requests stacked on the batch axis of one ``ModelStates``
(L, num_slots, ...) on the device, with the logits each slot draws its next token from (num_slots, V). One
iteration (:meth:`Engine.step`):

1. handles cancellations: a cancelled request frees its slot at once and its stream ends with "cancelled";
2. while a slot is free, a request waits and fewer than ``max_prefill_rows`` requests are being prefilled, starts
   prefilling the next one: the longest cached prefix of its prompt is looked up in the
   :class:`~xlstm_jax.serving.prefix_cache.PrefixCache`, and only the rest is prefilled;
3. runs the next chunk, of at most ``prefill_chunk_tokens`` tokens, of every request being prefilled (the
   prefill backend, ``runtime.prefill_backend``, from each one's states so far) as one batch, so that a long
   prompt does not stall the running streams and a burst of requests is admitted in few iterations. A prompt's
   chunks are its remainder first, then full chunks, left-padded with ``valid=False`` positions, which are
   exact no-op steps. Several requests run as one batch of ``prefill_chunk_tokens`` columns and 2, 4, ... rows
   (``Engine.prefill_row_shapes``, padded with empty rows); a request alone runs in the smallest of the shapes
   ``prefill_chunk_tokens``, its half, its quarter, ... (down to ``min_prefill_chunk_tokens``) that holds its
   chunk, so a short prompt or a cached prefix's new turn is not padded to a full chunk (see ``stable_scratch``
   of :class:`Engine` for how the shapes are launched). After a request's last
   chunk its first token is drawn from the prompt's logits and sent at once, and its states and logits are
   written into its slot;
4. queues one jitted decode step over all slots, then hands out the tokens of the step queued before it: the
   host reads one step's tokens while the device runs the next, so the device does not wait for the host
   between steps. Each running slot draws a token with its own sampling settings (a slot's first step feeds
   the token drawn after its prefill instead) and feeds it through the model (``decode=True``); free slots run
   as padding (``valid=False``) and do not change. A request that emits a stop token or reaches
   ``max_tokens`` frees its slot. The step checks the stop ids itself (a table of ``MAX_STOP_TOKENS`` per
   slot) and marks the slot done, so the step queued before the host saw the stop token leaves the slot's
   states as they were; the last step of ``max_tokens`` is known when it is queued.

Nothing is recompiled as requests come and go: the decode step, the slot insertion (a dynamic update at a
traced slot index), the first token's draw and each prefill chunk shape and row count have one compilation each
(:meth:`Engine.warmup` compiles them all). Per-slot sampling settings are arrays of shape (num_slots,) fed to
the step. Token t of a request is drawn with the key ``fold_in(key(seed), t)``, exactly as
:func:`xlstm_jax.generation.generate` draws step t of a batch of one, so a request's tokens do not depend on its
slot or its neighbours.

Threads. The engine iterates in a thread of its own beside its clients (an HTTP server's event loop, a benchmark's
coroutines), and each hand-over of tokens wakes a client that must then take Python's interpreter lock from a
busy engine thread, or the reverse. At the interpreter's default switch interval (5 ms) such a hand-over can wait
up to 5 ms, on the path of every first token; ``xlstm-jax serve`` and ``benchmarks/serve.py`` set
``sys.setswitchinterval(SWITCH_INTERVAL_S)`` (0.5 ms) for that reason. The engine itself leaves the interpreter's
settings alone.

With ``prefix_cache_bytes > 0`` the states after every prefilled prompt, and after every finished request's
prompt plus its generated tokens (the conversation so far), are kept in the prefix cache: a request that
repeats or extends one prefills only its new tokens (a finished request's key holds every token it generated,
its stop token included: those are the tokens its states have seen). :meth:`Engine.cache_prefix` prefills a
shared prefix such as a system prompt ahead of time; :meth:`Engine.save_state` and :meth:`Engine.load_state`
write a conversation's states to disk and read them back into the cache. Results do not depend on the cache:
the states it holds are those a prefill of the same tokens would leave, up to floating-point rounding (the
chunk boundaries, and the decode step instead of the prefill form for generated tokens).

Requests are admitted in the order they arrive; a request's first token is drawn and sent in the iteration that
runs its last prefill chunk (a first token that ends the request, a stop token or
``max_tokens=1``, is sent with its finish reason after the decode step that feeds it).

On a mesh (``Engine(..., mesh=mesh)``, the axes ``data``, ``fsdp``, ``tensor`` of
:mod:`~xlstm_jax.models.xlstm_parallel.sharding`) the engine serves the sharded model: the parameters are laid out
by ``param_specs`` (replicated over ``data``; heads, FFN columns and the vocabulary over ``tensor``; split over
``fsdp``), the slot states (L, num_slots, ...) by ``state_specs`` (the slots over ``data``, and over ``fsdp`` too
where it divides them; the heads over ``tensor``), and the per-slot logits, keys and sampling settings by their
slot rows alike. A request being prefilled, and every prefix-cache entry, has its heads over ``tensor`` and its
one row on every ``data`` device. The decode step, the prefill chunk, the slot insertion and the slot copy run
under the mesh (``jax.set_mesh``) and pin their outputs to these layouts, so the slot states stay split across
the devices and nothing recompiles as requests come and go. ``data`` must divide ``num_slots`` and ``tensor``
the model's heads (:func:`check_mesh`). :meth:`Engine.save_state` gathers a conversation's states to the host;
:meth:`Engine.load_state` lays them out again.

Example:
    >>> with Engine(config, params, num_slots=4, prefix_cache_bytes=1 << 30) as engine:
    ...     stream = engine.submit([1, 2, 3], SamplingParams(temperature=0.7, seed=0, max_tokens=32))
    ...     tokens = [event.token_id for event in stream if event.token_id is not None]
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import functools
import logging
import os
import secrets
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xlstm_jax.generation import MAX_NEW_TOKENS, SamplingConfig, filter_logits
from xlstm_jax.models.xlstm_parallel.config import _is_int, xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.model import ModelStates, xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig
from xlstm_jax.models.xlstm_parallel.sharding import MESH_AXES, shard_params, state_specs
from xlstm_jax.serving.prefix_cache import PrefixCache, PrefixEntry

__all__ = [
    "FINISH_REASONS",
    "LATENCY_BUCKETS",
    "MAX_STOP_TOKENS",
    "Engine",
    "EngineOverloaded",
    "RequestStream",
    "STABLE_SCRATCH_MODES",
    "SWITCH_INTERVAL_S",
    "SamplingParams",
    "TokenEvent",
    "auto_stable_scratch",
    "check_mesh",
    "require_stable_scratch",
    "stable_scratch_allocator_note",
    "stable_scratch_options",
    "stable_scratch_supported",
]

logger = logging.getLogger(__name__)

# What a serving process sets sys.setswitchinterval to (seconds; the module docstring's "Threads").
SWITCH_INTERVAL_S = 5e-4
# Why a request ended: a stop token, max_tokens, cancel() (or the engine stopping), an error in the engine.
FINISH_REASONS = ("stop", "length", "cancelled", "error")
# Upper bounds (seconds) of the latency histograms of Engine.stats(); a last bucket +inf follows.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seeds are any int in [0, MAX_SEED): jax.random.key keeps only the low 32 bits of a seed unless 64-bit JAX is on,
# so larger seeds would silently collide.
MAX_SEED = 2**32
# A request's stop ids are checked inside the decode step, in a table of this many columns per slot.
MAX_STOP_TOKENS = 16


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings.

    Attributes:
        temperature: 0 for greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: Keep only the k most likely tokens (0: all). Ties with the k-th are kept.
        top_p: Keep the smallest set of most likely tokens whose probability reaches top_p (1: all).
        seed: The PRNG seed of the request (an int in [0, 2**32)); None draws a random one. Token t is drawn
            with ``fold_in(jax.random.key(seed), t)``.
        max_tokens: Generate at most this many tokens (>= 1).
        stop_token_ids: Ids that end the request (the stop token is the last event's ``token_id``); at most
            ``MAX_STOP_TOKENS``.

    Raises:
        TypeError: a field of the wrong type (the field named).
        ValueError: a field out of range (the field named).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        checked = SamplingConfig(self.temperature, self.top_k, self.top_p)  # the one check of these three
        object.__setattr__(self, "temperature", checked.temperature)
        object.__setattr__(self, "top_k", checked.top_k)
        object.__setattr__(self, "top_p", checked.top_p)
        if self.seed is not None:
            if not _is_int(self.seed):
                raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__} {self.seed!r}")
            if not 0 <= self.seed < MAX_SEED:
                raise ValueError(f"seed must be in [0, 2**32), got seed={self.seed}")
            object.__setattr__(self, "seed", int(self.seed))
        if not _is_int(self.max_tokens):
            raise TypeError(f"max_tokens must be an int, got {type(self.max_tokens).__name__} {self.max_tokens!r}")
        if not 1 <= self.max_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_tokens must be in [1, {MAX_NEW_TOKENS}], got max_tokens={self.max_tokens}")
        object.__setattr__(self, "max_tokens", int(self.max_tokens))
        stop = self.stop_token_ids
        if isinstance(stop, str | bytes) or not isinstance(stop, Sequence | np.ndarray):
            raise TypeError(f"stop_token_ids must be a sequence of ints, got {type(stop).__name__} {stop!r}")
        stop = tuple(stop)
        wrong = [t for t in stop if not _is_int(t)]
        if wrong:
            raise TypeError(f"stop_token_ids must be ints, got {wrong}")
        negative = [t for t in stop if t < 0]
        if negative:
            raise ValueError(f"stop_token_ids must be >= 0, got {negative}")
        if len(set(stop)) > MAX_STOP_TOKENS:
            raise ValueError(f"stop_token_ids may hold at most {MAX_STOP_TOKENS} ids, got {len(set(stop))}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stop))


@dataclass(frozen=True)
class TokenEvent:
    """One event of a request's stream.

    Attributes:
        token_id: The generated token, or None (only on a final event when nothing more was generated:
            "cancelled" or "error").
        finish_reason: None while the request runs; on its last event one of ``FINISH_REASONS``: "stop" (the
            token is a stop token), "length" (the token is the max_tokens-th), "cancelled", "error".
    """

    token_id: int | None
    finish_reason: str | None


class EngineOverloaded(Exception):
    """The waiting queue is full (``max_queue`` requests wait for a slot)."""


@dataclass(eq=False)
class _Request:
    """What the engine keeps of one request."""

    prompt: tuple[int, ...]
    sampling: SamplingParams
    key_data: np.ndarray  # the raw data of jax.random.key(seed)
    stream: RequestStream
    submitted: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    last_token_time: float | None = None
    cancelled: bool = False
    early: bool = False  # its first token went out when its prefill ended (the decode step then only feeds it)


class RequestStream:
    """The output of one request: iterate it (or ``async for``) to get its :class:`TokenEvent` s.

    The last event has a ``finish_reason``; iteration ends after it. Each event is delivered once (one consumer).
    Leaving an ``async for`` early (the client went away) cancels the request.
    """

    def __init__(self, request_id: str, engine: Engine) -> None:
        self.request_id = request_id
        self._engine = engine
        self._events: collections.deque[TokenEvent] = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._closed = False  # the final event has been pushed
        self._request: _Request | None = None

    @property
    def finished(self) -> bool:
        """Whether the final event has been produced (it may not have been consumed yet)."""
        with self._cond:
            return self._closed

    def cancel(self) -> None:
        """Frees the request's slot at the next iteration; the stream then ends with "cancelled"."""
        if self._request is not None:
            self._request.cancelled = True
        self._engine._wake_up()

    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            if self._closed:
                return
            self._events.append(event)
            self._closed = event.finish_reason is not None
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, ready in waiters:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there any more
                loop.call_soon_threadsafe(ready.set)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                event = self._events.popleft()
            yield event
            if event.finish_reason is not None:
                return

    async def _aiter(self) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        waiter = (loop, ready)
        with self._cond:
            self._waiters.append(waiter)
        done = False
        try:
            while True:
                ready.clear()
                with self._cond:
                    events = list(self._events)
                    self._events.clear()
                for event in events:
                    yield event
                    if event.finish_reason is not None:
                        done = True
                        return
                if not events:
                    await ready.wait()
        finally:
            with self._cond:
                self._waiters.remove(waiter)
            if not done:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._aiter()


def sample_rows(
    logits: jax.Array,  # (B, V) float
    keys: jax.Array,  # (B, *key_shape) uint32: raw key data, one key per row
    t: jax.Array,  # (B,) int32: the index of the token drawn in each row
    temperature: jax.Array,  # (B,) float32, 0 = greedy
    top_k: jax.Array,  # (B,) int32, 0 = off
    top_p: jax.Array,  # (B,) float32, 1 = off
) -> jax.Array:
    """Draws one token per row, each row with its own settings and key; returns (B,) int32.

    Row b draws what ``sample_logits(logits[b:b+1], fold_in(key_b, t[b]), SamplingConfig(temperature[b],
    top_k[b], top_p[b]))`` draws (greedy rows take the argmax), so a row's token depends on nothing else in
    the batch.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def one(row, key_data, t):  # row (V,)
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), t)
        return jax.random.categorical(key, row[None], axis=-1)[0].astype(jnp.int32)

    def sampled() -> jax.Array:
        drawn = jax.vmap(one)(filter_logits(logits, temperature, top_k, top_p), keys, t)
        return jnp.where(temperature > 0, drawn, greedy)

    # The filters sort every row's logits twice: skipped at run time when every slot is greedy.
    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


@dataclass(frozen=True)
class _Layout:
    """Where the engine's arrays live on a mesh (hashable: a static argument of the jitted functions).

    Attributes:
        slots: The slot states (L, N, ...): N over the batch axes, heads over ``tensor`` (``state_specs``).
        row: One request's states (L, 1, ...): heads over ``tensor``, the row on every device.
        slot_rows: Arrays of N rows, (N, ...): the rows over the batch axes, the rest whole (logits, tokens,
            sampling settings, keys).
        replicated: The whole array on every device (one request's logits (1, V)).
    """

    slots: ModelStates
    row: ModelStates
    slot_rows: NamedSharding
    replicated: NamedSharding


def _pin(x: Any, sharding: Any) -> Any:
    """``x`` (an array or a pytree) constrained to ``sharding`` (a sharding or a matching tree of them)."""
    return jax.lax.with_sharding_constraint(x, sharding)


@functools.partial(
    jax.jit, static_argnames=("config", "runtime", "layout"), donate_argnames=("states", "logits", "done")
)
def _decode_step(
    config: xLSTMLMConfig,
    runtime: RuntimeConfig,
    layout: _Layout | None,
    params: Any,
    states: ModelStates,  # (L, N, ...)
    logits: jax.Array,  # (N, V) float32
    done: jax.Array,  # (N,) bool: the slot drew a stop token in an earlier step
    active: jax.Array,  # (N,) bool
    forced: jax.Array,  # (N,) int32: the token to feed instead of drawing one (-1: draw)
    keys: jax.Array,  # (N, *key_shape) uint32
    t: jax.Array,  # (N,) int32
    temperature: jax.Array,  # (N,) float32
    top_k: jax.Array,  # (N,) int32
    top_p: jax.Array,  # (N,) float32
    stop_ids: jax.Array,  # (N, MAX_STOP_TOKENS) int32, -1 where unused
) -> tuple[jax.Array, ModelStates, jax.Array, jax.Array]:
    """Draws a token in every running slot (active and not done) and feeds it through the model; the other slots
    are padding (unchanged) and return the token -1. A slot whose token is one of its stop ids is done from then
    on, so a step queued before the host has seen that token leaves the slot's states as they were.

    Returns:
        ``(tokens (N,) int32, states, logits, done)``.
    """
    run = active & ~done
    drawn = sample_rows(logits, keys, t, temperature, top_k, top_p)
    tokens = jnp.where(run, jnp.where(forced >= 0, forced, drawn), -1)
    new_logits, states = xLSTMLMModel(config, runtime).apply(
        {"params": params}, jnp.maximum(tokens, 0)[:, None], states, run[:, None], decode=True, return_states=True
    )
    logits = jnp.where(run[:, None], new_logits[:, 0].astype(logits.dtype), logits)
    done = done | (run & jnp.any(tokens[:, None] == stop_ids, axis=1))
    if layout is not None:
        tokens, states, logits, done = _pin(
            (tokens, states, logits, done), (layout.slot_rows, layout.slots, layout.slot_rows, layout.slot_rows)
        )
    return tokens, states, logits, done


@functools.partial(jax.jit, static_argnames=("layout",))
def _first_token(
    layout: _Layout | None,
    logits: jax.Array,  # (1, V) float32: a prefilled prompt's
    keys: jax.Array,  # (1, *key_shape) uint32
    temperature: jax.Array,  # (1,) float32
    top_k: jax.Array,  # (1,) int32
    top_p: jax.Array,  # (1,) float32
) -> jax.Array:
    """A request's first token (1,) int32, drawn from its prompt's logits as a decode step would draw it (t=0)."""
    token = sample_rows(logits, keys, jnp.zeros((1,), jnp.int32), temperature, top_k, top_p)
    return token if layout is None else _pin(token, layout.replicated)


class _ChunkWork(NamedTuple):
    """The states and logits a prefill chunk of h rows runs on, rewritten in place (donated) by every chunk.

    XLA launches a GPU program's kernels as command buffers (CUDA graphs) and records each again, at a cost on the
    host, whenever a buffer it uses has moved. Were a chunk's outputs new buffers every call (they are kept: as the
    next chunk's input, in the prefix cache), every block's commands would be recorded anew at every chunk. So the
    chunk program reads and writes the same buffers every call, and two small programs copy the rows in and out
    (:func:`_load_chunk`, :func:`_split_chunk`).
    """

    states: ModelStates  # (L, h, ...)
    logits: jax.Array  # (h, V) float32: each row's logits at its chunk's last position


class _ChunkTokens(NamedTuple):
    """A chunk's token ids (h, C) int32 and their mask (h, C) bool (False at left padding), rewritten in place."""

    input_ids: jax.Array
    valid: jax.Array


def _chunk_layouts(layout: _Layout) -> tuple[_ChunkWork, _ChunkTokens]:
    """The shardings of a chunk's buffers: each row's states as a request's, the logits and tokens replicated."""
    return _ChunkWork(layout.row, layout.replicated), _ChunkTokens(layout.replicated, layout.replicated)


# keep_unused: a donated buffer the program does not read (the logits here, and below) stays an argument, so the
# output of its shape is written into it rather than into a new buffer.
@functools.partial(jax.jit, static_argnames=("layout",), donate_argnames=("work", "tokens"), keep_unused=True)
def _load_chunk(
    layout: _Layout | None,
    work: _ChunkWork,
    tokens: _ChunkTokens,
    rows: tuple[ModelStates, ...],  # h requests' states (L, 1, ...) each, not donated: one may be a cached entry
    input_ids: jax.Array,  # (h, C) int32
    valid: jax.Array,  # (h, C) bool
) -> tuple[_ChunkWork, _ChunkTokens]:
    """Writes h requests' states and a chunk's tokens into the chunk's buffers (their donated storage)."""
    parts = zip(*rows, strict=True)  # per state array: the rows' parts
    states = ModelStates(*(jnp.concatenate(p, axis=1).astype(w.dtype) for p, w in zip(parts, work.states, strict=True)))
    out = _ChunkWork(states, work.logits), _ChunkTokens(input_ids.astype(jnp.int32), valid.astype(bool))
    if layout is not None:
        out = _pin(out, _chunk_layouts(layout))
    return out


def _prefill_chunk_fn(
    config: xLSTMLMConfig,
    runtime: RuntimeConfig,
    layout: _Layout | None,
    params: Any,
    work: _ChunkWork,  # the h rows' states before the chunk; logits unused
    tokens: _ChunkTokens,
) -> tuple[_ChunkWork, _ChunkTokens]:
    """One prefill chunk of h requests at once, each from its own states, as one batch of h rows, in place.

    Returns:
        The rows' states after the chunk and the logits of its last position (h, V) float32, in ``work``'s
        storage; ``tokens`` unchanged.
    """
    logits, states = xLSTMLMModel(config, runtime).apply(
        {"params": params}, tokens.input_ids, work.states, tokens.valid, return_states=True, last_only=True
    )
    states = ModelStates(*(s.astype(w.dtype) for s, w in zip(states, work.states, strict=True)))
    out = _ChunkWork(states, logits[:, 0].astype(jnp.float32))
    if layout is not None:
        out = _pin(out, _chunk_layouts(layout)[0])
    return out, tokens


_jit_chunk = functools.partial(
    jax.jit, static_argnames=("config", "runtime", "layout"), donate_argnames=("work", "tokens"), keep_unused=True
)
# XLA launches a GPU program's kernels as command buffers (CUDA graphs) and records them again, on the host, whenever
# a buffer they use has moved: the chunk's in-place buffers do not, but its scratch buffers do, between chunks, as
# other requests' states are allocated and freed, and recording the ~1000 kernels of a 7B chunk again costs more on
# the host than launching them one by one. XLA's command buffer update mode that keeps the scratch buffers a command
# buffer uses at fixed virtual addresses, so that nothing is recorded twice, is named SKIP_TEMP in jaxlib 0.11 and
# VMM_PERSISTENT_TEMP in later XLA; older versions have neither. Either needs the client's VMM allocator (jax's
# XLA_PYTHON_CLIENT_ALLOCATOR=vmm, set before jax starts); under another allocator XLA records as before.
STABLE_SCRATCH_MODES = ("SKIP_TEMP", "VMM_PERSISTENT_TEMP")


@functools.cache
def stable_scratch_options() -> dict[str, str] | None:
    """The compiler options of the first of ``STABLE_SCRATCH_MODES`` the installed XLA takes, or None."""
    for mode in STABLE_SCRATCH_MODES:
        options = {"xla_gpu_command_buffer_update_mode": mode}
        try:
            jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
        except jax.errors.JaxRuntimeError:
            continue
        return options
    return None


def stable_scratch_supported() -> bool:
    """Whether the installed XLA has one of ``STABLE_SCRATCH_MODES`` (``stable_scratch_options()`` is not None)."""
    return stable_scratch_options() is not None


def stable_scratch_allocator_note(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the stable-scratch mode may not keep scratch buffers in place in a process with ``environ``, or None:
    XLA does so only under the client's VMM allocator, which jax takes from ``XLA_PYTHON_CLIENT_ALLOCATOR=vmm``
    (or from the mode set process-wide in ``XLA_FLAGS``), read when jax starts its GPU client."""
    vmm = environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") == "vmm"
    if vmm or "xla_gpu_command_buffer_update_mode" in environ.get("XLA_FLAGS", ""):
        return None
    return (
        "stable scratch needs jax's VMM allocator (XLA_PYTHON_CLIENT_ALLOCATOR=vmm, set before jax starts); "
        "under another allocator XLA records the command buffers again as before"
    )


def auto_stable_scratch(environ: Mapping[str, str] = os.environ) -> bool:
    """What ``Engine(stable_scratch=None)`` picks: True where it pays and takes effect, on a GPU whose XLA has one
    of ``STABLE_SCRATCH_MODES`` in a process with jax's VMM allocator (:func:`stable_scratch_allocator_note` of
    ``environ`` is None), else False. With it, xLSTM-7B's time to first token on a cached 2,000-token prefix fell
    from 18.3 to 12.1 and 12.4 ms (6.3x and 6.0x below the uncached, against 4.3x) on an H100, the decode steps
    unchanged (BENCHMARKS.md)."""
    if jax.default_backend() != "gpu" or stable_scratch_allocator_note(environ) is not None:
        return False
    return stable_scratch_supported()


def require_stable_scratch(what: str) -> None:
    """Raises a ValueError naming ``what`` where the installed XLA has none of ``STABLE_SCRATCH_MODES``; logs a
    warning where the process's allocator will not keep the scratch buffers in place
    (:func:`stable_scratch_allocator_note`)."""
    if not stable_scratch_supported():
        raise ValueError(
            f"{what} needs XLA's command buffer update mode SKIP_TEMP or VMM_PERSISTENT_TEMP, which jax "
            f"{jax.__version__} does not have (jaxlib 0.11 and later)"
        )
    note = stable_scratch_allocator_note()
    if note is not None:
        logger.warning("%s: %s", what, note)


# The chunk program in the full shape (prefill_chunk_tokens columns: every batched chunk, and a long prompt's chunks,
# which follow one another on the device), launched as XLA's command buffers.
_prefill_chunk = _jit_chunk(_prefill_chunk_fn)
# The shorter shapes: a request's lone first chunk, on which its first token waits (a cached prefix's new tokens, a
# short prompt). Where the scratch buffers move, compiled without command buffers: a chunk that follows others on
# the device hides its launches, a lone one does not, and recording costs it more than launching (BENCHMARKS.md,
# serving).
_prefill_short_chunk = _jit_chunk(_prefill_chunk_fn, compiler_options={"xla_gpu_enable_command_buffer": ""})


@functools.cache
def _prefill_chunk_stable() -> Callable[..., tuple[_ChunkWork, _ChunkTokens]]:
    """Every shape, where XLA keeps the scratch buffers in place: command buffers recorded once."""
    return _jit_chunk(_prefill_chunk_fn, compiler_options=stable_scratch_options())


@functools.partial(jax.jit, static_argnames=("layout",))
def _split_chunk(layout: _Layout | None, work: _ChunkWork) -> tuple[tuple[jax.Array, ...], tuple[ModelStates, ...]]:
    """Copies of each row's logits (1, V) and states (L, 1, ...) out of a chunk's buffers."""
    h = work.logits.shape[0]
    out_logits = tuple(work.logits[i : i + 1] for i in range(h))
    out_rows = tuple(ModelStates(*(s[:, i : i + 1] for s in work.states)) for i in range(h))
    if layout is not None:
        out_logits, out_rows = _pin((out_logits, out_rows), ((layout.replicated,) * h, (layout.row,) * h))
    return out_logits, out_rows


@functools.partial(jax.jit, static_argnames=("layout",), donate_argnames=("states", "logits", "done"))
def _insert(
    layout: _Layout | None,
    states: ModelStates,
    logits: jax.Array,
    done: jax.Array,
    slot: jax.Array,
    new_states: ModelStates,
    new_logits: jax.Array,
) -> tuple[ModelStates, jax.Array, jax.Array]:
    """Writes a request's states (L, 1, ...) and logits (1, V) into slot ``slot`` (traced: one compilation), and
    clears the slot's done flag."""
    states = ModelStates(
        *(
            jax.lax.dynamic_update_slice_in_dim(s, n.astype(s.dtype), slot, axis=1)
            for s, n in zip(states, new_states, strict=True)
        )
    )
    logits = jax.lax.dynamic_update_slice_in_dim(logits, new_logits.astype(logits.dtype), slot, axis=0)
    done = jax.lax.dynamic_update_slice_in_dim(done, jnp.zeros((1,), bool), slot, axis=0)
    if layout is not None:
        states, logits, done = _pin((states, logits, done), (layout.slots, layout.slot_rows, layout.slot_rows))
    return states, logits, done


@functools.partial(jax.jit, static_argnames=("layout",))
def _extract(layout: _Layout | None, states: ModelStates, logits: jax.Array, slot: jax.Array) -> PrefixEntry:
    """A copy of slot ``slot``'s states (L, 1, ...) and logits (1, V), laid out as a prefilled request's."""
    entry = PrefixEntry(
        ModelStates(*(jax.lax.dynamic_slice_in_dim(s, slot, 1, axis=1) for s in states)),
        jax.lax.dynamic_slice_in_dim(logits, slot, 1, axis=0),
    )
    if layout is not None:
        entry = PrefixEntry(_pin(entry.states, layout.row), _pin(entry.logits, layout.replicated))
    return entry


def check_mesh(mesh: Any, num_slots: int, num_heads: int) -> dict[str, int]:
    """Checks that the engine can lay ``num_slots`` slots of a model with ``num_heads`` heads out on ``mesh``.

    Args:
        mesh: A ``jax.sharding.Mesh`` with the axes ``data``, ``fsdp``, ``tensor``.
        num_slots: The engine's decode slots: split over ``data`` (and ``fsdp`` where it divides them too).
        num_heads: The model's heads: split over ``tensor``.

    Returns:
        The mesh's axis sizes, e.g. ``{"data": 2, "fsdp": 2, "tensor": 2}``.

    Raises:
        TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
        ValueError: the mesh lacks an axis, ``data`` does not divide ``num_slots``, or ``tensor`` does not divide
            ``num_heads`` (the message names the numbers and the mesh shape).
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    missing = [name for name in MESH_AXES if name not in mesh.axis_names]
    if missing:
        raise ValueError(f"the mesh must have the axes {MESH_AXES}, got {tuple(mesh.axis_names)} (missing {missing})")
    sizes = {name: int(size) for name, size in mesh.shape.items()}
    shape = ", ".join(f"{name}={size}" for name, size in sizes.items())
    if num_slots % sizes["data"]:
        raise ValueError(
            f"num_slots={num_slots} must be a multiple of the mesh's data axis (mesh shape {shape}): the slots are "
            f"split over it"
        )
    if num_heads % sizes["tensor"]:
        raise ValueError(
            f"the model's num_heads={num_heads} must be a multiple of the mesh's tensor axis (mesh shape {shape}): "
            f"the heads are split over it"
        )
    return sizes


def _make_layout(config: xLSTMLMConfig, num_slots: int, mesh: Mesh) -> _Layout:
    """The engine's layout on ``mesh``: the slot and row states by ``state_specs``, the per-slot arrays' rows over
    the axes the slot states take."""

    def named(specs: ModelStates) -> ModelStates:
        return ModelStates(*(NamedSharding(mesh, spec) for spec in specs))

    slots = state_specs(config, num_slots, mesh)
    return _Layout(
        slots=named(slots),
        row=named(state_specs(config, 1, mesh)),
        slot_rows=NamedSharding(mesh, PartitionSpec(slots.m[1])),  # m is (L, N, NH): its N entry
        replicated=NamedSharding(mesh, PartitionSpec()),
    )


def _int_array(values: Sequence[Any]) -> np.ndarray | None:
    """``values`` as an int64 array when every one is a Python int or a NumPy integer (bools are not) that int64
    holds; else None (also for no values)."""
    kinds = set(map(type, values))
    if not kinds or not all(kind is int or issubclass(kind, np.integer) for kind in kinds):
        return None
    try:
        return np.fromiter(values, np.int64, len(values))
    except OverflowError:  # an int beyond int64 (uint64's top half included): out of any vocabulary's range
        return None


@functools.cache
def _host_device() -> jax.Device | None:
    """JAX's CPU device, or None where JAX runs without its CPU backend (``JAX_PLATFORMS`` excluding it)."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def _key_data(seed: int) -> np.ndarray:
    """The raw data of ``jax.random.key(seed)`` for a seed in [0, MAX_SEED), without waiting for a device.

    With JAX's default keys (threefry2x32) that is ``[0, seed]``: threefry seeds a key with the seed's high and low
    32-bit words. It is written here directly, since computing it is a JAX computation of about 0.3 ms in
    :meth:`Engine.submit`, in the caller's thread (an HTTP server's event loop) and on the path of the first
    token. Other key implementations are computed on the host's CPU device (on a GPU the computation would
    queue behind the decode steps in flight and wait for them)."""
    if jax.config.jax_default_prng_impl == "threefry2x32":
        return np.array([0, seed], np.uint32)
    with jax.default_device(_host_device()):
        return np.asarray(jax.random.key_data(jax.random.key(seed)))


class _Histogram:
    """Counts of observations per bucket of ``LATENCY_BUCKETS`` (and +inf), their sum and number."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def as_dict(self) -> dict[str, Any]:
        return {"buckets": list(LATENCY_BUCKETS), "counts": list(self.counts), "sum": self.sum, "count": self.count}


@dataclass(eq=False)
class _Prefill:
    """The request being prefilled: its slot, the states so far, the tokens still to run."""

    request: _Request
    slot: int
    states: ModelStates
    logits: jax.Array | None
    done: int  # prompt tokens whose states ``states`` holds


class Engine:
    """Serves generation requests with continuous batching over ``num_slots`` decode slots.

    Args:
        config: The model config.
        params: The model parameters (laid out for ``runtime.scan_blocks``).
        num_slots: The decode batch: how many requests generate at once.
        runtime: How the model runs (``RuntimeConfig``; None for the default).
        max_prompt_tokens: The longest prompt accepted.
        prefill_chunk_tokens: Prompt tokens prefilled per iteration at most (the longest chunk shape).
        min_prefill_chunk_tokens: The shortest chunk shape: a prompt's short first chunk, prefilled alone, runs in
            the smallest of ``prefill_chunk_tokens``, its half, its quarter, ... (halving while even, down to this)
            that holds it. ``prefill_chunk_tokens`` or more: one shape.
        stable_scratch: Whether the chunk programs run with XLA's command buffers (CUDA graphs) recorded once,
            their scratch buffers kept at fixed addresses (``stable_scratch_options()``: jaxlib 0.11 and later,
            under jax's VMM allocator, ``XLA_PYTHON_CLIENT_ALLOCATOR=vmm``), for every chunk shape. False: the
            full shape runs as command buffers that XLA records again whenever its scratch buffers have moved, the
            shorter shapes as below. None (the default): :func:`auto_stable_scratch` on one device, True on a GPU
            where both hold; False on a mesh of several devices (not measured there: True asks for it).
        short_chunk_command_buffers: Without ``stable_scratch``, whether the chunk shapes below
            ``prefill_chunk_tokens`` run as command buffers too. False (the default): their kernels are launched
            one by one, which costs a lone 7B chunk less than recording its command buffers again whenever its
            scratch buffers have moved; True where they do not move for another reason.
        max_prefill_rows: How many requests are prefilled together: each iteration runs the next chunk of every
            request being prefilled (up to this many) as one batch of ``prefill_chunk_tokens`` columns, whose
            row count is the smallest of 2, 4, 8, ... (and this number) that holds them. More rows admit a burst
            of requests in fewer iterations; each iteration's prefill then delays the running streams' next token
            by the time of a batch that size. 1: one request at a time. The chunks run in buffers kept on the
            device, one request's states (and logits) for each row of 1 and of each row count.
        max_queue: How many requests may wait for a slot; :meth:`submit` raises ``EngineOverloaded`` beyond.
        prefix_cache_bytes: The byte budget of the prefix-state cache (0: no cache).
        mesh: None: one device. A ``jax.sharding.Mesh`` with the axes ``data``, ``fsdp``, ``tensor``: the
            parameters are placed by ``sharding.param_specs`` (a no-op where ``load_hf(..., mesh=mesh)`` placed
            them), the slot states by ``sharding.state_specs`` (slots over ``data`` and, where it divides them
            too, ``fsdp``; heads over ``tensor``) and the per-slot logits and sampling settings over the slots'
            axes; every program runs under the mesh (see the module docstring).

    Raises:
        TypeError: config, runtime, mesh or an int argument of the wrong type.
        ValueError: an int argument out of range, or a mesh whose ``data`` axis does not divide ``num_slots``
            or whose ``tensor`` axis does not divide the model's heads (see :func:`check_mesh`).

    Attributes:
        prefill_chunk_shapes: The compiled lengths of a chunk prefilled alone, ascending (``prefill_chunk_tokens``
            and its halvings down to ``min_prefill_chunk_tokens``).
        prefill_row_shapes: The compiled row counts of a batched chunk (of ``prefill_chunk_tokens`` columns),
            ascending: 2, 4, ... up to ``max_prefill_rows`` (empty for 1).
    """

    def __init__(
        self,
        config: xLSTMLMConfig,
        params: Any,
        *,
        num_slots: int = 8,
        runtime: RuntimeConfig | None = None,
        max_prompt_tokens: int = 4096,
        prefill_chunk_tokens: int = 256,
        min_prefill_chunk_tokens: int = 16,
        stable_scratch: bool | None = None,
        short_chunk_command_buffers: bool = False,
        max_prefill_rows: int = 4,
        max_queue: int = 64,
        prefix_cache_bytes: int = 0,
        mesh: Mesh | None = None,
    ) -> None:
        if not isinstance(config, xLSTMLMConfig):
            raise TypeError(f"config must be an xLSTMLMConfig, got {type(config).__name__}")
        runtime = RuntimeConfig() if runtime is None else runtime
        if not isinstance(runtime, RuntimeConfig):
            raise TypeError(f"runtime must be a RuntimeConfig or None, got {type(runtime).__name__}")
        for name, value, low in (
            ("num_slots", num_slots, 1),
            ("max_prompt_tokens", max_prompt_tokens, 1),
            ("prefill_chunk_tokens", prefill_chunk_tokens, 1),
            ("min_prefill_chunk_tokens", min_prefill_chunk_tokens, 1),
            ("max_prefill_rows", max_prefill_rows, 1),
            ("max_queue", max_queue, 0),
            ("prefix_cache_bytes", prefix_cache_bytes, 0),
        ):
            if not _is_int(value):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {name}={value}")
        if not isinstance(short_chunk_command_buffers, bool):
            raise TypeError(
                f"short_chunk_command_buffers must be a bool, got {type(short_chunk_command_buffers).__name__}"
            )
        if stable_scratch is not None and not isinstance(stable_scratch, bool):
            raise TypeError(f"stable_scratch must be a bool or None, got {type(stable_scratch).__name__}")
        if stable_scratch:
            require_stable_scratch("stable_scratch=True")
        if mesh is not None:
            check_mesh(mesh, int(num_slots), config.num_heads)
            params = shard_params(params, mesh, config)
        if stable_scratch is None:  # measured on one GPU; a mesh of several takes it when asked for
            stable_scratch = (mesh is None or mesh.devices.size == 1) and auto_stable_scratch()
        self.mesh = mesh
        self._layout = None if mesh is None else _make_layout(config, int(num_slots), mesh)
        self.config, self.params, self.runtime = config, params, runtime
        self.num_slots = int(num_slots)
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.prefill_chunk_tokens = int(prefill_chunk_tokens)
        self.stable_scratch = stable_scratch
        self.short_chunk_command_buffers = short_chunk_command_buffers
        self.max_queue = int(max_queue)
        self.prefix_cache = PrefixCache(int(prefix_cache_bytes))

        N = self.num_slots
        self._zeros: ModelStates | None = None  # _zero_row's
        # The buffers prefill chunks run in, per row count and per (row count, chunk tokens); _chunk_lock guards
        # them (the serving thread and cache_prefix's caller both prefill).
        self._chunk_work: dict[int, _ChunkWork] = {}
        self._chunk_tokens: dict[tuple[int, int], _ChunkTokens] = {}
        self._chunk_lock = threading.Lock()
        self._states = self._place(ModelStates.zeros(config, N), lambda layout: layout.slots)
        self._logits = self._place(jnp.zeros((N, config.vocab_size), jnp.float32), lambda layout: layout.slot_rows)
        key_shape = _key_data(0).shape
        self._active = np.zeros(N, bool)
        self._keys = np.zeros((N, *key_shape), np.uint32)
        self._t = np.zeros(N, np.int32)
        self._temperature = np.zeros(N, np.float32)
        self._top_k = np.zeros(N, np.int32)
        self._top_p = np.ones(N, np.float32)
        self._forced = np.full(N, -1, np.int32)
        self._stop_ids = np.full((N, MAX_STOP_TOKENS), -1, np.int32)
        self._done = self._place(jnp.zeros(N, bool), lambda layout: layout.slot_rows)
        # Decode steps queued on the device whose tokens the host has not handed out yet, with the slots they ran:
        # (tokens, [(slot, request, t)]).
        self._inflight: collections.deque[tuple[jax.Array, list[tuple[int, _Request, int]]]] = collections.deque()
        sizes = [self.prefill_chunk_tokens]
        while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= min_prefill_chunk_tokens:
            sizes.append(sizes[-1] // 2)
        self.prefill_chunk_shapes = tuple(sorted(sizes))  # a short chunk runs in the smallest that holds it
        self.max_prefill_rows = int(max_prefill_rows)
        rows = [2]
        while rows[-1] < self.max_prefill_rows:
            rows.append(min(2 * rows[-1], self.max_prefill_rows))
        self.prefill_row_shapes = tuple(rows) if self.max_prefill_rows > 1 else ()
        self._slots: list[_Request | None] = [None] * N  # the request that holds each slot (active or prefilling)

        self._lock = threading.RLock()  # guards the queue, the slots table and the counters
        self._step_lock = threading.Lock()  # one iteration at a time
        self._wake = threading.Condition(threading.Lock())
        self._waiting: collections.deque[_Request] = collections.deque()
        self._prefill: list[_Prefill] = []  # the requests being prefilled, in arrival order
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: BaseException | None = None

        self._tokens_generated = 0
        self._finished: collections.Counter[str] = collections.Counter()
        self._prefill_tokens = 0
        self._prefill_chunks = 0
        self._decode_steps = 0
        self._ttft = _Histogram()
        self._itl = _Histogram()

    # ------------------------------------------------------------------------------------------- layout

    def _place(self, x: Any, where: Callable[[_Layout], Any]) -> Any:
        """``x`` (an array or a pytree, on the host or the devices) laid out by ``where(layout)`` (a sharding or a
        matching tree of them) on the mesh; on the default device without a mesh.

        The programs' outputs pass here too: a program reports an output's sharding in its own (equivalent)
        terms, and the jitted functions key their caches on the exact sharding of their inputs, so relabelling
        (no copy where the layouts agree) keeps one compilation each.
        """
        if self._layout is None:  # an array already on the device passes as it is (jnp.asarray costs ~30 us)
            return jax.tree_util.tree_map(lambda a: a if isinstance(a, jax.Array) else jnp.asarray(a), x)
        return jax.device_put(x, where(self._layout))

    def _on_mesh(self) -> contextlib.AbstractContextManager:
        """The context the engine's programs run under: the mesh (``jax.set_mesh``), or nothing without one."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _replicated(self, x: Any) -> Any:
        """A small host array (token ids, a slot index) on every device of the mesh; itself without a mesh."""
        return x if self._layout is None else jax.device_put(x, self._layout.replicated)

    def _new_chunk_work(self, height: int) -> _ChunkWork:
        """Zeroed buffers for a prefill chunk of ``height`` rows: their states and last logits."""
        work = _ChunkWork(
            ModelStates.zeros(self.config, height), jnp.zeros((height, self.config.vocab_size), jnp.float32)
        )
        return self._place(work, lambda layout: _chunk_layouts(layout)[0])

    def _new_chunk_tokens(self, height: int, size: int) -> _ChunkTokens:
        """Zeroed buffers for a prefill chunk's (height, size) token ids and mask."""
        tokens = _ChunkTokens(jnp.zeros((height, size), jnp.int32), jnp.zeros((height, size), bool))
        return self._place(tokens, lambda layout: _chunk_layouts(layout)[1])

    def _zero_row(self) -> ModelStates:
        """One request's initial states (L, 1, ...), laid out as a prefilled request's: one array made once and
        shared (no program donates a request's states)."""
        if self._zeros is None:
            self._zeros = self._place(ModelStates.zeros(self.config, 1), lambda layout: layout.row)
        return self._zeros

    # ----------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Starts the background thread that runs iterations while there is work (no-op if running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="xlstm-serving-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the background thread; requests still waiting or running end with "cancelled"."""
        self._stopping.set()
        self._wake_up()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._step_lock, self._lock:
            requests = [r for r in self._slots if r is not None] + list(self._waiting)
            self._waiting.clear()
            self._prefill = []
            self._inflight.clear()
            for slot, request in enumerate(self._slots):
                if request is not None:
                    self._free(slot)
            for request in requests:
                self._finish(request, "cancelled", None)

    def warmup(self) -> None:
        """Compiles the engine's programs now (the prefill chunk in each of its shapes and row counts, the first
        token's draw, slot insertion, the decode step, and the slot copy of the prefix cache), so that the first
        request does not wait for them; no request or cached state changes."""
        N = self.num_slots
        with self._step_lock:
            for rows in self.prefill_row_shapes:
                self._run_chunks([self._zero_row()] * rows, [()] * rows, count=False)
            for size in self.prefill_chunk_shapes:
                [(logits, states)] = self._run_chunks([self._zero_row()], [()], count=False, size=size)
            self._draw_first(logits, _key_data(0), SamplingParams())
            with self._lock:
                free = [j for j, r in enumerate(self._slots) if r is None]
                args = self._step_args(np.zeros(N, bool))
            if free:  # a free slot's contents are overwritten when a request takes it
                self._insert(free[0], states, logits)
            tokens = self._decode_slots(args)  # every slot is padding: nothing changes
            if self.prefix_cache.max_bytes:
                self._extract(0)
            jax.block_until_ready(tokens)

    def step_all_slots(self) -> jax.Array:
        """One decode step with every slot active and greedy, for timing the bare step at batch ``num_slots``.

        The same compiled program as the serving loop's step. It overwrites every slot's states and logits, so it
        runs only on an idle engine (not started, no request admitted, none waiting); a request admitted later
        overwrites its slot again.

        Returns:
            The drawn tokens (num_slots,), not waited for (the step runs asynchronously).

        Raises:
            RuntimeError: the engine is running or holds requests.
        """
        if (self._thread is not None and self._thread.is_alive()) or self._has_work() or self._prefill:
            raise RuntimeError("step_all_slots needs an idle engine: not started, with no request admitted or waiting")
        N = self.num_slots
        with self._step_lock:
            self._done = self._place(jnp.zeros(N, bool), lambda layout: layout.slot_rows)
            args = (np.ones(N, bool), np.full(N, -1, np.int32), self._keys.copy(), self._t.copy())
            args += (np.zeros(N, np.float32), np.zeros(N, np.int32), np.ones(N, np.float32))
            args += (np.full_like(self._stop_ids, -1),)
            return self._decode_slots(args)

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _wake_up(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                worked = self.step()
            except Exception as e:  # end every stream rather than leave clients waiting forever
                logger.exception("serving engine iteration failed")
                self.error = e
                with self._lock:
                    requests = [r for r in self._slots if r is not None] + list(self._waiting)
                    self._waiting.clear()
                    self._prefill = []
                    self._inflight.clear()
                    for slot in range(self.num_slots):
                        self._free(slot)
                for request in requests:
                    self._finish(request, "error", None)
                return
            if not worked:
                with self._wake:
                    if not self._has_work():
                        self._wake.wait(timeout=0.1)

    def _has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting) or bool(self._inflight) or any(r is not None for r in self._slots)

    # ------------------------------------------------------------------------------------------- requests

    def _check_prompt(self, prompt_ids: Any, name: str = "prompt_ids") -> tuple[int, ...]:
        if isinstance(prompt_ids, str | bytes):
            raise TypeError(f"{name} must be token ids (a sequence of ints), got text; encode it first")
        if isinstance(prompt_ids, np.ndarray | jax.Array):
            if prompt_ids.ndim != 1 or not np.issubdtype(prompt_ids.dtype, np.integer):
                raise TypeError(f"{name} must be a 1-D integer array, got {prompt_ids.dtype}{list(prompt_ids.shape)}")
            prompt_ids = np.asarray(prompt_ids).tolist()
        if not isinstance(prompt_ids, Sequence):
            raise TypeError(f"{name} must be a sequence of ints, got {type(prompt_ids).__name__}")
        V = self.config.vocab_size
        ids = _int_array(prompt_ids)
        if ids is not None and not np.any((ids < 0) | (ids >= V)):  # one array check: tens of microseconds
            return tuple(ids.tolist())
        # Otherwise the checks one id at a time, which name the first offending entry.
        wrong = [(i, t) for i, t in enumerate(prompt_ids) if not _is_int(t)]
        if wrong:
            raise TypeError(f"{name} must be ints, got {type(wrong[0][1]).__name__} {wrong[0][1]!r} at {wrong[0][0]}")
        if not prompt_ids:
            raise ValueError(f"{name} is empty: a prompt needs at least one token")
        bad = [(i, t) for i, t in enumerate(prompt_ids) if not 0 <= t < V]
        if bad:
            raise ValueError(f"{name} token ids must lie in [0, vocab_size={V}); {name}[{bad[0][0]}] is {bad[0][1]}")
        return tuple(int(t) for t in prompt_ids)

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams = SamplingParams()) -> RequestStream:
        """Queues a request; returns its stream at once.

        Args:
            prompt_ids: The prompt's token ids (1 to ``max_prompt_tokens`` ids in [0, vocab_size)).
            sampling: The request's sampling settings.

        Raises:
            TypeError: prompt_ids that are not token ids, or sampling that is not a SamplingParams.
            ValueError: an empty prompt, a token id out of range, a prompt longer than max_prompt_tokens, or a
                stop token id >= vocab_size.
            EngineOverloaded: ``max_queue`` requests already wait.
        """
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        prompt = self._check_prompt(prompt_ids)
        if len(prompt) > self.max_prompt_tokens:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens, more than max_prompt_tokens={self.max_prompt_tokens}"
            )
        V = self.config.vocab_size
        bad = [t for t in sampling.stop_token_ids if t >= V]
        if bad:
            raise ValueError(f"stop_token_ids must lie in [0, vocab_size={V}), got {bad}")
        seed = sampling.seed if sampling.seed is not None else secrets.randbelow(MAX_SEED)
        stream = RequestStream(uuid.uuid4().hex, self)
        request = _Request(prompt, sampling, _key_data(seed), stream)
        stream._request = request
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise EngineOverloaded(
                    f"{len(self._waiting)} requests wait for a slot (max_queue={self.max_queue}); retry later"
                )
            self._waiting.append(request)
        self._wake_up()
        return stream

    # ------------------------------------------------------------------------------------------ iteration

    def step(self) -> bool:
        """Runs one iteration (cancellations, admission, one prefill chunk of the requests being prefilled, one
        decode step).

        Returns:
            Whether any work was done.
        """
        with self._step_lock:
            worked = self._handle_cancelled()
            worked |= self._admit()
            worked |= self._prefill_step()
            worked |= self._decode()
            return worked

    def _handle_cancelled(self) -> bool:
        ended = []
        with self._lock:
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
                ended.append(request)
            for slot, request in enumerate(self._slots):
                if request is not None and request.cancelled:
                    self._prefill = [job for job in self._prefill if job.request is not request]
                    self._free(slot)
                    ended.append(request)
        for request in ended:
            self._finish(request, "cancelled", None)
        return bool(ended)

    def _free(self, slot: int) -> None:
        self._slots[slot] = None
        self._active[slot] = False

    def _admit(self) -> bool:
        """Starts prefilling waiting requests, in arrival order, while a slot is free and fewer than
        ``max_prefill_rows`` requests are being prefilled."""
        admitted = []
        with self._lock:
            while self._waiting and None in self._slots and len(self._prefill) + len(admitted) < self.max_prefill_rows:
                request = self._waiting.popleft()
                slot = self._slots.index(None)
                self._slots[slot] = request
                admitted.append((request, slot))
        for request, slot in admitted:
            done, entry = self.prefix_cache.lookup(request.prompt) if self.prefix_cache.max_bytes else (0, None)
            if entry is None:
                self._prefill.append(_Prefill(request, slot, self._zero_row(), None, 0))
            else:
                self._prefill.append(_Prefill(request, slot, entry.states, entry.logits, done))
        return bool(admitted)

    def _run_chunks(
        self,
        rows: Sequence[ModelStates],
        tokens: Sequence[Sequence[int]],
        count: bool = True,
        size: int | None = None,
    ) -> list[tuple[jax.Array, ModelStates]]:
        """Prefills ``tokens[i]`` (at most ``prefill_chunk_tokens`` each) from ``rows[i]`` for every i, as one
        left-padded batch: alone in the smallest chunk shape that holds the tokens (``size``: of that shape), else
        in the smallest row count of ``prefill_row_shapes`` that holds them (padded with empty rows), at
        ``prefill_chunk_tokens`` columns. Returns each row's last logits (1, V) and states after the chunk."""
        r = len(rows)
        if r == 1:
            if size is None:
                size = self.prefill_chunk_shapes[bisect.bisect_left(self.prefill_chunk_shapes, len(tokens[0]))]
            height = 1
        else:
            size = self.prefill_chunk_tokens
            height = self.prefill_row_shapes[bisect.bisect_left(self.prefill_row_shapes, r)]
            rows = [*rows, *[self._zero_row()] * (height - r)]
        ids = np.zeros((height, size), np.int32)
        valid = np.zeros((height, size), bool)
        for i, row_tokens in enumerate(tokens):
            if row_tokens:
                ids[i, size - len(row_tokens) :] = row_tokens
                valid[i, size - len(row_tokens) :] = True
        with self._chunk_lock, self._on_mesh():
            # The chunk's buffers of this shape (made on first use), taken out while the programs donate them.
            work = self._chunk_work.pop(height, None) or self._new_chunk_work(height)
            chunk_tokens = self._chunk_tokens.pop((height, size), None) or self._new_chunk_tokens(height, size)
            ids, valid = self._replicated((ids, valid))
            work, chunk_tokens = _load_chunk(self._layout, work, chunk_tokens, tuple(rows), ids, valid)
            work, chunk_tokens = self._chunk_program(size)(
                self.config, self.runtime, self._layout, self.params, work, chunk_tokens
            )
            logits, states = _split_chunk(self._layout, work)
            work, chunk_tokens = self._place((work, chunk_tokens), _chunk_layouts)
            self._chunk_work[height], self._chunk_tokens[(height, size)] = work, chunk_tokens
            out = [
                self._place((lg, st), lambda layout: (layout.replicated, layout.row))
                for lg, st in zip(logits[:r], states[:r], strict=True)
            ]
        if count:
            with self._lock:
                self._prefill_tokens += sum(len(t) for t in tokens)
                self._prefill_chunks += 1
        return out

    def _chunk_program(self, size: int) -> Callable[..., tuple[_ChunkWork, _ChunkTokens]]:
        """The jitted chunk program that runs chunks of ``size`` columns: ``_prefill_chunk_stable`` with
        ``stable_scratch``; else ``_prefill_chunk`` at the full size (and every size with
        ``short_chunk_command_buffers``), ``_prefill_short_chunk`` below it."""
        if self.stable_scratch:
            return _prefill_chunk_stable()
        if size == self.prefill_chunk_tokens or self.short_chunk_command_buffers:
            return _prefill_chunk
        return _prefill_short_chunk

    def _draw_first(self, logits: jax.Array, key_data: np.ndarray, sampling: SamplingParams) -> int:
        """A request's first token, drawn from its prompt's logits (1, V) on the device; waits for it."""
        args = (key_data[None], np.float32([sampling.temperature]), np.int32([sampling.top_k]))
        args += (np.float32([sampling.top_p]),)
        with self._on_mesh():
            return int(np.asarray(_first_token(self._layout, logits, *self._replicated(args)))[0])

    def _insert(self, slot: int, states: ModelStates, logits: jax.Array) -> None:
        """Writes one request's states (L, 1, ...) and logits (1, V) into ``slot``, and clears its done flag."""
        with self._on_mesh():
            index = self._replicated(np.int32(slot))
            out = _insert(self._layout, self._states, self._logits, self._done, index, states, logits)
            self._states, self._logits, self._done = self._place(
                out, lambda layout: (layout.slots, layout.slot_rows, layout.slot_rows)
            )

    def _extract(self, slot: int) -> PrefixEntry:
        """A copy of ``slot``'s states and logits, laid out as a prefilled request's."""
        with self._on_mesh():
            entry = _extract(self._layout, self._states, self._logits, self._replicated(np.int32(slot)))
            return self._place(entry, lambda layout: PrefixEntry(layout.row, layout.replicated))

    def _step_args(self, active: np.ndarray) -> tuple[np.ndarray, ...]:
        """The decode step's per-slot arguments for the slots ``active`` (N,) bool, from the host's tables (called
        under the lock): active, forced tokens, keys, t, temperature, top_k, top_p, stop ids."""
        args = (active, self._forced.copy(), self._keys.copy(), self._t.copy(), self._temperature.copy())
        return args + (self._top_k.copy(), self._top_p.copy(), self._stop_ids.copy())

    def _decode_slots(self, args: tuple[np.ndarray, ...]) -> jax.Array:
        """Queues one decode step over every slot with the per-slot ``args`` (:meth:`_step_args`); returns the
        drawn tokens (N,) (-1 where a slot did not run), not waited for."""
        with self._on_mesh():
            if self._layout is not None:
                args = jax.device_put(args, self._layout.slot_rows)
            tokens, *out = _decode_step(
                self.config, self.runtime, self._layout, self.params, self._states, self._logits, self._done, *args
            )
            self._states, self._logits, self._done = self._place(
                tuple(out), lambda layout: (layout.slots, layout.slot_rows, layout.slot_rows)
            )
        return tokens

    def _chunks(self, start: int, end: int) -> list[tuple[int, int]]:
        """The chunks of positions [start, end): a short one first (left-padded, like a padded prompt), then full."""
        C = self.prefill_chunk_tokens
        first = start + ((end - start) % C or C)
        return [(start, first)] + [(s, s + C) for s in range(first, end, C)]

    def _prefill_step(self) -> bool:
        """Runs the next chunk of every request being prefilled, as one batch; each request whose prompt is then
        complete draws and sends its first token and moves into its slot."""
        if not self._prefill:
            return False
        pending = [job for job in self._prefill if job.done < len(job.request.prompt)]
        finished_here = []  # prompts whose last chunk runs now (a prompt found whole in the cache is there already)
        if pending:
            spans = [self._chunks(job.done, len(job.request.prompt))[0] for job in pending]
            out = self._run_chunks(
                [job.states for job in pending],
                [job.request.prompt[a:b] for job, (a, b) in zip(pending, spans, strict=True)],
            )
            for job, (_, end), (logits, states) in zip(pending, spans, out, strict=True):
                job.logits, job.states, job.done = logits, states, end
                if end == len(job.request.prompt):
                    finished_here.append(job)
        ready = [job for job in self._prefill if job.done == len(job.request.prompt)]
        self._prefill = [job for job in self._prefill if job.done < len(job.request.prompt)]
        for job in ready:
            self._start_decoding(job)
        if self.prefix_cache.max_bytes:  # after the first tokens went out: the cache's bookkeeping is not theirs
            for job in finished_here:
                self.prefix_cache.put(job.request.prompt, PrefixEntry(job.states, job.logits))
        return True

    def _start_decoding(self, job: _Prefill) -> None:
        """Draws a prefilled request's first token, sends it, and writes the request into its slot."""
        request, slot, sampling = job.request, job.slot, job.request.sampling
        # The first token is drawn now and goes out at once, unless it ends the request: then it goes out with its
        # finish reason after the slot's first decode step has fed it (the states a conversation cache keeps).
        token = self._draw_first(job.logits, request.key_data, sampling)
        request.early = token not in sampling.stop_token_ids and sampling.max_tokens > 1
        if request.early:
            self._hand_out_token(request, token, final=False)
        self._insert(slot, job.states, job.logits)
        stop = sorted(set(sampling.stop_token_ids))
        with self._lock:
            self._keys[slot] = request.key_data
            self._t[slot] = 0
            self._forced[slot] = token  # the slot's first step feeds this token rather than drawing it again
            self._temperature[slot] = sampling.temperature
            self._top_k[slot] = sampling.top_k
            self._top_p[slot] = sampling.top_p
            self._stop_ids[slot] = -1
            self._stop_ids[slot, : len(stop)] = stop
            self._active[slot] = True

    def _hand_out_token(self, request: _Request, token: int, final: bool) -> None:
        """Records a request's next token; sends it unless it is the ``final`` one (:meth:`_finish` sends that)."""
        now = time.perf_counter()
        with self._lock:
            request.generated.append(token)
            self._tokens_generated += 1
            if request.last_token_time is None:
                self._ttft.observe(now - request.submitted)
            else:
                self._itl.observe(now - request.last_token_time)
            request.last_token_time = now
        if not final:
            request.stream._push(TokenEvent(token, None))

    def _decode(self) -> bool:
        """Queues one decode step over the running slots, then hands out the tokens of the step queued before it:
        the host reads one step's tokens while the next runs, so the device does not wait for the host.

        A slot's last step is known when it is queued (``max_tokens``), so no later step runs it; a stop token is
        known to the host one step late, but the step marks the slot done on the device, so the step queued after
        it leaves the slot as it was.
        """
        with self._lock:
            running = self._active.copy()
            batch = [(int(j), self._slots[j], int(self._t[j])) for j in np.flatnonzero(running)]
            if batch:
                args = self._step_args(running)
                for j, request, t in batch:
                    self._t[j] = t + 1
                    self._forced[j] = -1
                    if t + 1 >= request.sampling.max_tokens:
                        self._active[j] = False  # this step draws its last token
                self._decode_steps += 1
        if batch:
            self._inflight.append((self._decode_slots(args), batch))
        if len(self._inflight) > 1 or (self._inflight and not batch):
            self._hand_out(*self._inflight.popleft())
            return True
        return bool(batch)

    def _hand_out(self, tokens: jax.Array, batch: list[tuple[int, _Request, int]]) -> None:
        """Sends the tokens (N,) of one decode step to the requests that ran in it; frees the slots of those that
        end (a stop token, or max_tokens)."""
        tokens = np.asarray(tokens)
        finished = []
        with self._lock:  # the requests that still hold their slots: others ended after the step was queued
            batch = [(slot, r, t) for slot, r, t in batch if self._slots[slot] is r and not r.cancelled]
        for slot, request, t in batch:
            token = int(tokens[slot])
            if token < 0 or (t == 0 and request.early):
                continue  # done on the device; or the first token, sent when the prefill ended
            reason = None
            if token in request.sampling.stop_token_ids:
                reason = "stop"
            elif len(request.generated) + 1 >= request.sampling.max_tokens:
                reason = "length"
            self._hand_out_token(request, token, final=reason is not None)
            if reason is not None:
                finished.append((slot, request, token, reason))
        for slot, request, token, reason in finished:
            if self.prefix_cache.max_bytes:  # the conversation so far: the prompt and every token fed after it
                entry = self._extract(slot)
                self.prefix_cache.put(request.prompt + tuple(request.generated), entry)
            with self._lock:
                self._free(slot)
            self._finish(request, reason, token)

    def _finish(self, request: _Request, reason: str, token: int | None) -> None:
        with self._lock:
            self._finished[reason] += 1
        request.stream._push(TokenEvent(token, reason))

    # ---------------------------------------------------------------------------------------- prefix states

    def _states_after(self, prompt: tuple[int, ...]) -> PrefixEntry:
        """The states and logits after ``prompt``: from the cache, or prefilled from its longest cached prefix
        (and then cached)."""
        if self.prefix_cache.max_bytes:
            done, entry = self.prefix_cache.lookup(prompt)
        else:
            done, entry = 0, None
        if done == len(prompt):
            return entry
        states = self._zero_row() if entry is None else entry.states
        logits = None
        for start, end in self._chunks(done, len(prompt)):
            [(logits, states)] = self._run_chunks([states], [prompt[start:end]])
        entry = PrefixEntry(states, logits)
        if self.prefix_cache.max_bytes:
            self.prefix_cache.put(prompt, entry)
        return entry

    def cache_prefix(self, prompt_ids: Sequence[int]) -> int:
        """Prefills ``prompt_ids`` (e.g. a shared system prompt) into the prefix cache now, in the caller's thread.

        Returns:
            The number of tokens prefilled (0 if the prefix was cached already).

        Raises:
            ValueError: no prefix cache (``prefix_cache_bytes=0``), or a bad prompt (see :meth:`submit`).
        """
        if not self.prefix_cache.max_bytes:
            raise ValueError("cache_prefix needs a prefix cache: the engine has prefix_cache_bytes=0")
        prompt = self._check_prompt(prompt_ids)
        before = self._prefill_tokens
        self._states_after(prompt)
        return self._prefill_tokens - before

    def save_state(self, prompt_ids: Sequence[int], path: str | os.PathLike) -> None:
        """Writes the states after ``prompt_ids`` (a conversation so far) to ``path`` (npz), in one call.

        The states come from the prefix cache when it holds them (e.g. a finished request's prompt plus its
        generated tokens), else the prompt is prefilled. The file is written next to ``path`` under a temporary
        name and renamed, so a reader never sees a partial file.

        Raises:
            ValueError: a bad prompt (see :meth:`submit`).
        """
        prompt = self._check_prompt(prompt_ids)
        entry = self._states_after(prompt)
        arrays = {"prompt_ids": np.asarray(prompt, np.int64)}
        for name, x in (*zip(ModelStates._fields, entry.states, strict=True), ("logits", entry.logits)):
            x = np.asarray(x)
            arrays[name] = x.view(f"u{x.dtype.itemsize}")  # raw bits: exact for any float dtype (bfloat16 too)
            arrays[f"{name}_dtype"] = np.asarray(str(x.dtype))
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_state(self, path: str | os.PathLike) -> list[int]:
        """Reads a file of :meth:`save_state` into the prefix cache; returns its prompt ids.

        A request whose prompt extends the returned ids then prefills only its new tokens.

        Raises:
            ValueError: the file does not hold states of this model's shapes and state dtype, or the prefix
                cache cannot hold them (``prefix_cache_bytes`` too small).
        """
        with np.load(Path(path), allow_pickle=False) as data:
            missing = [k for k in ("prompt_ids", *ModelStates._fields, "logits") if k not in data.files]
            if missing:
                raise ValueError(f"{path} is not a saved conversation state: it lacks {missing}")
            prompt = self._check_prompt(data["prompt_ids"].tolist(), name=f"prompt_ids in {path}")
            loaded = {}
            for name in (*ModelStates._fields, "logits"):
                loaded[name] = data[name].view(jnp.dtype(str(data[f"{name}_dtype"])))
        want = jax.eval_shape(lambda: ModelStates.zeros(self.config, 1))
        expected = {name: (tuple(w.shape), w.dtype) for name, w in zip(ModelStates._fields, want, strict=True)}
        expected["logits"] = ((1, self.config.vocab_size), jnp.dtype(jnp.float32))
        for name, (shape, dtype) in expected.items():
            got = loaded[name]
            if tuple(got.shape) != shape or got.dtype != dtype:
                raise ValueError(
                    f"{path}: {name} is {got.dtype}{list(got.shape)}, but this model's is {dtype}{list(shape)}"
                )
        entry = self._place(
            PrefixEntry(ModelStates(*(loaded[k] for k in ModelStates._fields)), loaded["logits"]),
            lambda layout: PrefixEntry(layout.row, layout.replicated),
        )
        if not self.prefix_cache.put(prompt, entry):
            raise ValueError(
                f"the prefix cache cannot hold the loaded state: prefix_cache_bytes={self.prefix_cache.max_bytes}, "
                f"the state takes {sum(int(x.nbytes) for x in loaded.values())} bytes"
            )
        return list(prompt)

    # ---------------------------------------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for monitoring.

        Returns:
            A dict with ``queue_length`` (requests waiting for a slot), ``slots_in_use`` (slots held by a request
            being prefilled or generating), ``running`` (requests generating: their slots decode), ``num_slots``,
            ``tokens_generated_total``, ``requests_finished_total``, ``requests_finished_by_reason`` (a dict
            reason -> count), ``prefill_tokens_total`` (prompt tokens run through the model, cache hits
            excluded), ``prefill_chunks_total`` (prefill programs run: a batch of several requests' chunks counts
            once), ``decode_steps_total``, ``prefix_cache_hits_total``, ``prefix_cache_misses_total``,
            ``prefix_cache_evictions_total``, ``prefix_cache_entries``, ``prefix_cache_bytes``,
            ``prefix_cache_max_bytes``, and two latency histograms in seconds, ``time_to_first_token_seconds``
            (submit to first token) and ``inter_token_latency_seconds`` (between a request's consecutive tokens),
            each a dict of ``buckets`` (upper bounds, ``LATENCY_BUCKETS``), ``counts`` (observations per bucket,
            not cumulative, one more than ``buckets``: the last is +inf), ``sum`` and ``count``.
        """
        cache = self.prefix_cache.stats()
        with self._lock:
            return {
                "queue_length": len(self._waiting),
                "slots_in_use": sum(r is not None for r in self._slots),
                "running": int(self._active.sum()),
                "num_slots": self.num_slots,
                "tokens_generated_total": self._tokens_generated,
                "requests_finished_total": sum(self._finished.values()),
                "requests_finished_by_reason": dict(self._finished),
                "prefill_tokens_total": self._prefill_tokens,
                "prefill_chunks_total": self._prefill_chunks,
                "decode_steps_total": self._decode_steps,
                "prefix_cache_hits_total": cache["hits"],
                "prefix_cache_misses_total": cache["misses"],
                "prefix_cache_evictions_total": cache["evictions"],
                "prefix_cache_entries": cache["entries"],
                "prefix_cache_bytes": cache["bytes"],
                "prefix_cache_max_bytes": cache["max_bytes"],
                "time_to_first_token_seconds": self._ttft.as_dict(),
                "inter_token_latency_seconds": self._itl.as_dict(),
            }

    @staticmethod
    def compilations() -> dict[str, int]:
        """How many programs each jitted function of the engine has compiled (for checking that nothing recompiles)."""
        return {
            "decode_step": _decode_step._cache_size(),
            "load_chunk": _load_chunk._cache_size(),
            "prefill_chunk": _prefill_chunk._cache_size(),
            "prefill_short_chunk": _prefill_short_chunk._cache_size(),
            "prefill_chunk_stable": _prefill_chunk_stable()._cache_size() if stable_scratch_supported() else 0,
            "split_chunk": _split_chunk._cache_size(),
            "first_token": _first_token._cache_size(),
            "insert": _insert._cache_size(),
            "extract": _extract._cache_size(),
        }
