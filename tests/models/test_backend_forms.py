"""The backends: the generic call and frozen configs of every registered backend (jit, hashing, a missing
config); "parallel_stabilized" and "chunkwise" in particular (registry, configs, vmap over heads); and the
hand-off of states between forms (prefill with one form, continue with another)."""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import INTERPRET
from tests.mlstm.form_checks import random_inputs
from tests.numerics import TOL, assert_close
from tests.reference import documents_ref, recurrent_ref
from xlstm_jax.kernels.config import SequenceKernelConfig
from xlstm_jax.mlstm.recurrent import recurrent_step_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import (
    BACKENDS,
    create_mlstm_backend,
    mLSTMBackend,
    mLSTMBackendChunkwise,
    mLSTMBackendChunkwiseConfig,
    mLSTMBackendParallel,
    mLSTMBackendParallelConfig,
)

NAMES = {"parallel_stabilized": mLSTMBackendParallel, "chunkwise": mLSTMBackendChunkwise}
INPUTS = ("q", "k", "v", "i", "f")
STATES = ("c0", "n0", "m0")


@pytest.mark.parametrize("name", sorted(NAMES))
def test_registered_with_documented_config(name):
    backend = create_mlstm_backend(name)
    assert type(backend) is NAMES[name]
    fields = {f.name: f.default for f in dataclasses.fields(backend.config)}
    expected = {"context_length": -1, "eps": 1e-6, "state_dtype": None}
    if name == "chunkwise":
        expected["chunk_size"] = 256
    assert fields == expected
    assert backend.can_vmap_over_heads is True
    assert type(create_mlstm_backend(backend.config)) is NAMES[name]


