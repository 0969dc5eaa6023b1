"""The chunkwise Mosaic kernel's products in XLA and their hand-derived backward (``chunkwise_mosaic_bw``).

``chunk_products`` against the kernel (Mosaic GPU's interpreter, bf16); ``chunk_products_vjp`` against ``jax.vjp``
of ``chunk_products`` in float64 on plans of the real ``chunk_plan`` (initial states, extreme and closed gates,
resets, packed documents across chunk borders and of one step) and on a plan with normaliser ties and -inf rows;
``chunkwise_split_fw`` (plan through autodiff, products by hand) against ``jax.vjp`` of the XLA chunkwise form and
against central differences of the float64 reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.mlstm.form_checks import check_forward, check_gradients, random_inputs
from tests.numerics import TOL, assert_close
from xlstm_jax.kernels.chunkwise_mosaic import (
    _BREAKS,
    _BREAKS_COL,
    _COL,
    _INTER,
    _LOWER,
    _PLAN_ROWS,
    _QN,
    _ROW,
    CHUNK,
    chunk_plan,
    mosaic_chunkwise,
)
from xlstm_jax.kernels.chunkwise_mosaic_bw import (
    chunk_borders,
    chunk_products,
    chunk_products_vjp,
    chunkwise_split_fw,
    mosaic_products_vjp,
)
from xlstm_jax.kernels.mosaic import mosaic_interpret_params
from xlstm_jax.mlstm.chunkwise import chunk_sequence, chunkwise_fw

EPS = 1e-6
NAMES = ("q", "k", "v", "i", "f")
STATES = ("c0", "n0", "m0")


def _ids(lengths: list[int]) -> list[int]:
    return [n for n, length in enumerate(lengths) for _ in range(length)]


# S = 150, chunks of 64: row 0 has a document of 1 at the start, one ending on the first border, one filling chunk 1
# exactly, one of 1 on the second border and one crossing into the padded tail; row 1 has one crossing the first
# border and two of 1 inside a chunk.
SEGMENTS = np.array([_ids([1, 63, 64, 1, 21]), _ids([70, 1, 1, 78])])


@jax.jit
def _operands(args, states, segment_ids):
    """The kernel's operands (q, k, v, plan, decay, c0), heads flattened, from ``chunk_plan`` of the inputs."""
    seq = chunk_sequence(*args, *(states or (None,) * 3), EPS, None, CHUNK, segment_ids, True)
    plan, decay, _, _ = chunk_plan(seq)
    B, NH, _, DHQK, DHV = seq.dims
    BH, S = B * NH, seq.NC * seq.L
    return (
        seq.q.reshape(BH, S, DHQK),
        seq.k.reshape(BH, S, DHQK),
        seq.v.reshape(BH, S, DHV),
        plan.reshape(BH, seq.NC * _PLAN_ROWS, seq.L),
        decay.reshape(BH, seq.NC),
        seq.states[0].astype(plan.dtype).reshape(BH, DHQK, DHV),
    )


def operands(x: dict[str, np.ndarray], dtype, segment_ids=None):
    """:func:`_operands` of the inputs ``x`` in ``dtype`` (initial states in ``dtype`` promoted to float32)."""
    args = tuple(jnp.asarray(x[name], dtype) for name in NAMES)
    state_dtype = jnp.promote_types(dtype, jnp.float32)
    states = tuple(jnp.asarray(x[name], state_dtype) for name in STATES) if "c0" in x else None
    ids = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    return _operands(args, states, ids)


