"""The Mosaic GPU decode-step kernel (``StepKernelConfig(backend="mosaic")``).

Mosaic GPU has no interpret mode in the JAX versions CI runs (0.10), so on a CPU these tests check that the
kernel lowers for CUDA with c aliased in place, and the backend selection and its errors. On a Hopper GPU the
kernel runs compiled against the float64 reference, with the cases of the Triton kernel's tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import INTERPRET, ON_GPU
from tests.kernels.test_recurrent_step import _TOL_KEY, _reference, _step_inputs, assert_step_matches
from tests.numerics import TOL, assert_close, make_inputs
from tests.reference import recurrent_ref
from xlstm_jax.kernels import StepKernelConfig, recurrent_step_pallas, recurrent_step_pallas_stacked
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
    f32, S = jnp.float32, jax.ShapeDtypeStruct
    return (
        S((BH, DHQK, DHV), f32), S((BH, DHQK), f32), S((BH,), f32),
        S((BH, DHQK), dtype), S((BH, DHQK), dtype), S((BH, DHV), dtype), S((BH,), dtype), S((BH,), dtype),
    )  # fmt: skip


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
    assert f"%arg0: tensor<{BH}x{DHQK}x{DHV}xf32> {{tf.aliasing_output = 1 : i32}}" in text


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
    """Asked for explicitly, the Mosaic kernel refuses interpret mode, tilings it cannot run and the stacked
    step; ``"auto"`` falls back to the Triton kernel in interpret mode."""
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
    stack = {"c": args["c"][None], "n": args["n"][None], "m": args["m"][None, ..., 0]}
    qkv = jnp.concatenate([args[x].reshape(1, -1) for x in ("q", "k", "v")], axis=1)
    with pytest.raises(ValueError, match="stacked step has only the Triton kernel"):
        recurrent_step_pallas_stacked(**stack, layer=0, qkv=qkv, i=args["i"], f=args["f"], config=C())


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