@pytest.mark.parametrize("config_class", [mLSTMBackendParallelConfig, mLSTMBackendChunkwiseConfig])
def test_config_checks_and_model_params(config_class):
    config = config_class(eps=1e-5, state_dtype="float32")
    config.assign_model_config_params(type("ModelConfig", (), {"context_length": 4096})())
    assert config.context_length == 4096
    with pytest.raises(ValueError, match="eps"):
        config_class(eps=0.0)
    with pytest.raises(ValueError, match="state_dtype"):
        config_class(state_dtype="int8")


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5])
def test_chunkwise_config_rejects_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        mLSTMBackendChunkwiseConfig(chunk_size=chunk_size)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_one_generic_call(name):
    """Every backend runs the generic call of mLSTMBackend (no backend has its own __call__), with the
    documented signature."""
    cls = BACKENDS[name]
    assert issubclass(cls, mLSTMBackend) and "__call__" not in vars(cls)
    params = [(p.name, p.default) for p in inspect.signature(cls.__call__).parameters.values()]
    assert params == [
        ("self", inspect.Parameter.empty), ("q", inspect.Parameter.empty), ("k", inspect.Parameter.empty),
        ("v", inspect.Parameter.empty), ("i", inspect.Parameter.empty), ("f", inspect.Parameter.empty),
        ("c_initial", None), ("n_initial", None), ("m_initial", None), ("return_last_states", False),
        ("segment_ids", None),
    ]  # fmt: skip
    assert inspect.signature(cls.__call__).parameters["segment_ids"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_without_a_config_is_an_error(name):
    cls = BACKENDS[name]
    with pytest.raises(
        TypeError, match=rf"{cls.__name__} needs config={cls.config_class.__name__}\(...\), got NoneType"
    ):
        cls(config=None)
    other = next(c for c in BACKENDS.values() if c.config_class is not cls.config_class).config_class()
    with pytest.raises(TypeError, match=f"got {type(other).__name__}"):
        cls(config=other)
    with pytest.raises(TypeError, match="missing"):
        cls()


# Settings that make every backend run on a CPU in a few seconds (the Pallas kernel in interpret mode).
CPU_KWARGS = {
    "recurrent": {"use_scan": True},
    "chunkwise": {"chunk_size": 8},
    "chunkwise_mosaic": {"chunk_size": 8},  # float32 inputs: the XLA form (the kernel's own tests run the kernel)
    "recurrent_pallas": {"interpret": INTERPRET, "kernel_config": SequenceKernelConfig(block_dhv=16, chunk_size=16)},
}


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_jit_of_every_backend(name):
    """``jax.jit(backend)`` works: configs are frozen and hashable, so the backend (a Flax module) hashes, and
    equal configs give equal backends. The jitted backend matches the float64 reference."""
    backend = create_mlstm_backend(name, **CPU_KWARGS.get(name, {}))
    same = create_mlstm_backend(name, **CPU_KWARGS.get(name, {}))
    assert backend.config == same.config and hash(backend.config) == hash(same.config)
    assert hash(backend) == hash(same)
    with pytest.raises(dataclasses.FrozenInstanceError):
        backend.config.eps = 1e-3
    x = random_inputs(5, 1, 2, 19, 16, 16, states=True)
    args = [jnp.asarray(x[key], jnp.float32) for key in INPUTS + STATES]
    h_ref, states_ref, scale = recurrent_ref(*(x[key] for key in INPUTS + STATES))
    assert_close(name, h_ref, jax.jit(backend)(*args), TOL["float32"], scale=scale)
    h, states = jax.jit(functools.partial(backend, return_last_states=True))(*args)
    assert_close(f"{name} (h with states)", h_ref, h, TOL["float32"], scale=scale)
    for key, ref, out in zip("cnm", states_ref, states, strict=True):
        assert_close(f"{name}: {key}", ref, out, TOL["float32"])


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_takes_segment_ids(name):
    """The generic call passes ``segment_ids`` to every backend's form: packed rows (documents of 1 and 4 on
    chunk borders, one crossing them, ids repeating non-adjacently) equal their documents run alone, from
    initial states for each row's first document."""
    backend = create_mlstm_backend(name, **CPU_KWARGS.get(name, {}))
    segment_ids = np.array([[0] * 3 + [1] * 1 + [2] * 4 + [3] * 9, [4] * 9 + [7] * 1 + [4] * 7])
    x = random_inputs(6, 2, 2, 17, 16, 16, states=True, igate="extreme")
    args = [jnp.asarray(x[key], jnp.float32) for key in INPUTS + STATES]
    run = jax.jit(functools.partial(backend, return_last_states=True))
    h, states = run(*args, segment_ids=jnp.asarray(segment_ids))
    h_ref, states_ref, scale = documents_ref(*(x[key] for key in INPUTS + STATES), segment_ids=segment_ids)
    assert_close(f"{name}: h", h_ref, h, TOL["float32"], scale=scale)
    for key, ref, out in zip("cnm", states_ref, states, strict=True):
        assert_close(f"{name}: {key}", ref, out, TOL["float32"])


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_config_stays_hashable_when_given_model_params(name):
    """``assign_model_config_params`` sets the context length in place; it takes no part in the hash, so a
    config already used as a static argument keeps its hash."""
    config = BACKENDS[name].config_class()
    before = hash(config)
    config.assign_model_config_params(type("ModelConfig", (), {"context_length": 2048})())
    assert config.context_length == 2048 and hash(config) == before
    with pytest.raises(TypeError, match="context_length"):
        config.assign_model_config_params(object())
    with pytest.raises(ValueError, match="context_length"):
        config.assign_model_config_params(type("ModelConfig", (), {"context_length": "2048"})())
    with pytest.raises(ValueError, match="context_length"):
        BACKENDS[name].config_class(context_length=0)


@pytest.mark.parametrize(("name", "kwargs"), [("parallel_stabilized", {}), ("chunkwise", {"chunk_size": 8})])
def test_vmap_over_heads(name, kwargs):
    """Heads are independent: the backend vmapped over the heads axis matches the float32 reference bound."""
    backend = create_mlstm_backend(name, **kwargs)
    x = random_inputs(2, 2, 3, 21, 4, 6, states=True)
    args = [jnp.asarray(x[key], jnp.float32) for key in INPUTS + STATES]

    def one_head(*a):  # every argument without its heads axis
        h, states = backend(*(t[:, None] for t in a), return_last_states=True)
        return h[:, 0], tuple(s[:, 0] for s in states)

    h, states = jax.jit(jax.vmap(one_head, in_axes=1, out_axes=1))(*args)
    h_ref, states_ref, scale = recurrent_ref(*(x[key] for key in INPUTS + STATES))
    assert_close("h", h_ref, h, TOL["float32"], scale=scale)
    for key, ref, out in zip("cnm", states_ref, states, strict=True):
        assert_close(key, ref, out, TOL["float32"])


def _run(backend, x, lo, hi, states):
    """The backend on steps [lo, hi) of ``x`` (float64), starting from ``states``."""
    args = [jnp.asarray(x[key][:, :, lo:hi]) for key in INPUTS]
    return jax.jit(functools.partial(backend, return_last_states=True))(*args, *states)


def _decode(x, lo, hi, states):
    """Steps [lo, hi) one at a time with ``recurrent_step_fw``, as a decoder runs."""
    c, n, m = states
    m = m[..., None]
    hs = []
    step = jax.jit(recurrent_step_fw)
    for t in range(lo, hi):
        q, k, v, i, f = (jnp.asarray(x[key][:, :, t]) for key in INPUTS)
        h, (c, n, m) = step(c, n, m, q, k, v, i[..., None], f[..., None])
        hs.append(h)
    return jnp.stack(hs, axis=2), (c, n, m[..., 0])


def _check_against_reference(x, h, states):
    h_ref, states_ref, scale = recurrent_ref(*(x[key] for key in INPUTS + STATES))
    assert_close("h", h_ref, h, TOL["float64"], scale=scale)
    for key, ref, out in zip("cnm", states_ref, states, strict=True):
        assert_close(f"{key} (last state)", ref, out, TOL["float64"])


@pytest.mark.parametrize("igate", ["wide", "extreme"])
def test_chunkwise_prefill_then_recurrent_decode(igate):
    """Chunkwise prefill of a prompt + recurrent steps for the rest == one recurrent pass == one parallel
    pass (all against the float64 reference, for h and the final states), from random initial states."""
    S, prompt = 45, 29
    x = random_inputs(7, 2, 2, S, 5, 3, states=True, igate=igate)
    with jax.enable_x64(True):
        init = tuple(jnp.asarray(x[key]) for key in STATES)
        h1, states = _run(create_mlstm_backend("chunkwise", chunk_size=8), x, 0, prompt, init)
        h2, states = _decode(x, prompt, S, states)
        _check_against_reference(x, jnp.concatenate([h1, h2], axis=2), states)
        _check_against_reference(x, *_run(create_mlstm_backend("recurrent", use_scan=True), x, 0, S, init))
        _check_against_reference(x, *_run(create_mlstm_backend("parallel_stabilized"), x, 0, S, init))


def test_parallel_then_chunkwise_then_recurrent():
    """Parallel on the first part, chunkwise (chunk size not dividing its part) on the second, the
    recurrent backend on the third: the states carry over exactly, with and without initial states."""
    S, cuts = 50, (13, 37)
    for states_given in (False, True):
        x = random_inputs(11, 2, 2, S, 4, 6, states=states_given, igate="extreme")
        with jax.enable_x64(True):
            init = tuple(jnp.asarray(x[key]) for key in STATES) if states_given else (None, None, None)
            h1, states = _run(create_mlstm_backend("parallel_stabilized"), x, 0, cuts[0], init)
            h2, states = _run(create_mlstm_backend("chunkwise", chunk_size=5), x, cuts[0], cuts[1], states)
            h3, states = _run(create_mlstm_backend("recurrent", use_scan=True), x, cuts[1], S, states)
            if not states_given:
                x = {**x, "c0": None, "n0": None, "m0": None}
            _check_against_reference(x, jnp.concatenate([h1, h2, h3], axis=2), states)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("recurrent", {"use_scan": True}),
        ("parallel_stabilized", {}),
        ("chunkwise", {"chunk_size": 4}),
        ("chunkwise", {"chunk_size": 3}),
    ],
)
def test_no_op_steps_leave_states_untouched(name, kwargs):
    """Steps with input gate -inf and forget gate +inf are exact no-ops in every form, also when they fill
    whole chunks (a chunk that adds nothing once produced NaN through exp(-inf - (-inf)))."""
    x = random_inputs(21, 2, 2, 6, 4, 3, states=True)
    args = [jnp.asarray(x[n], jnp.float32) for n in INPUTS]
    states = [jnp.asarray(x[n], jnp.float32) for n in STATES]
    pad = 8  # two whole chunks of 4 (and two of 3 plus two steps) of no-ops before the sequence
    noop = {"i": -jnp.inf, "f": jnp.inf}
    padded = [
        jnp.concatenate([jnp.full(a.shape[:2] + (pad,) + a.shape[3:], noop.get(n, 1.0)), a], axis=2)
        for n, a in zip(INPUTS, args, strict=True)
    ]
    backend = jax.jit(functools.partial(create_mlstm_backend(name, **kwargs), return_last_states=True))
    h, last = backend(*args, *states)
    h_pad, last_pad = backend(*padded, *states)
    assert np.all(np.isfinite(np.asarray(h_pad))), "no-op steps produced non-finite outputs"
    assert_close("h after no-op steps", np.asarray(h, np.float64), h_pad[:, :, pad:], TOL["float32"])
    for s, a, b in zip("cnm", last, last_pad, strict=True):
        assert_close(f"{s} after no-op steps", np.asarray(a, np.float64), b, TOL["float32"])
    # Only no-op steps: the states come back unchanged.
    _, only = backend(*(a[:, :, :pad] for a in padded), *states)
    for s, a, b in zip("cnm", states, only, strict=True):
        assert_close(f"{s} after only no-op steps", np.asarray(a, np.float64), b, TOL["float32"])
