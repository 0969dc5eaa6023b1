"""The documented module xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent: API pin, backend,
config and registry."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent as documented
from tests.numerics import make_inputs
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import BACKENDS, create_mlstm_backend
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend

SPEC = Path(__file__).resolve().parents[3] / "shared" / "spec" / "recurrent_backend.rst"


def test_public_names():
    assert sorted(documented.__all__) == sorted(
        ["mLSTMBackendRecurrent", "mLSTMBackendRecurrentConfig", "recurrent_sequence_fw", "recurrent_step_fw"]
    )
    for name in documented.__all__:
        assert hasattr(documented, name)


def test_signatures_pinned():
    assert str(inspect.signature(documented.recurrent_step_fw)) == (
        "(c: 'jax.Array', n: 'jax.Array', m: 'jax.Array', q: 'jax.Array', k: 'jax.Array', v: 'jax.Array', "
        "i: 'jax.Array', f: 'jax.Array', eps: 'float' = 1e-06) -> "
        "'tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]'"
    )
    params = inspect.signature(documented.recurrent_sequence_fw).parameters
    assert list(params) == [
        "queries", "keys", "values", "igate_preact", "fgate_preact", "c_initial", "n_initial", "m_initial",
        "return_last_states", "eps", "state_dtype", "use_scan", "mlstm_step_fn",
    ]  # fmt: skip
    defaults = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults == {
        "c_initial": None, "n_initial": None, "m_initial": None, "return_last_states": False, "eps": 1e-6,
        "state_dtype": None, "use_scan": False, "mlstm_step_fn": documented.recurrent_step_fw,
    }  # fmt: skip
    call = inspect.signature(documented.mLSTMBackendRecurrent.__call__).parameters
    assert list(call) == [
        "self", "q", "k", "v", "i", "f", "c_initial", "n_initial", "m_initial", "return_last_states", "segment_ids"
    ]  # fmt: skip
    assert call["segment_ids"].kind is inspect.Parameter.KEYWORD_ONLY and call["segment_ids"].default is None


@pytest.mark.skipif(not SPEC.exists(), reason="the spec lives beside the checkout (../shared/spec)")
def test_signatures_match_spec():
    """The spec's py:function lines, parsed, give the same parameter names and defaults as the code."""
    text = SPEC.read_text()
    for name in ("recurrent_step_fw", "recurrent_sequence_fw"):
        spec_params = re.search(rf"py:function:: {name}\((.*)\)", text).group(1).split(", ")
        code = inspect.signature(getattr(documented, name)).parameters
        assert [p.split(" = ")[0] for p in spec_params] == list(code)
        for p in spec_params:
            if " = " in p:
                key, value = p.split(" = ")
                expected = documented.recurrent_step_fw if value == "recurrent_step_fw" else eval(value)  # noqa: S307
                assert code[key].default == expected, key


def test_config_fields_and_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(documented.mLSTMBackendRecurrentConfig)}
    assert list(fields) == ["context_length", "eps", "state_dtype", "use_scan"]
    assert fields == {"context_length": -1, "eps": 1e-6, "state_dtype": None, "use_scan": False}
    assert documented.mLSTMBackendRecurrentConfig.__dataclass_params__.frozen
    cfg = documented.mLSTMBackendRecurrentConfig()
    assert cfg.assign_model_config_params(SimpleNamespace(context_length=4096)) is None
    assert cfg.context_length == 4096
    assert documented.mLSTMBackendRecurrent.__bases__ == (mLSTMBackend,)
    assert mLSTMBackend.__module__ == "xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config"
    assert "can_vmap_over_heads" in vars(documented.mLSTMBackendRecurrent)  # declared on the documented class


@pytest.mark.parametrize(
    "kwargs, pattern",
    [({"eps": 0.0}, "eps must be a positive finite number"), ({"state_dtype": "f33"}, "state_dtype='f33'")],
)
def test_config_validates(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        documented.mLSTMBackendRecurrentConfig(**kwargs)


def test_config_rejects_a_non_bool_use_scan():
    with pytest.raises(TypeError, match="use_scan must be a bool, got 'false'"):
        documented.mLSTMBackendRecurrentConfig(use_scan="false")


def test_backend_needs_its_config():
    with pytest.raises(TypeError, match=r"mLSTMBackendRecurrent needs config=mLSTMBackendRecurrentConfig\(...\)"):
        documented.mLSTMBackendRecurrent(config=None)


def _inputs():
    x = make_inputs(np.random.default_rng(0), 2, 3, 6, 4, 5, states=True)
    qkvif = tuple(jnp.asarray(x[n], jnp.float32) for n in ("q", "k", "v", "i", "f"))
    return qkvif, tuple(jnp.asarray(x[n], jnp.float32) for n in ("c0", "n0", "m0"))


def test_backend_delegates_with_config():
    (q, k, v, i, f), s0 = _inputs()
    cfg = documented.mLSTMBackendRecurrentConfig(eps=1e-3, use_scan=True, state_dtype="float32")
    backend = documented.mLSTMBackendRecurrent(config=cfg)
    assert isinstance(backend, mLSTMBackend) and backend.config_class is documented.mLSTMBackendRecurrentConfig
    assert backend.can_vmap_over_heads is False
    h, states = backend(q, k, v, i, f, *s0, return_last_states=True)
    h_ref, states_ref = documented.recurrent_sequence_fw(
        q, k, v, i, f, *s0, return_last_states=True, eps=1e-3, use_scan=True, state_dtype="float32"
    )
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_ref))
    for a, b in zip(states, states_ref, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # eps reaches the computation: another eps gives another result.
    h_default = documented.recurrent_sequence_fw(q, k, v, i, f, *s0, use_scan=True)
    assert not np.array_equal(np.asarray(h), np.asarray(h_default))


def test_backend_inside_flax_module():
    (q, k, v, i, f), _ = _inputs()

    class Cell(nn.Module):
        @nn.compact
        def __call__(self, x):
            backend = create_mlstm_backend("recurrent", use_scan=True)
            return backend(x * nn.Dense(x.shape[-1], use_bias=False, name="proj")(x), k, v, i, f)

    model = Cell()
    params = model.init(jax.random.key(0), q)
    h = jax.jit(model.apply)(params, q)
    assert h.shape == (2, 3, 6, 5)
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, q) ** 2))(params)
    assert np.all(np.isfinite(np.asarray(grads["params"]["proj"]["kernel"])))


def test_registry():
    assert BACKENDS["recurrent"] is documented.mLSTMBackendRecurrent
    backend = create_mlstm_backend("recurrent", use_scan=True, eps=1e-5)
    assert isinstance(backend, documented.mLSTMBackendRecurrent) and backend.config.eps == 1e-5
    cfg = documented.mLSTMBackendRecurrentConfig(use_scan=True)
    assert create_mlstm_backend(cfg).config is cfg
    with pytest.raises(ValueError, match=r"unknown mLSTM backend 'nope'; known backends: \[.*'recurrent'.*\]"):
        create_mlstm_backend("nope")
    with pytest.raises(ValueError, match="no backend takes a config of type dict"):
        create_mlstm_backend({"use_scan": True})
    with pytest.raises(ValueError, match="cannot be given with a config object"):
        create_mlstm_backend(cfg, eps=1e-3)
    with pytest.raises(TypeError):
        create_mlstm_backend("recurrent", not_a_field=1)
