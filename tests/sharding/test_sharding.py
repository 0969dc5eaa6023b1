"""Tests of xlstm_jax/models/xlstm_parallel/sharding.py and hf.load_hf(mesh=...) in this (one-device) process.

The layout rules are checked on abstract meshes of several shapes, which need no devices. The model on 8
devices (``test_multidevice.py``) runs in a subprocess started here, with 8 CPU devices made by XLA_FLAGS set
before JAX is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec
from safetensors.numpy import load_file, save_file

from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.hf import load_hf, save_hf
from xlstm_jax.models.xlstm_parallel.model import ModelStates, xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig
from xlstm_jax.models.xlstm_parallel.sharding import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    MeshConfig,
    batch_sharding,
    logical_constraint,
    logical_shards,
    logical_spec,
    make_mesh,
    param_logical_axes,
    param_shardings,
    param_specs,
    shard_map_batch_heads,
    shard_params,
    state_specs,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "xlstm_tiny"
P = PartitionSpec


def _abstract(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def test_multidevice_subprocess():
    """tests/sharding/test_multidevice.py on 8 CPU devices (XLA_FLAGS set before JAX starts, in a new process).

    XLA's LLVM optimisations are turned down there: they cost most of the compile time of the many small
    programs and change no result (XLA's own passes still run; no fast-math either way).
    """
    env = dict(os.environ)
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags} --xla_llvm_disable_expensive_passes=true".strip()
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/sharding/test_multidevice.py"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = [
        line for line in (run.stdout + run.stderr).splitlines() if "Involuntary full rematerialization" not in line
    ]
    assert run.returncode == 0, "\n".join(lines[-80:])
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


# --- the mesh ----------------------------------------------------------------------------------------------


def test_mesh_config_resolves_the_remaining_devices():
    assert MeshConfig().shape(8) == (1, 8, 1)
    assert MeshConfig(data=2, tensor=2).shape(8) == (2, 2, 2)
    assert MeshConfig(data=2, fsdp=4, tensor=1).shape(8) == (2, 4, 1)
    assert MeshConfig(data=-1, fsdp=1, tensor=8).shape(8) == (1, 1, 8)
    assert MeshConfig(np.int64(2), 2, 2) == MeshConfig(2, 2, 2)
    assert hash(MeshConfig()) == hash(MeshConfig(1, -1, 1))


@pytest.mark.parametrize(
    ("fields", "devices", "error", "match"),
    [
        ({"data": 0}, 8, ValueError, r"MeshConfig.data must be a positive int or -1 \(the rest\), got data=0"),
        ({"tensor": -2}, 8, ValueError, "MeshConfig.tensor must be a positive int or -1"),
        ({"fsdp": 2.0}, 8, TypeError, r"MeshConfig.fsdp must be an int, got fsdp=2.0 \(float\)"),
        ({"data": True}, 8, TypeError, "MeshConfig.data must be an int"),
        ({"data": -1}, 8, ValueError, r"at most one MeshConfig field may be -1 .*\['data', 'fsdp'\]"),
        ({"data": 3}, 8, ValueError, "product 3 does not divide the device count 8"),
        (
            {"data": 2, "fsdp": 2, "tensor": 2},
            4,
            ValueError,
            "asks for data\\*fsdp\\*tensor = 8 devices, but the device count is 4",
        ),
    ],
)
def test_mesh_config_errors_name_the_field_and_device_count(fields, devices, error, match):
    with pytest.raises(error, match=match):
        MeshConfig(**fields).shape(devices)


def test_make_mesh_on_this_process_devices():
    mesh = make_mesh()
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    with pytest.raises(ValueError, match=f"device count is {jax.device_count()}"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=2 * jax.device_count()))
    with pytest.raises(TypeError, match="mesh_config must be a MeshConfig"):
        make_mesh((1, 1, 1))


# --- logical axes ------------------------------------------------------------------------------------------


def test_logical_spec_takes_the_longest_dividing_prefix():
    mesh = _abstract(2, 4, 2)
    assert logical_spec(("batch", "seq", "act_embed"), (16, 5, 64), mesh) == P(("data", "fsdp"), None, None)
    assert logical_spec(("batch", "heads"), (6, 3), mesh) == P("data", None)  # 6 = 2 x 3: data only; 3 heads whole
    assert logical_spec(("batch", "vocab"), (3, 100), mesh) == P(None, "tensor")
    # A mesh axis serves one dimension at most.
    assert logical_spec(("heads", "vocab"), (8, 8), mesh) == P("tensor", None)
    with pytest.raises(ValueError, match="one logical name per dimension"):
        logical_spec(("batch",), (2, 3), mesh)
    with pytest.raises(ValueError, match="unknown logical axis name 'rows'"):
        logical_spec(("rows",), (2,), mesh)
    assert {name for name, _ in LOGICAL_AXIS_RULES} >= {"batch", "embed", "heads", "ffn", "qkvo", "vocab"}


@pytest.fixture(scope="module")
def tiny_shapes():
    """The parameter shapes of the fixture's architecture (D=128, NH=2, V=99, FFN 384), both block layouts."""
    config = xLSTMLMConfig.tiny()
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = {}
    for scan in (False, True):
        model = xLSTMLMModel(config, RuntimeConfig(scan_blocks=scan))
        shapes[scan] = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    return config, shapes


# The fixture architecture's parameters on a 2x2x2 mesh, by hand: D=128 over fsdp, the fused and FFN columns
# and the per-head norm over tensor; V=99 is not split by tensor=2; the gate bias (4,), with no D, takes fsdp
# on its only axis, the per-head norm's weight (heads over tensor) fsdp beside tensor.
EXPECTED_2x2x2 = {
    "embedding/embedding": P(None, "fsdp"),
    "norm_mlstm/weight": P("fsdp"),
    "mlstm_layer/qkvo_kernel": P("fsdp", "tensor"),
    "mlstm_layer/if_kernel": P("fsdp", None),
    "mlstm_layer/if_bias": P("fsdp"),
    "mlstm_layer/multihead_norm/weight": P(("tensor", "fsdp")),
    "mlstm_layer/out_proj/kernel": P("tensor", "fsdp"),
    "norm_ffn/weight": P("fsdp"),
    "ffn/proj_gate_up/kernel": P("fsdp", "tensor"),
    "ffn/proj_down/kernel": P("tensor", "fsdp"),
    "out_norm/weight": P("fsdp"),
    "lm_head/kernel": P("fsdp", None),
}


def _flat(tree) -> dict:
    return {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))
    }


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_param_specs_name_every_parameter(tiny_shapes, scan_blocks):
    config, shapes = tiny_shapes
    specs = param_specs(shapes[scan_blocks], config, _abstract(2, 2, 2))
    assert jax.tree_util.tree_structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree_util.tree_structure(
        shapes[scan_blocks]
    )
    for path, spec in _flat(specs).items():
        top, _, rest = path.partition("/")
        if top == "blocks":  # the scanned blocks' leading L is never split
            assert spec == P(None, *EXPECTED_2x2x2[rest]), path
        elif top.startswith("blocks_"):
            assert spec == EXPECTED_2x2x2[rest], path
        else:
            assert spec == EXPECTED_2x2x2[path], path


