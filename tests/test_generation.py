"""``xlstm_jax.generation``: one compiled loop per max_new_tokens bucket, a stream step that does not grow with
max_new_tokens, and clear errors for arguments that are not what generation takes (prompts that are not token
ids above all). Agreement with the transformers model and the sampling rules are in tests/models."""

from __future__ import annotations

import itertools
import logging

import jax
import numpy as np
import pytest

from tests.models.fixture import load, peer
from tests.numerics import TOL, assert_close
from xlstm_jax.generation import (
    MAX_NEW_TOKENS,
    MIN_TOKEN_BUFFER,
    SamplingConfig,
    _decode_loop,
    _prefill,
    _sample_jit,
    _step_jit,
    generate,
    pad_prompts,
    prefill,
    stream,
)

PROMPTS = [peer()["prompt"][0].tolist(), peer()["prompt"][0, 5:9].tolist()]
SAMPLED = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95)


def _sizes() -> tuple[int, int]:
    return _decode_loop._cache_size(), _prefill._cache_size()


def test_generate_compiles_once_per_bucket():
    """max_new_tokens 3, 9, 16 and 11 share one compiled loop (the buffer of 16); each result has exactly
    max_new_tokens columns, and the first tokens and logits of a longer run are those of a shorter one."""
    config, params, rt = load()
    kwargs = {"sampling": SAMPLED, "key": jax.random.key(5), "stop_tokens": (), "return_logits": True, "runtime": rt}
    first = generate(config, params, PROMPTS, 3, **kwargs)
    compiled = _sizes()
    runs = {n: generate(config, params, PROMPTS, n, **kwargs) for n in (9, 16, 11)}
    assert _sizes() == compiled
    runs[3] = first
    runs[21] = generate(config, params, PROMPTS, 21, **kwargs)  # the next bucket (32): another program
    for n, out in runs.items():
        assert out.tokens.shape == (2, n) and out.logits.shape == (2, n, config.vocab_size)
        np.testing.assert_array_equal(np.asarray(out.num_generated), [n, n])
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(runs[21].tokens[:, :n]), err_msg=f"N={n}")
        np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(runs[21].logits[:, :n]), err_msg=f"N={n}")


def test_bucket_edges():
    """Powers of two from MIN_TOKEN_BUFFER: the loop stops at the real count, even one past a power of two."""
    config, params, rt = load()
    for n in (MIN_TOKEN_BUFFER - 1, MIN_TOKEN_BUFFER, MIN_TOKEN_BUFFER + 1):
        out = generate(config, params, PROMPTS[:1], n, stop_tokens=(), runtime=rt)
        assert out.tokens.shape == (1, n)
        np.testing.assert_array_equal(np.asarray(out.tokens[0]), peer()["greedy"][0, :n])


def _compiled_programs(caplog, run) -> list[str]:
    """The "Compiling ..." log lines (with the argument shapes) of everything ``run()`` compiles."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles():
        run()
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]


def test_stream_step_does_not_depend_on_max_new_tokens(caplog):
    """A stream of 10**6 tokens runs the compiled programs of a stream of 64 (same shapes, so the same cost
    per step), compiles nothing, allocates nothing of size 10**6, and stops at the stop token after a few
    steps with generate's tokens."""
    config, params, rt = load()
    greedy = peer()["greedy"][0]
    stop = int(greedy[3])
    steps = int(np.argmax(greedy == stop)) + 1
    kwargs = {"stop_tokens": (stop,), "runtime": rt}
    short = lambda: list(stream(config, params, PROMPTS[:1], 64, **kwargs))  # noqa: E731
    np.testing.assert_array_equal(np.concatenate(short()), greedy[:steps])
    compiled = (_step_jit._cache_size(), _sample_jit._cache_size(), _prefill._cache_size())
    for n in (10**6, 64, 1000):
        out: list[np.ndarray] = []
        run = lambda n=n, out=out: out.extend(stream(config, params, PROMPTS[:1], n, **kwargs))  # noqa: E731
        programs = _compiled_programs(caplog, run)
        assert programs == [], programs
        np.testing.assert_array_equal(np.concatenate(out), greedy[:steps])
    assert (_step_jit._cache_size(), _sample_jit._cache_size(), _prefill._cache_size()) == compiled
    # Without a stop token it would go on: the first steps of an unbounded stream are generate's tokens.
    head = list(itertools.islice(stream(config, params, PROMPTS, 10**6, stop_tokens=(), runtime=rt), 5))
    expected = generate(config, params, PROMPTS, 5, stop_tokens=(), runtime=rt).tokens
    np.testing.assert_array_equal(np.stack(head, axis=1), np.asarray(expected))


def test_stream_step_shapes(caplog):
    """The programs a stream compiles take and return nothing whose size is max_new_tokens (here 7777, new
    shapes: a batch of three prompts)."""
    config, params, rt = load()
    prompts = [*PROMPTS, PROMPTS[1][:3]]
    programs = _compiled_programs(
        caplog, lambda: list(stream(config, params, prompts, 7777, runtime=rt, stop_tokens=(2,)))
    )
    assert any("_step_jit" in p for p in programs) and any("_sample_jit" in p for p in programs), programs
    assert not any("7777" in p for p in programs), programs


