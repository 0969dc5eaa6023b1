"""The Mosaic GPU decode-step kernel (``StepKernelConfig(backend="mosaic")``).

The kernel's ``emit_pipeline`` does not run in JAX's Mosaic GPU interpreter, so on a CPU these tests check that
the kernel lowers for CUDA with c aliased in place, and the backend selection and its errors. On a Hopper GPU the
kernel runs compiled against the float64 reference, with the cases of the Triton kernel's tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from tests.kernels import INTERPRET, ON_GPU
from tests.kernels.test_recurrent_step import (
    _TOL_KEY,
    _reference,
    _step_inputs,
    assert_step_matches,
    flat_states,
    kernel_sources,
    stacked_layers,
)
from tests.numerics import TOL, assert_close, make_inputs
from tests.reference import recurrent_ref
from xlstm_jax.kernels import StepKernelConfig, recurrent_step_kernel, recurrent_step_pallas
from xlstm_jax.kernels.recurrent_step_mosaic import device_supports_mosaic, mosaic_step, mosaic_step_unsupported
from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw

ON_HOPPER = ON_GPU and device_supports_mosaic()
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="the Mosaic GPU kernel runs compiled on Hopper GPUs only")

C = functools.partial(StepKernelConfig, backend="mosaic")
# (B, NH, DHQK, DHV, config): one row block and two 32-column blocks per head (odd B·NH); four row blocks,
# two 64-column blocks, three blocks in flight; two row blocks of 128 rows; the default tiling.
CASES = [
    (1, 3, 64, 64, C(block_dhv=32)),
    (3, 1, 256, 128, C(pipeline_depth=3)),
    (2, 2, 256, 64, C(block_dhqk=128, block_dhv=64, pipeline_depth=1)),
    (2, 3, 128, 256, C()),
]
CASE_IDS = ["one-row-block", "four-row-blocks", "rows128", "default"]


def _avals(BH, DHQK, DHV, dtype=jnp.bfloat16):
    """One layer's states (L=1) and inputs, flattened over the heads."""
    f32, S = jnp.float32, jax.ShapeDtypeStruct
    return (
        S((1, BH, DHQK, DHV), f32), S((1, BH, DHQK), f32), S((1, BH), f32),
        S((BH, DHQK), dtype), S((BH, DHQK), dtype), S((BH, DHV), dtype), S((BH, 1), dtype), S((BH, 1), dtype),
    )  # fmt: skip


