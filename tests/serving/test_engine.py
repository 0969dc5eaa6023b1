"""The serving engine: outputs equal to generate, slots coming and going without recompilation, per-request
sampling, cancellation, overload, the prefix-state cache and saved states."""

from __future__ import annotations

import asyncio
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.fixture import load
from xlstm_jax.generation import SamplingConfig, generate
from xlstm_jax.models.xlstm_parallel.model import ModelStates
from xlstm_jax.serving import Engine, EngineOverloaded, SamplingParams, TokenEvent
from xlstm_jax.serving import engine as serving_engine
from xlstm_jax.serving.engine import auto_stable_scratch, stable_scratch_allocator_note, stable_scratch_supported
from xlstm_jax.serving.prefix_cache import PrefixEntry, entry_nbytes

NUM_SLOTS = 3
CHUNK = 8  # prefill chunk: the prompts below span one to three chunks, with a remainder
PROMPTS = ([5, 6, 7], [(7 * i + 3) % 97 for i in range(19)], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])


@pytest.fixture(scope="module")
def model():
    return load()


def _engine(model, **kwargs) -> Engine:
    config, params, runtime = model
    kwargs = {"num_slots": NUM_SLOTS, "prefill_chunk_tokens": CHUNK, "max_prompt_tokens": 64, **kwargs}
    return Engine(config, params, runtime=runtime, **kwargs)


@pytest.fixture(scope="module")
def engine(model):
    return _engine(model)


@pytest.fixture(scope="module")
def cached_engine(model):
    return _engine(model, prefix_cache_bytes=1 << 20)


@functools.cache
def _reference(prompt: tuple[int, ...], n: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed=0):
    """``generate`` run alone on one prompt (no stop tokens)."""
    config, params, runtime = load()
    sampling = SamplingConfig(temperature, top_k, top_p)
    out = generate(config, params, [list(prompt)], n, sampling=sampling, key=jax.random.key(seed), stop_tokens=[],
                   runtime=runtime)  # fmt: skip
    return out.tokens[0].tolist()


def _drain(engine: Engine) -> None:
    while engine.step():
        pass


def _tokens(stream) -> tuple[list[int], str]:
    events = list(stream)
    assert all(e.finish_reason is None for e in events[:-1])
    return [e.token_id for e in events if e.token_id is not None], events[-1].finish_reason


def test_greedy_concurrent_requests_equal_generate(engine):
    lengths = (7, 4, 9)
    streams = [engine.submit(p, SamplingParams(max_tokens=n)) for p, n in zip(PROMPTS, lengths, strict=True)]
    for _ in range(5):  # the first two are prefilled and decoding when more arrive
        engine.step()
    assert engine.stats()["slots_in_use"] == NUM_SLOTS
    late = [engine.submit(PROMPTS[1][:13], SamplingParams(max_tokens=5)), engine.submit([42], SamplingParams())]
    assert engine.stats()["queue_length"] == 2  # every slot is taken
    _drain(engine)
    for p, n, s in zip(PROMPTS, lengths, streams, strict=True):
        assert _tokens(s) == (_reference(tuple(p), n), "length")
    assert _tokens(late[0]) == (_reference(tuple(PROMPTS[1][:13]), 5), "length")
    assert _tokens(late[1]) == (_reference((42,), 16), "length")
    stats = engine.stats()
    assert stats["slots_in_use"] == 0 and stats["queue_length"] == 0
    assert stats["tokens_generated_total"] >= sum(lengths) + 5 + 16


