"""Hugging Face format: transformers' config semantics, load and save, sharding, bad files, safe saving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.models.fixture import FIXTURE, load
from tests.numerics import TOL, assert_close
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.hf import (
    config_from_hf,
    config_to_hf,
    expected_hf_shapes,
    hf_tensors_to_params,
    load_hf,
    save_hf,
)
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig

# Written by transformers from xLSTMConfig(num_blocks=3, hidden_size=32, ...) (scripts/make_alias_fixture.py).
ALIASES = FIXTURE.parent / "xlstm_aliases"
REPO = Path(__file__).resolve().parents[2]


def _hf_config(path: Path = FIXTURE) -> dict:
    return json.loads((path / "config.json").read_text())


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _write_checkpoint(path: Path, tensors: dict, config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(_hf_config() if config is None else config))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# --- transformers' config semantics ---------------------------------------------------------------


def test_checkpoint_written_by_transformers_from_num_blocks():
    """config.json holds num_blocks=3 and the default num_hidden_layers=32: 3 blocks, logits as transformers."""
    hf = _hf_config(ALIASES)
    assert (hf["num_blocks"], hf["num_hidden_layers"], hf["tie_word_embeddings"]) == (3, 32, True)
    config, params = load_hf(ALIASES, scan_blocks=True)
    assert (config.num_blocks, config.embedding_dim, config.vocab_size, config.num_heads) == (3, 32, 61, 2)
    # int(32 * 0.75) = 24 (transformers' config.qk_dim would round it up to 64; its layer does not); the FFN
    # width 32 * 1.51 = 48.32 rounds down to 48 at multiples of 16, as transformers sizes it.
    assert (config.qk_dim, config.qk_head_dim, config.v_head_dim, config.ffn_dim) == (24, 12, 16, 48)
    # transformers keeps its own lm_head despite tie_word_embeddings=True; its head differs from the embedding.
    assert config.tie_word_embeddings is False
    tensors = load_file(ALIASES / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]), tensors["lm_head.weight"].T)
    with np.load(ALIASES / "peer.npz") as peer:
        ids, ref = peer["input_ids"], peer["logits"]
    model = xLSTMLMModel(config, RuntimeConfig(scan_blocks=True))
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(ids))  # eager Flax is slow
    assert_close("logits (transformers checkpoint from num_blocks)", ref, logits, TOL["float32-model"])
    # The unrolled layout holds the same parameters, block by block.
    config2, unrolled = load_hf(ALIASES)
    assert config2 == config
    blocks = jax.tree_util.tree_map(np.asarray, params["blocks"])  # sliced on the host: no op per leaf shape
    for layer in range(3):
        _assert_trees_equal(unrolled[f"blocks_{layer}"], jax.tree_util.tree_map(lambda x, i=layer: x[i], blocks))


def test_absent_keys_take_transformers_defaults():
    """An empty config.json reads as transformers' default config, and that is our default config."""
    defaults = _hf_config_file(ALIASES / "transformers_defaults.json")
    assert config_from_hf({"model_type": "xlstm"}) == config_from_hf(defaults) == xLSTMLMConfig()


def _hf_config_file(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    ("keys", "num_blocks", "width"),
    [
        ({"num_blocks": 3, "num_hidden_layers": 32}, 3, 4096),  # num_blocks wins
        ({"num_blocks": None, "num_hidden_layers": 5}, 5, 4096),
        ({"num_hidden_layers": 5}, 5, 4096),
        ({"num_blocks": 7}, 7, 4096),
        ({}, 32, 4096),
        ({"hidden_size": 64, "embedding_dim": 64}, 32, 64),
        ({"hidden_size": 64}, 32, 64),  # embedding_dim follows hidden_size
        ({"hidden_size": None, "embedding_dim": 64}, 32, 64),
    ],
)
def test_aliases_resolve_as_transformers(keys, num_blocks, width):
    config = config_from_hf({"model_type": "xlstm", **keys})
    assert (config.num_blocks, config.embedding_dim) == (num_blocks, width)


