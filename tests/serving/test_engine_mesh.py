"""The serving engine on a mesh of 8 CPU devices (8x1x1 and 2x2x2): each request's greedy tokens equal ``generate``
run alone on one device, the slot states stay split (slots over data and fsdp, heads over tensor), nothing
recompiles as requests come and go, and the prefix cache and saved states work on the sharded states.

The mesh tests need 8 devices: ``test_on_8_cpu_devices`` runs this module in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before JAX starts); in a process with fewer devices
the mesh tests skip themselves, and in the 8-device process the launcher does.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.models.fixture import FIXTURE, load
from xlstm_jax.cli import main
from xlstm_jax.generation import generate
from xlstm_jax.models.xlstm_parallel.sharding import MeshConfig, make_mesh
from xlstm_jax.serving import Engine, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
EIGHT_DEVICES = jax.device_count() >= 8
needs_8 = pytest.mark.skipif(not EIGHT_DEVICES, reason="needs 8 devices: test_on_8_cpu_devices runs it in a subprocess")

CHUNK = 8  # prefill chunk: the prompts span one or two chunks, with a remainder
PAD = 16  # the references' prompts are left-padded to 16 (exact no-op steps): one compilation for all
REFERENCE_TOKENS = 8
# Greedy requests of different prompt lengths and max_tokens; the first two arrive before the others.
REQUESTS = (([5, 6, 7], 6), ([(7 * i + 3) % 97 for i in range(14)], 8), ([42], 5), ([3, 4, 5, 6, 7, 8, 9, 10, 11], 7))
MESHES = [((8, 1, 1), 8), ((2, 2, 2), 4)]  # (data, fsdp, tensor), num_slots
MESH_IDS = ["8x1x1-8slots", "2x2x2-4slots"]


@pytest.mark.skipif(EIGHT_DEVICES, reason="this is the 8-device process")
def test_on_8_cpu_devices():
    """This module in a new process with 8 CPU devices (XLA's expensive LLVM passes off: compile time only)."""
    env = dict(os.environ)
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags} --xla_llvm_disable_expensive_passes=true".strip()
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).relative_to(ROOT))]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = (run.stdout + run.stderr).splitlines()
    lines = [line for line in output if "Involuntary full rematerialization" not in line]
    assert run.returncode == 0, "\n".join(lines[-80:])
    assert "4 passed, 1 skipped" in run.stdout, run.stdout[-2000:]


@functools.cache
def _reference(prompt: tuple[int, ...]) -> list[int]:
    """``generate`` on one device, without a mesh, on the prompt alone (greedy, no stop tokens)."""
    config, params, runtime = load()
    out = generate(config, params, [list(prompt)], REFERENCE_TOKENS, stop_tokens=[], pad_to_multiple_of=PAD,
                   runtime=runtime)  # fmt: skip
    return out.tokens[0].tolist()


def _drain(engine: Engine) -> None:
    while engine.step():
        pass


def _tokens(stream) -> list[int]:
    events = list(stream)
    assert events[-1].finish_reason == "length"
    return [e.token_id for e in events]


def _shard_shapes(x: jax.Array) -> set[tuple[int, ...]]:
    assert len(x.addressable_shards) == 8
    return {tuple(s.data.shape) for s in x.addressable_shards}


