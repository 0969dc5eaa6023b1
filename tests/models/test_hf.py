"""Hugging Face format: load, save, sharding, config mapping, and the error listing."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.models.fixture import FIXTURE, load
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.hf import (
    config_from_hf,
    config_to_hf,
    expected_hf_shapes,
    hf_tensors_to_params,
    load_hf,
    save_hf,
)


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("scan_blocks", [True, False])
def test_save_load_round_trip(tmp_path, scan_blocks):
    """Saving writes the checkpoint's own tensors bit for bit; loading the saved directory gives the same params."""
    config, params, _ = load(scan_blocks=scan_blocks)
    save_hf(tmp_path, config, params)
    original = load_file(FIXTURE / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(original)
    for name, x in original.items():
        np.testing.assert_array_equal(saved[name], x, err_msg=name)
    config2, params2 = load_hf(tmp_path, scan_blocks=scan_blocks)
    assert config2 == config
    _assert_trees_equal(params, params2)


def test_sharded_save_and_load(tmp_path):
    config, params, _ = load()
    save_hf(tmp_path, config, params, max_shard_bytes=400_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    assert files == sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert set(index["weight_map"]) == set(expected_hf_shapes(config))
    _, params2 = load_hf(tmp_path)
    _assert_trees_equal(params, params2)


def test_errors_list_missing_unexpected_and_mismatched(tmp_path):
    tensors = load_file(FIXTURE / "model.safetensors")
    del tensors["backbone.blocks.1.mlstm_layer.k.weight"]
    del tensors["lm_head.weight"]
    tensors["backbone.blocks.0.mlstm_layer.extra.weight"] = np.ones((3,), np.float32)
    tensors["backbone.blocks.0.ffn.proj_up.weight"] = np.ones((128, 384), np.float32)  # transposed
    (tmp_path / "config.json").write_text((FIXTURE / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        load_hf(tmp_path)
    message = str(info.value)
    for expected in (
        "missing (2): backbone.blocks.1.mlstm_layer.k.weight, lm_head.weight",
        "unexpected (1): backbone.blocks.0.mlstm_layer.extra.weight",
        "shape mismatch (1): backbone.blocks.0.ffn.proj_up.weight: checkpoint (128, 384) != expected (384, 128)",
    ):
        assert expected in message, message


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text((FIXTURE / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(tmp_path)


def test_index_must_match_files(tmp_path):
    config, params, _ = load()
    save_hf(tmp_path, config, params, max_shard_bytes=400_000)
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["backbone.ghost.weight"] = sorted(index["weight_map"].values())[0]
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="backbone.ghost.weight"):
        load_hf(tmp_path)


def test_config_mapping():
    hf = json.loads((FIXTURE / "config.json").read_text())
    config = config_from_hf(hf)
    assert (config.embedding_dim, config.num_blocks, config.num_heads, config.vocab_size) == (128, 2, 2, 99)
    assert (config.param_dtype, config.state_dtype, config.chunk_size) == ("float32", "float32", 16)
    back = config_to_hf(config)
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_heads",
        "vocab_size",
        "qk_dim_factor",
        "v_dim_factor",
        "ffn_proj_factor",
        "gate_soft_cap",
        "output_logit_soft_cap",
        "norm_eps",
        "eps",
        "weight_mode",
    ):
        assert back[key] == hf[key], key
    assert config_from_hf(back) == config
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({**hf, "model_type": "llama"})
    with pytest.raises(ValueError, match="weight_mode"):
        config_from_hf({**hf, "weight_mode": "fused"})


def test_dtype_conversion_and_tied_embeddings():
    tensors = load_file(FIXTURE / "model.safetensors")
    config = config_from_hf(json.loads((FIXTURE / "config.json").read_text()), param_dtype="bfloat16")
    params = hf_tensors_to_params(config, tensors)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    tied = xLSTMLMConfig.tiny(tie_word_embeddings=True)
    assert "lm_head.weight" not in expected_hf_shapes(tied)
    del tensors["lm_head.weight"]
    assert "lm_head" not in hf_tensors_to_params(tied, tensors)


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


def test_saving_a_mis_shaped_fused_parameter_raises(tmp_path):
    config, params, _ = load(scan_blocks=False)
    block = dict(params["blocks_1"])
    block["ffn"] = {**block["ffn"], "proj_gate_up": {"kernel": block["ffn"]["proj_gate_up"]["kernel"][:, :-1]}}
    with pytest.raises(ValueError, match="blocks 1 ffn/proj_gate_up/kernel"):
        save_hf(tmp_path, config, {**params, "blocks_1": block})