@pytest.mark.skipif(mosaic_interpret_params() is None, reason="needs a JAX with Mosaic GPU's interpreter")
def test_products_match_the_kernel():
    """bf16, two chunks (the second padded), initial states, a document crossing the border: h and the last state
    of ``chunk_products`` equal the kernel's (Mosaic GPU's interpreter) within the bf16 bound."""
    x = random_inputs(7, 1, 1, 100, 64, 32, states=True, igate="extreme")
    ops = operands(x, jnp.bfloat16, np.array([_ids([40, 60])]))
    h, c = jax.jit(functools.partial(chunk_products, eps=EPS))(*ops)
    h_kernel, c_kernel = mosaic_chunkwise(*ops, eps=EPS, interpret=True)
    assert h.dtype == h_kernel.dtype == jnp.bfloat16 and c.dtype == c_kernel.dtype == jnp.float32
    assert_close("h", np.asarray(h_kernel, np.float32), h, TOL["bfloat16/float32"])
    assert_close("c (last state)", c_kernel, c, TOL["bfloat16/float32"])
    # Under differentiation: the border states r(C_j) before every chunk too, h and c unchanged.
    h_b, c_b, borders = mosaic_chunkwise(*ops, eps=EPS, interpret=True, borders=True)
    assert borders.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(c_b), np.asarray(c_kernel))
    np.testing.assert_array_equal(np.asarray(h_b), np.asarray(h_kernel))
    expected = chunk_borders(*ops[1:])[0]  # (BH, NC, DHQK, DHV) float32
    assert_close("borders", np.asarray(borders, np.float32), expected.reshape(borders.shape), TOL["bfloat16/float32"])
    # Precomputed scores: the same h, last state and borders, and the steps' (qn, den) for the backward.
    pre = functools.partial(mosaic_chunkwise, eps=EPS, interpret=True, scores="precomputed")
    h_pre, c_pre = pre(*ops)
    assert_close("h (precomputed)", np.asarray(h_pre, np.float32), h, TOL["bfloat16/float32"])
    assert_close("c (precomputed)", c_pre, c, TOL["bfloat16/float32"])
    h_b, c_b, borders, qn_den_pre = pre(*ops, borders=True, normaliser=True)
    np.testing.assert_array_equal(np.asarray(h_b), np.asarray(h_pre))
    np.testing.assert_array_equal(np.asarray(c_b), np.asarray(c_pre))
    assert_close("borders (precomputed)", np.asarray(borders, np.float32), expected.reshape(borders.shape),
                 TOL["bfloat16/float32"])  # fmt: skip
    # In-kernel scores: the kernel's own (qn, den), written by each head's first column block, beside h and c.
    h_in, c_in, _, qn_den_in = mosaic_chunkwise(*ops, eps=EPS, interpret=True, borders=True, normaliser=True)
    np.testing.assert_array_equal(np.asarray(h_in), np.asarray(h_kernel))
    np.testing.assert_array_equal(np.asarray(c_in), np.asarray(c_kernel))
    q, k, _, plan, _, _ = ops
    expected_qn, expected_den, size = _step_normaliser(q, k, plan)
    # float32: each P element a sum of DHQK exact bf16 products times D and the scale (DHQK + 2 roundings of 2^-24),
    # then qn a sum of L + 1 terms: within (DHQK + L + 3) · 2^-24 of the terms' sizes; den adds one rounding (+ eps).
    bound = (q.shape[-1] + CHUNK + 3) * 2.0**-24 * size
    for qn, den in (qn_den_pre, qn_den_in):
        assert qn.shape == den.shape == expected_qn.shape and qn.dtype == den.dtype == jnp.float32
        assert np.all(np.abs(np.asarray(qn) - expected_qn) <= bound)
        assert np.all(np.abs(np.asarray(den) - expected_den) <= bound + 2.0**-24 * expected_den)


@pytest.mark.skipif(mosaic_interpret_params() is None, reason="needs a JAX with Mosaic GPU's interpreter")
def test_in_kernel_normaliser_from_the_first_column_block():
    """With in-kernel scores, two heads of four column blocks (two programs of two warpgroups each): the (qn, den)
    that each head's first block writes cover every step and equal the float64 values within the float32 bound,
    and h and the last state are those of the call without them."""
    x = random_inputs(8, 1, 2, 128, 64, 128, states=True, igate="wide")
    ops = operands(x, jnp.bfloat16)
    run = functools.partial(mosaic_chunkwise, eps=EPS, interpret=True, consumers=2)
    h, c = run(*ops)
    h_n, c_n, (qn, den) = run(*ops, normaliser=True)
    np.testing.assert_array_equal(np.asarray(h_n), np.asarray(h))
    np.testing.assert_array_equal(np.asarray(c_n), np.asarray(c))
    q, k, _, plan, _, _ = ops
    expected_qn, expected_den, size = _step_normaliser(q, k, plan)
    bound = (q.shape[-1] + CHUNK + 3) * 2.0**-24 * size  # as in test_products_match_the_kernel
    assert np.all(np.abs(np.asarray(qn) - expected_qn) <= bound)
    assert np.all(np.abs(np.asarray(den) - expected_den) <= bound + 2.0**-24 * expected_den)


