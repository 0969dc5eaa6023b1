"""The sharded model on 8 CPU devices equals the single-device model, for the mesh shapes 8x1x1, 2x4x1, 2x2x2, 1x1x8.

The module needs 8 devices: ``test_sharding.py`` runs it in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; in a process with fewer devices it skips itself.

One tiny model with 8 heads (so that ``tensor=8`` splits them; DHQK = DHV = 16, which the Pallas step
covers) and a vocabulary of 100 (split by ``tensor=2``, replicated under ``tensor=8``, which does not divide
it). Per mesh: the forward logits, a masked cross-entropy loss and its gradients (chunkwise form, scanned
blocks: the parameters' leading L axis), one ``optax.adamw`` step on the sharded optimiser state, and
``generate`` with the Pallas decode step and the fused norm kernels in interpret mode (unrolled blocks), each
against the same computation without a mesh; and each device's shards of the parameters. Last, the
Hugging Face fixture loaded straight onto each mesh.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tests.numerics import TOL, assert_close, make_inputs
from xlstm_jax.generation import generate
from xlstm_jax.kernels.mosaic import HeadColumns
from xlstm_jax.kernels.recurrent_sequence import recurrent_sequence_pallas
from xlstm_jax.models.xlstm_parallel.blocks import dense
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.chunkwise_mosaic import chunkwise_hopper_fw
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.hf import load_hf
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig
from xlstm_jax.models.xlstm_parallel.sharding import (
    MeshConfig,
    batch_sharding,
    logical_constraint,
    make_mesh,
    param_specs,
    shard_map_sequence_form,
    shard_params,
    state_specs,
)

if jax.device_count() < 8:
    pytest.skip("needs 8 devices: test_sharding.py runs it in a subprocess with 8 CPU devices", allow_module_level=True)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "xlstm_tiny"
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
CONFIG = xLSTMLMConfig.tiny(num_heads=8, qk_dim_factor=1.0, vocab_size=100)
TRAIN = RuntimeConfig(prefill_backend="chunkwise", prefill_backend_kwargs=(("chunk_size", 8),), scan_blocks=True)
DECODE = RuntimeConfig(
    prefill_backend="chunkwise",
    prefill_backend_kwargs=(("chunk_size", 8),),
    step_backend="recurrent_pallas",
    decode_fusion="on",
    kernel_mode="interpret",
)
B, S = 8, 21  # 20 input positions: chunks of 8 with a remainder
OPTIMIZER = optax.adamw(1e-2, weight_decay=0.1)


def _random_params(seed: int) -> dict:
    """Random parameters of the scanned layout (never zeros): kernels ~ N(0, 1/fan_in), vectors ~ 1 + N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(xLSTMLMModel(CONFIG, TRAIN).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))

    def draw(path, s):
        if s.ndim - (jax.tree_util.keystr(path[:1]) == "['blocks']") >= 2:
            return rng.normal(0.0, 1.0 / math.sqrt(s.shape[-2]), s.shape).astype(np.float32)
        return (1.0 + rng.normal(0.0, 0.1, s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def _unrolled(params: dict) -> dict:
    """The scanned layout's parameters block by block (``blocks_0`` ...)."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    for layer in range(CONFIG.num_blocks):
        out[f"blocks_{layer}"] = jax.tree_util.tree_map(lambda x, i=layer: x[i], params["blocks"])
    return out


def _loss(params, batch):
    logits = xLSTMLMModel(CONFIG, TRAIN).apply({"params": params}, batch["input_ids"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"]), logits


_grad_step = jax.jit(jax.value_and_grad(_loss, has_aux=True))


@jax.jit
def _opt_step(params, opt_state, grads):
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _generate(params):
    return generate(CONFIG, params, PROMPTS, 5, runtime=DECODE, return_logits=True)


rng = np.random.default_rng(7)
TOKENS = rng.integers(0, CONFIG.vocab_size, (B, S)).astype(np.int32)
BATCH = {
    "input_ids": TOKENS[:, :-1],
    "targets": TOKENS[:, 1:],
    "loss_mask": (rng.random((B, S - 1)) < 0.8).astype(np.float32),
}
# 4 prompts of different lengths (left-padded): a batch that ("data", "fsdp") = 8 does not divide.
PROMPTS = [TOKENS[b, : 3 + 2 * b].tolist() for b in range(4)]


@pytest.fixture(scope="module")
def reference():
    """Everything on one device, without a mesh."""
    params = _random_params(0)
    (loss, logits), grads = _grad_step(params, BATCH)
    opt_state = OPTIMIZER.init(params)
    stepped, opt_state = _opt_step(params, opt_state, grads)
    return {
        "params": params,
        "loss": loss,
        "logits": logits,
        "grads": grads,
        "stepped": stepped,
        "opt_state": opt_state,
        "generated": _generate(_unrolled(params)),
    }


def _assert_trees_close(name, ref, out, tol):
    paths = jax.tree_util.tree_leaves_with_path(ref)
    for (path, r), o in zip(paths, jax.tree_util.tree_leaves(out), strict=True):
        assert_close(f"{name}{jax.tree_util.keystr(path)}", np.asarray(r, np.float64), np.asarray(o), tol)


def _tensor_split(spec: PartitionSpec) -> bool:
    return any(e == "tensor" or (isinstance(e, tuple) and "tensor" in e) for e in spec)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_model_equals_single_device(reference, shape):
    data, fsdp, tensor = shape
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    assert dict(mesh.shape) == {"data": data, "fsdp": fsdp, "tensor": tensor}
    params = shard_params(reference["params"], mesh, CONFIG)

    # Every parameter is split over fsdp (each device holds 1/fsdp of it, 1/(fsdp*tensor) where tensor also
    # splits it), the leading L axis never.
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        spec = x.sharding.spec
        if jax.tree_util.keystr(path[:1]) == "['blocks']":
            assert spec[0] is None, f"{jax.tree_util.keystr(path)}: the layer axis is split ({spec})"
        parts = fsdp * (tensor if _tensor_split(spec) else 1)
        for shard in x.addressable_shards:
            assert math.prod(shard.data.shape) * parts == x.size, (jax.tree_util.keystr(path), spec, shard.data.shape)
    blocks = params["blocks"]
    D, W, F = CONFIG.embedding_dim, 2 * CONFIG.qk_dim + 2 * CONFIG.v_dim, CONFIG.ffn_dim
    L = CONFIG.num_blocks
    assert blocks["mlstm_layer"]["qkvo_kernel"].addressable_shards[0].data.shape == (L, D // fsdp, W // tensor)
    assert blocks["ffn"]["proj_down"]["kernel"].addressable_shards[0].data.shape == (L, F // tensor, D // fsdp)
    vocab = CONFIG.vocab_size // tensor if CONFIG.vocab_size % tensor == 0 else CONFIG.vocab_size  # 100 / 8: whole
    assert params["embedding"]["embedding"].addressable_shards[0].data.shape == (vocab, D // fsdp)

    with jax.set_mesh(mesh):
        batch = jax.device_put(BATCH, batch_sharding(mesh))
        (loss, logits), grads = _grad_step(params, batch)
        assert_close("loss", np.float64(reference["loss"]), np.asarray(loss), TOL["float32-model"])
        assert_close("logits", np.asarray(reference["logits"], np.float64), np.asarray(logits), TOL["float32-model"])
        # Gradients from two evaluation orders (the batch and the parameters' sums split differently), compared
        # per parameter as the model's other gradient tests do.
        _assert_trees_close("grad", reference["grads"], grads, TOL["float32-model"])

        # The optimiser state laid out by the parameters' specs (optax.tree_map_params), then one step. Adam's
        # first step moves each element by lr * g / (|g| + eps), which turns the rounding differences of a
        # near-zero gradient element into up to 2 lr: the step is checked on one gradient (the single-device
        # one, laid out as the parameters), the gradients themselves above.
        specs = param_specs(params, CONFIG, mesh)
        opt_specs = optax.tree_map_params(
            OPTIMIZER,
            lambda _, spec: spec,
            jax.eval_shape(OPTIMIZER.init, params),
            specs,
            transform_non_params=lambda _: PartitionSpec(),
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )
        shardings = jax.tree_util.tree_map(
            lambda s: NamedSharding(mesh, s), opt_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )
        opt_state = jax.jit(OPTIMIZER.init, out_shardings=shardings)(params)
        for state in (opt_state[0].mu, opt_state[0].nu):  # laid out as the parameters
            for x, p in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(params), strict=True):
                assert x.sharding == p.sharding
        ref_grads = jax.device_put(reference["grads"], jax.tree_util.tree_map(lambda x: x.sharding, params))
        stepped, opt_state = _opt_step(params, opt_state, ref_grads)
        _assert_trees_close("step", reference["stepped"], stepped, TOL["float32-model"])
        _assert_trees_close("optimiser state", reference["opt_state"], opt_state, TOL["float32-model"])

        # generate: prefill, then the Pallas step and fused norms (interpret mode) inside shard_map.
        unrolled = shard_params(_unrolled(reference["params"]), mesh, CONFIG)
        out = _generate(unrolled)
        step = jax.make_jaxpr(
            lambda p, ids, states: xLSTMLMModel(CONFIG, DECODE).apply({"params": p}, ids, states, decode=True)
        )(unrolled, jnp.zeros((4, 1), jnp.int32), out.states)
        assert str(step).count("shard_map") == 3 * CONFIG.num_blocks + 1  # per block: 2 norms, the step; out norm
    ref = reference["generated"]
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.num_generated), np.asarray(ref.num_generated))
    assert_close("generated logits", np.asarray(ref.logits, np.float64), np.asarray(out.logits), TOL["float32-model"])
    _assert_trees_close("generated states", ref.states, out.states, TOL["float32-model"])


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 1, 8)], ids=lambda s: "x".join(map(str, s)))
def test_per_block_projections_on_a_tensor_split_mesh(reference, shape, monkeypatch):
    """The fused kernels' per-block products (``project_split`` from ``SPLIT_MIN_ROWS`` rows on, here forced)
    slice kernels whose columns ``tensor`` splits contiguously: loss, logits and gradients stay the reference's."""
    monkeypatch.setattr(dense, "SPLIT_MIN_ROWS", 1)
    mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    params = shard_params(reference["params"], mesh, CONFIG)
    with jax.set_mesh(mesh):
        batch = jax.device_put(BATCH, batch_sharding(mesh))
        (loss, logits), grads = jax.jit(jax.value_and_grad(_loss, has_aux=True))(params, batch)  # traced anew
    assert_close("loss", np.float64(reference["loss"]), np.asarray(loss), TOL["float32-model"])
    assert_close("logits", np.asarray(reference["logits"], np.float64), np.asarray(logits), TOL["float32-model"])
    _assert_trees_close("grad", reference["grads"], grads, TOL["float32-model"])


def test_activations_and_states_take_their_logical_layout():
    """logical_constraint and state_specs under a 2x2x2 mesh: B over (data, fsdp), heads over tensor."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 3, 128)), jnp.float32)
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: logical_constraint(x * 2, ("batch", "seq", "act_embed")))(x)
        z = jax.jit(lambda x: logical_constraint(x, ("batch", None, "vocab")))(x[:6])  # 6 rows: over data only
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), 3)
    assert z.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("data", None, "tensor")), 3)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
    specs = state_specs(CONFIG, 4, mesh)
    assert specs.c == PartitionSpec(None, ("data", "fsdp"), "tensor", None, None)
    assert specs.m == PartitionSpec(None, ("data", "fsdp"), "tensor")


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_hf_checkpoint_loads_onto_its_shards(scan_blocks):
    """load_hf(mesh=...) of the fixture: each device holds 1/fsdp of every parameter (1/(fsdp*tensor) where tensor
    also splits it), and the values are the load without a mesh, bit for bit."""
    config, want = load_hf(FIXTURE, scan_blocks=scan_blocks)
    for data, fsdp, tensor in MESHES:
        mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
        loaded_config, params = load_hf(FIXTURE, scan_blocks=scan_blocks, mesh=mesh)
        assert loaded_config == config
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want)
        for (path, x), w in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(want), strict=True
        ):
            name = f"{(data, fsdp, tensor)} {jax.tree_util.keystr(path)}"
            assert x.sharding.mesh == mesh and x.dtype == w.dtype, name
            parts = fsdp * (tensor if _tensor_split(x.sharding.spec) else 1)
            assert len(x.addressable_shards) == 8, name
            for shard in x.addressable_shards:
                assert math.prod(shard.data.shape) * parts == x.size, (name, x.sharding.spec, shard.data.shape)
                np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(w)[shard.index], err_msg=name)
        kernel = params["blocks" if scan_blocks else "blocks_1"]["mlstm_layer"]["qkvo_kernel"]
        D, W = config.embedding_dim, 2 * config.qk_dim + 2 * config.v_dim
        assert kernel.addressable_shards[0].data.shape[-2:] == (D // fsdp, W // tensor)


@pytest.mark.parametrize("backend", ["recurrent_pallas", "chunkwise_mosaic-BSND"])
def test_pallas_sequence_form_per_device(backend):
    """A Pallas backend's form under shard_map_sequence_form on 2x2x2: 2 rows split over data only (fsdp gets the
    rows whole), 2 heads over tensor; h, the last states and every gradient (initial states included) equal the
    call without a mesh. recurrent_pallas's with packed documents in interpret mode; chunkwise_mosaic's with
    ``layout="BSND"`` (its XLA form here), q, k and v ``HeadColumns`` blocks of one (B, S, 3 NH D) array, taken as
    arrays and split on B and NH (h too) rather than on their first two axes."""
    x = make_inputs(np.random.default_rng(3), 2, 2, 11, 16, 16, states=True)
    x = {name: jnp.asarray(value, jnp.float32) for name, value in x.items()}
    if backend == "recurrent_pallas":
        segment_ids = jnp.asarray([[1] * 4 + [2] * 7, [1] * 11], jnp.int32)
        form = functools.partial(
            shard_map_sequence_form(recurrent_sequence_pallas), segment_ids=segment_ids, interpret=True
        )  # fmt: skip
        heads = lambda *qkv: qkv  # noqa: E731
    else:
        form = functools.partial(
            shard_map_sequence_form(chunkwise_hopper_fw), chunk_size=4, interpret=False, layout="BSND"
        )  # fmt: skip

        def heads(*qkv):  # blocks of one (B, S, 3 NH D) array, each (B, S, NH, D)
            B, NH, S, D = qkv[0].shape
            array = jnp.concatenate([t.swapaxes(1, 2).reshape(B, S, NH * D) for t in qkv], axis=-1)
            return tuple(HeadColumns(array, n * NH * D, NH, D) for n in range(3))

    def loss(x):
        args = (*heads(*(x[name] for name in ("q", "k", "v"))), x["i"], x["f"], x["c0"], x["n0"], x["m0"], True)
        h, (c, n, m) = form(*args)
        return jnp.sum(h * jnp.cos(h)) + jnp.sum(c * x["c0"]) + jnp.sum(jnp.sin(n)) + jnp.sum(m), (h, c, n, m)

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    ref = run(x)
    with jax.set_mesh(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
        assert "shard_map" in str(jax.make_jaxpr(run)(x))
        out = run(x)
    _assert_trees_close("sequence form", ref, out, TOL["float32-model"])
