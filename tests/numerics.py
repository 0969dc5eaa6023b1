"""One per-dtype tolerance table for every test, the comparison helper, and random test inputs.

Errors are measured against the float64 reference as ``max |out - ref| / scale``, where ``scale`` is
the reference's absolute-sum error scale for h (see ``tests/reference.py``) or, for states and
gradients, ``max |ref|`` of the whole tensor. Each bound below is derived from the unit roundoff u of
the arithmetic and the number of roundings an output accumulates; none is fitted to an observed error.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

__all__ = ["TOL", "Tol", "assert_close", "make_inputs"]


@dataclass(frozen=True)
class Tol:
    max_err: float  # bound on max |out - ref| / scale
    reason: str


TOL: dict[str, Tol] = {
    # Key: the dtype the arithmetic runs in (inputs/state).
    "float64": Tol(
        1e-9,
        "u = 1.1e-16; an output accumulates at most ~1e4 roundings (S <= 257 steps, sums over DHQK, log-gate "
        "sums up to ~1e3 in magnitude); 1e-9 is that bound times 1e3 and still 1e6 below float32 error.",
    ),
    "float32": Tol(
        1e-3,
        "u = 6e-8; log-space gate sums reach |F| ~ S*|logsigmoid(f)| ~ 3e3 at S=257 with forget preacts near "
        "-10, so gate weights carry relative error ~u*3e3 = 2e-4, plus ~1e3 roundings in the dot products.",
    ),
    "bfloat16/float32": Tol(
        1e-2,
        "bf16 inputs, float32 state: the reference gets the same bf16-rounded inputs, so the error is h's "
        "rounding to bf16 (2^-9 = 2e-3 of |h| <= scale), the float32 budget above, and bf16 rounding "
        "(2^-9 per term) where a form feeds bf16 operands to matrix units: 2e-3 + 1e-3 + 4e-3, doubled.",
    ),
    "bfloat16-product": Tol(
        4e-3,
        "a vector-matrix product of bf16 operands (their products exact in float32), float32 accumulation over "
        "K <= 1024 terms against the float64 product of the same bf16 values: K * u = 6e-5 of sum|x_k w_kn|, "
        "which is ~6x max|y| for random data at K=1024 (4e-4), plus the result's rounding to bf16 (2^-9 = 2e-3 "
        "of |y| <= max|y|); 2.4e-3 rounded up.",
    ),
    "bfloat16-norm": Tol(
        1.2e-2,
        "residual adds and RMSNorm on bf16 rows (add_rms_norm), against float64 from the same bf16 inputs: up to "
        "two adds rounded to bf16 (2 * 2^-9 of |s|), which normalising can double (value and statistic both "
        "carry it), then the normalised value and its product with the weight rounded once each: "
        "(2 * 2 + 2) * 2^-9 = 1.2e-2 of |y|. The gate product of those rows, scaled by sum_k |y_k w_k| + |b|, "
        "inherits the same relative bound (float32 accumulation adds ~K * 6e-8; tanh's slope is at most 1). "
        "The mLSTM read-out (head_norm) makes as many: h rounded to bf16 (2^-9, doubled by the normalisation), "
        "the normalised value, times the weight, sigmoid(o), their product: (2 + 4) * 2^-9.",
    ),
    "bfloat16-grad": Tol(
        2e-2,
        "gradients of bf16 inputs (float32 states and accumulation) against float64 autodiff of the same function "
        "on the same bf16 values, scaled by the largest gradient of each input (dm0 by the size of the terms it "
        "sums, |dc0 * c0| + |dn0 * n0|). The backward feeds bf16 operands to its products: the forward's rounded "
        "P and border states, the backward's dS, the weighted dh and the border cotangents, one rounding of 2^-9 "
        "each. Where one step dominates its row (input gates far above the rest), its score gradient "
        "dP_tt = (dh.v_t - dh.h_t) / den cancels to a small fraction of its terms, and every rounding on either "
        "side lands whole in dq_t and dk_t at the size of the largest gradient: up to 4 roundings on each of the "
        "two products summed into dq and dk, 8 * 2^-9 = 1.6e-2, plus the gradient's own rounding to bf16 "
        "(2^-9 = 2e-3): 1.8e-2, rounded up. A float32 form on bf16 inputs (the XLA chunkwise backward) reaches "
        "9e-3 on the same case; a dropped term or a wrong scale errs by O(1).",
    ),
    "float64-grad": Tol(
        1e-8,
        "float64 autodiff against central differences (delta = 1e-6) of the float64 reference, measured against "
        "the loss's absolute size sum|out * cotangent|: each loss value carries ~1e2 roundings of u = 1.1e-16, "
        "so a difference quotient is off by ~1e-14 / (2 delta) = 5e-9 of that size; the truncation error "
        "delta^2 * f''' / 6 ~ 1e-12 stays below it for the moderate gates of these tests. 1e-8 is twice the bound.",
    ),
    "float32-grad": Tol(
        6e-5,
        "float32 gradients against float64 central differences, scaled by the largest gradient of the call, for the "
        "gradient tests' shapes (S <= 20, head dims <= 32). Round-to-nearest errors are unbiased, so a value "
        "accumulated from N rounded operations errs by ~sqrt(N) u of its terms' size (the worst case N u is never "
        "approached). A gradient chains the forward sums (<= S * 32 = 640 terms), the normaliser, which the "
        "backward divides by twice, and the backward sums (<= 640 terms): 2 * sqrt(2 * 640) = 72 roundings' "
        "worth; the log-gate sums (|F| <= 20 * 7 = 140 with closed forget gates) put an absolute error u * |F| "
        "into every gate weight: (72 + 140) * u = 1.3e-5 (u = 6e-8); the largest of ~1e3 gradient elements is "
        "within 4 sigma of that: 5.1e-5, rounded up. A TF32 regression rounds each product operand by up to "
        "2^-11 = 4.9e-4, a bf16 intermediate by 2^-8 = 3.9e-3: 8x and 65x this bound from one rounding alone.",
    ),
    "float32-sum": Tol(
        1e-5,
        "a weighted sum of K <= 64 rows in float32 (each chunk's keys' sums, bf16 keys times float32 weights; the "
        "gates' product of bf16 activations and weights) against float64 from the same values, scaled by max|ref| "
        "or by sum_k |w_k x_k|: each product rounded once and the sum in any order, K u = 3.8e-6 of "
        "sum_k |w_k x_k| (u = 6e-8), which for random keys is a few times |sum| at most: 1e-5. A bf16 weight, "
        "intermediate or result (2^-9 = 2e-3) errs 200x more.",
    ),
    "float32-norm": Tol(
        4e-4,
        "RMSNorm or per-head LayerNorm of float32 rows of width K <= 4096 (and the gate product after it), "
        "against float64 from the same float32 inputs, scaled by max|ref| (by sum_k |y_k w_k| + |b| for a gate "
        "product). Worst case, a float32 sum of K terms errs by K u of its absolute terms (u = 6e-8): the mean "
        "square K u = 2.4e-4, halved by the square root, 1.2e-4; up to two residual adds, the rsqrt, the "
        "normalised value and the weight product (LayerNorm: the centring and sigmoid(o) instead) one rounding "
        "each, 6u; a gate product of the normalised row sums K more terms, K u = 2.4e-4 of its scale (tanh's "
        "slope is at most 1): 3.6e-4, rounded up. (The cell's float32 entry, 1e-3, is for log-gate sums over "
        "hundreds of steps; a norm has none.)",
    ),
    "float32-loss": Tol(
        1e-5,
        "the masked cross-entropy of float32 logits (V <= 1024 classes, soft cap 30 or none) and its gradient in the "
        "logits, against float64 from the same logits: the sum scaled by its own size, the gradient by its largest "
        "element. A capped logit (|z| <= 30) carries ~30 u of absolute error (u = 6e-8; tanh and the product, one "
        "rounding each), which exp(z - shift) turns into 30 u of relative error, as does the shift; the sum of V "
        "exponentials adds ~sqrt(V) u = 32 u; the log and the subtraction of values up to ~40 add 40 u each: "
        "~140 u = 8.4e-6 of a token's loss, which is >= 1 for these random logits, and the masked sum of such "
        "unbiased errors stays within that fraction of its size. The gradient, softmax minus one-hot times the cap's "
        "slope (|d| <= 1), comes from the same exponentials: ~100 u. 1e-5 is ~170 u; a bf16 intermediate "
        "(2^-8 = 3.9e-3) or a dropped factor errs by orders of magnitude more.",
    ),
    "bfloat16-loss-grad": Tol(
        2.5e-3,
        "the cross-entropy's gradient in bf16 logits, written in bf16: the float32 gradient (float32-loss, 1e-5) "
        "rounded once to bf16, 2^-9 = 2e-3 of |d| <= max|d|; 2.5e-3 with the float32 error and margin. A second "
        "bf16 rounding inside (a bf16 softmax) doubles it.",
    ),
    "float32-model": Tol(
        2e-4,
        "logits of the tiny xLSTM models (D <= 128, 2-3 blocks, S <= 45, float32) from two evaluation orders "
        "(transformers' model, or prefill against decode), scaled by max|logits|; also the states they carry. "
        "Round-to-nearest errors are unbiased, so a sum of K rounded terms errs by ~sqrt(K) u of its terms' size "
        "(u = 6e-8): a projection of K <= 384 terms by 20 u; a block chains ~10 such stages (qkvo, gates, the "
        "cell's read-out over DHQK, two norms, out_proj, FFN up and down, residual adds), sqrt(10) * 20 u = 63 u, "
        "and the blocks and the LM head add in quadrature, ~110 u. The cell's log-gate sums put an absolute error "
        "u * |F| into every gate weight; the gates are soft-capped at 15, so |logsigmoid(f)| <= 15 and "
        "|F| <= 15 * 45 = 675 steps' worth: 675 u. (110 + 675) u = 4.7e-5; the largest of the ~1e4 compared "
        "values lies within 4 sigma: 1.9e-4, rounded up. TF32 products (operands rounded by 2^-11 = 4.9e-4) or a "
        "bf16 intermediate (2^-8) exceed it from a single rounding.",
    ),
}


def assert_close(name: str, ref, out, tol: Tol, scale=None) -> None:
    """Asserts ``max |out - ref| / scale <= tol.max_err``; reports max abs and relative RMS error.

    Args:
        name: What is compared, for the message.
        ref: The float64 reference.
        out: The value under test (any dtype; compared in float64).
        tol: An entry of ``TOL``.
        scale: Per-element error scale broadcastable to ref, or None for ``max |ref|`` (at least 1e-30).
    """
    ref = np.asarray(ref, np.float64)
    out = np.asarray(jnp.asarray(out, jnp.float32) if out.dtype == jnp.bfloat16 else out, np.float64)
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: shape {out.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(out)):
        raise AssertionError(f"{name}: {np.sum(~np.isfinite(out))} non-finite values")
    err = np.abs(out - ref)
    if scale is None:
        scale = max(float(np.max(np.abs(ref))), 1e-30)
    scaled = float(np.max(err / scale))
    rel_rms = float(np.sqrt(np.mean(err**2)) / max(np.sqrt(np.mean(ref**2)), 1e-30))
    if not scaled <= tol.max_err:
        raise AssertionError(
            f"{name}: scaled max error {scaled:.3e} > {tol.max_err:.1e} "
            f"(max abs error {float(err.max()):.3e}, relative RMS error {rel_rms:.3e})"
        )


def make_inputs(
    rng: np.random.Generator,
    B: int,
    NH: int,
    S: int,
    DHQK: int,
    DHV: int,
    *,
    fgate: str = "mixed",
    igate: str = "wide",
    states: bool = False,
) -> dict[str, np.ndarray]:
    """Random float64 inputs (never zeros) for one call.

    Args:
        fgate: ``"open"`` (preacts ~ N(3, 1): long memory), ``"closed"`` (~ N(-6, 2): strong forgetting),
            or ``"mixed"`` (half of each, per position).
        igate: ``"wide"`` (uniform in [-10, 10]) or ``"extreme"`` (±50 with random sign, mixed with wide).
        states: Also draw initial states c0, n0, m0 (m0 in [-5, 5]).
    """
    x = {
        "q": rng.standard_normal((B, NH, S, DHQK)),
        "k": rng.standard_normal((B, NH, S, DHQK)),
        "v": rng.standard_normal((B, NH, S, DHV)),
        "i": rng.uniform(-10.0, 10.0, (B, NH, S)),
    }
    open_, closed = rng.normal(3.0, 1.0, (B, NH, S)), rng.normal(-6.0, 2.0, (B, NH, S))
    x["f"] = {"open": open_, "closed": closed, "mixed": np.where(rng.random((B, NH, S)) < 0.5, open_, closed)}[fgate]
    if igate == "extreme":
        x["i"] = np.where(rng.random((B, NH, S)) < 0.3, rng.choice([-50.0, 50.0], (B, NH, S)), x["i"])
    if states:
        x["c0"] = rng.standard_normal((B, NH, DHQK, DHV))
        x["n0"] = rng.standard_normal((B, NH, DHQK))
        x["m0"] = rng.uniform(-5.0, 5.0, (B, NH))
    return x
