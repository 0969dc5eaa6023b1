"""The chunk gradients kernel (``mosaic_chunk_gradients``) against the XLA backward's ``_chunk_gradients``.

On a Hopper GPU the kernel runs compiled; elsewhere in Mosaic GPU's interpreter (where this JAX has one), and its
CUDA lowering at the xLSTM-7B head shape is checked on any machine. The operands are real: ``chunk_plan`` of random
bf16 inputs (two chunks; one case padded, with initial states, extreme input gates, resets and packed documents
across the chunk border), the border states of ``chunk_borders`` and the border cotangents as the ``dc0`` of
``chunk_products_vjp`` on the sequence's tail, both rounded to bf16; the expected gradients are
``_chunk_gradients`` (float32) on the same rounded operands.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import ON_GPU
from tests.kernels.test_chunkwise_mosaic_bw import operands
from tests.mlstm.form_checks import random_inputs
from tests.numerics import TOL, assert_close
from xlstm_jax.kernels.chunkwise_mosaic import (
    _BREAKS,
    _BREAKS_COL,
    _COL,
    _GAIN,
    _INTER,
    _LOWER,
    _PLAN_ROWS,
    _QN,
    _ROW,
    CHUNK,
)
from xlstm_jax.kernels.chunkwise_mosaic_bw import (
    _chunk_forward,
    _chunk_gradients,
    _den_slope,
    chunk_borders,
    chunk_products_vjp,
)
from xlstm_jax.kernels.chunkwise_mosaic_grads import (
    BREAKS,
    BREAKS_COL,
    COL,
    D_COL,
    D_DECAY,
    D_GAIN,
    D_INTER,
    D_LOWER,
    D_QN,
    D_ROW,
    DDEN_DQN,
    GAIN,
    RDEN,
    ROW,
    VEC_ROWS,
    W,
    chunk_gradients_smem_bytes,
    chunk_gradients_unsupported,
    mosaic_chunk_gradients,
)
from xlstm_jax.kernels.mosaic import mosaic_interpret_params
from xlstm_jax.kernels.recurrent_step_mosaic import device_supports_mosaic

ON_HOPPER = ON_GPU and device_supports_mosaic()
INTERPRET = not ON_HOPPER
runs = pytest.mark.skipif(
    INTERPRET and mosaic_interpret_params() is None,
    reason="needs a Hopper GPU or a JAX with Mosaic GPU's interpreter",
)
EPS = 1e-6


@jax.jit
def _problem(ops, dh, dc_last):
    """The kernel's operands and the expected gradients of one problem.

    Args:
        ops: ``(q, k, v, plan, decay, c0)`` of ``operands`` (bf16 tiles, float32 plan and state), NC = 2 chunks.
        dh: The cotangent of h (BH, S, DHV), bf16.
        dc_last: The cotangent of the last state (BH, DHQK, DHV), float32.

    Returns:
        ``(kernel operands (q, k, v, dh, borders, dborders, vec), expected (dq, dk, dv, dvec))``, the expected
        values float32.
    """
    q, k, v, plan, decay, c0 = ops
    BH, S, _ = q.shape
    L = CHUNK
    NC = S // L
    borders = chunk_borders(k, v, plan, decay, c0)[0].astype(q.dtype)  # r(C_j), (BH, NC, DHQK, DHV)
    # dC_{j+1}: dc_last after the last chunk; after chunk 0, the cotangent of the state entering chunk 1, which is
    # the dc0 of the products' backward on the sequence from chunk 1 on.
    tail = lambda x: x[:, L:]  # noqa: E731
    dc_1 = chunk_products_vjp(
        tail(q), tail(k), tail(v), plan[:, _PLAN_ROWS:], decay[:, 1:], borders[:, 1].astype(jnp.float32), EPS,
        tail(dh).astype(jnp.float32), dc_last,
    )[5]  # fmt: skip
    assert NC == 2
    dborders = jnp.stack([dc_1, dc_last], axis=1).astype(q.dtype)  # r(dC_{j+1}), (BH, NC, DHQK, DHV)

    def chunk(q, k, v, plan, c, dc, dh):
        qn, den = _chunk_forward(q, k, v, plan, c, EPS)[4:6]
        dq, dk, dv, dplan, ddecay = _chunk_gradients(q, k, v, plan, c, dc, dh, EPS)
        rows = {
            ROW: plan[_ROW], COL: plan[_COL], BREAKS: plan[_BREAKS], BREAKS_COL: plan[_BREAKS_COL],
            GAIN: plan[_GAIN], RDEN: 1.0 / den, W: plan[_INTER] / den, DDEN_DQN: _den_slope(qn, plan[_LOWER]),
        }  # fmt: skip
        vec = jnp.stack([rows[r] for r in range(VEC_ROWS)])
        d_rows = {
            D_ROW: dplan[_ROW], D_COL: dplan[_COL], D_INTER: dplan[_INTER], D_GAIN: dplan[_GAIN],
            D_DECAY: jnp.full((L,), ddecay), D_QN: dplan[_QN], D_LOWER: dplan[_LOWER],
        }  # fmt: skip
        dvec = jnp.concatenate([jnp.stack([d_rows[r] for r in range(D_LOWER + 1)]), jnp.zeros((1, L))])
        return dq, dk, dv, vec, dvec

    tiles = lambda x: x.reshape(BH, NC, L, -1)  # noqa: E731
    f32 = jnp.float32
    dq, dk, dv, vec, dvec = jax.vmap(jax.vmap(chunk))(
        tiles(q), tiles(k), tiles(v), plan.reshape(BH, NC, _PLAN_ROWS, L),
        borders.astype(f32), dborders.astype(f32), tiles(dh),
    )  # fmt: skip
    flat = lambda x: x.reshape(BH, NC * x.shape[2], x.shape[3])  # noqa: E731
    kernel_operands = (q, k, v, dh, flat(borders), flat(dborders), flat(vec))
    return kernel_operands, (flat(dq), flat(dk), flat(dv), flat(dvec))


def _ids(lengths: list[int]) -> list[int]:
    return [n for n, length in enumerate(lengths) for _ in range(length)]


# (seed, B, NH, S, DHQK, DHV, initial states, input gates, resets, segments, block_dhv, consumers); two chunks each.
_DOCUMENTS = np.array([_ids([1, 62, 3, 34]), _ids([70, 1, 29])])
CASES = {
    # one column block (no refills), dDECAY over two 64-row slices of DHQK
    "one-block": (1, 1, 2, 128, 128, 64, False, "wide", False, None, 64, 1),
    # two warpgroups: the same problem in two blocks of 32 columns (one slot refill), and in one block of 64
    "two-blocks-two-warpgroups": (1, 1, 2, 128, 128, 64, False, "wide", False, None, 32, 2),
    "one-block-two-warpgroups": (1, 1, 2, 128, 128, 64, False, "wide", False, None, 64, 2),
    # three column blocks: slot 0 refilled once, its barriers' phases odd at the end of a loop
    "padded-states-documents-resets-three-blocks": (2, 2, 1, 100, 64, 96, True, "extreme", True, _DOCUMENTS, 32, 1),
    "padded-states-documents-resets-three-blocks-two-warpgroups": (
        2, 2, 1, 100, 64, 96, True, "extreme", True, _DOCUMENTS, 32, 2,
    ),
}  # fmt: skip


@runs
@pytest.mark.parametrize(
    ("seed", "B", "NH", "S", "DHQK", "DHV", "states", "igate", "resets", "segments", "block_dhv", "consumers"),
    list(CASES.values()),
    ids=list(CASES),
)
def test_matches_chunk_gradients(seed, B, NH, S, DHQK, DHV, states, igate, resets, segments, block_dhv, consumers):
    """dq, dk, dv and every per-step vector (dROW, dCOL, dINTER, dGAIN, the chunk's dDECAY, the normaliser's dQN and
    dLOWER, which the kernel computes from its own products) of the kernel equal
    ``_chunk_gradients`` within the bf16 bound (the kernel also rounds dS, P and dh's weightings to bf16 where
    they enter its products), with one warpgroup per program and with two (dq's and dk's loops at once); the
    unused rows are exactly 0 and dDECAY is one value per chunk."""
    x = random_inputs(seed, B, NH, S, DHQK, DHV, states=states, igate=igate)
    if resets:
        x["f"][0, 0, [10, CHUNK]] = -np.inf
    ops = operands(x, jnp.bfloat16, segments)
    rng = np.random.default_rng(seed)
    BH, S_padded = B * NH, ops[0].shape[1]
    dh = rng.standard_normal((BH, S_padded, DHV))
    dh[:, S:] = 0.0  # the padded steps' h is cut off: no cotangent reaches them
    dc_last = rng.standard_normal((BH, DHQK, DHV))
    args, expected = _problem(ops, jnp.asarray(dh, jnp.bfloat16), jnp.asarray(dc_last, jnp.float32))
    assert all(bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))) for a in args[3:6])
    vec = np.asarray(args[6]).reshape(BH, -1, VEC_ROWS, CHUNK)
    assert np.all(np.isfinite(np.delete(vec, [ROW, COL], axis=2)))  # -inf in ROW and COL masks, as in the plan
    out = mosaic_chunk_gradients(*args, block_dhv=block_dhv, consumers=consumers, interpret=INTERPRET)
    for name, o, a in zip(("dq", "dk", "dv"), out[:3], args[:3], strict=True):
        assert o.shape == a.shape and o.dtype == jnp.bfloat16, name
    tol = TOL["bfloat16/float32"]
    for name, e, o in zip(("dq", "dk", "dv"), expected[:3], out[:3], strict=True):
        assert_close(name, e, o, tol)
    dvec, dvec_expected = (np.asarray(a).reshape(BH, -1, VEC_ROWS, CHUNK) for a in (out[3], expected[3]))
    assert out[3].dtype == jnp.float32 and out[3].shape == args[6].shape
    rows = {"dROW": D_ROW, "dCOL": D_COL, "dINTER": D_INTER, "dGAIN": D_GAIN, "dDECAY": D_DECAY}
    for name, r in {**rows, "dQN": D_QN, "dLOWER": D_LOWER}.items():
        assert float(np.max(np.abs(dvec_expected[:, :, r]))) > 0, name  # a real check, not of zeros
        assert_close(name, dvec_expected[:, :, r], dvec[:, :, r], tol)
    np.testing.assert_array_equal(dvec[:, :, D_DECAY], dvec[:, :, D_DECAY, :1].repeat(CHUNK, axis=-1))
    assert not np.any(dvec[:, :, D_LOWER + 1 :])


@pytest.mark.parametrize(
    ("DHQK", "DHV", "block_dhv", "consumers"),
    [(256, 512, 32, 1), (128, 128, 64, 1), (256, 512, 32, 2), (128, 128, 64, 2)],
)
def test_lowers_for_cuda(DHQK, DHV, block_dhv, consumers):
    """Tracing and Mosaic GPU lowering (the layouts, the operands' shared swizzle, the shared-memory scopes) succeed
    on any machine: at the xLSTM-7B head shape in blocks of 32 columns, and in blocks of 64, each with one and
    with two warpgroups."""
    BH, NC, bf16, A = 2, 2, jnp.bfloat16, jax.ShapeDtypeStruct
    S = NC * CHUNK
    avals = (
        A((BH, S, DHQK), bf16), A((BH, S, DHQK), bf16), A((BH, S, DHV), bf16), A((BH, S, DHV), bf16),
        A((BH, NC * DHQK, DHV), bf16), A((BH, NC * DHQK, DHV), bf16), A((BH, NC * VEC_ROWS, CHUNK), jnp.float32),
    )  # fmt: skip
    step = functools.partial(mosaic_chunk_gradients, block_dhv=block_dhv, consumers=consumers)
    text = jax.jit(step).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_bad_calls_raise():
    BH, S, DHQK, DHV, bf16 = 1, CHUNK, 64, 32, jnp.bfloat16
    q = jnp.ones((BH, S, DHQK), bf16)
    v = jnp.ones((BH, S, DHV), bf16)
    borders = jnp.ones((BH, DHQK, DHV), bf16)
    vec = jnp.ones((BH, VEC_ROWS, CHUNK), jnp.float32)
    args = (q, q, v, v, borders, borders, vec)
    run = functools.partial(mosaic_chunk_gradients, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"q.shape=\(1, 60, 64\) must be \(BH, S, DHQK\) with S a positive multiple"):
        run(q[:, :60], *args[1:])
    with pytest.raises(ValueError, match=r"k.shape=\(1, 64, 32\) must equal q.shape"):
        run(q, q[..., :32], *args[2:])
    with pytest.raises(ValueError, match=r"dh.shape=\(1, 64, 64\) must be \(1, 64, 32\)"):
        run(q, q, v, q, *args[4:])
    with pytest.raises(ValueError, match=r"dborders.shape=\(1, 32, 64\) must be \(1, 64, 32\)"):
        run(*args[:5], borders.transpose(0, 2, 1), vec)
    with pytest.raises(ValueError, match=r"vec.shape=\(1, 16, 64\) must be \(1, 8, 64\)"):
        run(*args[:6], jnp.concatenate([vec, vec], axis=1))
    with pytest.raises(ValueError, match="borders.dtype=float32 must equal q.dtype=bfloat16"):
        run(*args[:4], borders.astype(jnp.float32), *args[5:])
    with pytest.raises(ValueError, match="vec.dtype=bfloat16 must be float32"):
        run(*args[:6], vec.astype(bf16))
    with pytest.raises(ValueError, match="inputs must be bfloat16 or float16"):
        run(*(a.astype(jnp.float32) for a in args))
    with pytest.raises(ValueError, match="block_dhv=48 must be 32 or 64 and divide DHV=32"):
        run(*args, block_dhv=48)
    assert chunk_gradients_unsupported(96, 64, bf16, 32) == "DHQK=96 must be a multiple of 64 and at most 256 " + (
        "(dq's accumulator in registers)"
    )
    assert "DHQK=320" in chunk_gradients_unsupported(320, 64, bf16, 32)
    assert chunk_gradients_unsupported(256, 512, bf16, 32) is None
    assert chunk_gradients_smem_bytes(256, bf16, 32) == 200 * 1024  # the module docstring's budget
    too_big = chunk_gradients_unsupported(256, 512, jnp.float16, 64)
    assert too_big is not None and "284 KiB of shared memory" in too_big
    assert chunk_gradients_unsupported(128, 512, bf16, 64) is None  # 188 KiB
    assert "236 KiB" in chunk_gradients_unsupported(192, 512, bf16, 64)
    # Two warpgroups: one pipeline feeds both loops, 116 + 80 + 16 KiB at the xLSTM-7B head shape (module docstring).
    assert chunk_gradients_unsupported(256, 512, bf16, 32, 2) is None
    assert chunk_gradients_smem_bytes(256, bf16, 32, 2) == 212 * 1024
    assert chunk_gradients_unsupported(128, 128, bf16, 64, 2) is None  # 212 KiB
    assert chunk_gradients_unsupported(256, 512, bf16, 64, 2) == (
        "the tiles need 308 KiB of shared memory at DHQK=256, block_dhv=64, consumers=2; a Hopper block has 227 KiB, "
        "4 KiB of it kept for barriers"
    )
    assert chunk_gradients_unsupported(64, 64, bf16, 32, 3) == "consumers=3 must be 1 or 2 (warpgroups per program)"
    with pytest.raises(ValueError, match=r"cannot run this call: consumers=0 must be 1 or 2"):
        run(*args, consumers=0)
