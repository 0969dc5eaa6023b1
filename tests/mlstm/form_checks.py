"""Checks shared by the tests of the sequence forms (parallel, chunkwise): forward and gradients against
the float64 reference of ``tests/reference.py``, with tolerances from ``tests/numerics.TOL``.

A *form* here is any function with the signature of the sequence forms,
``fn(q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states=True)``, and, for packed documents,
a keyword ``segment_ids``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tests.numerics import TOL, assert_close, make_inputs
from tests.reference import documents_ref, numerical_vjp, recurrent_ref

__all__ = ["STATE_NAMES", "check_forward", "check_gradients", "random_inputs", "reference_gradients"]

STATE_NAMES = ("c", "n", "m")
_TOL_KEY = {"float64": "float64", "float32": "float32", "bfloat16": "bfloat16/float32"}


def random_inputs(seed: int, B: int, NH: int, S: int, DHQK: int, DHV: int, **kwargs) -> dict[str, np.ndarray]:
    """``make_inputs`` from a fresh generator seeded by ``seed``."""
    return make_inputs(np.random.default_rng(seed), B, NH, S, DHQK, DHV, **kwargs)


def _segment_kwargs(segment_ids) -> dict:
    return {} if segment_ids is None else {"segment_ids": jnp.asarray(segment_ids, jnp.int32)}


def _call(form: Callable, x: dict[str, np.ndarray], dtype, state_dtype=jnp.float32, jit: bool = True, segment_ids=None):
    """Runs ``form`` (jitted unless ``jit=False``) on ``x`` with q, k, v, i, f in ``dtype`` and initial states (if
    any) in state_dtype."""
    args = [jnp.asarray(x[name], dtype) for name in ("q", "k", "v", "i", "f")]
    states = [jnp.asarray(x[name], state_dtype) for name in ("c0", "n0", "m0")] if "c0" in x else [None] * 3
    kwargs = _segment_kwargs(segment_ids)
    call = lambda *a: form(*a, return_last_states=True, **kwargs)  # noqa: E731
    return (jax.jit(call) if jit else call)(*args, *states)


def check_forward(
    form: Callable, x: dict[str, np.ndarray], dtype: str, jit: bool = True, segment_ids: np.ndarray | None = None
) -> None:
    """Compares h and the last states of ``form`` on ``x`` with the float64 recurrent reference.

    float64 runs under ``jax.enable_x64``. For lower precisions the reference gets the same rounded inputs,
    so the comparison measures the form's arithmetic, not the rounding of its inputs. ``jit=False`` runs the
    form eagerly (the unrolled recurrent loop compiles slowly at long S). With ``segment_ids`` (B, S) the rows
    are packed documents, and the reference runs every document alone (``documents_ref``).
    """
    tol = TOL[_TOL_KEY[dtype]]
    if dtype == "float64":
        with jax.enable_x64(True):
            h, states = _call(form, x, jnp.float64, jnp.float64, jit, segment_ids)
            h, states = np.asarray(h), [np.asarray(s) for s in states]
        rounded = x
    else:
        h, states = _call(form, x, jnp.dtype(dtype), jit=jit, segment_ids=segment_ids)
        if h.dtype != jnp.dtype(dtype):
            raise AssertionError(f"h has dtype {h.dtype}, expected q's dtype {dtype}")
        if any(s.dtype != jnp.float32 for s in states):
            raise AssertionError(f"last states have dtypes {[s.dtype for s in states]}, expected float32")
        rounded = {
            name: np.asarray(jnp.asarray(val, dtype).astype(jnp.float32)) if name in ("q", "k", "v", "i", "f") else val
            for name, val in x.items()
        }
    reference = recurrent_ref if segment_ids is None else functools.partial(documents_ref, segment_ids=segment_ids)
    h_ref, states_ref, scale = reference(
        *(rounded[name] for name in ("q", "k", "v", "i", "f")), rounded.get("c0"), rounded.get("n0"), rounded.get("m0")
    )
    assert_close("h", h_ref, h, tol, scale=scale)
    for name, ref, out in zip(STATE_NAMES, states_ref, states, strict=True):
        assert_close(f"{name} (last state)", ref, out, tol)


def _reference_outputs(q, k, v, i, f, c0=None, n0=None, m0=None, segment_ids=None):
    h, (c, n, m), _ = recurrent_ref(q, k, v, i, f, c0, n0, m0, segment_ids=segment_ids)
    return h, c, n, m


def reference_gradients(
    x: dict[str, np.ndarray], seed: int = 0, segment_ids: np.ndarray | None = None
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], dict[str, np.ndarray]]:
    """The reference's outputs (h, c, n, m) on ``x``, random cotangents for them, and the gradients of
    ``sum <outputs, cotangents>`` by central differences of the float64 reference (every input of ``x``)."""
    reference = functools.partial(_reference_outputs, segment_ids=segment_ids)
    outs = reference(**x)
    rng = np.random.default_rng(seed)
    cotangents = tuple(rng.standard_normal(o.shape) for o in outs)
    return outs, cotangents, numerical_vjp(reference, x, cotangents)


def check_gradients(
    form: Callable,
    x: dict[str, np.ndarray],
    dtype: str,
    seed: int = 0,
    segment_ids: np.ndarray | None = None,
    reference: tuple | None = None,
) -> None:
    """Compares ``jax.vjp`` of ``form`` with central differences of the float64 reference.

    Random cotangents on h and on all three last states; gradients of every input, the initial states'
    included when ``x`` has them. float64 gradients are measured against the loss's absolute size
    (``TOL["float64-grad"]``), float32 ones against the largest gradient (``TOL["float32-grad"]``). With
    ``segment_ids`` (B, S) the rows are packed documents (the reference resets its states at each start).
    ``reference``: what :func:`reference_gradients` returned for the same ``x``, ``seed`` and ``segment_ids``
    (computed here when None), so that several forms can share one set of finite differences.
    """
    names = [name for name in ("q", "k", "v", "i", "f", "c0", "n0", "m0") if name in x]
    outs, cotangents, expected = reference if reference is not None else reference_gradients(x, seed, segment_ids)
    kwargs = _segment_kwargs(segment_ids)

    def fn(*args):
        given = dict(zip(names, args, strict=True))
        h, (c, n, m) = form(
            *(given[name] for name in ("q", "k", "v", "i", "f")),
            given.get("c0"),
            given.get("n0"),
            given.get("m0"),
            return_last_states=True,
            **kwargs,
        )
        return h, c, n, m

    jdtype = {"float64": jnp.float64, "float32": jnp.float32}[dtype]
    with jax.enable_x64(dtype == "float64"):
        _, vjp = jax.vjp(jax.jit(fn), *(jnp.asarray(x[name], jdtype) for name in names))
        grads = vjp(tuple(jnp.asarray(ct, jdtype) for ct in cotangents))
        grads = [np.asarray(g) for g in grads]
    if dtype == "float64":
        loss_size = float(sum(np.sum(np.abs(o * ct)) for o, ct in zip(outs, cotangents, strict=True)))
        for name, g in zip(names, grads, strict=True):
            assert_close(f"d loss / d {name}", expected[name], g, TOL["float64-grad"], scale=loss_size)
    else:
        # Rounding errors of the backward pass scale with the cotangents flowing through it, so they are
        # measured against the largest gradient of the call: a gradient that is small by cancellation (the
        # initial states' when the input gates dominate) is not held to a tighter bound than its sources.
        grad_size = max(float(np.max(np.abs(expected[name]))) for name in names)
        for name, g in zip(names, grads, strict=True):
            assert_close(f"d loss / d {name}", expected[name], g, TOL["float32-grad"], scale=grad_size)
