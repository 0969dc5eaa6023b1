"""The scores kernel (``mosaic_normalised_scores``) against XLA's ``normalised_scores`` on the same plan.

The chunkwise forward with ``scores="kernel"`` is checked against the float64 reference in
``test_chunkwise_mosaic.py``; here the kernel's own outputs (``P / den``, the readout, qn and den) are compared
with the XLA function it replaces, with the plan's ``q̂·n`` row and with ``n_border`` (the plan then reads no q),
on random inputs with initial states, extreme gates and packed documents. Compiled on a Hopper GPU, in Mosaic
GPU's interpreter elsewhere; the CUDA lowering is checked on any machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from tests.kernels.test_chunkwise_mosaic import INTERPRET, runs
from tests.mlstm.form_checks import random_inputs
from xlstm_jax.kernels.chunkwise_mosaic import CHUNK, chunk_plan, normalised_scores
from xlstm_jax.kernels.chunkwise_mosaic_scan import mosaic_state_scan
from xlstm_jax.kernels.chunkwise_mosaic_scores import mosaic_normalised_scores
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


@runs
@pytest.mark.skipif(not INTERPRET, reason="compiled kernels return at once, as every compiled JAX call")
def test_interpreted_kernels_return_their_results_finished():
    """Called eagerly in the interpreter, a kernel returns once its results are computed, even where its operands
    are still being computed: the interpreter's callbacks dispatch computations of their own, and eager work queued
    behind an unfinished kernel can fill XLA's CPU client and wait on them forever."""
    rng = np.random.default_rng(5)
    k = jnp.asarray(rng.standard_normal((2, 3 * CHUNK, 64)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((512, 512)) / 23, jnp.float32)

    @jax.jit
    def pending(a):  # a, returned after a few matrix products: still running when the kernel is called
        return a + 0 * lax.fori_loop(0, 16, lambda _, y: jnp.tanh(y @ x), x)[0, 0]

    gains = jnp.asarray(rng.uniform(size=(2, 3, CHUNK)), jnp.float32)
    decays = jnp.asarray(rng.uniform(size=(2, 3)), jnp.float32)
    plan = jnp.asarray(rng.uniform(size=(2, 3 * 8, CHUNK)), jnp.float32)
    for _ in range(2):  # the first calls compile the kernels, which gives pending() time to finish
        scores = mosaic_normalised_scores(k, k, pending(plan), EPS, interpret=True)
        assert all(y.is_ready() for y in jax.tree.leaves(scores))
        _, state = mosaic_state_scan(k, k, pending(gains), decays, None, reverse=False, borders=False, interpret=True)
        assert state.is_ready()


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
