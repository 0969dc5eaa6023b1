"""The float64 NumPy reference of the mLSTM, written from the equations (not from the code under test).

For each batch element and head, states c (DHQK, DHV), n (DHQK), m (scalar)::

    m' = max(logsigmoid(f) + m, i),  f' = exp(logsigmoid(f) + m - m'),  i' = exp(i - m')
    c' = f' c + i' k vᵀ,             n' = f' n + i' k,                 q̂ = q / sqrt(DHQK)
    h  = (q̂ᵀ c') / (max(|q̂ᵀ n'|, exp(-m')) + eps)

Packed documents (``segment_ids`` (B, S) ints): before a step t > 0 whose id differs from step t - 1's, c, n
and m of that row are set to 0, the states a document run alone starts from.

Besides h, the recurrent reference returns a per-element error *scale*: the value of h computed with
every term replaced by its absolute value, ``(|q̂|ᵀ|c|' + |h| |q̂|ᵀ|n|') / den``. Rounding errors in any
implementation are proportional to these absolute sums, not to |h| (h divides by |q̂·n|, which can be
close to 0 on random data), so comparing ``|out - ref| / scale`` makes one tolerance fit every input.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["documents_ref", "numerical_vjp", "parallel_ref", "recurrent_ref"]


def _logsigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _gate(g: np.ndarray) -> np.ndarray:
    g = np.asarray(g, np.float64)
    return g[..., 0] if g.ndim == 4 else g  # (B, NH, S)


def _zeros_if_none(c0, n0, m0, B, NH, DHQK, DHV):
    if c0 is None:
        return np.zeros((B, NH, DHQK, DHV)), np.zeros((B, NH, DHQK)), np.zeros((B, NH))
    return (np.asarray(x, np.float64) for x in (c0, n0, m0))


def recurrent_ref(q, k, v, i, f, c0=None, n0=None, m0=None, eps=1e-6, segment_ids=None):
    """Step-by-step float64 mLSTM.

    Args:
        q, k: (B, NH, S, DHQK); v: (B, NH, S, DHV); i, f: (B, NH, S) or (B, NH, S, 1);
        c0 (B, NH, DHQK, DHV), n0 (B, NH, DHQK), m0 (B, NH): initial states, or None for zeros.
        segment_ids: (B, S) document ids, or None for one document per row.

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
        if segment_ids is not None and t > 0:
            keep = np.asarray(segment_ids)[:, t] == np.asarray(segment_ids)[:, t - 1]  # (B,)
            c, c_abs = (np.where(keep[:, None, None, None], x, 0.0) for x in (c, c_abs))
            n, n_abs = (np.where(keep[:, None, None], x, 0.0) for x in (n, n_abs))
            m = np.where(keep[:, None], m, 0.0)
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


def documents_ref(q, k, v, i, f, c0=None, n0=None, m0=None, eps=1e-6, segment_ids=None):
    """Packed rows by definition: every document of every row run alone through :func:`recurrent_ref`.

    A row's first document starts from that row's initial states (zeros without), every later one from zeros;
    the h of the documents are concatenated, the last states are those of the row's last document.

    Returns:
        ``h (B, NH, S, DHV), (c, n, m) last states, scale (B, NH, S, DHV)`` like :func:`recurrent_ref`.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    i, f = _gate(i), _gate(f)
    B, S = q.shape[0], q.shape[2]
    ids = np.zeros((B, S), int) if segment_ids is None else np.asarray(segment_ids)
    h, scale, last = np.empty(q.shape[:3] + v.shape[-1:]), np.empty(q.shape[:3] + v.shape[-1:]), []
    for b in range(B):
        cuts = [0, *(t for t in range(1, S) if ids[b, t] != ids[b, t - 1]), S]
        states = (None, None, None) if c0 is None else (c0[b : b + 1], n0[b : b + 1], m0[b : b + 1])
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            doc = (x[b : b + 1, :, lo:hi] for x in (q, k, v, i, f))
            h[b : b + 1, :, lo:hi], row_last, scale[b : b + 1, :, lo:hi] = recurrent_ref(*doc, *states, eps=eps)
            states = (None, None, None)
        last.append(row_last)
    return h, tuple(np.concatenate(parts) for parts in zip(*last, strict=True)), scale


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