def test_param_specs_fall_back_where_the_mesh_does_not_divide(tiny_shapes):
    """fsdp=3 divides neither D=128 nor the vectors: a matrix takes it on its largest dimension that 3 divides,
    the others stay whole; tensor=3 divides V=99 and the fused 384 columns, not the per-head norm's 128."""
    config, shapes = tiny_shapes
    specs = _flat(param_specs(shapes[False], config, _abstract(1, 3, 1)))
    assert specs["embedding/embedding"] == P("fsdp", None)  # 99 = 3 x 33
    assert specs["blocks_0/mlstm_layer/qkvo_kernel"] == P(None, "fsdp")  # 384
    assert specs["blocks_0/ffn/proj_down/kernel"] == P("fsdp", None)  # 384
    assert specs["blocks_0/norm_mlstm/weight"] == P(None)  # 128: replicated
    assert specs["blocks_0/mlstm_layer/if_kernel"] == P(None, None)  # (128, 4)
    specs = _flat(param_specs(shapes[False], config, _abstract(1, 1, 3)))
    assert specs["embedding/embedding"] == P("tensor", "fsdp")  # unit axes cost nothing
    assert specs["blocks_0/mlstm_layer/qkvo_kernel"] == P("fsdp", "tensor")
    assert specs["blocks_0/mlstm_layer/multihead_norm/weight"] == P(None)  # 128