def test_embedding_dim_and_hidden_size_must_agree():
    with pytest.raises(ValueError, match=r"embedding_dim=64 but hidden_size=128: transformers"):
        config_from_hf({"hidden_size": 128, "embedding_dim": 64})
    # Without hidden_size, transformers uses its default 4096 for the blocks: the message says so.
    message = r"embedding_dim=64 but hidden_size=4096 \(absent: transformers' default\)"
    with pytest.raises(ValueError, match=message):
        config_from_hf({"embedding_dim": 64})


def test_block_count_mismatch_names_config_and_checkpoint(tmp_path):
    """The old bug: reading num_hidden_layers=32 over 3 blocks. Now the error names both sides."""
    hf = _hf_config(ALIASES)
    del hf["num_blocks"]  # transformers then builds num_hidden_layers=32 blocks
    shutil.copy(ALIASES / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError) as info:
        load_hf(tmp_path)
    message = str(info.value)
    assert "config.json gives num_blocks=32 but the checkpoint has blocks 0..2" in message
    assert "missing (435): backbone.blocks.3.ffn.proj_down.weight, " in message  # 29 blocks x 15 tensors
    assert "... (415 more)" in message


def test_embedding_shape_mismatch_names_config_and_tensor(tmp_path):
    hf = {**_hf_config(), "vocab_size": 100}
    shutil.copy(FIXTURE / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"vocab_size=100, hidden_size=128 but backbone.embeddings.weight has shape"):
        load_hf(tmp_path)


def test_config_mapping_round_trip():
    hf = _hf_config()
    config = config_from_hf(hf)
    assert (config.embedding_dim, config.num_blocks, config.num_heads, config.vocab_size) == (128, 2, 2, 99)
    assert (config.param_dtype, config.dtype, config.state_dtype) == ("float32", "float32", "float32")
    back = config_to_hf(config)
    architecture = (
        *("hidden_size", "embedding_dim", "num_hidden_layers", "num_blocks", "num_heads", "vocab_size"),
        *("qk_dim_factor", "v_dim_factor", "ffn_proj_factor", "ffn_round_up_to_multiple_of", "gate_soft_cap"),
        *("output_logit_soft_cap", "norm_eps", "eps", "use_bias", "weight_mode", "add_out_norm"),
        *("norm_reduction_force_float32", "tie_word_embeddings", "bos_token_id", "pad_token_id", "eos_token_id"),
        *("dtype", "inference_state_dtype", "model_type", "mode", "return_last_states"),
    )
    for key in architecture:
        assert back[key] == hf[key], key
    assert config_from_hf(back) == config


def test_config_dtypes_and_eos_lists():
    hf = _hf_config()
    assert config_from_hf({**hf, "dtype": "bfloat16"}).param_dtype == "bfloat16"
    old = {k: v for k, v in hf.items() if k != "dtype"}
    assert config_from_hf({**old, "torch_dtype": "bfloat16"}).dtype == "bfloat16"
    assert config_from_hf({**hf, "dtype": None}).param_dtype == "float32"
    assert config_from_hf({**hf, "eos_token_id": [5]}).eos_token_id == 5
    assert config_from_hf({**hf, "eos_token_id": []}).eos_token_id is None
    with pytest.raises(ValueError, match=r"eos_token_id=\[2, 5\]"):
        config_from_hf({**hf, "eos_token_id": [2, 5]})
    assert config_from_hf({**hf, "eos_token_id": [2, 5]}, eos_token_id=5).eos_token_id == 5


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"model_type": "llama"}, ValueError, "model_type='llama'"),
        ({"weight_mode": "fused"}, ValueError, "weight_mode='fused'"),
        ({"use_bias": True}, ValueError, "use_bias=True"),
        ({"use_bias": "false"}, ValueError, "use_bias='false'"),
        ({"add_out_norm": "true"}, TypeError, "add_out_norm"),
        ({"hidden_size": "128"}, TypeError, "hidden_size must be an int, got hidden_size='128'"),
        ({"num_blocks": 2.0}, TypeError, "num_blocks must be an int"),
        ({"num_hidden_layers": "2", "num_blocks": None}, TypeError, "num_hidden_layers must be an int"),
        ({"vocab_size": "99"}, TypeError, "config.json: vocab_size must be an int"),
        ({"num_heads": 2.0}, TypeError, "config.json: num_heads must be an int"),
        ({"tie_word_embeddings": "false"}, TypeError, "config.json: tie_word_embeddings must be a bool"),
        ({"qk_dim_factor": -0.5}, ValueError, "config.json: qk_dim_factor must be a positive"),
        ({"ffn_proj_factor": 0.0}, ValueError, "config.json: ffn_proj_factor must be a positive"),
        ({"v_dim_factor": "1.0"}, TypeError, "config.json: v_dim_factor must be a number"),
        ({"dtype": 32}, TypeError, "config.json: dtype must be a dtype name"),
        ({"dtype": "int8"}, ValueError, "dtype must be a floating-point dtype"),
        ({"inference_state_dtype": "int8"}, ValueError, "state_dtype must be a floating-point dtype"),
        ({"pad_token_id": 99}, ValueError, r"pad_token_id must be a token id in \[0, vocab_size=99\)"),
    ],
)
def test_config_from_hf_rejects_bad_values(changes, error, match):
    with pytest.raises(error, match=match):
        config_from_hf({**_hf_config(), **changes})


