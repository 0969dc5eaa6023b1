"""Edge cases of the gates and inputs in every sequence form and in the recurrent step.

- A forget gate pre-activation of -inf (forget gate 0: a state reset) gives the recurrent result, never NaN,
  with gradients equal to the float64 reference's.
- Very negative finite forget gates (-1e4, -1e30) give the recurrent result: they must not absorb the
  later gates of the forms' cumulative log-gate sums.
- A NaN or inf in k or v at step t leaves h[:t] exactly as without it.

Every form is compared with the float64 recurrent reference of ``tests/reference.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import INTERPRET
from tests.mlstm.form_checks import check_forward, check_gradients, random_inputs
from tests.numerics import TOL, assert_close
from tests.reference import recurrent_ref
from xlstm_jax.kernels import SequenceKernelConfig, recurrent_sequence_pallas
from xlstm_jax.mlstm.chunkwise import chunkwise_fw
from xlstm_jax.mlstm.parallel import parallel_stabilized_fw
from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw, recurrent_step_fw
from xlstm_jax.mlstm.stabilizer import forget_gate_resets, max_bound, step_gates, underflow_gap

CHUNK = 16  # chunk / kernel block size; the special steps below sit on and next to its borders
FORMS = {
    "recurrent-scan": functools.partial(recurrent_sequence_fw, use_scan=True),
    "recurrent-loop": functools.partial(recurrent_sequence_fw, use_scan=False),
    "parallel": parallel_stabilized_fw,
    "chunkwise": functools.partial(chunkwise_fw, chunk_size=CHUNK),
    "pallas": functools.partial(
        recurrent_sequence_pallas, config=SequenceKernelConfig(block_dhv=16, chunk_size=CHUNK), interpret=INTERPRET
    ),
}
XLA_FORMS = [name for name in FORMS if name != "pallas"]  # the kernel reads float32/bfloat16 only
# The unrolled loop compiles slowly at S=63 under jit (superlinear in S); it runs eagerly here.
JIT = {name: name != "recurrent-loop" for name in FORMS}
# Steps with special gates or inputs in a sequence of 63: the first, both sides of chunk borders, two in a
# row inside a chunk, the last.
SPECIAL_STEPS = [0, 15, 16, 37, 38, 62]


@pytest.mark.parametrize(("dtype", "states"), [("float32", True), ("float64", False)])
@pytest.mark.parametrize("form", list(FORMS))
def test_very_negative_forget_gates(form, dtype, states):
    """S=63; forget gates of -inf (head 0), -1e30 (head 1) and -1e4 (head 2) at the first step, on both sides
    of a chunk border, twice in a row and at the last step, and in head 3 once mid-sequence. float32 with
    initial states, float64 without (the running max starts at 0)."""
    if form == "pallas" and dtype == "float64":
        pytest.skip("the kernel reads float32/bfloat16")
    x = random_inputs(1 + states, 1, 4, 63, 16, 16, states=states, igate="extreme")
    for head, value in enumerate((-np.inf, -1e30, -1e4)):
        x["f"][0, head, SPECIAL_STEPS] = value
    x["f"][0, 3, 37] = -np.inf
    check_forward(FORMS[form], x, dtype, jit=JIT[form])


@pytest.mark.parametrize("form", list(FORMS))
def test_zero_forget_gate_at_a_single_step(form):
    """S=1: the only step resets the initial states (f = -inf) in head 0; head 1 keeps them."""
    x = random_inputs(3, 1, 2, 1, 16, 16, states=True, igate="extreme")
    x["f"][0, 0, 0] = -np.inf
    check_forward(FORMS[form], x, "float32")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resets_are_exact_zeros_of_the_recurrent_forget_activation(dtype):
    """Where ``forget_gate_resets`` marks a step, the recurrent step's forget activation is exactly 0 in that
    dtype, so masking the terms across it changes nothing. Gates are drawn on both sides of the cut, with
    input gates and initial max spread over [-50, 50]; -inf and -1e30 are always resets."""
    rng = np.random.default_rng(15)
    B, S = 64, 40
    with jax.enable_x64(dtype == "float64"):
        i = jnp.asarray(rng.uniform(-50.0, 50.0, (B, S)), dtype)
        m0 = jnp.asarray(rng.uniform(-50.0, 50.0, (B,)), dtype)
        bound = max_bound(m0, i)[:, None]
        f = i - bound - underflow_gap(dtype) + jnp.asarray(rng.uniform(-3.0, 3.0, (B, S)), dtype)
        f = f.at[:, 7].set(-jnp.inf).at[:, 8].set(-1e30)
        resets = forget_gate_resets(f, i, bound)
        assert bool(jnp.all(resets[:, 7:9])) and 0.2 < float(jnp.mean(resets)) < 0.8
        m = m0[:, None]
        for t in range(S):
            m, f_act, _ = step_gates(m, i[:, t : t + 1], f[:, t : t + 1])
            assert bool(jnp.all(jnp.where(resets[:, t : t + 1], f_act == 0.0, True))), f"step {t}"


@pytest.mark.parametrize(
    ("form", "states"), [("recurrent-scan", True), ("recurrent-loop", False), ("parallel", False), ("chunkwise", True)]
)
def test_zero_forget_gate_gradients_float64(form, states):
    """Gradients of every input (the initial states' included) against central differences of the float64
    reference, with f = -inf at two steps in a row in head 0 (the second on a chunk border of chunk size 3)
    and f = -1e30 once in head 1."""
    x = random_inputs(6, 1, 2, 7, 3, 2, states=states)
    x["i"] = np.random.default_rng(7).uniform(-3.0, 3.0, x["i"].shape)  # keep the max away from ties
    x["f"][0, 0, [2, 3]] = -np.inf
    x["f"][0, 1, 5] = -1e30
    form_fn = functools.partial(chunkwise_fw, chunk_size=3) if form == "chunkwise" else FORMS[form]
    check_gradients(form_fn, x, "float64")


def test_zero_forget_gate_gradients_pallas():
    """The kernel's custom_vjp (float32) with f = -inf inside a block of 16 steps and at a block border."""
    x = random_inputs(8, 1, 1, 20, 16, 16, states=True)
    x["i"] = np.random.default_rng(9).uniform(-3.0, 3.0, x["i"].shape)
    x["f"][0, 0, [5, 16]] = -np.inf
    check_gradients(FORMS["pallas"], x, "float32")


def test_step_with_very_negative_forget_gates():
    """recurrent_step_fw resets the state at f = -inf, -1e30 and -1e4 (heads 0, 1, 2 of batch 0; batch 1 keeps
    its state), matching the reference, with the reference's gradients."""
    x = random_inputs(10, 2, 3, 1, 4, 5, states=True)
    x["f"][0, :, 0] = (-np.inf, -1e30, -1e4)

    def step_as_sequence(q, k, v, i, f, c0, n0, m0, return_last_states=True):
        h, (c, n, m) = recurrent_step_fw(c0, n0, m0[..., None], q[:, :, 0], k[:, :, 0], v[:, :, 0], i, f)
        return h[:, :, None], (c, n, m[..., 0])

    check_forward(step_as_sequence, x, "float64")
    check_forward(step_as_sequence, x, "float32")
    x["i"] = np.random.default_rng(11).uniform(-3.0, 3.0, x["i"].shape)
    check_gradients(step_as_sequence, x, "float64")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("form", list(FORMS))
def test_nonfinite_k_or_v_leaves_earlier_outputs_unchanged(form, dtype):
    """A NaN in k or an inf in v at step t: h[:t] is bit for bit the h of the same call without it, and h at t
    is not finite. t on both sides of a chunk border and inside a chunk, with and without initial states."""
    if form == "pallas" and dtype == "float64":
        pytest.skip("the kernel reads float32/bfloat16")
    jdtype = jnp.float64 if dtype == "float64" else jnp.float32
    with jax.enable_x64(dtype == "float64"):
        for states in (True, False):
            x = random_inputs(12 + states, 1, 2, 63, 16, 16, states=states, igate="extreme")
            names = ("q", "k", "v", "i", "f", "c0", "n0", "m0") if states else ("q", "k", "v", "i", "f")
            fn = lambda *a: FORMS[form](*a)  # noqa: E731
            fn = jax.jit(fn) if JIT[form] else fn
            h_clean = np.asarray(fn(*(jnp.asarray(x[n], jdtype) for n in names)))
            for name, bad, t in (("k", np.nan, 16), ("v", np.inf, 15), ("v", -np.inf, 37), ("k", np.inf, 1)):
                y = {n: a.copy() for n, a in x.items()}
                y[name][:, :, t, 3] = bad
                h = np.asarray(fn(*(jnp.asarray(y[n], jdtype) for n in names)))
                np.testing.assert_array_equal(h[:, :, :t], h_clean[:, :, :t], err_msg=f"{name}[{t}] = {bad}")
                assert np.all(np.any(~np.isfinite(h[:, :, t]), axis=-1)), f"{name}[{t}] = {bad}: h[{t}] is finite"


def test_reference_resets():
    """The float64 reference itself: f = -inf and f = -1e30 empty the state (the states after the step are the
    step's own contribution), and the last states equal a fresh start from that step."""
    x = random_inputs(14, 1, 2, 9, 3, 4, states=True)
    names = ("q", "k", "v", "i", "f")
    for value in (-np.inf, -1e30):
        y = {n: a.copy() for n, a in x.items()}
        y["f"][..., 4] = value
        h, last, _ = recurrent_ref(*(y[n] for n in names), y["c0"], y["n0"], y["m0"])
        # From step 4 on, the run equals a fresh run on steps 4.. whose first forget gate cannot matter: any m0.
        h_tail, last_tail, scale = recurrent_ref(
            *(y[n][..., 4:, :] if y[n].ndim == 4 else y[n][..., 4:] for n in names)
        )
        assert_close("h after the reset", h_tail, h[..., 4:, :], TOL["float64"], scale=scale)
        for s, a, b in zip("cnm", last_tail, last, strict=True):
            assert_close(f"{s} after the reset", a, b, TOL["float64"])
