"""The mLSTM layer's decode step (``mlstm_decode_step``): every form against float64 or bit for bit against the
step on one layer's states; the Pallas forms in interpret mode on the CPU and compiled on a GPU."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import INTERPRET, ON_GPU
from tests.kernels.test_recurrent_step import STACKED_CASES, _reference, _step_inputs, fused_projection, stacked_layers
from tests.kernels.test_recurrent_step_mosaic import MOSAIC_STACKED_CASE, needs_hopper
from tests.numerics import TOL, assert_close
from xlstm_jax.kernels import recurrent_step_pallas
from xlstm_jax.mlstm.recurrent import recurrent_step_fw
from xlstm_jax.models.xlstm_parallel.decode import mlstm_decode_step
from xlstm_jax.models.xlstm_parallel.runtime import KernelMode, RuntimeConfig

KERNELS = KernelMode.INTERPRET if INTERPRET else KernelMode.COMPILED


def _pallas(config=None, kernel_mode=KERNELS) -> RuntimeConfig:
    return RuntimeConfig(step_backend="recurrent_pallas", kernel_mode=kernel_mode, step_kernel=config)


def _gates(x):
    """The layer's gate projection (B, 2·NH): all i, then all f."""
    B, NH = x["q"].shape[:2]
    return jnp.concatenate([x["i"].reshape(B, NH), x["f"].reshape(B, NH)], axis=1)


def _kernel_calls(jaxpr) -> list:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _kernel_calls(sub)
    return found


@pytest.mark.parametrize(
    "case", [STACKED_CASES[0], STACKED_CASES[1], STACKED_CASES[-1]], ids=["unsplit", "split4", "unaligned"]
)
@pytest.mark.parametrize("layer", [0, 2])
def test_stacked_pallas_step_updates_one_layer(case, layer):
    """On stacked states the Pallas form steps the layer's slice with one kernel that reads q, k, v (where their
    offsets fall on its blocks) and the gates in place from the projections; it equals the step on the layer's
    states bit for bit, the other layers unchanged."""
    B, NH, DHQK, DHV, config = case
    L = 3
    layers, stack = stacked_layers(10 * layer, L, B, NH, DHQK, DHV, jnp.bfloat16)
    x = {name: layers[layer][name] for name in ("q", "k", "v", "i", "f")}
    qkv, gates = fused_projection(x), _gates(x)
    step = jax.jit(
        lambda s, qkv, g: mlstm_decode_step(s, qkv, g, layer=layer, runtime=_pallas(config)), donate_argnums=0
    )
    (call,) = _kernel_calls(jax.make_jaxpr(step)(tuple(stack), qkv, gates).jaxpr)
    assert (call.invars[3].aval.shape == qkv.shape) == (case is not STACKED_CASES[-1])  # in place or sliced
    assert call.invars[6].aval.shape == call.invars[7].aval.shape == (2 * B * NH, 1)  # the gate projection itself
    h, (c, n, m) = step(tuple(jnp.copy(a) for a in stack), qkv, gates)
    h_ref, states_ref = recurrent_step_pallas(**layers[layer], config=config, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_ref))
    for name, new, old, ref in zip("cnm", (c, n, m), stack, states_ref, strict=True):
        assert new.shape == old.shape, name
        np.testing.assert_array_equal(np.asarray(new[layer]), np.asarray(ref).reshape(new.shape[1:]), err_msg=name)
        for other in set(range(L)) - {layer}:
            np.testing.assert_array_equal(np.asarray(new[other]), np.asarray(old[other]), err_msg=name)


