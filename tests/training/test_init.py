"""init_params against transformers' own initialisation (``init_stats.json``, made by scripts/make_init_stats.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from xlstm_jax.models.xlstm_parallel.hf import config_from_hf, params_to_hf_tensors
from xlstm_jax.training.init import init_params

STATS = json.loads((Path(__file__).parent / "init_stats.json").read_text())
# Sampling bounds, not rounding bounds: the sample std of n normal draws has a standard error of sigma/sqrt(2n)
# and the sample mean sigma/sqrt(n), so two independent draws differ by sigma/sqrt(n) in std and
# sigma*sqrt(2/n) in mean (one standard error); over the ~60 tensors compared, 5 standard errors are exceeded
# with probability ~1e-5. Distinct rules differ by far more: small(128) = 0.056, wang(4, 128) = 0.044,
# wang(4, 384) = 0.026, with n >= 8192 (one standard error <= 1.1% of sigma).
SIGMAS = 5.0


@pytest.fixture(scope="module")
def tensors():
    config = config_from_hf(STATS["config"])
    params = init_params(config, jax.random.PRNGKey(7))
    return params_to_hf_tensors(config, params)


def test_every_tensor_matches_transformers(tensors):
    assert sorted(tensors) == sorted(STATS["tensors"])
    for name, want in STATS["tensors"].items():
        x = np.asarray(tensors[name], np.float64)
        assert list(x.shape) == want["shape"], name
        if "values" in want:  # constant tensors and the gate biases: exactly transformers' values
            np.testing.assert_array_equal(x, np.broadcast_to(np.asarray(want["values"]), x.shape), err_msg=name)
            continue
        n, sigma = want["numel"], want["std"]
        assert sigma > 0, name
        assert abs(x.std() - sigma) <= SIGMAS * sigma / np.sqrt(n), (name, x.std(), sigma)
        assert abs(x.mean() - want["mean"]) <= SIGMAS * sigma * np.sqrt(2.0 / n), (name, x.mean(), want["mean"])


def test_layers_and_keys_draw_independently(tensors):
    q0, q1 = tensors["backbone.blocks.0.mlstm_layer.q.weight"], tensors["backbone.blocks.1.mlstm_layer.q.weight"]
    assert not np.array_equal(q0, q1)
    q, k = tensors["backbone.blocks.0.mlstm_layer.q.weight"], tensors["backbone.blocks.0.mlstm_layer.k.weight"]
    assert not np.array_equal(q, k)
    config = config_from_hf(STATS["config"])
    again = params_to_hf_tensors(config, init_params(config, jax.random.PRNGKey(7)))
    np.testing.assert_array_equal(again["backbone.embeddings.weight"], tensors["backbone.embeddings.weight"])


def test_scanned_layout_has_the_same_rules():
    config = config_from_hf(STATS["config"])
    stacked = params_to_hf_tensors(config, init_params(config, jax.random.PRNGKey(8), scan_blocks=True))
    for name, want in STATS["tensors"].items():
        if "values" in want:
            np.testing.assert_array_equal(
                stacked[name], np.broadcast_to(np.asarray(want["values"]), stacked[name].shape), err_msg=name
            )
        else:
            assert abs(np.std(stacked[name]) - want["std"]) <= SIGMAS * want["std"] / np.sqrt(want["numel"]), name


def test_init_params_rejects_a_non_config():
    with pytest.raises(TypeError, match="xLSTMLMConfig"):
        init_params({"embedding_dim": 128}, jax.random.PRNGKey(0))