def test_config_from_hf_rejects_bad_overrides():
    with pytest.raises(TypeError, match="chunk_size"):
        config_from_hf(_hf_config(), chunk_size=16)  # a transformers kernel setting, not a field
    with pytest.raises(TypeError, match="with num_heads overridden: num_heads must be an int"):
        config_from_hf(_hf_config(), num_heads="2")
    with pytest.raises(TypeError, match="hf_config must be a mapping"):
        config_from_hf([("model_type", "xlstm")])


# --- load and save ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_blocks", [True, False])
def test_save_load_round_trip(tmp_path, scan_blocks):
    """Saving writes the checkpoint's own tensors bit for bit; loading the saved directory gives the same params."""
    config, params, _ = load(scan_blocks=scan_blocks)
    save_hf(tmp_path, config, params)
    assert _files(tmp_path) == ["config.json", "model.safetensors"]
    original = load_file(FIXTURE / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(original)
    for name, x in original.items():
        np.testing.assert_array_equal(saved[name], x, err_msg=name)
    config2, params2 = load_hf(tmp_path, scan_blocks=scan_blocks)
    assert config2 == config
    _assert_trees_equal(params, params2)


def test_sharded_save_packs_greedily_and_loads(tmp_path):
    config, params, _ = load()
    limit = 60_000
    save_hf(tmp_path, config, params, max_shard_bytes=limit)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert list(weight_map) == sorted(weight_map)  # written sorted
    assert set(weight_map) == set(expected_hf_shapes(config))
    tensors = load_file(FIXTURE / "model.safetensors")
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in tensors.values())
    files = sorted(set(weight_map.values()))
    count = len(files)
    assert files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert _files(tmp_path) == sorted(["config.json", "model.safetensors.index.json", *files])
    # Greedy packing in checkpoint order: a shard exceeds the limit only as a single tensor, and the first
    # tensor of the next shard would not have fitted in it.
    shards = [load_file(tmp_path / name) for name in files]
    sizes = [sum(x.nbytes for x in shard.values()) for shard in shards]
    for shard, size in zip(shards, sizes, strict=True):
        assert size <= limit or len(shard) == 1
    order = list(expected_hf_shapes(config))
    firsts = [min(order.index(name) for name in shard) for shard in shards]
    for size, first in zip(sizes[:-1], firsts[1:], strict=True):
        assert size + tensors[order[first]].nbytes > limit
    _, params2 = load_hf(tmp_path)
    _assert_trees_equal(params, params2)


def test_single_file_is_read_before_an_index(tmp_path):
    """As in transformers: with both model.safetensors and an index present, the single file is the checkpoint."""
    config, params, _ = load()
    save_hf(tmp_path, config, params, max_shard_bytes=60_000)
    changed = {**params, "out_norm": {"weight": params["out_norm"]["weight"] + 1.0}}
    save_hf(tmp_path / "single", config, changed)
    shutil.copy(tmp_path / "single" / "model.safetensors", tmp_path / "model.safetensors")
    _, loaded = load_hf(tmp_path)
    np.testing.assert_array_equal(np.asarray(loaded["out_norm"]["weight"]), np.asarray(changed["out_norm"]["weight"]))
    # A new save removes the files of both: only its own remain.
    shutil.rmtree(tmp_path / "single")
    save_hf(tmp_path, config, params, max_shard_bytes=400_000)
    shards = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert set(_files(tmp_path)) == {"config.json", "model.safetensors.index.json"} | shards
    _assert_trees_equal(params, load_hf(tmp_path)[1])


