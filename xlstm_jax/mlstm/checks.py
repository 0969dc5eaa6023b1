"""Input validation shared by every form of the mLSTM cell.

Every check runs at trace time on static shapes and dtypes, so it costs nothing inside ``jax.jit``.
Bad input raises ``ValueError`` (shapes, values) or ``TypeError`` (types, dtypes) with a message that
names the argument, what it got and what was expected; nothing here uses ``assert``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "SequenceDims",
    "check_eps",
    "check_initial_states",
    "check_sequence_inputs",
    "check_step_inputs",
    "normalize_gate",
    "resolve_state_dtype",
]


class SequenceDims(NamedTuple):
    """The static sizes of one call: batch, heads, sequence, query/key head dim, value head dim."""

    B: int
    NH: int
    S: int
    DHQK: int
    DHV: int


def check_eps(eps: Any) -> None:
    """Raises unless ``eps`` is a positive, finite number. A traced ``eps`` is not checked."""
    if isinstance(eps, jax.core.Tracer):
        return
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a positive finite number, got {eps!r}") from None
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def resolve_state_dtype(state_dtype: Any) -> jnp.dtype | None:
    """Turns ``state_dtype`` (None, a dtype name such as ``"float32"``, or a dtype) into a dtype.

    Raises:
        ValueError: the name is not a dtype, or the dtype is not a floating-point one.
    """
    if state_dtype is None:
        return None
    try:
        dtype = jnp.dtype(state_dtype)
    except TypeError:
        raise ValueError(
            f"state_dtype={state_dtype!r} is not a known dtype; use a floating dtype name such as "
            "'float32' or 'bfloat16', or None"
        ) from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"state_dtype={state_dtype!r} must be a floating-point dtype, got {dtype}")
    return dtype


def _check_float(name: str, x: Any) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating-point dtype, got {name}.dtype={x.dtype}")


def _check_shape(name: str, x: Any, expected: tuple[int, ...], layout: str) -> None:
    _check_float(name, x)
    if tuple(x.shape) != expected:
        raise ValueError(f"{name}.shape={tuple(x.shape)} must be {layout}={expected}")


def normalize_gate(name: str, g: Any, leading: tuple[int, ...], layout: str) -> jax.Array:
    """Accepts a gate shaped ``leading`` or ``leading + (1,)`` and returns it as ``leading + (1,)``."""
    _check_float(name, g)
    shape = tuple(g.shape)
    if shape == leading:
        return g[..., None]
    if shape == (*leading, 1):
        return g
    raise ValueError(f"{name}.shape={shape} must be {layout}={leading} or {layout[:-1]}, 1)={(*leading, 1)}")


def check_sequence_inputs(
    q: Any,  # (B, NH, S, DHQK)
    k: Any,  # (B, NH, S, DHQK)
    v: Any,  # (B, NH, S, DHV)
    i: Any,  # (B, NH, S) or (B, NH, S, 1)
    f: Any,  # (B, NH, S) or (B, NH, S, 1)
    names: tuple[str, str, str, str, str] = ("queries", "keys", "values", "igate_preact", "fgate_preact"),
) -> tuple[SequenceDims, jax.Array, jax.Array]:
    """Checks the inputs of a sequence call.

    Returns:
        The sizes, and the two gates normalised to shape (B, NH, S, 1).
    """
    qn, kn, vn, in_, fn = names
    _check_float(qn, q)
    if q.ndim != 4:
        raise ValueError(f"{qn} must have rank 4 (B, NH, S, DHQK), got {qn}.shape={tuple(q.shape)}")
    B, NH, S, DHQK = q.shape
    _check_shape(kn, k, (B, NH, S, DHQK), "(B, NH, S, DHQK)")
    _check_float(vn, v)
    if v.ndim != 4 or tuple(v.shape[:3]) != (B, NH, S):
        raise ValueError(
            f"{vn}.shape={tuple(v.shape)} must be (B, NH, S, DHV) with (B, NH, S)={(B, NH, S)} "
            f"from {qn}.shape={tuple(q.shape)}"
        )
    DHV = v.shape[3]
    if min(B, NH, S, DHQK, DHV) < 1:
        raise ValueError(f"all sizes must be positive, got {qn}.shape={tuple(q.shape)}, {vn}.shape={tuple(v.shape)}")
    i = normalize_gate(in_, i, (B, NH, S), "(B, NH, S)")
    f = normalize_gate(fn, f, (B, NH, S), "(B, NH, S)")
    return SequenceDims(B, NH, S, DHQK, DHV), i, f


def check_initial_states(
    c: Any,  # (B, NH, DHQK, DHV) or None
    n: Any,  # (B, NH, DHQK) or None
    m: Any,  # (B, NH) or None
    dims: SequenceDims,
) -> tuple[jax.Array, jax.Array, jax.Array] | None:
    """Checks the optional initial states of a sequence call.

    Returns:
        None when no state is given, else ``(c, n, m)`` unchanged.

    Raises:
        ValueError: only some of the three are given, or a shape does not match the inputs.
    """
    given = {"c_initial": c is not None, "n_initial": n is not None, "m_initial": m is not None}
    if not any(given.values()):
        return None
    if not all(given.values()):
        have = [k for k, g in given.items() if g]
        missing = [k for k, g in given.items() if not g]
        raise ValueError(f"initial states must be given all together or not at all: got {have}, missing {missing}")
    B, NH, _, DHQK, DHV = dims
    _check_shape("c_initial", c, (B, NH, DHQK, DHV), "(B, NH, DHQK, DHV)")
    _check_shape("n_initial", n, (B, NH, DHQK), "(B, NH, DHQK)")
    _check_shape("m_initial", m, (B, NH), "(B, NH)")
    return c, n, m


def check_step_inputs(c: Any, n: Any, m: Any, q: Any, k: Any, v: Any, i: Any, f: Any) -> tuple[jax.Array, jax.Array]:
    """Checks the arguments of one recurrent step; returns the gates shaped (B, NH, 1).

    Raises:
        ValueError: a shape does not match.
        TypeError: the three states do not share one dtype.
    """
    _check_float("q", q)
    if q.ndim != 3:
        raise ValueError(f"q must have rank 3 (B, NH, DHQK), got q.shape={tuple(q.shape)}")
    B, NH, DHQK = q.shape
    _check_shape("k", k, (B, NH, DHQK), "(B, NH, DHQK)")
    _check_float("v", v)
    if v.ndim != 3 or tuple(v.shape[:2]) != (B, NH):
        raise ValueError(
            f"v.shape={tuple(v.shape)} must be (B, NH, DHV) with (B, NH)={(B, NH)} from q.shape={tuple(q.shape)}"
        )
    DHV = v.shape[2]
    _check_shape("c", c, (B, NH, DHQK, DHV), "(B, NH, DHQK, DHV)")
    _check_shape("n", n, (B, NH, DHQK), "(B, NH, DHQK)")
    _check_shape("m", m, (B, NH, 1), "(B, NH, 1)")
    if not (c.dtype == n.dtype == m.dtype):
        raise TypeError(f"the states must share one dtype, got {c.dtype=}, {n.dtype=}, {m.dtype=}")
    i = normalize_gate("i", i, (B, NH), "(B, NH)")
    f = normalize_gate("f", f, (B, NH), "(B, NH)")
    return i, f


def check_stacked_states(c: Any, n: Any, m: Any, layer: Any) -> None:
    """Checks states stacked over L layers, c (L, B, NH, DHQK, DHV), n (L, B, NH, DHQK), m (L, B, NH), and
    that a Python int ``layer`` is in [0, L) (a traced layer is not checked).

    Raises:
        ValueError: wrong ranks, stacks of different L or (B, NH), or layer out of range.
    """
    if c.ndim != 5 or n.ndim != 4 or m.ndim != 3 or not (c.shape[:3] == n.shape[:3] == m.shape):
        raise ValueError(
            "stacked states must be c (L, B, NH, DHQK, DHV), n (L, B, NH, DHQK), m (L, B, NH), got "
            f"c.shape={tuple(c.shape)}, n.shape={tuple(n.shape)}, m.shape={tuple(m.shape)}"
        )
    if isinstance(layer, int) and not 0 <= layer < c.shape[0]:
        raise ValueError(
            f"layer={layer} must be in [0, L) for L={c.shape[0]} stacked layers (c.shape={tuple(c.shape)})"
        )