@pytest.mark.parametrize(
    "prompts, error, message",
    [
        ("the memory", TypeError, "got text (str)"),
        (b"the memory", TypeError, "got text (bytes)"),
        (["the", "memory"], TypeError, "got text at prompts[0]"),
        ([[1.0, 2.0]], TypeError, "got float 1.0 at prompts[0][0]"),
        ([[1, 2.5]], TypeError, "got float 2.5 at prompts[0][1]"),
        (np.asarray([[1.0, 2.0]]), TypeError, "got an array of dtype float64"),
        (np.asarray([[True, False]]), TypeError, "got an array of dtype bool"),
        ([[True, 2]], TypeError, "got bool True at prompts[0][0]"),
        ([[np.bool_(True)]], TypeError, "at prompts[0][0]"),
        ([1, 2, 3], TypeError, "got int 1 at prompts[0] (one level too flat?)"),
        ([[[1, 2]]], TypeError, "got list [1, 2] at prompts[0][0]"),
        (np.asarray([1, 2, 3]), ValueError, "got an array of shape (3,)"),
        (np.ones((1, 2, 3), np.int32), ValueError, "got an array of shape (1, 2, 3)"),
        ([np.asarray([[1, 2]])], TypeError, "shape (1, 2) at prompts[0]"),
        (7, TypeError, "got int"),
        ([], ValueError, "prompts must be a non-empty list of non-empty token lists"),
        ([[1, 2], []], ValueError, "prompts must be a non-empty list of non-empty token lists"),
        (np.zeros((1, 0), np.int32), ValueError, "prompts must be a non-empty list of non-empty token lists"),
        ([[1, 2], [3, -1]], ValueError, "prompts[1][1] is -1"),
        ([[5, 99, 7]], ValueError, "prompts[0][1] is 99"),
        ([[5, 6], [2**40]], ValueError, "prompts[1][0] is"),
        (np.asarray([[3, 100]]), ValueError, "prompts[0][1] is 100"),
    ],
)
@pytest.mark.parametrize("api", ["generate", "stream"])
def test_prompts_must_be_token_ids(api, prompts, error, message):
    config, params, rt = load()
    call = {"generate": generate, "stream": stream}[api]  # stream checks when called, before the first token
    with pytest.raises(error, match="prompt") as info:
        call(config, params, prompts, 4, runtime=rt)
    assert message in str(info.value), str(info.value)


def test_prompts_as_arrays_and_numpy_ints():
    """Integer arrays, NumPy integers and jax arrays are token ids like Python ints."""
    config, params, rt = load()
    reference = np.asarray(generate(config, params, PROMPTS[:1], 4, stop_tokens=(), runtime=rt).tokens)
    row = np.asarray(PROMPTS[0], np.int64)
    for prompts in (
        row[None],
        jax.numpy.asarray(row[None], jax.numpy.int32),
        [row],
        [list(row)],
        [row.astype(np.uint16)],
    ):
        out = generate(config, params, prompts, np.int64(4), stop_tokens=(), runtime=rt)
        np.testing.assert_array_equal(np.asarray(out.tokens), reference)
    ids, valid = pad_prompts(np.asarray([[5, 6, 7]]), pad_token_id=1, multiple_of=2)
    np.testing.assert_array_equal(ids, [[1, 5, 6, 7]])
    np.testing.assert_array_equal(valid, [[False, True, True, True]])


def test_packed_prompts_continue_their_last_document():
    """A prompt packed after other documents (``segment_ids``) generates what the last document generates alone:
    row 0 packs a document of 9 tokens before the 21-token prompt (crossing the chunk border at 16) and gives the
    transformers peer's greedy tokens; row 1 (ids 5, 5, 2, ...: only changes matter) packs one of 2 before a
    4-token prompt, left-padded in the batch; the states after the generated tokens are those of the prompts run
    alone. ``stream`` draws the same tokens."""
    config, params, rt = load()
    other = PROMPTS[0][:9]
    packed = [other + PROMPTS[0], PROMPTS[1][:2] + PROMPTS[1]]
    segment_ids = [[0] * 9 + [1] * 21, [5, 5, 2, 2, 2, 2]]
    n = 6
    out = generate(config, params, packed, n, stop_tokens=(), runtime=rt, segment_ids=segment_ids)
    alone = generate(config, params, PROMPTS, n, stop_tokens=(), runtime=rt)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), peer()["greedy"][0, :n])
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(alone.tokens))
    for name, a, b in zip("cnm", alone.states, out.states, strict=True):
        assert_close(f"state {name}", np.asarray(a, np.float64), b, TOL["float32-model"])
    as_array = np.asarray([segment_ids[0]])  # an integer array (B, S) like the prompts
    head = list(itertools.islice(stream(config, params, packed[:1], n, runtime=rt, segment_ids=as_array), 3))
    np.testing.assert_array_equal(np.concatenate(head), peer()["greedy"][0, :3])