def test_param_specs_errors(tiny_shapes):
    config, shapes = tiny_shapes
    mesh = _abstract(1, 2, 1)
    with pytest.raises(ValueError, match="'blocks_0/ffn/gate' is not a parameter"):
        param_specs({"blocks_0": {"ffn": {"gate": jnp.zeros((2, 2))}}}, config, mesh)
    with pytest.raises(ValueError, match=r"out_norm/weight has shape \(2, 2\); expected 1 dims"):
        param_specs({"out_norm": {"weight": jnp.zeros((2, 2))}}, config, mesh)
    wrong_depth = {"blocks": {"norm_ffn": {"weight": jnp.zeros((3, 128))}}}
    with pytest.raises(ValueError, match="leading axis must be num_blocks=2"):
        param_specs(wrong_depth, config, mesh)
    with pytest.raises(ValueError, match=r"the mesh must have the axes .* \(missing \['fsdp', 'tensor'\]\)"):
        param_specs(shapes[False], config, AbstractMesh((1,), ("data",)))
    with pytest.raises(TypeError, match="config must be an xLSTMLMConfig"):
        param_specs(shapes[False], {}, mesh)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        param_specs(shapes[False], config, (1, 2, 1))
    assert param_logical_axes(("blocks", "mlstm_layer", "qkvo_kernel")) == ("layers", "embed", "qkvo")


def test_optimizer_state_specs_follow_the_params(tiny_shapes):
    """optax.tree_map_params lays the adamw state out by the parameters' specs (the specs tree mirrors the params)."""
    config, shapes = tiny_shapes
    params = shapes[True]
    specs = param_specs(params, config, _abstract(1, 2, 2))
    optimizer = optax.adamw(1e-3)
    state = jax.eval_shape(optimizer.init, params)
    opt_specs = optax.tree_map_params(
        optimizer,
        lambda _, spec: spec,
        state,
        specs,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )
    is_spec = lambda x: isinstance(x, P)
    assert jax.tree_util.tree_structure(opt_specs, is_leaf=is_spec) == jax.tree_util.tree_structure(state)
    assert opt_specs[0].mu == specs and opt_specs[0].nu == specs
    assert opt_specs[0].count == P()
    assert opt_specs[0].mu["blocks"]["ffn"]["proj_down"]["kernel"] == P(None, "tensor", "fsdp")


def test_state_and_batch_layout():
    config = xLSTMLMConfig.tiny(num_heads=4)
    specs = state_specs(config, 8, _abstract(2, 2, 2))
    assert isinstance(specs, ModelStates)
    assert specs.c == P(None, ("data", "fsdp"), "tensor", None, None)
    assert specs.n == P(None, ("data", "fsdp"), "tensor", None)
    assert specs.m == P(None, ("data", "fsdp"), "tensor")
    assert state_specs(config, 3, _abstract(2, 2, 8)).m == P(None, None, None)  # 3 rows, 4 heads: whole
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        state_specs(config, 0, _abstract(2, 2, 2))
    mesh = make_mesh()
    assert batch_sharding(mesh).spec == P(("data", "fsdp"), None)


# --- without a mesh, and on a one-device mesh ---------------------------------------------------------------


def test_helpers_without_a_mesh_change_nothing():
    x = jnp.arange(12.0).reshape(2, 3, 2)
    assert logical_constraint(x, ("batch", "seq", "act_embed")) is x
    assert logical_shards("heads", 8) == 1
    assert shard_map_batch_heads(lambda a: a, [("batch", None, None)], ("batch", None, None))(x) is x
    with pytest.raises(ValueError, match="one logical name per dimension"):
        logical_constraint(x, ("batch",))
    with pytest.raises(ValueError, match="unknown logical axis name 'rows'"):
        logical_constraint(x, ("rows", None, None))
    with jax.set_mesh(jax.make_mesh((1,), ("x",), axis_types=(AxisType.Auto,))):  # a mesh of other axes
        assert logical_constraint(x, ("batch", "seq", "act_embed")) is x
        assert logical_shards("batch", 8) == 1


_B = ("batch", "heads", None)


