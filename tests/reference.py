"""The float64 NumPy reference of the mLSTM, written from the equations (not from the code under test).

For each batch element and head, states c (DHQK, DHV), n (DHQK), m (scalar)::

    m' = max(logsigmoid(f) + m, i),  f' = exp(logsigmoid(f) + m - m'),  i' = exp(i - m')
    c' = f' c + i' k vᵀ,             n' = f' n + i' k,                 q̂ = q / sqrt(DHQK)
    h  = (q̂ᵀ c') / (max(|q̂ᵀ n'|, exp(-m')) + eps)

Besides h, the recurrent reference returns a per-element error *scale*: the value of h computed with
every term replaced by its absolute value, ``(|q̂|ᵀ|c|' + |h| |q̂|ᵀ|n|') / den``. Rounding errors in any
implementation are proportional to these absolute sums, not to |h| (h divides by |q̂·n|, which can be
close to 0 on random data), so comparing ``|out - ref| / scale`` makes one tolerance fit every input.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["numerical_vjp", "parallel_ref", "recurrent_ref"]


def _logsigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _gate(g: np.ndarray) -> np.ndarray:
    g = np.asarray(g, np.float64)
    return g[..., 0] if g.ndim == 4 else g  # (B, NH, S)


def _zeros_if_none(c0, n0, m0, B, NH, DHQK, DHV):
    if c0 is None:
        return np.zeros((B, NH, DHQK, DHV)), np.zeros((B, NH, DHQK)), np.zeros((B, NH))
    return (np.asarray(x, np.float64) for x in (c0, n0, m0))


def recurrent_ref(q, k, v, i, f, c0=None, n0=None, m0=None, eps=1e-6):
    """Step-by-step float64 mLSTM.

    Args:
        q, k: (B, NH, S, DHQK); v: (B, NH, S, DHV); i, f: (B, NH, S) or (B, NH, S, 1);
        c0 (B, NH, DHQK, DHV), n0 (B, NH, DHQK), m0 (B, NH): initial states, or None for zeros.

    Returns:
        ``h (B, NH, S, DHV), (c, n, m) last states, scale (B, NH, S, DHV)`` (see the module docstring).
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    i, f = _gate(i), _gate(f)
    B, NH, S, DHQK = q.shape
    DHV = v.shape[-1]
    c, n, m = _zeros_if_none(c0, n0, m0, B, NH, DHQK, DHV)
    c_abs, n_abs = np.abs(c), np.abs(n)
    h = np.empty((B, NH, S, DHV))
    scale = np.empty((B, NH, S, DHV))
    for t in range(S):
        log_f = _logsigmoid(f[:, :, t])
        m_new = np.maximum(log_f + m, i[:, :, t])
        fa = np.exp(log_f + m - m_new)[..., None]
        ia = np.exp(i[:, :, t] - m_new)[..., None]
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]
        c = fa[..., None] * c + ia[..., None] * kv
        n = fa * n + ia * k[:, :, t]
        c_abs = fa[..., None] * c_abs + ia[..., None] * np.abs(kv)
        n_abs = fa * n_abs + ia * np.abs(k[:, :, t])
        m = m_new
        q_hat = q[:, :, t] / np.sqrt(DHQK)
        num = np.einsum("bhd,bhde->bhe", q_hat, c)
        qn = np.einsum("bhd,bhd->bh", q_hat, n)
        den = (np.maximum(np.abs(qn), np.exp(-m)) + eps)[..., None]
        h[:, :, t] = num / den
        num_abs = np.einsum("bhd,bhde->bhe", np.abs(q_hat), c_abs)
        qn_abs = np.einsum("bhd,bhd->bh", np.abs(q_hat), n_abs)[..., None]
        scale[:, :, t] = (num_abs + np.abs(h[:, :, t]) * qn_abs) / den
    return h, (c, n, m), scale


def parallel_ref(q, k, v, i, f, c0=None, n0=None, m0=None, eps=1e-6):
    """The same function in quadratic form (all time steps at once), float64.

    ``log D[t, s] = F_t - F_s + i_s`` for s <= t with ``F`` the cumulative sum of log forget gates; the
    initial state enters with log weight ``F_t + m0``; the row max of both is the stabiliser m_t.

    Returns:
        ``h (B, NH, S, DHV), (c, n, m) last states``.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    i, f = _gate(i), _gate(f)
    B, NH, S, DHQK = q.shape
    DHV = v.shape[-1]
    c0, n0, m0 = _zeros_if_none(c0, n0, m0, B, NH, DHQK, DHV)
    F = np.cumsum(_logsigmoid(f), axis=-1)
    log_d = F[..., :, None] - F[..., None, :] + i[..., None, :]
    log_d = np.where(np.tril(np.ones((S, S), bool)), log_d, -np.inf)
    log_w = F + m0[..., None]
    m = np.maximum(log_d.max(-1), log_w)
    d = np.exp(log_d - m[..., None])
    w = np.exp(log_w - m)
    q_hat = q / np.sqrt(DHQK)
    scores = np.einsum("bhtd,bhsd->bhts", q_hat, k) * d
    num = scores @ v + w[..., None] * np.einsum("bhtd,bhde->bhte", q_hat, c0)
    qn = scores.sum(-1) + w * np.einsum("bhtd,bhd->bht", q_hat, n0)
    h = num / (np.maximum(np.abs(qn), np.exp(-m)) + eps)[..., None]
    c = np.einsum("bhs,bhsd,bhse->bhde", d[..., -1, :], k, v) + w[..., -1, None, None] * c0
    n = np.einsum("bhs,bhsd->bhd", d[..., -1, :], k) + w[..., -1, None] * n0
    return h, (c, n, m[..., -1])


def numerical_vjp(
    fn: Callable[..., tuple[np.ndarray, ...]],
    inputs: dict[str, np.ndarray],
    cotangents: tuple[np.ndarray, ...],
    delta: float = 1e-6,
) -> dict[str, np.ndarray]:
    """Gradients of ``sum_j <fn(**inputs)[j], cotangents[j]>`` by central differences in float64.

    One pair of evaluations per input element: use small shapes. With delta 1e-6 the truncation error is
    O(delta²) and the rounding error O(1e-16 / delta), both near 1e-10 relative.
    """

    def loss(values: dict[str, np.ndarray]) -> float:
        outs = fn(**values)
        return float(sum(np.sum(o * ct) for o, ct in zip(outs, cotangents, strict=True)))

    grads = {}
    for name, x in inputs.items():
        x = np.asarray(x, np.float64)
        g = np.empty_like(x)
        for idx in np.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[idx] += delta
            minus[idx] -= delta
            g[idx] = (loss({**inputs, name: plus}) - loss({**inputs, name: minus})) / (2 * delta)
        grads[name] = g
    return grads
