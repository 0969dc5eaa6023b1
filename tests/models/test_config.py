"""xLSTMLMConfig: field checks at construction, derived widths, and the exact parameter count."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.models.fixture import FIXTURE
from xlstm_jax.models.xlstm_parallel.config import round_up, xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.hf import config_from_hf, load_hf
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel

ALIASES = FIXTURE.parent / "xlstm_aliases"


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"embedding_dim": "128"}, TypeError, "embedding_dim must be an int, got embedding_dim='128'"),
        ({"vocab_size": 99.0}, TypeError, "vocab_size must be an int, got vocab_size=99.0"),
        ({"num_blocks": True}, TypeError, "num_blocks must be an int"),
        ({"num_heads": 2.0}, TypeError, "num_heads must be an int"),
        ({"ffn_round_up_to_multiple_of": "64"}, TypeError, "ffn_round_up_to_multiple_of must be an int"),
        ({"num_blocks": 0}, ValueError, "num_blocks must be positive, got num_blocks=0"),
        ({"vocab_size": -3}, ValueError, "vocab_size must be positive"),
        ({"qk_dim_factor": 0.0}, ValueError, "qk_dim_factor must be a positive finite number"),
        ({"v_dim_factor": -1.0}, ValueError, "v_dim_factor must be a positive finite number"),
        ({"ffn_proj_factor": 0}, ValueError, "ffn_proj_factor must be a positive finite number"),
        ({"ffn_proj_factor": float("inf")}, ValueError, "ffn_proj_factor must be a positive finite number"),
        ({"qk_dim_factor": "0.5"}, TypeError, "qk_dim_factor must be a number, got qk_dim_factor='0.5'"),
        ({"gate_soft_cap": -1.0}, ValueError, "gate_soft_cap"),
        ({"output_logit_soft_cap": True}, TypeError, "output_logit_soft_cap must be a number"),
        ({"norm_eps": float("nan")}, ValueError, "norm_eps"),
        ({"eps": 0.0}, ValueError, "eps must be a positive finite number"),
        (
            {"tie_word_embeddings": "false"},
            TypeError,
            "tie_word_embeddings must be a bool, got tie_word_embeddings='false'",
        ),
        ({"norm_reduction_force_float32": 1}, TypeError, "norm_reduction_force_float32 must be a bool"),
        ({"eos_token_id": "2"}, TypeError, "eos_token_id must be an int or None"),
        (
            {"pad_token_id": 99},
            ValueError,
            r"pad_token_id must be a token id in \[0, vocab_size=99\), got pad_token_id=99",
        ),
        ({"bos_token_id": -1}, ValueError, "bos_token_id must be a token id"),
        ({"dtype": "int32"}, ValueError, "dtype must be a floating-point dtype"),
        ({"param_dtype": "no_such_type"}, ValueError, "param_dtype='no_such_type' is not a dtype"),
        ({"state_dtype": "bool"}, ValueError, "state_dtype must be a floating-point dtype"),
        (
            {"num_heads": 3},
            ValueError,
            r"qk_dim=64 \(int\(embedding_dim=128 x qk_dim_factor=0.5\)\) must be a positive ",
        ),
        ({"v_dim_factor": 0.001}, ValueError, "v_dim=0"),
        ({"ffn_proj_factor": 0.005}, ValueError, "the FFN width is 0"),
        ({"use_bias": False}, TypeError, "unexpected keyword argument 'use_bias'"),
        ({"chunk_size": 64}, TypeError, "unexpected keyword argument 'chunk_size'"),
        ({"prefill_backend": "chunkwise"}, TypeError, "unexpected keyword argument 'prefill_backend'"),
    ],
)
def test_bad_fields_are_rejected_by_name(changes, error, match):
    with pytest.raises(error, match=match):
        xLSTMLMConfig.tiny(**changes)
    with pytest.raises(error, match=match):
        xLSTMLMConfig.tiny().replace(**changes)


def test_numpy_scalars_and_dtypes_are_normalised():
    config = xLSTMLMConfig.tiny(
        embedding_dim=np.int64(128),
        qk_dim_factor=np.float32(0.5),
        tie_word_embeddings=np.bool_(True),
        dtype=jnp.bfloat16,
    )
    assert config == xLSTMLMConfig.tiny(tie_word_embeddings=True, dtype="bfloat16")
    assert hash(config) == hash(xLSTMLMConfig.tiny(tie_word_embeddings=True, dtype="bfloat16"))
    assert [type(getattr(config, f)) for f in ("embedding_dim", "qk_dim_factor", "tie_word_embeddings", "dtype")] == [
        int,
        float,
        bool,
        str,
    ]
    assert xLSTMLMConfig.tiny(qk_dim_factor=1).qk_dim_factor == 1.0  # an int is a valid factor
    assert xLSTMLMConfig.tiny(eos_token_id=None).eos_token_id is None


def test_every_field_is_architecture():
    """The fields a Hugging Face config describes; runtime choices live in RuntimeConfig."""
    assert [f.name for f in dataclasses.fields(xLSTMLMConfig)] == [
        *("vocab_size", "embedding_dim", "num_blocks", "num_heads", "qk_dim_factor", "v_dim_factor"),
        *("ffn_proj_factor", "ffn_round_up_to_multiple_of", "gate_soft_cap", "output_logit_soft_cap", "norm_eps"),
        *("eps", "norm_reduction_force_float32", "tie_word_embeddings", "bos_token_id", "pad_token_id"),
        *("eos_token_id", "dtype", "param_dtype", "state_dtype"),
    ]


@pytest.mark.parametrize(
    ("x", "multiple", "expected"),
    [(341.376, 64, 384), (10924.032, 64, 10944), (48.32, 16, 48), (64.0, 64, 64), (65, 64, 128), (1, 64, 64)],
)
def test_ffn_rounding_is_transformers(x, multiple, expected):
    """floor((x + m - 1) / m) * m: up for integers, down when x passes a multiple by less than 1 (48.32 -> 48)."""
    assert round_up(x, multiple) == expected


def test_derived_widths():
    assert (xLSTMLMConfig.xlstm_7b().qk_head_dim, xLSTMLMConfig.xlstm_7b().v_head_dim) == (256, 512)
    assert xLSTMLMConfig.xlstm_7b().ffn_dim == 10944  # round_up(4096 * 2.667 = 10924.03, 64)
    config = xLSTMLMConfig.tiny(
        embedding_dim=32, qk_dim_factor=0.75, ffn_proj_factor=1.51, ffn_round_up_to_multiple_of=16
    )
    assert (config.qk_dim, config.v_dim, config.qk_head_dim, config.v_head_dim, config.ffn_dim) == (24, 32, 12, 16, 48)
    # The same widths as the layers transformers built for this config (the alias fixture).
    tensors = load_file(ALIASES / "model.safetensors")
    assert (
        tensors["backbone.blocks.0.mlstm_layer.q.weight"].shape[0]
        == config_from_hf(json.loads((ALIASES / "config.json").read_text())).qk_dim
    )
    assert tensors["backbone.blocks.0.ffn.proj_up.weight"].shape == (48, 32)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize(
    "changes",
    [{}, {"embedding_dim": 96, "num_heads": 3, "qk_dim_factor": 0.25, "ffn_proj_factor": 1.3, "num_blocks": 3}],
)
def test_num_params_is_the_initialised_model(changes, tie):
    config = xLSTMLMConfig.tiny(tie_word_embeddings=tie, **changes)
    shapes = jax.eval_shape(xLSTMLMModel(config).init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
    assert config.num_params() == _count(shapes["params"])


@pytest.mark.parametrize("fixture", ["xlstm_tiny", "xlstm_aliases"])
def test_num_params_is_the_checkpoint(fixture):
    """Every tensor transformers wrote, counted; its lm_head is its own (untied) in both fixtures."""
    path = FIXTURE.parent / fixture
    config, params = load_hf(path)
    tensors = load_file(path / "model.safetensors")
    assert config.num_params() == sum(x.size for x in tensors.values()) == _count(params)