def test_shard_map_batch_heads_on_a_mesh():
    """Under a mesh (one device here, 8 in test_multidevice.py) fn runs inside shard_map on its blocks; names
    that no argument bears are refused."""
    mesh = make_mesh()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 3)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3,)), jnp.float32)
    fn = shard_map_batch_heads(lambda a, w, _: (a * w, None), [("batch", "heads", None), None, None], (_B, None))
    with jax.set_mesh(mesh):
        out, none = jax.jit(fn)(x, w, None)
        assert logical_shards("batch", 4) == jax.device_count()
        bad = shard_map_batch_heads(lambda a: a, [("batch", None, None)], ("batch", "heads", None))
        with pytest.raises(ValueError, match="no argument has a 'heads' axis"):
            jax.jit(bad)(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x * w))
    assert none is None


def test_shard_params_places_every_leaf(tiny_shapes):
    config, shapes = tiny_shapes
    mesh = make_mesh()
    params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), shapes[False])
    placed = shard_params(params, mesh, config)
    shardings = param_shardings(params, config, mesh)
    for x, sharding in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(shardings), strict=True):
        assert x.sharding == sharding


# --- load_hf(mesh=...) -------------------------------------------------------------------------------------


def _assert_bitwise_equal(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(
            np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8), err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.parametrize(("scan_blocks", "overrides"), [(False, {}), (True, {"dtype": "bfloat16"})])
def test_load_hf_onto_a_mesh_equals_the_plain_load(scan_blocks, overrides):
    mesh = make_mesh()
    config, want = load_hf(FIXTURE, scan_blocks=scan_blocks, **overrides)
    loaded_config, got = load_hf(FIXTURE, scan_blocks=scan_blocks, mesh=mesh, **overrides)
    assert loaded_config == config
    _assert_bitwise_equal(got, want)
    for x in jax.tree_util.tree_leaves(got):
        assert x.sharding.mesh == mesh


def test_load_hf_onto_a_mesh_from_safetensors_shards(tmp_path):
    config, params = load_hf(FIXTURE)
    save_hf(tmp_path, config, params, max_shard_bytes=300_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _, got = load_hf(tmp_path, mesh=make_mesh())
    _assert_bitwise_equal(got, params)


def _write(tmp_path: Path, tensors: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text((FIXTURE / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def _same_error(model_dir: Path, **kwargs) -> None:
    """load_hf with a mesh raises what load_hf without one raises, word for word."""
    with pytest.raises(ValueError) as plain:
        load_hf(model_dir, **kwargs)
    with pytest.raises(ValueError) as sharded:
        load_hf(model_dir, mesh=make_mesh(), **kwargs)
    assert str(sharded.value) == str(plain.value)


def test_load_hf_onto_a_mesh_checks_as_the_plain_load(tmp_path):
    tensors = load_file(FIXTURE / "model.safetensors")
    bad = dict(tensors)
    bad["backbone.blocks.1.mlstm_layer.v.weight"] = bad["backbone.blocks.1.mlstm_layer.v.weight"].copy()
    bad["backbone.blocks.1.mlstm_layer.v.weight"][5, :3] = np.nan  # inside the fused qkvo_kernel
    bad["lm_head.weight"] = bad["lm_head.weight"].copy()
    bad["lm_head.weight"][0, 0] = np.inf
    _same_error(_write(tmp_path / "nan", bad))

    ints = dict(tensors, **{"backbone.out_norm.weight": np.ones(128, np.int32)})
    _same_error(_write(tmp_path / "int", ints))

    missing = {k: v for k, v in tensors.items() if k != "backbone.blocks.0.ffn.proj_up.weight"}
    _same_error(_write(tmp_path / "missing", missing))

    _same_error(_write(tmp_path / "tied", dict(tensors)), tie_word_embeddings=True)

    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh or None, got tuple"):
        load_hf(FIXTURE, mesh=(1, 1, 1))


def test_load_hf_onto_a_mesh_ties_an_equal_head(tmp_path):
    """A head equal to the embedding (compared block by block on the mesh path) loads tied, as without a mesh."""
    tensors = load_file(FIXTURE / "model.safetensors")
    tensors["lm_head.weight"] = tensors["backbone.embeddings.weight"].copy()
    hf = (FIXTURE / "config.json").read_text().replace('"tie_word_embeddings": false', '"tie_word_embeddings": true')
    model_dir = _write(tmp_path, tensors)
    (model_dir / "config.json").write_text(hf)
    config, want = load_hf(model_dir)
    loaded_config, got = load_hf(model_dir, mesh=make_mesh())
    assert config.tie_word_embeddings and loaded_config == config and "lm_head" not in got
    _assert_bitwise_equal(got, want)