def test_errors_list_missing_unexpected_and_mismatched(tmp_path):
    tensors = load_file(FIXTURE / "model.safetensors")
    del tensors["backbone.blocks.1.mlstm_layer.k.weight"]
    del tensors["lm_head.weight"]
    tensors["backbone.blocks.0.mlstm_layer.extra.weight"] = np.ones((3,), np.float32)
    tensors["backbone.blocks.0.ffn.proj_up.weight"] = np.ones((128, 384), np.float32)  # transposed
    _write_checkpoint(tmp_path, tensors)
    with pytest.raises(ValueError) as info:
        load_hf(tmp_path)
    lines = str(info.value).splitlines()
    assert lines == [
        "the checkpoint does not fit the xLSTM config (D=128, L=2, NH=2, V=99):",
        "  missing (2): backbone.blocks.1.mlstm_layer.k.weight, lm_head.weight",
        "  unexpected (1): backbone.blocks.0.mlstm_layer.extra.weight",
        "  shape mismatch (1): backbone.blocks.0.ffn.proj_up.weight: checkpoint (128, 384) != expected (384, 128)",
    ]


def test_integer_tensors_are_refused(tmp_path):
    tensors = load_file(FIXTURE / "model.safetensors")
    tensors["backbone.out_norm.weight"] = np.ones(128, np.int32)
    tensors["backbone.blocks.0.mlstm_layer.igate_preact.bias"] = np.zeros(2, np.int64)
    _write_checkpoint(tmp_path, tensors)
    with pytest.raises(ValueError) as info:
        load_hf(tmp_path)
    assert str(info.value) == (
        "checkpoint tensors must be floating point; not float (2): "
        "backbone.blocks.0.mlstm_layer.igate_preact.bias (int64), backbone.out_norm.weight (int32)"
    )


def test_non_finite_weights_are_listed(tmp_path):
    tensors = load_file(FIXTURE / "model.safetensors")
    tensors["backbone.blocks.1.ffn.proj_down.weight"][3, :2] = np.nan
    tensors["lm_head.weight"][0, 0] = -np.inf
    _write_checkpoint(tmp_path, tensors)
    with pytest.raises(ValueError) as info:
        load_hf(tmp_path)
    assert str(info.value) == (
        "checkpoint tensors must be finite; NaN or inf in (2): "
        "backbone.blocks.1.ffn.proj_down.weight (2 of 49152 values), lm_head.weight (1 of 12672 values)"
    )


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text((FIXTURE / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="shard.safetensors does not exist"):
        load_hf(tmp_path)


def test_index_must_match_files(tmp_path):
    config, params, _ = load()
    save_hf(tmp_path, config, params, max_shard_bytes=400_000)
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["backbone.ghost.weight"] = sorted(index["weight_map"].values())[0]
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lists tensors that no file holds \(1\): backbone.ghost.weight"):
        load_hf(tmp_path)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_index_entries_outside_the_model_dir_are_refused(tmp_path, entry):
    config, params, _ = load()
    model_dir = tmp_path / "model"
    save_hf(model_dir, config, params, max_shard_bytes=400_000)
    outside = tmp_path / "outside.safetensors"  # a real, readable file outside the model directory
    path = model_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = sorted(index["weight_map"].values())[0]
    shutil.copy(model_dir / first, outside)
    entry = str(outside) if entry == "ABSOLUTE" else entry
    index["weight_map"] = {k: (entry if v == first else v) for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="points outside the model directory"):
        load_hf(model_dir)


def _sharded(tmp_path: Path) -> Path:
    config, params, _ = load()
    save_hf(tmp_path, config, params, max_shard_bytes=400_000)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("model.safetensors", "TRUNCATE", "model.safetensors is not a readable safetensors file"),
        ("model.safetensors", b"\x00garbage" * 10, "model.safetensors is not a readable safetensors file"),
        ("model.safetensors", b"", "model.safetensors is not a readable safetensors file"),
        ("config.json", b"{not json", "config.json is not valid JSON"),
        ("config.json", b"[1, 2]", "config.json must hold a JSON object"),
        ("config.json", b"\xff\xfe\x00", "config.json is not valid JSON"),
    ],
)
def test_corrupted_files_name_the_file(tmp_path, name, content, match):
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    path = tmp_path / name
    if content == "TRUNCATE":
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_hf(tmp_path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{oops", "model.safetensors.index.json is not valid JSON"),
        (b"{}", "model.safetensors.index.json has no weight_map object"),
        (b'{"weight_map": []}', "has no weight_map object"),
        (b'{"weight_map": {"lm_head.weight": 3}}', r"weight_map\['lm_head.weight'\] must be a file name"),
    ],
)
def test_corrupted_index_names_the_file(tmp_path, content, match):
    _sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_hf(tmp_path)


