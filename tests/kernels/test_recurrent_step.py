"""The fused decode-step kernel against the float64 reference (interpret mode on CPU, compiled on a GPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import INTERPRET, ON_GPU
from tests.numerics import TOL, assert_close, make_inputs
from tests.reference import recurrent_ref
from xlstm_jax.kernels import StepKernelConfig, recurrent_step_pallas, recurrent_step_pallas_stacked
from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw, recurrent_step_fw

_TOL_KEY = {"float32": "float32", "bfloat16": "bfloat16/float32"}

# (B, NH, DHQK, DHV, config): one DHQK split walking two row chunks; four DHQK splits (partial numerators
# combined after the kernel); the automatic split, which picks four splits for B·NH = 6; the default config;
# four row blocks loaded at their use, heads fastest in the grid, Triton's pipeliner (the previous layout);
# three row blocks prefetched by hand with the evict_first hint; all rows at once with two DHV blocks; one
# program per head (c, n and m all updated in place).
C = StepKernelConfig
CASES = [
    (1, 2, 32, 16, C(block_dhv=16, block_dhqk=16, dhqk_splits=1)),
    (3, 1, 64, 32, C(block_dhv=16, block_dhqk=16, dhqk_splits=4)),
    (2, 3, 64, 16, C(block_dhv=16, block_dhqk=16, dhqk_splits=None)),
    (1, 3, 128, 64, None),
    (2, 2, 64, 32, C(block_dhv=16, block_dhqk=16, dhqk_splits=1, prefetch=False, grid_order="heads", num_stages=2)),
    (1, 2, 64, 32, C(block_dhv=32, block_dhqk=16, dhqk_splits=1, evict_first=True)),
    (3, 2, 32, 64, C(block_dhv=32, block_dhqk=None, dhqk_splits=1)),
    (2, 3, 32, 32, C(block_dhv=32, block_dhqk=16, dhqk_splits=1)),
]
CASE_IDS = ["unsplit", "split4", "auto-split", "default", "no-prefetch-heads", "evict-first", "one-shot", "per-head"]


def _step_inputs(seed, B, NH, DHQK, DHV, dtype, igate="wide"):
    """Random step inputs in ``dtype`` (states float32) and the same values, rounded, in float64."""
    x = make_inputs(np.random.default_rng(seed), B, NH, 1, DHQK, DHV, states=True, igate=igate)
    args = {
        "c": jnp.asarray(x["c0"], jnp.float32),
        "n": jnp.asarray(x["n0"], jnp.float32),
        "m": jnp.asarray(x["m0"][..., None], jnp.float32),
        **{name: jnp.asarray(x[name][:, :, 0], dtype) for name in ("q", "k", "v")},
        **{name: jnp.asarray(x[name][:, :, :1], dtype) for name in ("i", "f")},
    }
    rounded = {name: np.asarray(a.astype(jnp.float32), np.float64) for name, a in args.items()}
    return args, rounded


def _reference(r):
    h, (c, n, m), scale = recurrent_ref(
        r["q"][:, :, None], r["k"][:, :, None], r["v"][:, :, None], r["i"], r["f"], r["c"], r["n"], r["m"][..., 0]
    )
    return h[:, :, 0], (c, n, m[..., None]), scale[:, :, 0]


def assert_step_matches(rounded, h, states, tol, dtype=jnp.float32):
    """h (in ``dtype``) and the float32 states of one step against float64 from the same (rounded) inputs."""
    h_ref, states_ref, scale = _reference(rounded)
    assert h.dtype == jnp.dtype(dtype)
    assert all(s.dtype == jnp.float32 for s in states)
    assert_close("h", h_ref, h, tol, scale=scale)
    for name, ref, out in zip("cnm", states_ref, states, strict=True):
        assert_close(name, ref, out, tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_step_matches_reference(case, dtype):
    B, NH, DHQK, DHV, config = case
    args, rounded = _step_inputs(B * 100 + DHQK, B, NH, DHQK, DHV, jnp.dtype(dtype))
    step = jax.jit(functools.partial(recurrent_step_pallas, config=config, interpret=INTERPRET))
    h, states = step(**args)
    assert_step_matches(rounded, h, states, TOL[_TOL_KEY[dtype]], dtype)


@pytest.mark.parametrize("case", CASES[:2], ids=["unsplit", "split4"])
def test_step_extreme_gates(case):
    B, NH, DHQK, DHV, config = case
    args, rounded = _step_inputs(7, B, NH, DHQK, DHV, jnp.float32, igate="extreme")
    args["f"] = args["f"].at[0].set(-30.0)  # forget almost everything on one batch element
    rounded["f"] = np.asarray(args["f"], np.float64)
    h, states = recurrent_step_pallas(**args, config=config, interpret=INTERPRET)
    assert_step_matches(rounded, h, states, TOL["float32"])


def test_step_as_mlstm_step_fn_in_a_sequence():
    """The kernel plugged into ``recurrent_sequence_fw`` over an odd number of steps, with initial states."""
    B, NH, S, DHQK, DHV = 2, 1, 3, 32, 16
    x = make_inputs(np.random.default_rng(3), B, NH, S, DHQK, DHV, states=True)
    step = functools.partial(recurrent_step_pallas, config=CASES[1][4], interpret=INTERPRET)
    args = [jnp.asarray(x[name], jnp.float32) for name in ("q", "k", "v", "i", "f", "c0", "n0", "m0")]
    h, states = jax.jit(
        lambda *a: recurrent_sequence_fw(*a, return_last_states=True, use_scan=True, mlstm_step_fn=step)
    )(*args)
    h_ref, states_ref, scale = recurrent_ref(*(x[name] for name in ("q", "k", "v", "i", "f", "c0", "n0", "m0")))
    assert_close("h", h_ref, h, TOL["float32"], scale=scale)
    for name, ref, out in zip("cnm", states_ref, states, strict=True):
        assert_close(name, ref, out, TOL["float32"])


@pytest.mark.parametrize("config", [CASES[0][4], CASES[1][4], CASES[7][4]], ids=["unsplit", "split4", "per-head"])
def test_step_aliases_c_in_place(config):
    """c is updated in place; n and m go to fresh buffers (several warps read each of their elements)."""
    args, _ = _step_inputs(1, 1, 2, 32, 32, jnp.float32)
    jaxpr = jax.make_jaxpr(functools.partial(recurrent_step_pallas, config=config, interpret=INTERPRET))(**args)
    calls = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert len(calls) == 1
    assert tuple(calls[0].params["input_output_aliases"]) == ((0, 0),)


def _fused_projection(x, extra_columns=5):
    """q, k, v of all heads side by side in one (B, W) array, with further (random) columns after them."""
    B = x["q"].shape[0]
    parts = [x[name].reshape(B, -1) for name in ("q", "k", "v")]
    extra = jnp.asarray(np.random.default_rng(0).standard_normal((B, extra_columns)), x["q"].dtype)
    return jnp.concatenate([*parts, extra], axis=1)


# Stacked-step cases: the first four read q, k, v in place from the fused projection; in the last, v starts at
# column 2·NH·DHQK = 32, not a multiple of its 64-column blocks, so q, k, v are sliced out first.
STACKED_CASES = [CASES[0], CASES[1], CASES[7], CASES[2], (2, 1, 16, 64, C(block_dhv=64, block_dhqk=16, dhqk_splits=1))]


@pytest.mark.parametrize("gates", ["separate", "side-by-side"])
@pytest.mark.parametrize("case", STACKED_CASES, ids=["unsplit", "split4", "per-head", "auto", "unaligned"])
@pytest.mark.parametrize("layer", [0, 2])
def test_stacked_step_updates_one_layer(case, layer, gates):
    """The model's stacked step (q, k, v from a fused projection; the gates separate, or side by side as the
    model's gate projection, f=None) equals the step on the layer's slice bit for bit; the other layers stay
    unchanged."""
    B, NH, DHQK, DHV, config = case
    L = 3
    layers = [_step_inputs(10 * layer + j, B, NH, DHQK, DHV, jnp.bfloat16)[0] for j in range(L)]
    stack = [jnp.stack([a[name] for a in layers]) for name in ("c", "n", "m")]
    stack[2] = stack[2][..., 0]  # m stacked as (L, B, NH)
    x = {name: layers[layer][name] for name in ("q", "k", "v", "i", "f")}
    step = jax.jit(
        functools.partial(recurrent_step_pallas_stacked, layer=layer, config=config, interpret=INTERPRET),
        donate_argnums=(0, 1, 2),
    )
    qkv = _fused_projection(x)
    if gates == "separate":
        gate_args = {"i": x["i"], "f": x["f"]}
    else:
        gate_args = {"i": jnp.concatenate([x["i"].reshape(B, NH), x["f"].reshape(B, NH)], axis=1), "f": None}
    jaxpr = jax.make_jaxpr(step)(*stack, qkv=qkv, **gate_args)
    (call,) = [e for e in jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "pallas_call"]
    in_place = case is not STACKED_CASES[-1]
    assert (call.invars[3].aval.shape == qkv.shape) == in_place  # the kernel's q operand: qkv itself or a slice
    if gates == "side-by-side":  # the kernel's i and f operands are the gate array itself (flattened)
        assert call.invars[6].aval.shape == call.invars[7].aval.shape == (2 * B * NH, 1)
    h, (c, n, m) = step(*[jnp.copy(a) for a in stack], qkv=qkv, **gate_args)
    h_ref, states_ref = recurrent_step_pallas(
        **{name: layers[layer][name] for name in "cnm"}, **x, config=config, interpret=INTERPRET
    )
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_ref))
    for name, new, old, ref in zip("cnm", (c, n, m), stack, states_ref, strict=True):
        assert new.shape == old.shape, name
        np.testing.assert_array_equal(np.asarray(new[layer]), np.asarray(ref).reshape(new.shape[1:]), err_msg=name)
        for other in set(range(L)) - {layer}:
            np.testing.assert_array_equal(np.asarray(new[other]), np.asarray(old[other]), err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "case", [STACKED_CASES[0], STACKED_CASES[1], STACKED_CASES[-1]], ids=["unsplit", "split4", "o-unaligned"]
)
def test_stacked_step_head_norm(case, dtype):
    """With ``head_norm`` the stacked step returns the layer's read-out sigmoid(o) * LayerNorm_head(h) * w, its
    second kernel reading o from the fused projection (in place, or sliced where o's offset is not a multiple
    of DHV) and writing n', m' into the stacks: against float64 from the equations; the other layer unchanged."""
    check_stacked_head_norm(case, dtype, INTERPRET)


def check_stacked_head_norm(case, dtype, interpret):
    """``test_stacked_step_head_norm`` for one (B, NH, DHQK, DHV, config) case (shared with the Mosaic tests)."""
    B, NH, DHQK, DHV, config = case
    args, rounded = _step_inputs(5, B, NH, DHQK, DHV, jnp.dtype(dtype))
    other, _ = _step_inputs(6, B, NH, DHQK, DHV, jnp.dtype(dtype))
    stack = [jnp.stack([other[name], args[name]]) for name in "cnm"]  # the step's layer is 1
    stack[2] = stack[2][..., 0]
    rng = np.random.default_rng(1)
    o = jnp.asarray(2 * rng.standard_normal((B, NH * DHV)), dtype)
    weight = jnp.asarray(1 + 0.3 * rng.standard_normal(NH * DHV), dtype)
    qkv = jnp.concatenate([_fused_projection(args, extra_columns=0), o, o[:, :3]], axis=1)
    step = functools.partial(recurrent_step_pallas_stacked, layer=1, config=config, interpret=interpret)
    y, states = jax.jit(lambda *a, **kw: step(*a, **kw, head_norm=(weight, 1e-6)))(
        *[jnp.copy(a) for a in stack], qkv=qkv, i=args["i"], f=args["f"]
    )
    _, states_ref, _ = _reference(rounded)
    for name, new, old, ref in zip("cnm", states, stack, states_ref, strict=True):
        assert_close(name, ref.reshape(new.shape[1:]), new[1], TOL["float32"])
        np.testing.assert_array_equal(np.asarray(new[0]), np.asarray(old[0]), err_msg=name)
    h_ref = _reference(rounded)[0]  # (B, NH, DHV) float64
    h_ref = h_ref - h_ref.mean(axis=-1, keepdims=True)
    y_ref = h_ref / np.sqrt(np.mean(h_ref**2, axis=-1, keepdims=True) + 1e-6)
    f64 = lambda t: np.asarray(t.astype(jnp.float32), np.float64)  # noqa: E731
    y_ref = y_ref.reshape(B, NH * DHV) * f64(weight) / (1 + np.exp(-f64(o)))
    assert y.shape == (B, NH * DHV) and y.dtype == jnp.dtype(dtype)
    assert_close("read-out", y_ref, y, TOL["float32"] if dtype == "float32" else TOL["bfloat16-norm"])


def test_stacked_step_rejects_bad_layer_and_shapes():
    args, _ = _step_inputs(0, 1, 1, 16, 16, jnp.float32)
    stack = {"c": args["c"][None], "n": args["n"][None], "m": args["m"][None, ..., 0]}
    gates = {"i": args["i"], "f": args["f"]}
    qkv = _fused_projection(args)
    with pytest.raises(ValueError, match="layer=1 must be in"):
        recurrent_step_pallas_stacked(**stack, layer=1, qkv=qkv, **gates, interpret=INTERPRET)
    with pytest.raises(TypeError, match="Python int"):
        recurrent_step_pallas_stacked(**stack, layer=jnp.int32(0), qkv=qkv, **gates, interpret=INTERPRET)
    with pytest.raises(ValueError, match="stacked states"):
        recurrent_step_pallas_stacked(args["c"], args["n"], args["m"], 0, qkv, **gates, interpret=INTERPRET)
    with pytest.raises(ValueError, match="qkv must be"):
        recurrent_step_pallas_stacked(**stack, layer=0, qkv=qkv[:, :40], **gates, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"gates side by side must be \(B, 2·NH\)=\(1, 2\)"):
        recurrent_step_pallas_stacked(**stack, layer=0, qkv=qkv, i=jnp.ones((1, 3)), f=None, interpret=INTERPRET)


@pytest.mark.parametrize(("DHQK", "DHV"), [(48, 16), (16, 1024), (8, 16)])
def test_step_rejects_unsupported_head_dims(DHQK, DHV):
    args, _ = _step_inputs(0, 1, 1, 16, 16, jnp.float32)
    args.update(
        c=jnp.ones((1, 1, DHQK, DHV)), n=jnp.ones((1, 1, DHQK)), q=jnp.ones((1, 1, DHQK)), k=jnp.ones((1, 1, DHQK)),
        v=jnp.ones((1, 1, DHV)),
    )  # fmt: skip
    with pytest.raises(ValueError, match=f"DHQK={DHQK}, DHV={DHV}"):
        recurrent_step_pallas(**args, interpret=INTERPRET)


def test_step_rejects_non_float32_state_and_bad_config():
    args, _ = _step_inputs(0, 1, 1, 16, 16, jnp.float32)
    bf16_states = {**args, **{name: args[name].astype(jnp.bfloat16) for name in ("c", "n", "m")}}
    with pytest.raises(TypeError, match="float32"):
        recurrent_step_pallas(**bf16_states, interpret=INTERPRET)
    with pytest.raises(TypeError, match="StepKernelConfig"):
        recurrent_step_pallas(**args, config={"block_dhv": 16}, interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_dhv"):
        StepKernelConfig(block_dhv=24)
    with pytest.raises(ValueError, match="grid_order"):
        StepKernelConfig(grid_order="rows")
    with pytest.raises(ValueError, match="prefetch"):
        StepKernelConfig(prefetch=1)


@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without a GPU")
def test_step_without_gpu_falls_back_or_raises():
    args, _ = _step_inputs(2, 2, 1, 16, 32, jnp.float32)
    h, states = recurrent_step_pallas(**args)  # interpret=None: the XLA step
    h_xla, states_xla = recurrent_step_fw(**args)
    np.testing.assert_array_equal(h, h_xla)
    for s, s_xla in zip(states, states_xla, strict=True):
        np.testing.assert_array_equal(s, s_xla)
    with pytest.raises(RuntimeError, match="needs a GPU"):
        recurrent_step_pallas(**args, interpret=False)
