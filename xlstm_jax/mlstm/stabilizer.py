"""The mLSTM stabilisers, written once and shared by every form of the cell.

The mLSTM keeps its states scaled by ``exp(-m)``, where ``m`` is a running maximum of the log gate
weights. Every form (recurrent, parallel, chunkwise, the fused kernels) must produce the same ``m``
at every time step, because ``m`` also enters the output through the normaliser's lower bound
``exp(-m)`` and the ``eps`` that is added after it::

    m_t  = max(logsigmoid(f_t) + m_{t-1}, i_t)
    h_t  = (q̂_t · c_t) / (max(|q̂_t · n_t|, exp(-m_t)) + eps)

All arithmetic here runs in the dtype of its arguments; callers upcast the gates to float32 (or the
state dtype) before calling, because log-gate sums lose accuracy quickly in bfloat16.

Resets. A forget gate far below the input gate empties the state: in the recurrent form
``f' = exp(logsigmoid(f) + m - m')`` underflows to exactly 0 (``f = -inf``, zero forget gate, is the
extreme case). The forms that sum log forget gates (parallel, chunkwise, the fused kernel) must not put such
a gate into a cumulative sum: -inf would give ``-inf - (-inf) = NaN``, and a finite -1e30 would absorb every
later gate of the sum (``-1e30 + x == -1e30``), so differences of the sum after it would be 0. Those forms
find the steps at which the recurrent f' is exactly 0 (:func:`forget_gate_resets`), sum the other log gates
only (:func:`log_forget_gate_masked`), and drop every term that crosses a reset by a mask; the recurrent
form gets f' = 0 at those steps anyway, so all forms compute one function.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "finite_max",
    "forget_gate_resets",
    "log_forget_gate",
    "log_forget_gate_masked",
    "log_forget_gate_no_log1p",
    "max_bound",
    "normalizer",
    "normalize_readout",
    "step_gates",
]


def log_forget_gate(f: jax.Array) -> jax.Array:
    """``logsigmoid(f)``: the log of the forget gate from its pre-activation, in f's dtype."""
    return jax.nn.log_sigmoid(f)


def log_forget_gate_no_log1p(f: jax.Array) -> jax.Array:
    """``logsigmoid(f)`` as ``min(f, 0) - log(1 + exp(-|f|))``, for kernel compilers without ``log1p``
    (Mosaic GPU). It differs from :func:`log_forget_gate` where ``exp(-|f|)`` is below float32's rounding of
    1 (|f| > 16.6): there it gives ``min(f, 0)``, off by less than 6e-8 in absolute terms."""
    return jnp.minimum(f, 0.0) - jnp.log(1.0 + jnp.exp(-jnp.abs(f)))


def underflow_gap(dtype) -> float:
    """A gap U with ``exp(x) == 0`` in ``dtype`` for every ``x < -U``: -log of the smallest subnormal, plus one
    for the rounding of x (104.3 for float32, 745.4 for float64)."""
    return float(-np.log(np.finfo(dtype).smallest_subnormal)) + 1.0


def max_bound(
    m0: jax.Array,  # (...) the running max before the first step
    i: jax.Array,  # (..., S) input gate pre-activations
) -> jax.Array:
    """``max(m0, max_s i_s)`` (...): an upper bound of the running max m at every step, because
    ``m_t = max(logsigmoid(f_t) + m_{t-1}, i_t)`` and ``logsigmoid <= 0`` (also after rounding)."""
    return jnp.maximum(m0, jnp.max(i, axis=-1))


def forget_gate_resets(
    f: jax.Array,  # (..., S) forget gate pre-activations
    i: jax.Array,  # (..., S) input gate pre-activations
    m_bound: jax.Array,  # broadcastable to f: from max_bound
) -> jax.Array:
    """The steps at which the recurrent form's forget activation is exactly 0 in f's dtype: a reset (bool, like f).

    ``f' = exp(logsigmoid(f) + m - m')`` with ``m <= m_bound`` and ``m' >= i``, and ``logsigmoid(f) < f``, so
    ``f < i - m_bound - U`` (U from :func:`underflow_gap`) makes the exponent fall below -U, where exp is 0.
    A forget gate of -inf (with a finite input gate) is always a reset; a gate that does not make the cut keeps
    its log in the cumulative sums, as before. No gradient flows through this test.
    """
    return f < (i - m_bound) - underflow_gap(f.dtype)


def log_forget_gate_masked(f: jax.Array, resets: jax.Array) -> jax.Array:
    """``logsigmoid(f)`` with 0 at the reset steps, whose gate the caller masks instead; f's dtype.

    The gate is replaced by 0 before the logsigmoid as well, so that the gradient at a reset is exactly 0
    (and never ``0 * inf``) for any f, -inf included.
    """
    return jnp.where(resets, 0.0, log_forget_gate(jnp.where(resets, 0.0, f)))


def step_gates(
    m: jax.Array,  # (..., 1) running max before the step
    i: jax.Array,  # (..., 1) input gate pre-activation
    f: jax.Array,  # (..., 1) forget gate pre-activation
    log_forget: Callable[[jax.Array], jax.Array] = log_forget_gate,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One step of the running max and the stabilised gate activations (``log_forget`` computes logsigmoid).

    Returns:
        ``(m_new, f_act, i_act)`` with ``m_new = max(logsigmoid(f) + m, i)``,
        ``f_act = exp(logsigmoid(f) + m - m_new)`` and ``i_act = exp(i - m_new)``, all shaped like ``m``.
        Both activations are at most 1, so the stabilised states never overflow.
    """
    log_f_plus_m = log_forget(f) + m
    m_new = jnp.maximum(log_f_plus_m, i)
    return m_new, jnp.exp(log_f_plus_m - m_new), jnp.exp(i - m_new)


def normalizer(
    qn: jax.Array,  # (...) the query's product with the stabilised normaliser state, q̂ · n
    m: jax.Array,  # (...) the running max at the same step
    eps: float,
) -> jax.Array:
    """The denominator of the read-out: ``max(|q̂·n|, exp(-m)) + eps``, shaped like ``qn``."""
    return jnp.maximum(jnp.abs(qn), jnp.exp(-m)) + eps


def normalize_readout(
    num: jax.Array,  # (..., DHV) numerator q̂ · c
    qn: jax.Array,  # (...) q̂ · n
    m: jax.Array,  # (...) running max
    eps: float,
) -> jax.Array:
    """The hidden state ``num / (max(|qn|, exp(-m)) + eps)``, shaped like ``num``."""
    return num / normalizer(qn, m, eps)[..., None]


def finite_max(log_weights: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """The max of log weights along ``axis``, and the same max with -inf replaced by 0 for subtracting.

    A group of steps whose log weights are all -inf (input gates of -inf: padding, or exact no-op steps)
    has max -inf; ``exp(-inf - (-inf))`` would be NaN. Subtracting 0 instead gives weights ``exp(-inf) = 0``,
    while the returned max stays -inf, so the group still adds nothing wherever that max is used.

    Returns:
        ``(max, shift)``, both shaped like ``log_weights`` without ``axis``.
    """
    m = jnp.max(log_weights, axis=axis)
    return m, jnp.where(jnp.isfinite(m), m, 0.0)