def test_truncated_shard_names_the_shard(tmp_path):
    _sharded(tmp_path)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{shard.name} is not a readable safetensors file"):
        load_hf(tmp_path)


def test_dtype_conversion():
    tensors = load_file(FIXTURE / "model.safetensors")
    config = config_from_hf(_hf_config(), param_dtype="bfloat16")
    params = hf_tensors_to_params(config, tensors)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_tied_embeddings_round_trip(tmp_path):
    """A tied model saves its embedding as lm_head.weight (transformers keeps a head) and loads back tied."""
    config, params, _ = load()
    config = config.replace(tie_word_embeddings=True)
    params = {k: v for k, v in params.items() if k != "lm_head"}
    save_hf(tmp_path, config, params)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(expected_hf_shapes(config))
    np.testing.assert_array_equal(saved["lm_head.weight"], saved["backbone.embeddings.weight"])
    config2, params2 = load_hf(tmp_path)
    assert config2 == config
    _assert_trees_equal(params, params2)
    # Without lm_head.weight (a tied checkpoint written without a head), the config stays tied too.
    del saved["lm_head.weight"]
    _write_checkpoint(tmp_path / "headless", saved, config_to_hf(config))
    assert load_hf(tmp_path / "headless")[0] == config


def test_tied_config_with_a_different_head(tmp_path):
    """tie_word_embeddings=True with a distinct lm_head (as transformers writes it): untied, unless forced."""
    config, _ = load_hf(ALIASES)
    assert config.tie_word_embeddings is False
    with pytest.raises(ValueError, match="lm_head.weight differs from backbone.embeddings.weight"):
        load_hf(ALIASES, tie_word_embeddings=True)


def test_fused_parameters_are_the_checkpoint_tensors_side_by_side():
    """qkvo_kernel = [q k v o], if_kernel = [i f] (transposed), if_bias = [bi bf], proj_gate_up = [gate up]."""
    tensors = load_file(FIXTURE / "model.safetensors")
    config, params, _ = load(scan_blocks=False)
    for layer in range(config.num_blocks):
        block, prefix = params[f"blocks_{layer}"], f"backbone.blocks.{layer}."
        for param, projections in (("qkvo_kernel", ("q", "k", "v", "ogate")), ("if_kernel", ("igate", "fgate"))):
            names = [f"mlstm_layer.{p}{'_preact' if 'gate' in p else ''}.weight" for p in projections]
            want = np.concatenate([tensors[prefix + n].T for n in names], axis=-1)
            np.testing.assert_array_equal(np.asarray(block["mlstm_layer"][param]), want)
        want = np.concatenate([tensors[prefix + f"mlstm_layer.{g}_preact.bias"] for g in ("igate", "fgate")])
        np.testing.assert_array_equal(np.asarray(block["mlstm_layer"]["if_bias"]), want)
        want = np.concatenate([tensors[prefix + f"ffn.{p}.weight"].T for p in ("proj_up_gate", "proj_up")], axis=-1)
        np.testing.assert_array_equal(np.asarray(block["ffn"]["proj_gate_up"]["kernel"]), want)