def _mosaic_calls(jaxpr) -> list:
    """The Mosaic kernel launches (``pl.kernel``'s ``mpmd_map``) anywhere in a jaxpr."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "mpmd_map":
            found.append(eqn)
        for sub in jaxprs_in_params(eqn.params):
            found += _mosaic_calls(sub)
    return found


@pytest.mark.parametrize(("BH", "DHQK", "DHV", "block_dhqk", "block_dhv", "dtype"), [
    (3, 64, 32, 64, 32, jnp.float32), (5, 256, 512, 64, 64, jnp.bfloat16), (2, 128, 128, 128, 64, jnp.float16),
])  # fmt: skip
def test_mosaic_step_lowers_for_cuda_with_c_in_place(BH, DHQK, DHV, block_dhqk, block_dhv, dtype):
    """Tracing and Mosaic GPU lowering (layouts, pipeline, reductions) succeed on any machine, and c (the first
    argument) is aliased to the second output (c'): donated, it is updated in place."""
    step = functools.partial(mosaic_step, eps=1e-6, block_dhqk=block_dhqk, block_dhv=block_dhv)
    text = jax.jit(step, donate_argnums=0).trace(*_avals(BH, DHQK, DHV, dtype)).lower(lowering_platforms=("cuda",))
    text = text.as_text()
    assert "mosaic_gpu" in text
    assert f"%arg0: tensor<1x{BH}x{DHQK}x{DHV}xf32> {{tf.aliasing_output = 1 : i32}}" in text


def test_mosaic_stacked_step_lowers_with_inputs_in_place():
    """The model's form: a layer of 3 stacked layers, q, k, v read from a fused projection (B, W) and the gates
    from the gate projection (B, 2·NH), in place; the whole stack c aliased to c'. The layer index is data,
    not code: the kernels of two layers are the same (same jaxpr and parameters), the layer an int32 operand.
    (Their lowered modules still differ on JAX 0.11, which names each lowering with a counter.)"""
    B, NH, DHQK, DHV, L = 2, 3, 128, 64, 3
    f32, bf16, S = jnp.float32, jnp.bfloat16, jax.ShapeDtypeStruct
    BH, W = B * NH, NH * (2 * DHQK + 2 * DHV)
    avals = (S((L, BH, DHQK, DHV), f32), S((L, BH, DHQK), f32), S((L, BH), f32), *[S((B, W), bf16)] * 3)
    avals += (S((B, 2 * NH), bf16),) * 2
    kw = {"qkv_heads": NH, "qkv_offsets": (0, NH * DHQK, 2 * NH * DHQK), "gate_heads": NH, "gate_offsets": (0, NH)}
    kernels = []
    for layer in (1, 2):
        step = jax.jit(lambda *a, layer=layer: mosaic_step(*a, eps=1e-6, layer=layer, block_dhv=32, **kw))
        (call,) = _mosaic_calls(jax.make_jaxpr(step)(*avals))
        assert call.invars[0].aval.shape == (1,) and call.invars[0].aval.dtype == jnp.int32
        kernels.append(str(call.params))
    assert kernels[0] == kernels[1]
    text = jax.jit(step, donate_argnums=0).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    assert f"%arg0: tensor<{L}x{BH}x{DHQK}x{DHV}xf32> {{tf.aliasing_output = 1 : i32}}" in text


def test_mosaic_tiling_rules():
    assert mosaic_step_unsupported(256, 512, 64, 64) is None
    assert "block_dhqk=32" in mosaic_step_unsupported(64, 64, 32, 32)
    assert "block_dhv=16" in mosaic_step_unsupported(64, 64, 64, 16)
    assert "divides DHQK=64" in mosaic_step_unsupported(64, 64, 128, 32)
    with pytest.raises(ValueError, match="block_dhv=48 must be a multiple of 32"):
        mosaic_step(*[jnp.zeros(a.shape, a.dtype) for a in _avals(1, 64, 96)], eps=1e-6, block_dhv=48)
    with pytest.raises(ValueError, match="backend='cuda' must be one of"):
        StepKernelConfig(backend="cuda")
    with pytest.raises(ValueError, match="pipeline_depth=0"):
        StepKernelConfig(pipeline_depth=0)
    with pytest.raises(ValueError, match="mosaic_min_programs=0"):
        StepKernelConfig(mosaic_min_programs=0)


def test_mosaic_backend_errors_outside_compiled_mode():
    """Asked for explicitly, the Mosaic kernel refuses interpret mode (in both entry points) and tilings it
    cannot run; ``"auto"`` falls back to the Triton kernel in interpret mode."""
    args, rounded = _step_inputs(3, 1, 2, 64, 32, jnp.float32)
    if INTERPRET:
        with pytest.raises(ValueError, match="runs compiled only"):
            recurrent_step_pallas(**args, config=C(block_dhv=32), interpret=True)
        auto = StepKernelConfig(block_dhv=32, mosaic_min_programs=1)
        h, _ = recurrent_step_pallas(**args, config=auto, interpret=True)
        assert_close("h", _reference(rounded)[0], h, TOL["float32"], scale=_reference(rounded)[2])
    elif ON_HOPPER:
        with pytest.raises(ValueError, match="cannot tile this head shape"):
            recurrent_step_pallas(**args, config=C(block_dhv=16), interpret=False)
    if INTERPRET:
        stack = flat_states((args["c"][None], args["n"][None], args["m"][None, ..., 0]))
        sources, layout = kernel_sources(args, "side-by-side")
        with pytest.raises(ValueError, match="runs compiled only"):
            recurrent_step_kernel(*stack, *sources, layer=0, config=C(block_dhv=32), interpret=True, **layout)


@needs_hopper
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mosaic_step_matches_reference(case, dtype):
    B, NH, DHQK, DHV, config = case
    args, rounded = _step_inputs(B * 100 + DHQK, B, NH, DHQK, DHV, jnp.dtype(dtype))
    step = jax.jit(functools.partial(recurrent_step_pallas, config=config, interpret=False), donate_argnums=0)
    jaxpr = jax.make_jaxpr(step)(**args)
    assert "pallas_call" not in str(jaxpr)  # the Mosaic kernel, not the Triton one
    h, states = step(**args)
    assert_step_matches(rounded, h, states, TOL[_TOL_KEY[dtype]], dtype)


@needs_hopper
@pytest.mark.parametrize("case", CASES[:2], ids=CASE_IDS[:2])
def test_mosaic_step_extreme_gates(case):
    B, NH, DHQK, DHV, config = case
    args, rounded = _step_inputs(7, B, NH, DHQK, DHV, jnp.float32, igate="extreme")
    args["f"] = args["f"].at[0].set(-30.0)  # forget almost everything on one batch element
    args["f"] = args["f"].at[-1].set(40.0)  # and keep everything on another (logsigmoid below float32's 1 - u)
    rounded["f"] = np.asarray(args["f"], np.float64)
    h, states = recurrent_step_pallas(**args, config=config, interpret=False)
    assert_step_matches(rounded, h, states, TOL["float32"])


@needs_hopper
def test_mosaic_auto_selection_and_sequence():
    """``"auto"`` picks the Mosaic kernel once the grid has ``mosaic_min_programs`` programs; as ``mlstm_step_fn`` it
    steps an odd-length sequence with initial states inside ``lax.scan``."""
    B, NH, S, DHQK, DHV = 2, 3, 5, 64, 64
    auto = StepKernelConfig(block_dhv=32, mosaic_min_programs=B * NH * 2)
    x = make_inputs(np.random.default_rng(4), B, NH, S, DHQK, DHV, states=True)
    args = [jnp.asarray(x[name], jnp.float32) for name in ("q", "k", "v", "i", "f", "c0", "n0", "m0")]
    for config, mosaic in ((auto, True), (StepKernelConfig(block_dhv=32, mosaic_min_programs=B * NH * 2 + 1), False)):
        step = functools.partial(recurrent_step_pallas, config=config, interpret=False)
        run = jax.jit(
            lambda *a, step=step: recurrent_sequence_fw(*a, return_last_states=True, use_scan=True, mlstm_step_fn=step)
        )
        assert ("pallas_call" not in str(jax.make_jaxpr(run)(*args))) == mosaic
        h, states = run(*args)
        h_ref, states_ref, scale = recurrent_ref(*(x[name] for name in ("q", "k", "v", "i", "f", "c0", "n0", "m0")))
        assert_close("h", h_ref, h, TOL["float32"], scale=scale)
        for name, ref, out in zip("cnm", states_ref, states, strict=True):
            assert_close(name, ref, out, TOL["float32"])


MOSAIC_STACKED_CASE = (3, 2, 128, 64, C(block_dhv=32))  # 12 programs per layer, 2 row blocks


@needs_hopper
@pytest.mark.parametrize("gates", ["separate", "side-by-side"])
@pytest.mark.parametrize("extra_columns", [0, 5], ids=["in-place", "unaligned-rows"])
def test_mosaic_stacked_kernel_updates_one_layer(gates, extra_columns):
    """``recurrent_step_kernel`` by the Mosaic kernel on a layer of stacked states equals the Mosaic step on the
    layer's states bit for bit, the other layers unchanged. q, k, v are read in place from the fused projection
    when its rows are 16-byte aligned (the TMA engine's rule), else sliced out (5 extra bfloat16 columns)."""
    B, NH, DHQK, DHV, config = MOSAIC_STACKED_CASE
    L, layer = 3, 2
    layers, stack = stacked_layers(20, L, B, NH, DHQK, DHV, jnp.bfloat16)
    x = {name: layers[layer][name] for name in ("q", "k", "v", "i", "f")}
    sources, layout = kernel_sources(x, gates, extra_columns=extra_columns)
    step = jax.jit(
        functools.partial(recurrent_step_kernel, layer=layer, config=config, interpret=False, **layout),
        donate_argnums=0,
    )
    (call,) = _mosaic_calls(jax.make_jaxpr(step)(*flat_states(stack), *sources))
    reads_qkv = any(getattr(x.aval, "shape", None) == sources[0].shape for x in call.invars)
    assert reads_qkv == (extra_columns == 0)  # q, k, v read from qkv itself, or sliced out
    h, c, n, m = step(*flat_states([jnp.copy(a) for a in stack]), *sources)
    h_ref, states_ref = recurrent_step_pallas(**{name: layers[layer][name] for name in "cnm"}, **x, config=config)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_ref).reshape(h.shape))
    c = c.reshape(stack[0].shape)
    np.testing.assert_array_equal(np.asarray(c[layer]), np.asarray(states_ref[0]))
    for other in set(range(L)) - {layer}:
        np.testing.assert_array_equal(np.asarray(c[other]), np.asarray(stack[0][other]))
    np.testing.assert_array_equal(np.asarray(n), np.asarray(states_ref[1]).reshape(n.shape))
    np.testing.assert_array_equal(np.asarray(m), np.asarray(states_ref[2]).reshape(m.shape))