def _step_normaliser(q, k, plan):
    """Each step's (qn, den) in float64 from the chunks' scores (the module docstring's equations), and the size of
    the terms summed into qn (Σ|P| + |QN|)."""
    BH, S, DHQK = q.shape
    NC = S // CHUNK
    q, k = (np.asarray(x, np.float64).reshape(BH, NC, CHUNK, DHQK) for x in (q, k))
    rows = np.asarray(plan, np.float64).reshape(BH, NC, _PLAN_ROWS, CHUNK)
    keep = np.tril(np.ones((CHUNK, CHUNK), bool)) & (rows[:, :, _BREAKS, :, None] == rows[:, :, _BREAKS, None, :])
    with np.errstate(over="ignore"):
        d = np.where(keep, np.exp(rows[:, :, _ROW, :, None] + rows[:, :, _COL, None, :]), 0.0)
    p = np.einsum("bctd,bcsd->bcts", q, k) * d / np.sqrt(DHQK)
    qn = p.sum(-1) + rows[:, :, _QN]
    return qn, np.maximum(np.abs(qn), rows[:, :, _LOWER]) + EPS, np.abs(p).sum(-1) + np.abs(rows[:, :, _QN])


def _ties(ops):
    """The plan with normaliser ties: in rows t = 3, 4 of every chunk ROW = -inf (so P's row is exactly 0 and
    qn = QN), |QN| = LOWER = 0.7 with either sign; INTER = 0.5 keeps h non-zero there."""
    q, k, v, plan, decay, c0 = ops
    plan = plan.reshape(*plan.shape[:1], -1, _PLAN_ROWS, plan.shape[-1])
    plan = plan.at[:, :, _ROW, 3:5].set(-jnp.inf).at[:, :, _INTER, 3:5].set(0.5)
    plan = plan.at[:, :, _QN, 3].set(0.7).at[:, :, _QN, 4].set(-0.7).at[:, :, _LOWER, 3:5].set(0.7)
    return q, k, v, plan.reshape(ops[3].shape), decay, c0


@jax.jit
def _autodiff(ops, dh, dc):
    return jax.vjp(functools.partial(chunk_products, eps=EPS), *ops)[1]((dh, dc))


@jax.jit
def _by_hand(ops, dh, dc, borders):
    return chunk_products_vjp(*ops, EPS, dh, dc, borders)


# (seed, B, NH, initial states, forget gates, input gates, resets, segments, ties, borders given); all S = 150
# (three chunks, the last padded), DHQK = 6, DHV = 5, B * NH = 2, so that the cases share their compilations.
VJP_CASES = [
    (1, 2, 1, True, "mixed", "extreme", True, SEGMENTS, False, True),  # documents, states, resets
    (2, 1, 2, False, "open", "wide", False, None, False, False),  # long memory, no initial states
    (3, 2, 1, True, "closed", "extreme", False, None, True, False),  # ties, -inf rows
]


@pytest.mark.parametrize(
    ("seed", "B", "NH", "states", "fgate", "igate", "resets", "segments", "ties", "borders"),
    VJP_CASES,
    ids=["documents-states-resets", "open-no-states", "ties"],
)
def test_products_vjp_is_autodiffs(seed, B, NH, states, fgate, igate, resets, segments, ties, borders):
    """Every gradient of ``chunk_products_vjp`` (q, k, v, the plan, the decays, c0) equals ``jax.vjp`` of
    ``chunk_products`` in float64, for cotangents on h and on the last state; the break rows of the plan get
    exactly 0; passing the border states (``chunk_borders``) gives the same gradients as computing them."""
    x = random_inputs(seed, B, NH, 150, 6, 5, states=states, fgate=fgate, igate=igate)
    if resets:
        x["f"][0, 0, [CHUNK, 90]] = -np.inf
        x["f"][-1, -1, 5] = -np.inf
    with jax.enable_x64(True):
        ops = operands(x, jnp.float64, segments)
        if ties:
            ops = _ties(ops)
        rng = np.random.default_rng(seed)
        dh, dc = (jnp.asarray(rng.standard_normal(o.shape)) for o in (ops[2], ops[5]))
        expected = _autodiff(ops, dh, dc)
        grads = _by_hand(ops, dh, dc, None)
        given = _by_hand(ops, dh, dc, jax.jit(chunk_borders)(*ops[1:])[0]) if borders else grads
    for name, e, g, b in zip(("dq", "dk", "dv", "dplan", "ddecay", "dc0"), expected, grads, given, strict=True):
        assert g.dtype == e.dtype == jnp.float64, name
        assert_close(name, e, g, TOL["float64"])
        np.testing.assert_array_equal(np.asarray(b), np.asarray(g), err_msg=name)
    assert float(np.max(np.abs(expected[4]))) > 0  # the decays' gradients are not all zero
    dplan = np.asarray(grads[3]).reshape(2, -1, _PLAN_ROWS, CHUNK)
    assert not np.any(dplan[:, :, [_BREAKS, _BREAKS_COL]])
    if ties:
        assert np.all(dplan[:, :, _ROW, 3:5] == 0)  # -inf in ROW
        assert np.all(dplan[:, :, _LOWER, 3:5] != 0) and np.all(dplan[:, :, _QN, 3:5] != 0)  # the tie, split