@pytest.mark.parametrize(
    "segment_ids, error, message",
    [
        ([[0, 0, 1]], ValueError, "segment_ids has shape (1, 3) but must be the prompts' (B, S)=(1, 4)"),
        (np.zeros((2, 4), np.int32), ValueError, "segment_ids has shape (2, 4) but must be the prompts' (B, S)=(1, 4)"),
        (np.zeros(4, np.int32), ValueError, "segment_ids.shape=(4,) must be the prompts' (B, S)=(1, 4)"),
        (np.zeros((1, 4)), TypeError, "segment_ids must be integer ids, got an array of dtype float64"),
        ([[0, 0, 1.0, 1]], TypeError, "segment_ids must be B lists of int ids"),
        ("0011", TypeError, "segment_ids must be an integer array (B, S) or B lists of ints"),
    ],
)
@pytest.mark.parametrize("api", ["generate", "stream"])
def test_segment_ids_must_match_the_prompts(api, segment_ids, error, message):
    config, params, rt = load()
    call = {"generate": generate, "stream": stream}[api]
    with pytest.raises(error) as info:
        call(config, params, [PROMPTS[1]], 4, runtime=rt, segment_ids=segment_ids)
    assert message in str(info.value), str(info.value)
    with pytest.raises(ValueError, match=r"segment_ids must be integer \(B, S\)=\(1, 4\)"):
        prefill(config, params, np.asarray([PROMPTS[1]]), segment_ids=np.zeros((1, 3), np.int32), runtime=rt)


@pytest.mark.parametrize(
    "value, error, message",
    [
        (4.0, TypeError, "max_new_tokens must be an int, got float 4.0"),
        (True, TypeError, "max_new_tokens must be an int, got bool True"),
        ("4", TypeError, "max_new_tokens must be an int, got str '4'"),
        (np.float32(4), TypeError, "max_new_tokens must be an int"),
        (0, ValueError, "max_new_tokens must be in [1, 2147483647]"),
        (-3, ValueError, "max_new_tokens must be in [1, 2147483647]"),
        (MAX_NEW_TOKENS + 1, ValueError, "max_new_tokens must be in [1, 2147483647]"),
    ],
)
@pytest.mark.parametrize("api", ["generate", "stream"])
def test_max_new_tokens_must_be_an_int_in_range(api, value, error, message):
    config, params, rt = load()
    call = {"generate": generate, "stream": stream}[api]
    with pytest.raises(error) as info:
        call(config, params, PROMPTS, value, runtime=rt)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"key": 0, "sampling": SAMPLED}, TypeError, "key must be one PRNG key"),
        ({"key": jax.random.split(jax.random.key(0), 2), "sampling": SAMPLED}, TypeError, "key must be one PRNG key"),
        ({"sampling": SAMPLED}, ValueError, "needs an explicit PRNG key"),
        ({"sampling": {"temperature": 1.0}}, TypeError, "sampling must be a SamplingConfig"),
        ({"stop_tokens": 2}, TypeError, "stop_tokens must be a sequence of token ids"),
        ({"stop_tokens": "2"}, TypeError, "stop_tokens must be a sequence of token ids"),
        ({"stop_tokens": (2.0,)}, TypeError, "stop_tokens must be int token ids"),
        ({"stop_tokens": (99,)}, ValueError, "stop_tokens=[99]"),
        ({"pad_token_id": -1}, ValueError, "pad_token_id=[-1]"),
        ({"pad_token_id": True}, TypeError, "pad_token_id must be int token ids"),
        ({"pad_to_multiple_of": 0}, ValueError, "multiple_of must be >= 1"),
        ({"pad_to_multiple_of": 2.0}, TypeError, "multiple_of must be an int"),
        ({"runtime": "chunkwise"}, TypeError, "runtime must be a RuntimeConfig"),
        ({"return_logits": 1}, TypeError, "return_logits must be a bool"),
    ],
)
def test_other_arguments(kwargs, error, message):
    config, params, rt = load()
    kwargs = {"runtime": rt, **kwargs}
    with pytest.raises(error) as info:
        generate(config, params, PROMPTS, 4, **kwargs)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "fields, error, message",
    [
        ({"temperature": True}, TypeError, "temperature must be a number, got bool"),
        ({"temperature": "0.5"}, TypeError, "temperature must be a number, got str"),
        ({"temperature": float("nan")}, ValueError, "temperature must be a finite number >= 0"),
        ({"top_k": 2.0}, TypeError, "top_k must be an int, got float"),
        ({"top_p": float("nan")}, ValueError, "top_p must be in (0, 1]"),
    ],
)
def test_sampling_config_types(fields, error, message):
    with pytest.raises(error) as info:
        SamplingConfig(**fields)
    assert message in str(info.value)
    assert SamplingConfig(temperature=np.float32(0.5), top_k=np.int64(3)) == SamplingConfig(0.5, 3)
