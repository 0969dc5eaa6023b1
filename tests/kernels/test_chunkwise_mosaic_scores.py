"""The scores kernel (``mosaic_normalised_scores``) against XLA's ``normalised_scores`` on the same plan, and the
keys' sums kernel (``mosaic_key_sums``) against float64 and inside the gate plan.

The chunkwise forward with ``scores="kernel"`` is checked against the float64 reference in
``test_chunkwise_mosaic.py``; here the kernel's own outputs (``P / den``, the readout, qn and den) are compared
with the XLA function it replaces, with the plan's ``q̂·n`` row and with ``n_border`` (the plan then reads no q),
on random inputs with initial states, extreme gates and packed documents. Compiled on a Hopper GPU, in Mosaic
GPU's interpreter elsewhere; the CUDA lowering is checked on any machine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from tests.kernels.test_chunkwise_mosaic import INTERPRET, runs
from tests.mlstm.form_checks import random_inputs
from tests.numerics import TOL, assert_close
from xlstm_jax.kernels.chunkwise_mosaic import CHUNK, chunk_plan, normalised_scores
from xlstm_jax.kernels.chunkwise_mosaic_scan import mosaic_state_scan
from xlstm_jax.kernels.chunkwise_mosaic_scores import mosaic_key_sums, mosaic_normalised_scores
from xlstm_jax.kernels.mosaic import Rows
from xlstm_jax.mlstm.chunkwise import chunk_sequence

EPS = 1e-6


def _operands(S, DHQK, segments=None, border_qn=True, seed=0, **kwargs):
    """The scores' operands of random inputs: q, k (BH, NC * L, DHQK) bf16, the plan (BH, NC * 8, L) and the
    border normalisers (BH, NC, DHQK)."""
    x = random_inputs(seed, 2, 2, S, DHQK, 32, states=True, **kwargs)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")]
    args += [jnp.asarray(x[name], jnp.float32) for name in ("i", "f", "c0", "n0", "m0")]
    ids = None if segments is None else jnp.asarray(segments, jnp.int32)
    seq = chunk_sequence(*args, EPS, None, CHUNK, ids, True)
    plan, _, _, n_border = chunk_plan(seq, border_qn=border_qn)
    BH, NC = 4, seq.NC
    return (
        seq.q.reshape(BH, NC * CHUNK, DHQK),
        seq.k.reshape(BH, NC * CHUNK, DHQK),
        plan.reshape(BH, NC * 8, CHUNK),
        n_border.reshape(BH, NC, DHQK),
    )


def _compare(got, want):
    """P / den to bf16 rounding of values within a few units (one rounding each, of products that may sum in
    another order: 2 ulp at the largest magnitude); the float32 rows to 1e-5 relative to their scale."""
    (p, readout, (qn, den)), (p_ref, readout_ref, (qn_ref, den_ref)) = got, want
    assert p.dtype == p_ref.dtype == jnp.bfloat16 and p.shape == p_ref.shape
    p, p_ref = np.asarray(p, np.float64), np.asarray(p_ref, np.float64)
    np.testing.assert_allclose(p, p_ref, rtol=0, atol=2 * 2.0**-8 * max(np.abs(p_ref).max(), 1.0))
    for x, ref in ((readout, readout_ref), (qn, qn_ref), (den, den_ref)):
        x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
        assert np.isfinite(x).all()
        np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@runs
@pytest.mark.parametrize(
    ("S", "DHQK", "igate", "segments"),
    [(150, 64, "wide", False), (100, 128, "extreme", False), (150, 64, "extreme", True)],
    ids=["padded", "extreme", "documents"],
)
def test_matches_xla(S, DHQK, igate, segments):
    """With the plan's q̂·n row, and with ``n_border`` (q̂·n from the kernel's q tiles, the row left 0): the same
    outputs as XLA's ``normalised_scores`` on the plan with the row."""
    ids = np.repeat(np.array([[0, 1, 1, 2, 3]]), [20, 40, 30, 30, S - 120], axis=1).repeat(2, 0) if segments else None
    q, k, plan, n_border = _operands(S, DHQK, ids, igate=igate)
    want = normalised_scores(q, k, plan, EPS)
    _compare(mosaic_normalised_scores(q, k, plan, EPS, interpret=INTERPRET), want)
    _, _, plan_without_qn, _ = _operands(S, DHQK, ids, border_qn=False, igate=igate)
    assert not np.asarray(plan_without_qn.reshape(4, -1, 8, CHUNK)[:, :, 4]).any()  # the q̂·n row left 0
    _compare(mosaic_normalised_scores(q, k, plan_without_qn, EPS, n_border, interpret=INTERPRET), want)