@needs_8
@pytest.mark.parametrize(("shape", "num_slots"), MESHES, ids=MESH_IDS)
def test_concurrent_requests_equal_generate_on_one_device(shape, num_slots, tmp_path):
    config, params, runtime = load()
    data, fsdp, tensor = shape
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    before = Engine.compilations()
    engine = Engine(config, params, runtime=runtime, num_slots=num_slots, prefill_chunk_tokens=CHUNK,
                    max_prompt_tokens=64, prefix_cache_bytes=1 << 20, mesh=mesh)  # fmt: skip
    engine.warmup()
    warm = Engine.compilations()
    assert {k: warm[k] - before[k] for k in warm} == {
        "decode_step": 1,
        # One request alone (one chunk shape: CHUNK is below the shortest), 2 and 4 rows: loaded, run, split.
        "load_chunk": 3,
        "prefill_chunk": 3,
        "prefill_short_chunk": 0,
        "prefill_chunk_stable": 0,
        "split_chunk": 3,
        "first_token": 1,
        "insert": 1,
        "extract": 1,
    }

    # The parameters are laid out by param_specs: the fused qkvo columns over tensor, the width over fsdp.
    kernel = engine.params["blocks_0"]["mlstm_layer"]["qkvo_kernel"]
    D, W = config.embedding_dim, 2 * config.qk_dim + 2 * config.v_dim
    assert _shard_shapes(kernel) == {(D // fsdp, W // tensor)}

    def chunk_buffers():  # every shard's address: the chunk programs write their buffers in place on the mesh too
        buffers = {**engine._chunk_work, **engine._chunk_tokens}  # by row count, and by (row count, tokens)
        return {
            key: [s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(b) for s in x.addressable_shards]
            for key, b in buffers.items()
        }

    buffers = chunk_buffers()
    streams = [engine.submit(p, SamplingParams(max_tokens=n)) for p, n in REQUESTS[:2]]
    for _ in range(4):  # both are prefilled together (the second in two chunks) and decoding when the others arrive
        engine.step()
    assert engine.stats()["running"] >= 1
    streams += [engine.submit(p, SamplingParams(max_tokens=n)) for p, n in REQUESTS[2:]]
    _drain(engine)
    for (prompt, n), stream in zip(REQUESTS, streams, strict=True):
        assert _tokens(stream) == _reference(tuple(prompt))[:n], prompt
    assert Engine.compilations() == warm  # nothing recompiled as requests came and went
    assert engine.stats()["running"] == 0
    assert chunk_buffers() == buffers

    # The slot states: slots over (data, fsdp) where both divide them, heads over tensor; logits by slot rows.
    L, NH, split = config.num_blocks, config.num_heads, data * fsdp
    DHQK, DHV = config.qk_head_dim, config.v_head_dim
    c, n, m = engine._states
    assert _shard_shapes(c) == {(L, num_slots // split, NH // tensor, DHQK, DHV)}
    assert _shard_shapes(n) == {(L, num_slots // split, NH // tensor, DHQK)}
    assert _shard_shapes(m) == {(L, num_slots // split, NH // tensor)}
    assert _shard_shapes(engine._logits) == {(num_slots // split, config.vocab_size)}

    # A finished conversation's states, cached on the mesh, saved to the host and loaded back: a request that
    # extends it prefills only its new token and draws what generate draws from the whole prompt.
    prompt, n = REQUESTS[0]
    conversation = [*prompt, *_reference(tuple(prompt))[:n]]
    cached = engine.prefix_cache.get(conversation)
    assert cached is not None and _shard_shapes(cached.states.c) == {(L, 1, NH // tensor, DHQK, DHV)}
    path = tmp_path / "conversation.npz"
    engine.save_state(conversation, path)
    engine.prefix_cache.clear()
    assert engine.load_state(path) == conversation
    np.testing.assert_array_equal(
        np.asarray(engine.prefix_cache.get(conversation).states.c), np.asarray(cached.states.c)
    )
    prefilled = engine.stats()["prefill_tokens_total"]
    stream = engine.submit([*conversation, 17], SamplingParams(max_tokens=4))
    _drain(engine)
    assert _tokens(stream) == _reference((*conversation, 17))[:4]
    assert engine.stats()["prefill_tokens_total"] == prefilled + 1
    assert Engine.compilations() == warm


@needs_8
def test_stable_scratch_is_the_default_on_one_device_only(monkeypatch):
    """The default takes auto_stable_scratch's pick (measured on one GPU) without a mesh or on a mesh of one device,
    and leaves stable scratch off on a mesh of several, where stable_scratch=True asks for it."""
    from xlstm_jax.serving import engine as serving_engine

    monkeypatch.setattr(serving_engine, "auto_stable_scratch", lambda: True)  # as on a GPU with the mode and VMM
    config, params, runtime = load()

    def default(mesh):
        return Engine(config, params, runtime=runtime, num_slots=8, mesh=mesh).stable_scratch

    assert default(None) is True
    assert default(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])) is True
    assert default(make_mesh(MeshConfig(data=8))) is False
    assert default(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))) is False


@needs_8
def test_mesh_is_checked(tmp_path, capsys):
    config, params, runtime = load()
    with pytest.raises(ValueError, match=r"num_slots=6 .*data axis.*data=4, fsdp=2, tensor=1"):
        Engine(config, params, runtime=runtime, num_slots=6, mesh=make_mesh(MeshConfig(data=4, tensor=1)))
    with pytest.raises(ValueError, match=r"num_heads=2 .*tensor axis.*data=1, fsdp=2, tensor=4"):
        Engine(config, params, runtime=runtime, num_slots=4, mesh=make_mesh(MeshConfig(fsdp=2, tensor=4)))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        Engine(config, params, runtime=runtime, num_slots=4, mesh=MeshConfig(data=8))
    other = jax.make_mesh((8,), ("batch",))
    with pytest.raises(ValueError, match="missing"):
        Engine(config, params, runtime=runtime, num_slots=8, mesh=other)

    # xlstm-jax serve checks the same before the weights are read (here they cannot be).
    model_dir = tmp_path / "model"
    shutil.copytree(FIXTURE, model_dir)
    (model_dir / "model.safetensors").write_bytes(b"not safetensors")
    for mesh, slots, want in (("2,2,2", "3", "num_slots=3 must be"), ("1,2,4", "4", "num_heads=2 must be")):
        assert main(["serve", str(model_dir), "--port", "0", "--mesh", mesh, "--num-slots", slots]) == 2
        err = capsys.readouterr().err
        assert f"error: --mesh {mesh}: " in err and want in err and "safetensors" not in err, err