def test_stops_seen_a_step_late_leave_the_conversation_state_exact(cached_engine):
    """The host reads a step's tokens while the next step runs, so it learns of a stop token one step late; the
    step after a stop must leave the slot alone, or the cached conversation would have seen one token too many."""
    neighbour = cached_engine.submit(PROMPTS[0], SamplingParams(max_tokens=20))  # keeps steps queued meanwhile
    # (prompt, index of the stop token in its greedy output or None, max_tokens); distinct conversations
    cases = {"middle": (PROMPTS[2], 3, 9), "first": (PROMPTS[2][1:], 0, 9), "one token": (PROMPTS[2][2:], None, 1)}
    for name, (prompt, stop_at, max_tokens) in cases.items():
        prompt = tuple(prompt)
        ref = _reference(prompt, 9)
        stop_ids = () if stop_at is None else (ref[stop_at],)
        stream = cached_engine.submit(prompt, SamplingParams(max_tokens=max_tokens, stop_token_ids=stop_ids))
        while not stream.finished:
            cached_engine.step()
        tokens, reason = _tokens(stream)
        want = ref[: ref.index(ref[stop_at]) + 1] if stop_at is not None else ref[:1]
        assert (tokens, reason) == (want, "length" if stop_at is None else "stop"), name
        turn = [31, 32, 33]
        before = cached_engine.stats()["prefill_tokens_total"]
        after = cached_engine.submit(list(prompt) + tokens + turn, SamplingParams(max_tokens=4))
        _drain(cached_engine)
        assert cached_engine.stats()["prefill_tokens_total"] - before == len(turn), name  # the conversation hit
        assert _tokens(after)[0] == _reference(prompt + tuple(tokens + turn), 4), name
    _drain(cached_engine)
    assert _tokens(neighbour) == (_reference(tuple(PROMPTS[0]), 20), "length")


_STABLE = [
    pytest.param(
        True, marks=pytest.mark.skipif(not stable_scratch_supported(), reason="XLA without a stable scratch mode")
    ),
    False,
]


@pytest.mark.parametrize("stable", _STABLE)
@pytest.mark.parametrize("command_buffers", [False, True])
def test_short_chunks_run_in_smaller_shapes(model, stable, command_buffers):
    """A prompt's short first chunk, prefilled alone, runs in the smallest of prefill_chunk_tokens, its half, ...
    (down to min_prefill_chunk_tokens) that holds it: with stable scratch every shape in the one program; else the
    short shapes in the program without command buffers unless asked for. Outputs equal generate, and warmup
    compiles every shape."""
    engine = _engine(
        model, prefill_chunk_tokens=32, min_prefill_chunk_tokens=8, max_prefill_rows=1, stable_scratch=stable,
        short_chunk_command_buffers=command_buffers,
    )  # fmt: skip
    assert engine.prefill_chunk_shapes == (8, 16, 32) and engine.prefill_row_shapes == ()
    if stable:
        want = [serving_engine._prefill_chunk_stable] * 3
    else:
        short = serving_engine._prefill_chunk if command_buffers else serving_engine._prefill_short_chunk
        want = [short, short, serving_engine._prefill_chunk]
    assert [engine._chunk_program(n) for n in (8, 16, 32)] == want
    engine.warmup()
    before = Engine.compilations()
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1] * 2 + [1, 2]]  # 3, 19 and 40 = 8 + 32 tokens
    streams = [engine.submit(p, SamplingParams(max_tokens=5)) for p in prompts]
    _drain(engine)
    for p, s in zip(prompts, streams, strict=True):
        assert _tokens(s) == (_reference(tuple(p), 5), "length")
    assert engine.stats()["prefill_chunks_total"] == 4
    assert Engine.compilations() == before


def test_prefill_chunks_run_in_the_same_buffers_every_time(model):
    """Every prefill chunk program reads and writes one set of buffers per shape (donated, written in place), so
    that a GPU's recorded command buffers never see a buffer move; requests batched, alone, from the prefix cache
    and from cache_prefix all go through them, with outputs equal to generate."""
    engine = _engine(model, num_slots=4, max_prefill_rows=2, min_prefill_chunk_tokens=4, prefix_cache_bytes=1 << 20)
    engine.warmup()
    assert sorted(engine._chunk_work) == [1, 2]  # one request alone; two together
    assert sorted(engine._chunk_tokens) == [(1, 4), (1, 8), (2, 8)]

    def addresses():  # by row count, and by (row count, tokens)
        buffers = {**engine._chunk_work, **engine._chunk_tokens}
        return {key: [x.unsafe_buffer_pointer() for x in jax.tree.leaves(b)] for key, b in buffers.items()}

    before = addresses()
    engine.cache_prefix(PROMPTS[1])  # 3 + 8 + 8 tokens, alone
    prompts = [PROMPTS[1] + [1, 2], PROMPTS[0], PROMPTS[2]]  # a cache hit (2 new tokens), then two together
    streams = [engine.submit(p, SamplingParams(max_tokens=3)) for p in prompts]
    _drain(engine)
    for p, s in zip(prompts, streams, strict=True):
        assert _tokens(s) == (_reference(tuple(p), 3), "length")
    assert engine.stats()["prefix_cache_hits_total"] >= 1
    assert addresses() == before


