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
from xlstm_jax.kernels import StepKernelConfig, recurrent_step_kernel, recurrent_step_pallas
from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw, recurrent_step_fw

_TOL_KEY = {"float32": "float32", "bfloat16": "bfloat16/float32"}

# (B, NH, DHQK, DHV, config): one DHQK split walking two row chunks; four DHQK splits (partial numerators
# combined after the kernel); the automatic split, which picks four splits for B·NH = 6; the default config;
# four row blocks with Triton's pipeliner on top (two stages); four row blocks of 32 columns; all rows at once
# with two DHV blocks; one program per head walking two row blocks.
C = StepKernelConfig
CASES = [
    (1, 2, 32, 16, C(block_dhv=16, block_dhqk=16, dhqk_splits=1)),
    (3, 1, 64, 32, C(block_dhv=16, block_dhqk=16, dhqk_splits=4)),
    (2, 3, 64, 16, C(block_dhv=16, block_dhqk=16, dhqk_splits=None)),
    (1, 3, 128, 64, None),
    (2, 2, 64, 32, C(block_dhv=16, block_dhqk=16, dhqk_splits=1, num_stages=2)),
    (1, 2, 64, 32, C(block_dhv=32, block_dhqk=16, dhqk_splits=1)),
    (3, 2, 32, 64, C(block_dhv=32, block_dhqk=None, dhqk_splits=1)),
    (2, 3, 32, 32, C(block_dhv=32, block_dhqk=16, dhqk_splits=1)),
]
CASE_IDS = ["unsplit", "split4", "auto-split", "default", "two-stages", "four-row-blocks", "one-shot", "per-head"]


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


def fused_projection(x, extra_columns=5):
    """q, k, v of all heads side by side in one (B, W) array, with further (random) columns after them."""
    B = x["q"].shape[0]
    parts = [x[name].reshape(B, -1) for name in ("q", "k", "v")]
    extra = jnp.asarray(np.random.default_rng(0).standard_normal((B, extra_columns)), x["q"].dtype)
    return jnp.concatenate([*parts, extra], axis=1)


def stacked_layers(seed, L, B, NH, DHQK, DHV, dtype):
    """L layers of random step inputs (``_step_inputs``) and their states stacked: c (L, B, NH, DHQK, DHV), n (L,
    B, NH, DHQK), m (L, B, NH)."""
    layers = [_step_inputs(seed + j, B, NH, DHQK, DHV, dtype)[0] for j in range(L)]
    stack = [jnp.stack([a[name] for a in layers]) for name in ("c", "n", "m")]
    stack[2] = stack[2][..., 0]
    return layers, stack


def kernel_sources(x, gates, extra_columns=5):
    """``recurrent_step_kernel``'s sources and layout for one layer's inputs ``x`` (B, NH, ...): q, k, v read
    from one fused projection (B, W); the gates as (B·NH, 1) arrays ("separate") or from one (B, 2·NH) array,
    all i then all f ("side-by-side")."""
    B, NH, DHQK = x["q"].shape
    qkv = fused_projection(x, extra_columns)
    kw = {"qkv_heads": NH, "qkv_offsets": (0, NH * DHQK, 2 * NH * DHQK)}
    if gates == "separate":
        i, f = x["i"].reshape(B * NH, 1), x["f"].reshape(B * NH, 1)
    else:
        i = f = jnp.concatenate([x["i"].reshape(B, NH), x["f"].reshape(B, NH)], axis=1)
        kw |= {"gate_heads": NH, "gate_offsets": (0, NH)}
    return (qkv, qkv, qkv, i, f), kw


def flat_states(stack):
    L, B, NH, DHQK, DHV = stack[0].shape
    return stack[0].reshape(L, B * NH, DHQK, DHV), stack[1].reshape(L, B * NH, DHQK), stack[2].reshape(L, B * NH)


# Stacked-kernel cases: the first four read q, k, v in place from the fused projection; in the last, v starts at
# column 2·NH·DHQK = 32, not a multiple of its 64-column blocks, so q, k, v are sliced out first.
STACKED_CASES = [CASES[0], CASES[1], CASES[7], CASES[2], (2, 1, 16, 64, C(block_dhv=64, block_dhqk=16, dhqk_splits=1))]
STACKED_IDS = ["unsplit", "split4", "per-head", "auto", "unaligned"]