def test_save_checks_params_before_writing(tmp_path):
    config, params, _ = load(scan_blocks=False)
    block = dict(params["blocks_1"])
    block["ffn"] = {**block["ffn"], "proj_gate_up": {"kernel": block["ffn"]["proj_gate_up"]["kernel"][:, :-1]}}
    block["norm_ffn"] = {"weight": jnp.ones(128, jnp.int32)}
    bad = {k: v for k, v in params.items() if k != "out_norm"} | {"blocks_1": block, "extra": {"w": jnp.ones(2)}}
    target = tmp_path / "model"
    with pytest.raises(ValueError) as info:
        save_hf(target, config, bad)
    assert str(info.value).splitlines() == [
        "params do not fit the xLSTM config (D=128, L=2, NH=2, V=99, tie_word_embeddings=False):",
        "  missing (1): out_norm/weight",
        "  unexpected (1): extra/w",
        "  shape mismatch (1): blocks_1/ffn/proj_gate_up/kernel: (128, 767) != expected (128, 768)",
        "  not floating point (1): blocks_1/norm_ffn/weight (int32)",
    ]
    assert not target.exists()
    with pytest.raises(ValueError, match="max_shard_bytes must be a positive int"):
        save_hf(target, config, params, max_shard_bytes=0)
    with pytest.raises(TypeError, match="config must be an xLSTMLMConfig"):
        save_hf(target, config_to_hf(config), params)


# --- saving never loses the previous checkpoint ----------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    import jax.numpy as jnp
    from xlstm_jax.models.xlstm_parallel.hf import load_hf, save_hf

    fixture, target, shard, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    config, params = load_hf(fixture)
    params = dict(params, out_norm={"weight": params["out_norm"]["weight"] + 1.0})  # a different checkpoint
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        save_hf(target, config, params, max_shard_bytes=shard)
    except OSError as error:
        print("OSError:", error)
        sys.exit(3)
    sys.exit(0)
    """
)


def _save_in_child(target: Path, shard: int, limit: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", _CHILD, str(FIXTURE), str(target), str(shard), str(limit)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize(
    ("old_shard", "new_shard"),
    [(2**40, 2**40), (60_000, 60_000), (2**40, 60_000), (60_000, 2**40)],
    ids=["single-over-single", "sharded-over-sharded", "sharded-over-single", "single-over-sharded"],
)
def test_a_failed_save_leaves_the_old_checkpoint(tmp_path, old_shard, new_shard):
    """A save that hits a file-size limit part way (the FFN tensors, 192 KiB, pass 100 kB; every other shard
    fits) raises OSError, removes its temporary files, and the old checkpoint loads unchanged."""
    config, params, _ = load()
    save_hf(tmp_path, config, params, max_shard_bytes=old_shard)
    before = {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)}
    result = _save_in_child(tmp_path, new_shard, 100_000)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "OSError" in result.stdout
    assert {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)} == before  # no temporary files
    config2, params2 = load_hf(tmp_path)
    assert config2 == config
    _assert_trees_equal(params, params2)


@pytest.mark.parametrize(
    ("old_shard", "new_shard"),
    [(60_000, 60_000), (2**40, 60_000), (60_000, 2**40)],
    ids=["sharded-over-sharded", "sharded-over-single", "single-over-sharded"],
)
def test_a_save_replaces_the_old_checkpoint_entirely(tmp_path, old_shard, new_shard):
    """After a successful save only the new checkpoint's files remain; a new shard never reuses a name the old
    checkpoint reads (old index + new shards would mix the two), and the next save uses the plain names again."""
    config, params, _ = load()
    save_hf(tmp_path, config, params, max_shard_bytes=old_shard)
    old = set(_files(tmp_path))
    changed = {**params, "out_norm": {"weight": params["out_norm"]["weight"] + 1.0}}
    save_hf(tmp_path, config, changed, max_shard_bytes=new_shard)
    new = set(_files(tmp_path))
    if new_shard < 2**40:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert new == {"config.json", "model.safetensors.index.json"} | shards
        assert not shards & old
    else:
        assert new == {"config.json", "model.safetensors"}
    _, loaded = load_hf(tmp_path)
    _assert_trees_equal(changed, loaded)
    if new_shard == old_shard:
        save_hf(tmp_path, config, params, max_shard_bytes=new_shard)
        assert set(_files(tmp_path)) == old
        _assert_trees_equal(params, load_hf(tmp_path)[1])