def test_waiting_requests_are_prefilled_together(model):
    """Requests that wait together are prefilled as one batch (up to max_prefill_rows, in 2, 4, ... rows), each from
    its own states and at its own position in its prompt; outputs equal generate, with nothing compiled after
    warmup."""
    engine = _engine(model, num_slots=6, max_prefill_rows=3)
    assert engine.prefill_row_shapes == (2, 3)
    engine.warmup()
    before = Engine.compilations()
    # 3, 19 (3 + 8 + 8), 11 (3 + 8), 5, 40 (8 + 4 * 8) and 2 tokens: the first three start together, the others
    # join as rows free up, so a batch mixes first chunks (left-padded) with later ones.
    prompts = [*PROMPTS, PROMPTS[2][:5], PROMPTS[1] * 2 + [1, 2], [9, 8]]
    streams = [engine.submit(p, SamplingParams(max_tokens=4)) for p in prompts]
    chunks = []
    while engine.step():
        chunks.append(engine.stats()["prefill_chunks_total"])
    for p, s in zip(prompts, streams, strict=True):
        assert _tokens(s) == (_reference(tuple(p), 4), "length")
    # Batches: {3, 19, 11} -> {19, 11, 5} -> {19, 40, 2} -> {40} x 4: 7 programs for 12 chunks.
    assert engine.stats()["prefill_chunks_total"] == 7
    assert engine.stats()["prefill_tokens_total"] == sum(map(len, prompts))
    assert Engine.compilations() == before


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31, 2**32 - 1])
def test_request_keys_are_jax_keys_of_their_seeds(seed, impl):
    """A request's key data (written out for threefry keys, computed on the host's CPU device for others) is
    jax.random.key(seed)'s on the default device, in its dtype and shape."""
    with jax.default_prng_impl(impl):
        data = serving_engine._key_data(seed)
        expected = np.asarray(jax.random.key_data(jax.random.key(seed)))
    assert isinstance(data, np.ndarray) and data.dtype == expected.dtype and data.shape == expected.shape
    np.testing.assert_array_equal(data, expected)


def test_stop_tokens_and_max_tokens(engine):
    ref = _reference(tuple(PROMPTS[2]), 9)
    stop = ref[4]
    first = ref.index(stop)
    s_stop = engine.submit(PROMPTS[2], SamplingParams(max_tokens=9, stop_token_ids=(stop, 98)))
    s_len = engine.submit(PROMPTS[2], SamplingParams(max_tokens=2, stop_token_ids=(98,) if 98 not in ref[:2] else ()))
    _drain(engine)
    assert _tokens(s_stop) == (ref[: first + 1], "stop")  # the stop token is the last event's token
    assert _tokens(s_len) == (ref[:2], "length")