def test_bf16_gradients_of_the_plan_against_float64():
    """With bf16 operands (float32 accumulation) the gradient of the plan stays within the bf16 bound of the
    float64 gradient on the same values, in particular the rows of the gate halves (dROW) where one score
    dominates a row whose den is small: there dROW is the small difference of two large terms, and the
    normaliser's gradient must take P as dP does (rounded in one term only, P's rounding times 1/den reached
    4e-2 of the largest dROW in this case)."""
    x = random_inputs(1, 1, 2, 128, 128, 64, states=False, igate="wide")
    ops = operands(x, jnp.bfloat16)
    rng = np.random.default_rng(1)
    dh = jnp.asarray(rng.standard_normal(ops[2].shape), jnp.bfloat16)
    dc = jnp.asarray(rng.standard_normal(ops[5].shape), jnp.float32)
    got = _by_hand(ops, dh, dc, None)[3]
    with jax.enable_x64(True):
        wide = tuple(o.astype(jnp.float64) for o in ops)
        expected = _by_hand(wide, dh.astype(jnp.float64), dc.astype(jnp.float64), None)[3]
    got, expected = (np.asarray(a).reshape(2, -1, _PLAN_ROWS, CHUNK) for a in (got, expected))
    assert got.dtype == np.float32
    for name, r in (("dROW", _ROW), ("dCOL", _COL), ("dINTER", _INTER), ("dQN", _QN), ("dLOWER", _LOWER)):
        assert float(np.max(np.abs(expected[:, :, r]))) > 0, name
        assert_close(name, expected[:, :, r], got[:, :, r], TOL["bfloat16/float32"])


def _outputs(form, *args, segment_ids=None):
    h, (c, n, m) = form(*args, return_last_states=True, segment_ids=segment_ids)
    return h, c, n, m


@functools.partial(jax.jit, static_argnums=0)
def _vjp(form, args, cotangents):
    outs, pullback = jax.vjp(form, *args)
    return outs, pullback(cotangents)


# (seed, B, NH, S, initial states, input gates, segments, XLA chunk size)
SPLIT_CASES = [
    (4, 1, 2, 67, False, "wide", None, 16),
    (5, 2, 1, 130, True, "extreme", np.array([_ids([1, 62, 3, 1, 63]), _ids([100, 30])]), 32),
]


@pytest.mark.parametrize(
    ("seed", "B", "NH", "S", "states", "igate", "segments", "chunk_size"), SPLIT_CASES, ids=["67", "130"]
)
def test_split_gradients_are_the_xla_forms(seed, B, NH, S, states, igate, segments, chunk_size):
    """``chunkwise_split_fw`` (plan through autodiff, products by hand) against ``jax.vjp`` of the XLA chunkwise form
    (another chunk size) in float64, with a reset: outputs, and the gradients of q, k, v, i,
    f and of the initial states for cotangents on h and on all three last states."""
    DHQK, DHV = 6, 5
    x = random_inputs(seed, B, NH, S, DHQK, DHV, states=states, igate=igate)
    x["f"][0, -1, S // 2] = -np.inf
    names = NAMES + (STATES if states else ())
    rng = np.random.default_rng(seed)
    shapes = ((B, NH, S, DHV), (B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH))
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(x[name]) for name in names)
        cotangents = tuple(jnp.asarray(rng.standard_normal(shape)) for shape in shapes)
        ids = None if segments is None else jnp.asarray(segments, jnp.int32)
        forms = (chunkwise_split_fw, functools.partial(chunkwise_fw, chunk_size=chunk_size))
        if not states:  # the forms take absent initial states as None
            forms = tuple(functools.partial(form, c_initial=None, n_initial=None, m_initial=None) for form in forms)
        (outs, grads), (outs_xla, expected) = (
            _vjp(functools.partial(_outputs, form, segment_ids=ids), args, cotangents) for form in forms
        )
    for name, e, o in zip("hcnm", outs_xla, outs, strict=True):
        assert_close(name, e, o, TOL["float64"])
    for name, e, g in zip(names, expected, grads, strict=True):
        assert_close(f"d {name}", e, g, TOL["float64"])