def _heads_minor(x: jax.Array, NH: int = 2) -> jax.Array:
    """(B·NH, S, D) rows, head-major, as the kernels' heads-minor operand (B, S, NH·D)."""
    BH, S, D = x.shape
    return x.reshape(BH // NH, NH, S, D).swapaxes(1, 2).reshape(BH // NH, S, NH * D)


@runs
def test_heads_minor_operands_give_the_same_results():
    """Heads-minor operands (``sequences``): the scores kernel (with the plan's q̂·n row and with ``n_border``) and
    the keys' sums kernel read each head's window of columns of one (B, S, W) array holding q and k side by side,
    in place, with the same results bit for bit as from the (B·NH, S, D) rows."""
    q, k, plan, n_border = _operands(150, 64)
    qk = jnp.concatenate([_heads_minor(q), _heads_minor(k)], axis=-1)  # (2, S, 256): q's two heads, then k's
    q_rows, k_rows = Rows(2, 1, 0, 64), Rows(2, 1, 128, 64)
    for extra in ((), (n_border,)):
        rows = mosaic_normalised_scores(q, k, plan, EPS, *extra, interpret=INTERPRET)
        minor = mosaic_normalised_scores(qk, qk, plan, EPS, *extra, sequences=(q_rows, k_rows), interpret=INTERPRET)
        for a, b in zip(jax.tree.leaves(rows), jax.tree.leaves(minor), strict=True):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    w = jnp.asarray(np.random.default_rng(1).uniform(0.0, 1.0, (4, q.shape[1] // CHUNK, CHUNK)), jnp.float32)
    np.testing.assert_array_equal(
        mosaic_key_sums(k, w, interpret=INTERPRET), mosaic_key_sums(qk, w, sequences=k_rows, interpret=INTERPRET)
    )
    with pytest.raises(ValueError, match=r"k.shape=\(2, 192, 130\) must be \(B, S, W\) with NH=2 heads"):
        mosaic_key_sums(jnp.zeros((2, 192, 130), jnp.bfloat16), w, sequences=Rows(2))


def test_bad_operands_raise():
    """Shapes and dtypes that do not fit raise a ValueError naming the operand."""
    q, k, plan, n_border = _operands(100, 64)
    with pytest.raises(ValueError, match="q.shape"):
        mosaic_normalised_scores(q[:, :100], k, plan, EPS)
    with pytest.raises(ValueError, match="k "):
        mosaic_normalised_scores(q, k.astype(jnp.float16), plan, EPS)
    with pytest.raises(ValueError, match="q.dtype"):
        mosaic_normalised_scores(q.astype(jnp.float32), k.astype(jnp.float32), plan, EPS)
    with pytest.raises(ValueError, match="plan "):
        mosaic_normalised_scores(q, k, plan[:, :8], EPS)
    with pytest.raises(ValueError, match="n_border "):
        mosaic_normalised_scores(q, k, plan, EPS, n_border[:, :1])
    big = jnp.zeros((4, 2 * CHUNK, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match="n_border .* at most 256"):
        mosaic_normalised_scores(big, big, plan, EPS, jnp.zeros((4, 2, 512), jnp.float32))


@pytest.mark.parametrize(("DHQK", "fold"), [(256, True), (256, False), (512, False)])
def test_lowers_for_cuda(DHQK, fold):
    """Tracing and Mosaic GPU lowering at the xLSTM-7B head (with q̂·n from q's tiles) and at DHQK=512."""
    BH, NC, A = 2, 2, jax.ShapeDtypeStruct
    avals = [A((BH, NC * CHUNK, DHQK), jnp.bfloat16)] * 2 + [A((BH, NC * 8, CHUNK), jnp.float32)]
    avals += [A((BH, NC, DHQK), jnp.float32)] if fold else []
    text = jax.jit(lambda *a: mosaic_normalised_scores(*a[:3], EPS, *a[3:])).trace(*avals)
    assert "mosaic_gpu" in text.lower(lowering_platforms=("cuda",)).as_text()


@runs
@pytest.mark.parametrize("DHQK", [64, 256])
def test_key_sums_match_float64(DHQK):
    """Every chunk's weighted keys' sum against float64 from the same bf16 keys and float32 weights, with weights of 0
    (a whole chunk's and single steps') and of 1."""
    rng = np.random.default_rng(DHQK)
    BH, NC = 3, 2
    k = jnp.asarray(rng.standard_normal((BH, NC * CHUNK, DHQK)), jnp.bfloat16)
    w = rng.uniform(0.0, 1.0, (BH, NC, CHUNK))
    w[0, 1], w[1, 0, ::3], w[2, 1, -1] = 0.0, 0.0, 1.0
    got = mosaic_key_sums(k, jnp.asarray(w, jnp.float32), interpret=INTERPRET)
    assert got.shape == (BH, NC, DHQK) and got.dtype == jnp.float32
    ref = np.einsum("bct,bctd->bcd", w, np.asarray(k, np.float64).reshape(BH, NC, CHUNK, DHQK))
    assert_close("keys' sums", ref, got, TOL["float32-sum"])


@runs
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_key_sums_keep_every_bit_of_the_weights(dtype):
    """The kernel multiplies k by the weights on the WGMMA units as three parts of k's dtype that add up to each
    float32 weight exactly: with keys of 1 and one nonzero weight a chunk (full 24-bit mantissas, from 2^-14 to 1 in
    bf16, from 1/2 in f16, whose last part is a subnormal below that), each chunk's sum is that weight, bit for bit
    (two parts would drop its last 8 bits in bf16)."""
    rng = np.random.default_rng(7)
    BH, NC, DHQK = 2, 3, 64
    k = jnp.ones((BH, NC * CHUNK, DHQK), dtype)
    w = np.zeros((BH, NC, CHUNK), np.float32)
    lowest = -14 if dtype == jnp.bfloat16 else 0
    weights = (rng.uniform(0.5, 1.0, (BH, NC)) * 2.0 ** rng.integers(lowest, 1, (BH, NC))).astype(np.float32)
    steps = rng.integers(0, CHUNK, (BH, NC))
    for b, c in np.ndindex(BH, NC):
        w[b, c, steps[b, c]] = weights[b, c]
    got = np.asarray(mosaic_key_sums(k, jnp.asarray(w), interpret=INTERPRET))
    np.testing.assert_array_equal(got, np.broadcast_to(weights[..., None], (BH, NC, DHQK)))


@runs
@pytest.mark.skipif(not INTERPRET, reason="compiled kernels return at once, as every compiled JAX call")
def test_interpreted_kernels_return_their_results_finished():
    """Called eagerly in the interpreter, a kernel returns once its results are computed, even where its operands
    are still being computed: the interpreter's callbacks dispatch computations of their own, and eager work queued
    behind an unfinished kernel can fill XLA's CPU client and wait on them forever (it did, in an eager gate plan)."""
    rng = np.random.default_rng(5)
    k = jnp.asarray(rng.standard_normal((2, 3 * CHUNK, 64)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((512, 512)) / 23, jnp.float32)

    @jax.jit
    def pending(a):  # a, returned after a few matrix products: still running when the kernel is called
        return a + 0 * lax.fori_loop(0, 16, lambda _, y: jnp.tanh(y @ x), x)[0, 0]

    weights = jnp.asarray(rng.uniform(size=(2, 3, CHUNK)), jnp.float32)
    decays = jnp.asarray(rng.uniform(size=(2, 3)), jnp.float32)
    plan = jnp.asarray(rng.uniform(size=(2, 3 * 8, CHUNK)), jnp.float32)
    for _ in range(2):  # the first calls compile the kernels, which gives pending() time to finish
        assert mosaic_key_sums(k, pending(weights), interpret=True).is_ready()
        scores = mosaic_normalised_scores(k, k, pending(plan), EPS, interpret=True)
        assert all(y.is_ready() for y in jax.tree.leaves(scores))
        _, state = mosaic_state_scan(k, k, pending(weights), decays, None, reverse=False, borders=False, interpret=True)
        assert state.is_ready()


@runs
@pytest.mark.parametrize("segments", [False, True], ids=["padded", "documents"])
def test_plan_with_the_key_sums_kernel(segments):
    """``chunk_plan`` with ``key_sums=mosaic_key_sums`` (the forward's plan; the kernel runs at B=1): the same plan,
    decays, last states and border normalisers as with XLA's sums, at a padded length with extreme input gates and
    packed documents."""
    S, DHQK = 150, 64
    ids = np.repeat(np.array([[0, 1, 1, 2, 3]]), [20, 40, 30, 30, S - 120], axis=1) if segments else None
    x = random_inputs(3, 1, 3, S, DHQK, 32, states=True, igate="extreme")
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")]
    args += [jnp.asarray(x[name], jnp.float32) for name in ("i", "f", "c0", "n0", "m0")]
    seq = chunk_sequence(*args, EPS, None, CHUNK, None if ids is None else jnp.asarray(ids, jnp.int32), True)
    want = chunk_plan(seq, border_qn=False)
    got = chunk_plan(seq, border_qn=False, key_sums=functools.partial(mosaic_key_sums, interpret=INTERPRET))
    names = ("plan", "decay", "n_last", "m_last", "n_border")
    flat = lambda out: (out[0], out[1], *out[2], out[3])  # noqa: E731
    for name, g, w in zip(names, flat(got), flat(want), strict=True):
        w = np.asarray(w, np.float64)
        finite = np.isfinite(w)
        np.testing.assert_array_equal(np.isfinite(np.asarray(g)), finite, err_msg=name)
        assert_close(name, np.where(finite, w, 0.0), jnp.where(finite, g, 0.0), TOL["float32-sum"])


def test_key_sums_bad_operands_raise():
    """Shapes and dtypes that do not fit raise a ValueError naming the operand and the shapes."""
    k = jnp.zeros((2, 2 * CHUNK, 64), jnp.bfloat16)
    w = jnp.zeros((2, 2, CHUNK), jnp.float32)
    with pytest.raises(ValueError, match=r"k.shape=\(2, 100, 64\)"):
        mosaic_key_sums(k[:, :100], w)
    with pytest.raises(ValueError, match=r"k.shape=\(2, 128, 512\) .* at most 256"):
        mosaic_key_sums(jnp.zeros((2, 2 * CHUNK, 512), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="k.dtype=float32 must be bfloat16 or float16"):
        mosaic_key_sums(k.astype(jnp.float32), w)
    with pytest.raises(ValueError, match=r"weights \(\(2, 1, 64\), float32\) must be \(2, 2, 64\) float32"):
        mosaic_key_sums(k, w[:, :1])


def test_key_sums_lower_for_cuda():
    """Tracing and Mosaic GPU lowering of the keys' sums at the xLSTM-7B head (DHQK=256)."""
    A = jax.ShapeDtypeStruct
    text = jax.jit(mosaic_key_sums).trace(A((2, 2 * CHUNK, 256), jnp.bfloat16), A((2, 2, CHUNK), jnp.float32))
    assert "mosaic_gpu" in text.lower(lowering_platforms=("cuda",)).as_text()