def test_cancel_frees_the_slot(engine):
    streams = [engine.submit(p, SamplingParams(max_tokens=1000)) for p in PROMPTS]
    while engine.stats()["tokens_generated_total"] == 0 or engine.stats()["queue_length"]:
        engine.step()
    for _ in range(8):
        engine.step()
    assert engine.stats()["slots_in_use"] == NUM_SLOTS
    streams[1].cancel()
    engine.step()
    assert engine.stats()["slots_in_use"] == NUM_SLOTS - 1
    tokens, reason = _tokens(streams[1])
    assert reason == "cancelled" and len(tokens) >= 1
    newcomer = engine.submit(PROMPTS[0], SamplingParams(max_tokens=6))
    engine.step()
    assert engine.stats()["slots_in_use"] == NUM_SLOTS
    for _ in range(12):
        engine.step()
    assert _tokens(newcomer) == (_reference(tuple(PROMPTS[0]), 6), "length")
    waiting = engine.submit(PROMPTS[0], SamplingParams(max_tokens=3))
    waiting.cancel()  # cancelled before it got a slot
    for s in (streams[0], streams[2]):
        s.cancel()
    _drain(engine)
    assert _tokens(waiting) == ([], "cancelled")
    assert engine.stats()["slots_in_use"] == 0


def test_long_prompt_is_prefilled_between_decode_steps(engine):
    running = engine.submit(PROMPTS[0], SamplingParams(max_tokens=12))
    while engine.stats()["running"] == 0:  # until it decodes
        engine.step()
    assert engine.stats()["tokens_generated_total"] >= 1  # its first token went out when its prefill ended
    long_prompt = PROMPTS[1] * 2 + [1, 2]  # 40 tokens: 5 chunks
    late = engine.submit(long_prompt, SamplingParams(max_tokens=2))
    # An iteration queues a decode step and hands out the tokens of the step before it. The first hands out none
    # (the step before fed the running stream's first token, sent with its prefill), the next one each, and the
    # last also the long prompt's first token, drawn after its last chunk.
    for k, new_tokens in enumerate((0, 1, 1, 1, 2)):  # a chunk and a decode step per iteration
        before = engine.stats()
        engine.step()
        after = engine.stats()
        assert after["prefill_chunks_total"] == before["prefill_chunks_total"] + 1
        assert after["decode_steps_total"] == before["decode_steps_total"] + 1
        assert after["tokens_generated_total"] == before["tokens_generated_total"] + new_tokens, k
    _drain(engine)
    assert _tokens(running) == (_reference(tuple(PROMPTS[0]), 12), "length")
    assert len(_tokens(late)[0]) == 2


def test_no_recompilation_after_warmup(engine):
    engine.warmup()
    before = Engine.compilations()
    assert min(before["decode_step"], before["prefill_chunk"], before["insert"]) >= 1  # compiled by warmup
    busy = engine.submit(PROMPTS[1], SamplingParams(max_tokens=40))
    for _ in range(4):
        engine.step()
    engine.warmup()  # while a request runs: it must not change it
    settings = [SamplingParams(max_tokens=3 + k % 4, temperature=0.5 * (k % 3), top_k=k % 5, top_p=1 - 0.1 * (k % 2),
                               seed=k, stop_token_ids=(k,)) for k in range(10)]  # fmt: skip
    streams = [engine.submit(PROMPTS[k % 3][: 2 + 2 * k], s) for k, s in enumerate(settings)]
    _drain(engine)
    assert all(list(s)[-1].finish_reason in ("stop", "length") for s in streams)
    assert _tokens(busy) == (_reference(tuple(PROMPTS[1]), 40), "length")
    assert Engine.compilations() == before