def check_decode_read_out(case, dtype, runtime):
    """With ``head_norm`` the stacked step returns the layer's read-out sigmoid(o) * LayerNorm_head(h) * w (the
    Pallas form: by its read-out kernel, o read from the fused projection in place or sliced where its offset is
    not a multiple of DHV, n' and m' written into the stacks): against float64 from the equations, the other
    layer unchanged."""
    B, NH, DHQK, DHV, config = case
    runtime = runtime.replace(step_kernel=config)
    args, rounded = _step_inputs(5, B, NH, DHQK, DHV, jnp.dtype(dtype))
    other, _ = _step_inputs(6, B, NH, DHQK, DHV, jnp.dtype(dtype))
    stack = [jnp.stack([other[name], args[name]]) for name in "cnm"]  # the step's layer is 1
    stack[2] = stack[2][..., 0]
    rng = np.random.default_rng(1)
    o = jnp.asarray(2 * rng.standard_normal((B, NH * DHV)), dtype)
    weight = jnp.asarray(1 + 0.3 * rng.standard_normal(NH * DHV), dtype)
    qkv = jnp.concatenate([fused_projection(args, extra_columns=0), o, o[:, :3]], axis=1)
    step = jax.jit(
        lambda s, qkv, g: mlstm_decode_step(s, qkv, g, layer=1, runtime=runtime, head_norm=(weight, 1e-6)),
        donate_argnums=0,
    )
    y, states = step(tuple(jnp.copy(a) for a in stack), qkv, _gates(args))
    h_ref, states_ref, _ = _reference(rounded)
    for name, new, old, ref in zip("cnm", states, stack, states_ref, strict=True):
        assert_close(name, ref.reshape(new.shape[1:]), new[1], TOL["float32"])
        np.testing.assert_array_equal(np.asarray(new[0]), np.asarray(old[0]), err_msg=name)
    h_ref = h_ref - h_ref.mean(axis=-1, keepdims=True)  # (B, NH, DHV) float64
    y_ref = h_ref / np.sqrt(np.mean(h_ref**2, axis=-1, keepdims=True) + 1e-6)
    f64 = lambda t: np.asarray(t.astype(jnp.float32), np.float64)  # noqa: E731
    y_ref = y_ref.reshape(B, NH * DHV) * f64(weight) / (1 + np.exp(-f64(o)))
    assert y.shape == (B, NH * DHV) and y.dtype == jnp.dtype(dtype)
    assert_close("read-out", y_ref, y, TOL["float32"] if dtype == "float32" else TOL["bfloat16-norm"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "case", [STACKED_CASES[0], STACKED_CASES[1], STACKED_CASES[-1]], ids=["unsplit", "split4", "o-unaligned"]
)
def test_stacked_pallas_read_out(case, dtype):
    check_decode_read_out(case, dtype, _pallas())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stacked_xla_read_out(dtype):
    check_decode_read_out(STACKED_CASES[1], dtype, RuntimeConfig(step_backend="recurrent"))


@needs_hopper
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stacked_mosaic_read_out(dtype):
    """The Mosaic step kernel with the read-out kernel after it, against float64 from the equations."""
    check_decode_read_out(MOSAIC_STACKED_CASE, dtype, _pallas())


@pytest.mark.parametrize("form", ["recurrent", "recurrent_pallas"])
@pytest.mark.parametrize("stacked", [False, True], ids=["one-layer", "stacked"])
def test_decode_step_matches_float64(form, stacked):
    """Both forms on one layer's states (the blocks under nn.scan) and on stacked states, extreme gates (f=-30
    on one batch element) and bf16 projections, against float64."""
    B, NH, DHQK, DHV = 3, 2, 32, 16
    args, rounded = _step_inputs(8, B, NH, DHQK, DHV, jnp.bfloat16, igate="extreme")
    args["f"] = args["f"].at[0].set(-30.0)
    rounded["f"] = np.asarray(args["f"].astype(jnp.float32), np.float64)
    runtime = RuntimeConfig(step_backend=form, kernel_mode=KERNELS)
    state = (args["c"], args["n"], args["m"][..., 0])
    kw = {"layer": 0} if stacked else {}
    if stacked:
        state = tuple(x[None] for x in state)
    h, (c, n, m) = mlstm_decode_step(state, fused_projection(args), _gates(args), runtime=runtime, **kw)
    h_ref, states_ref, scale = _reference(rounded)
    assert h.dtype == jnp.bfloat16 and h.shape == (B, NH, DHV)
    assert_close("h", h_ref, h, TOL["bfloat16/float32"], scale=scale)
    for name, ref, out in zip("cnm", states_ref, (c, n, m[..., None]), strict=True):
        assert_close(name, ref, out[0] if stacked else out, TOL["float32"])


@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without a GPU")
def test_pallas_form_without_gpu_is_the_xla_form_with_the_kernel_checks():
    """``kernel_mode="auto"`` off a GPU: the Pallas form computes the XLA form's result bit for bit, after the
    same checks as the kernel (float32 states), so that a call that fails on a GPU fails here too."""
    B, NH, DHQK, DHV = 2, 2, 16, 32
    layers, stack = stacked_layers(3, 2, B, NH, DHQK, DHV, jnp.float32)
    x = layers[1]
    qkv, gates = fused_projection(x), _gates(x)
    auto = RuntimeConfig(step_backend="recurrent_pallas")
    got = mlstm_decode_step(tuple(stack), qkv, gates, layer=1, runtime=auto)
    want = mlstm_decode_step(tuple(stack), qkv, gates, layer=1, runtime=RuntimeConfig(step_backend="recurrent"))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bf16 = tuple(s.astype(jnp.bfloat16) for s in stack)
    with pytest.raises(TypeError, match="float32"):
        mlstm_decode_step(bf16, qkv, gates, layer=1, runtime=auto)
    mlstm_decode_step(bf16, qkv, gates, layer=1, runtime=RuntimeConfig(step_backend="recurrent"))
    with pytest.raises(RuntimeError, match="needs a GPU"):
        mlstm_decode_step(tuple(stack), qkv, gates, layer=1, runtime=auto.replace(kernel_mode="compiled"))


def test_decode_step_one_layer_pallas_equals_the_kernel_step():
    """On one layer's states the Pallas form is ``recurrent_step_pallas`` on q, k, v split from the projection."""
    args, _ = _step_inputs(9, 2, 2, 16, 32, jnp.float32)
    state = (args["c"], args["n"], args["m"][..., 0])
    h, (c, n, m) = mlstm_decode_step(state, fused_projection(args), _gates(args), runtime=_pallas())
    h_ref, (c_ref, n_ref, m_ref) = recurrent_step_pallas(**args, interpret=INTERPRET)
    for name, a, b in zip(["h", "c", "n", "m"], (h, c, n, m), (h_ref, c_ref, n_ref, m_ref[..., 0]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    h_xla, _ = recurrent_step_fw(**args)
    assert_close("h", np.asarray(h_xla, np.float64), h, TOL["float32"])


def test_decode_step_rejects_bad_input():
    args, _ = _step_inputs(0, 1, 2, 16, 16, jnp.float32)
    stack = (args["c"][None], args["n"][None], args["m"][None, ..., 0])
    qkv, gates = fused_projection(args), _gates(args)
    rt = _pallas()
    with pytest.raises(ValueError, match="layer=1 must be in"):
        mlstm_decode_step(stack, qkv, gates, layer=1, runtime=rt)
    with pytest.raises(TypeError, match="Python int"):
        mlstm_decode_step(stack, qkv, gates, layer=jnp.int32(0), runtime=rt)
    with pytest.raises(ValueError, match="stacked states"):
        mlstm_decode_step((args["c"], args["n"], args["m"]), qkv, gates, layer=0, runtime=rt)
    with pytest.raises(ValueError, match="one layer's c must be"):
        mlstm_decode_step(stack, qkv, gates, runtime=rt)
    with pytest.raises(ValueError, match="qkv must be"):
        mlstm_decode_step(stack, qkv[:, :40], gates, layer=0, runtime=rt)
    with pytest.raises(ValueError, match=r"qkv must be \(B, W\) with W >= NH·\(2·DHQK \+ 2·DHV\)"):
        mlstm_decode_step(stack, qkv, gates, layer=0, runtime=rt, head_norm=(jnp.ones(32), 1e-6))
    with pytest.raises(ValueError, match=r"gates side by side must be \(B, 2·NH\)=\(1, 4\)"):
        mlstm_decode_step(stack, qkv, jnp.ones((1, 3)), layer=0, runtime=rt)
    with pytest.raises(ValueError, match="DHQK=24"):
        bad = (jnp.ones((1, 1, 2, 24, 16)), jnp.ones((1, 1, 2, 24)), jnp.ones((1, 1, 2)))
        mlstm_decode_step(bad, jnp.ones((1, 2 * (48 + 16))), gates, layer=0, runtime=rt)