@pytest.mark.parametrize("policy", ["dots_saveable", "nothing_saveable"])
def test_split_gradients_under_remat(policy):
    """Under ``jax.checkpoint`` (the model's remat), with the document ids traced arguments of the jitted function,
    the split's gradients equal those without remat: no traced value escapes the custom VJP."""
    x = random_inputs(7, 1, 2, 70, 3, 4, states=True, igate="wide")
    names = NAMES + STATES
    segments = np.array([_ids([40, 1, 29])])
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(x[name]) for name in names)

        def loss(args, ids):
            h, (c, n, m) = chunkwise_split_fw(*args, return_last_states=True, segment_ids=ids)
            return jnp.sum(h * h) + jnp.sum(c) + jnp.sum(n) + jnp.sum(m)

        remat = jax.checkpoint(loss, policy=getattr(jax.checkpoint_policies, policy))
        ids = jnp.asarray(segments, jnp.int32)
        expected, grads = (jax.jit(jax.grad(fn))(args, ids) for fn in (loss, remat))
    for name, e, g in zip(names, expected, grads, strict=True):
        assert_close(f"d {name}", e, g, TOL["float64"])


def test_split_matches_the_reference():
    """Forward and gradients of ``chunkwise_split_fw`` against the float64 reference (gradients by central
    differences): S = 67 with a padded second chunk, initial states, documents of 1 step and across the border."""
    x = random_inputs(6, 1, 1, 67, 2, 2, states=True, igate="extreme")
    segments = np.array([_ids([20, 1, 30, 16])])
    check_forward(chunkwise_split_fw, x, "float64", segment_ids=segments)
    check_gradients(chunkwise_split_fw, x, "float64", segment_ids=segments)


def test_bad_shapes_raise():
    x = random_inputs(0, 1, 1, 64, 4, 3)
    q, k, v, plan, decay, c0 = operands(x, jnp.float32)
    with pytest.raises(ValueError, match=r"q.shape=\(64, 4\) must be \(BH, S, DHQK\)"):
        chunk_products(q[0], k, v, plan, decay, c0, EPS)
    with pytest.raises(ValueError, match=r"must have S = NC \* L = 64 steps"):
        chunk_products(q[:, :60], k[:, :60], v[:, :60], plan, decay, c0, EPS)
    with pytest.raises(ValueError, match=r"decay.shape=\(1, 2\) must be \(BH, NC\)=\(1, 1\)"):
        chunk_products(q, k, v, plan, jnp.concatenate([decay, decay], 1), c0, EPS)
    with pytest.raises(ValueError, match=r"c0.shape=\(1, 3, 4\) must be \(BH, DHQK, DHV\)=\(1, 4, 3\)"):
        chunk_products(q, k, v, plan, decay, c0.transpose(0, 2, 1), EPS)
    with pytest.raises(ValueError, match=r"dh.shape=\(1, 64, 4\) must be \(1, 64, 3\)"):
        chunk_products_vjp(q, k, v, plan, decay, c0, EPS, q, c0)
    with pytest.raises(ValueError, match=r"borders.shape=\(1, 4, 3\) must be"):
        chunk_products_vjp(q, k, v, plan, decay, c0, EPS, v, c0, borders=c0)
    ops = operands(random_inputs(0, 1, 1, 64, 64, 32), jnp.bfloat16)
    borders = jnp.zeros((1, 64, 32), jnp.bfloat16)  # one chunk's r(C_0)
    dh = jnp.zeros((1, 64, 32), jnp.float32)
    bad = (jnp.zeros((1, 1, CHUNK), jnp.float32), jnp.ones((1, 1, CHUNK), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"normaliser \(qn, den\) .* must be two \(1, 1, 64\) float32 arrays"):
        mosaic_products_vjp(*ops, EPS, dh, ops[5], borders=borders, normaliser=bad, interpret=True)
    with pytest.raises(
        ValueError,
        match=r"mosaic_state_scan cannot run .*: block_dhv=64 must be 32 or 64 and divide DHB=32",
    ):
        good = (jnp.ones((1, 1, CHUNK), jnp.float32),) * 2
        mosaic_products_vjp(*ops, EPS, dh, ops[5], borders=borders, normaliser=good, scan_block_dhv=64, interpret=True)