def test_step_all_slots_is_the_serving_step_on_an_idle_engine(model):
    """``step_all_slots`` runs the compiled serving step over every slot (no new compilation after warmup), draws
    one greedy token per slot, and refuses an engine that holds a request."""
    engine = _engine(model, num_slots=2)
    engine.warmup()
    before = Engine.compilations()
    tokens = np.asarray(engine.step_all_slots())
    assert tokens.shape == (2,) and tokens.dtype == np.int32
    assert Engine.compilations() == before
    engine.submit(PROMPTS[0], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.step_all_slots()
    _drain(engine)
    engine.step_all_slots()  # idle again


def test_seeded_sampling_does_not_depend_on_the_slot(engine):
    params = SamplingParams(temperature=0.9, top_k=30, top_p=0.9, seed=1234, max_tokens=8)
    alone = engine.submit(PROMPTS[2], params)  # slot 0, no neighbours
    _drain(engine)
    neighbours = [engine.submit(PROMPTS[0], SamplingParams(max_tokens=12, temperature=1.0, seed=s)) for s in (1, 2)]
    engine.step()
    crowded = engine.submit(PROMPTS[2], params)  # slot 2, next to two sampled requests
    _drain(engine)
    assert all(_tokens(s)[1] == "length" for s in neighbours)
    tokens, _ = _tokens(alone)
    assert _tokens(crowded) == (tokens, "length")
    assert tokens == _reference(tuple(PROMPTS[2]), 8, 0.9, 30, 0.9, seed=1234)  # generate with key(seed)


def test_prompt_ids_are_checked_id_by_id_and_as_an_array(model):
    """submit takes Python and NumPy ints alike (checked as one array) and names the first bad id otherwise."""
    V = model[0].vocab_size
    engine = _engine(model, max_queue=8)
    stream = engine.submit([np.int32(3), 1, np.uint8(2)])
    assert stream._request.prompt == (3, 1, 2) and all(type(t) is int for t in stream._request.prompt)
    assert engine.submit(range(4))._request.prompt == (0, 1, 2, 3)
    cases = [
        ([1, True], TypeError, r"must be ints, got bool True at 1"),  # a bool is not a token id
        ([1, np.bool_(True)], TypeError, r"must be ints, got bool .*True.* at 1"),
        ([4, 2.0], TypeError, r"got float 2.0 at 1"),
        ([4, -1, V], ValueError, rf"vocab_size={V}\); prompt_ids\[1\] is -1"),
        ([4, V, -1], ValueError, rf"prompt_ids\[1\] is {V}"),
        ([4, 2**70], ValueError, rf"prompt_ids\[1\] is {2**70}"),  # beyond int64: the id-by-id checks
        ([4, np.uint64(2**64 - 1)], ValueError, rf"prompt_ids\[1\] is {2**64 - 1}"),
        ([], ValueError, "empty"),
    ]
    for ids, error, match in cases:
        with pytest.raises(error, match=match):
            engine.submit(ids)


def test_overload_and_bad_requests(model):
    config = model[0]
    engine = _engine(model, max_queue=2)
    engine.submit([1], SamplingParams())
    engine.submit([2, 3], SamplingParams())
    with pytest.raises(EngineOverloaded, match="max_queue=2"):
        engine.submit([4], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.submit([])
    with pytest.raises(ValueError, match=r"vocab_size=99.*prompt_ids\[1\] is 99"):
        engine.submit([1, config.vocab_size])
    with pytest.raises(ValueError, match="max_prompt_tokens=64"):
        engine.submit([1] * 65)
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.submit([1], SamplingParams(stop_token_ids=(config.vocab_size,)))
    with pytest.raises(TypeError, match="prompt_ids"):
        engine.submit("hello")
    for field, value in (("temperature", -1.0), ("top_k", -1), ("top_p", 0.0), ("seed", -5), ("max_tokens", 0)):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="at most 16 ids"):
        SamplingParams(stop_token_ids=tuple(range(17)))  # the decode step's stop table has 16 columns
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
        SamplingParams(seed=2**32)  # would collide with seed 0 under 32-bit JAX
    with pytest.raises(ValueError, match="num_slots"):
        _engine(model, num_slots=0)
    with pytest.raises(ValueError, match="min_prefill_chunk_tokens"):
        _engine(model, min_prefill_chunk_tokens=0)
    with pytest.raises(ValueError, match="max_prefill_rows"):
        _engine(model, max_prefill_rows=0)
    with pytest.raises(TypeError, match="max_prefill_rows"):
        _engine(model, max_prefill_rows=2.0)
    with pytest.raises(TypeError, match="short_chunk_command_buffers must be a bool"):
        _engine(model, short_chunk_command_buffers=1)
    with pytest.raises(TypeError, match="stable_scratch must be a bool or None"):
        _engine(model, stable_scratch=1)


def test_stable_scratch_only_where_xla_supports_it(model):
    """stable_scratch=True takes XLA's update mode where the installed XLA has it, and is refused, naming it, where
    it does not; False leaves it off; the default is auto_stable_scratch's pick, off on a CPU."""
    assert _engine(model, stable_scratch=False).stable_scratch is False
    assert _engine(model).stable_scratch is auto_stable_scratch()
    if jax.default_backend() == "cpu":
        assert _engine(model).stable_scratch is False
    if stable_scratch_supported():
        assert _engine(model, stable_scratch=True).stable_scratch is True
    else:
        with pytest.raises(ValueError, match=r"stable_scratch=True needs XLA.s command buffer update mode SKIP_TEMP"):
            _engine(model, stable_scratch=True)


def test_prefix_cache_gives_identical_outputs_and_prefills_only_new_tokens(engine, cached_engine):
    system = PROMPTS[1]  # 19 tokens
    turn = [11, 12, 13, 14, 15]

    def converse(eng: Engine) -> tuple[list[list[int]], list[int]]:
        outputs, prefilled = [], []
        prompt = list(system)
        for _ in range(2):
            before = eng.stats()["prefill_tokens_total"]
            stream = eng.submit(prompt, SamplingParams(max_tokens=5))
            _drain(eng)
            tokens, _ = _tokens(stream)
            outputs.append(tokens)
            prefilled.append(eng.stats()["prefill_tokens_total"] - before)
            prompt = prompt + tokens + turn  # the conversation so far and the next user turn
        before = eng.stats()["prefill_tokens_total"]
        again = eng.submit(system, SamplingParams(max_tokens=5))
        _drain(eng)
        outputs.append(_tokens(again)[0])
        prefilled.append(eng.stats()["prefill_tokens_total"] - before)
        return outputs, prefilled

    plain, plain_prefilled = converse(engine)
    cached, cached_prefilled = converse(cached_engine)
    assert cached == plain
    assert plain_prefilled == [19, 19 + 5 + 5, 19]
    assert cached_prefilled == [19, 5, 0]  # only the new turn; nothing for a repeated prompt
    assert cached_engine.stats()["prefix_cache_hits_total"] >= 2
    assert 0 < cached_engine.stats()["prefix_cache_bytes"] <= 1 << 20


def test_cache_prefix_for_a_shared_system_prompt(engine, cached_engine):
    system = [9, 8, 7, 6, 5, 4, 3, 2, 1, 2, 3]
    assert cached_engine.cache_prefix(system) == len(system)
    assert cached_engine.cache_prefix(system) == 0  # cached already
    outputs = {}
    for eng in (engine, cached_engine):
        before = eng.stats()["prefill_tokens_total"]
        streams = [eng.submit(system + user, SamplingParams(max_tokens=4)) for user in ([50], [60, 61, 62])]
        _drain(eng)
        outputs[eng is cached_engine] = ([_tokens(s) for s in streams], eng.stats()["prefill_tokens_total"] - before)
    assert outputs[True][0] == outputs[False][0]
    assert outputs[False][1] == 2 * len(system) + 4 and outputs[True][1] == 4  # only the users' tokens
    with pytest.raises(ValueError, match="prefix_cache_bytes=0"):
        engine.cache_prefix(system)


def test_prefix_cache_evicts_least_recently_used_by_bytes(model):
    config = model[0]
    entry = PrefixEntry(ModelStates.zeros(config, 1), jnp.zeros((1, config.vocab_size), jnp.float32))
    engine = _engine(model, prefix_cache_bytes=2 * entry_nbytes(entry))  # room for two entries

    def prefilled(prompt) -> int:
        before = engine.stats()["prefill_tokens_total"]
        engine.submit(prompt, SamplingParams(max_tokens=2))
        _drain(engine)
        return engine.stats()["prefill_tokens_total"] - before

    a, b = PROMPTS[2], PROMPTS[0]
    assert prefilled(a) == len(a)  # caches a, then a and its two generated tokens
    assert prefilled(b) == len(b)  # caches b and b's conversation: both entries of a are evicted
    assert engine.stats()["prefix_cache_evictions_total"] == 2
    assert prefilled(b) == 0
    assert prefilled(a) == len(a)
    assert engine.stats()["prefix_cache_bytes"] <= 2 * entry_nbytes(entry)


def test_save_and_load_state(model, cached_engine, tmp_path):
    conversation = PROMPTS[2] + [20, 21]
    path = tmp_path / "conversation.npz"
    cached_engine.save_state(conversation, path)
    assert path.exists() and not [p for p in tmp_path.iterdir() if p != path]  # the temporary file is gone
    saved = cached_engine.prefix_cache.get(conversation)
    fresh = _engine(model, prefix_cache_bytes=1 << 20)
    assert fresh.load_state(path) == conversation
    loaded = fresh.prefix_cache.get(conversation)
    for a, b in zip((*saved.states, saved.logits), (*loaded.states, loaded.logits), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))  # bit-identical
    stream = fresh.submit(conversation + [30, 31, 32], SamplingParams(max_tokens=4))
    _drain(fresh)
    assert fresh.stats()["prefill_tokens_total"] == 3
    assert _tokens(stream)[0] == _reference(tuple(conversation + [30, 31, 32]), 4)
    with pytest.raises(ValueError, match="prefix_cache_bytes=0"):
        _engine(model).load_state(path)
    bad = tmp_path / "bad.npz"
    np.savez(bad, prompt_ids=np.asarray([1, 2]))
    with pytest.raises(ValueError, match="lacks"):
        fresh.load_state(bad)