@pytest.mark.parametrize("gates", ["separate", "side-by-side"])
@pytest.mark.parametrize("case", STACKED_CASES, ids=STACKED_IDS)
@pytest.mark.parametrize("layer", [0, 2])
def test_stacked_kernel_updates_one_layer(case, layer, gates):
    """``recurrent_step_kernel`` on layer ``layer`` of 3 stacked layers, q, k, v read from a fused projection and
    the gates from their own arrays or from one gate projection, equals the step on the layer's states bit for
    bit; the other layers stay unchanged."""
    B, NH, DHQK, DHV, config = case
    L = 3
    layers, stack = stacked_layers(10 * layer, L, B, NH, DHQK, DHV, jnp.bfloat16)
    x = {name: layers[layer][name] for name in ("q", "k", "v", "i", "f")}
    sources, layout = kernel_sources(x, gates)
    step = jax.jit(
        functools.partial(recurrent_step_kernel, layer=layer, config=config, interpret=INTERPRET, **layout),
        donate_argnums=0,  # c; the layer's n' and m' are fresh arrays
    )
    jaxpr = jax.make_jaxpr(step)(*flat_states(stack), *sources)
    (call,) = [e for e in jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "pallas_call"]
    in_place = case is not STACKED_CASES[-1]
    assert (call.invars[3].aval.shape == sources[0].shape) == in_place  # the kernel's q operand: qkv or a slice
    if gates == "side-by-side":  # the kernel's i and f operands are the gate array itself (flattened)
        assert call.invars[6].aval.shape == call.invars[7].aval.shape == (2 * B * NH, 1)
    h, c, n, m = step(*flat_states([jnp.copy(a) for a in stack]), *sources)
    h_ref, states_ref = recurrent_step_pallas(
        **{name: layers[layer][name] for name in "cnm"}, **x, config=config, interpret=INTERPRET
    )
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_ref).reshape(h.shape))
    np.testing.assert_array_equal(np.asarray(c.reshape(stack[0].shape)[layer]), np.asarray(states_ref[0]))
    for other in set(range(L)) - {layer}:
        np.testing.assert_array_equal(np.asarray(c.reshape(stack[0].shape)[other]), np.asarray(stack[0][other]))
    np.testing.assert_array_equal(np.asarray(n), np.asarray(states_ref[1]).reshape(n.shape))
    np.testing.assert_array_equal(np.asarray(m), np.asarray(states_ref[2]).reshape(m.shape))


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=["split4", "auto-split"])
def test_stacked_kernel_partial_sums(case):
    """``combine=False`` with DHQK split over P programs returns h's partial sums, float32: their sums divided by
    the normaliser of m' give h (float64 from the equations)."""
    B, NH, DHQK, DHV, config = case
    args, rounded = _step_inputs(4, B, NH, DHQK, DHV, jnp.float32)
    stack = (args["c"][None], args["n"][None], args["m"][None, ..., 0])
    sources, layout = kernel_sources(args, "side-by-side", extra_columns=0)
    (num, qn), _, _, m = recurrent_step_kernel(
        *flat_states(stack), *sources, layer=0, config=config, interpret=INTERPRET, combine=False, **layout
    )
    P = config.splits(B * NH, DHQK, DHV)[1]
    assert P > 1 and num.shape == (B * NH, P, DHV) and qn.shape == (B * NH, P)
    assert num.dtype == qn.dtype == jnp.float32
    h = np.sum(np.asarray(num, np.float64), axis=1) / (
        np.maximum(np.abs(np.sum(np.asarray(qn, np.float64), axis=1)), np.exp(-np.asarray(m, np.float64)))[:, None]
        + 1e-6
    )
    h_ref, _, scale = _reference(rounded)
    assert_close("h from partial sums", h_ref, h.reshape(h_ref.shape), TOL["float32"], scale=scale)


def test_stacked_kernel_rejects_bad_layer_and_sources():
    args, _ = _step_inputs(0, 1, 2, 16, 16, jnp.float32)
    stack = flat_states((args["c"][None], args["n"][None], args["m"][None, ..., 0]))
    sources, layout = kernel_sources(args, "separate")
    kw = {"interpret": INTERPRET, **layout}
    with pytest.raises(ValueError, match="layer=1 must be in"):
        recurrent_step_kernel(*stack, *sources, layer=1, **kw)
    with pytest.raises(TypeError, match="Python int"):
        recurrent_step_kernel(*stack, *sources, layer=jnp.int32(0), **kw)
    with pytest.raises(TypeError, match="interpret must be a bool"):
        recurrent_step_kernel(*stack, *sources, layer=0, **{**kw, "interpret": None})
    with pytest.raises(ValueError, match="stacked flattened states"):
        recurrent_step_kernel(args["c"], args["n"], args["m"], *sources, layer=0, **kw)
    narrow = sources[0][:, :40]
    with pytest.raises(ValueError, match=r"k.shape=\(1, 40\) cannot hold 2 heads"):
        recurrent_step_kernel(*stack, narrow, narrow, narrow, *sources[3:], layer=0, **kw)
    with pytest.raises(ValueError, match=r"i.shape=\(1, 3\) cannot hold 1 heads"):
        recurrent_step_kernel(*stack, *sources[:3], jnp.ones((1, 3)), jnp.ones((1, 3)), layer=0, **kw)


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
    with pytest.raises(ValueError, match="num_stages"):
        StepKernelConfig(num_stages=0)
    for knob in ("grid_order", "prefetch", "evict_first"):  # layouts measured slower, no longer settings
        with pytest.raises(TypeError, match=knob):
            StepKernelConfig(**{knob: None})


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