def test_background_thread_sync_and_async_streams(model):
    with _engine(model) as engine:
        stream = engine.submit(PROMPTS[0], SamplingParams(max_tokens=4))
        assert _tokens(stream) == (_reference(tuple(PROMPTS[0]), 4), "length")

        async def consume():
            s = engine.submit(PROMPTS[2], SamplingParams(max_tokens=3))
            return [e async for e in s]

        events = asyncio.run(consume())
        ref = _reference(tuple(PROMPTS[2]), 3)
        assert events == [TokenEvent(ref[0], None), TokenEvent(ref[1], None), TokenEvent(ref[2], "length")]

        async def leave_early():  # the client goes away after the first token: the request is cancelled
            s = engine.submit(PROMPTS[2], SamplingParams(max_tokens=10**6))
            events = s.__aiter__()
            first = await events.__anext__()
            await events.aclose()
            return s, first

        gone, first = asyncio.run(leave_early())
        assert first == TokenEvent(ref[0], None)
        assert list(gone)[-1] == TokenEvent(None, "cancelled")
        left = engine.submit(PROMPTS[0], SamplingParams(max_tokens=10**6))
    assert list(left)[-1].finish_reason == "cancelled"  # stop() ends what still runs


def test_auto_stable_scratch_wants_a_gpu_the_mode_and_the_vmm_allocator():
    vmm = {"XLA_PYTHON_CLIENT_ALLOCATOR": "vmm"}
    assert auto_stable_scratch({}) is False  # jax's default allocator: XLA would record the buffers again
    assert auto_stable_scratch({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}) is False
    on_gpu = jax.default_backend() == "gpu"
    assert auto_stable_scratch(vmm) is (on_gpu and stable_scratch_supported())


def test_stable_scratch_names_the_allocator_it_needs():
    """Stable scratch keeps scratch buffers in place only under jax's VMM allocator: without it (or the mode set
    process-wide) the engine says so rather than running as before without a word."""
    note = stable_scratch_allocator_note({})
    assert note is not None and "XLA_PYTHON_CLIENT_ALLOCATOR=vmm" in note
    assert stable_scratch_allocator_note({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}) == note
    assert stable_scratch_allocator_note({"XLA_PYTHON_CLIENT_ALLOCATOR": "vmm"}) is None
    flags = "--xla_gpu_command_buffer_update_mode=SKIP_TEMP --xla_dump_to=/tmp/x"
    assert stable_scratch_allocator_note({"XLA_FLAGS": flags}) is None
