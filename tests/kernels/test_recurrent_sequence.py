"""The fused sequence kernel and the ``recurrent_pallas`` backend against the float64 reference.

Pallas interpret mode on CPU, compiled on a GPU (``tests.kernels.INTERPRET``). Forward and gradient checks
are the shared ones of the sequence forms (``tests/mlstm/form_checks.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import INTERPRET, ON_GPU
from tests.mlstm.form_checks import check_forward, check_gradients, random_inputs
from tests.numerics import TOL, assert_close
from tests.reference import recurrent_ref
from xlstm_jax.kernels import SequenceKernelConfig, recurrent_sequence_pallas
from xlstm_jax.kernels.chunkwise_mosaic import chunkwise_mosaic_fw
from xlstm_jax.kernels.mosaic import mosaic_interpret_params
from xlstm_jax.kernels.recurrent_step_mosaic import device_supports_mosaic
from xlstm_jax.mlstm.recurrent import recurrent_sequence_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import BACKENDS, create_mlstm_backend
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent_pallas import (
    mLSTMBackendRecurrentPallas,
    mLSTMBackendRecurrentPallasConfig,
)

ON_HOPPER = ON_GPU and device_supports_mosaic()
# Blocks of 16 steps, four programs across DHV=64; and the literal step-by-step recurrence.
NARROW = SequenceKernelConfig(block_dhv=16, chunk_size=16, num_warps=1)
STEPS = SequenceKernelConfig(block_dhv=16, chunk_size=1, num_warps=2, num_stages=2)


def _form(config=None):
    return functools.partial(recurrent_sequence_pallas, config=config, interpret=INTERPRET)


# (B, NH, S, DHQK, DHV, config, input kwargs): S = 1, odd S, S below, at and above whole blocks (closed-form
# blocks followed by single steps), DHQK != DHV both ways, several DHV blocks, initial states or not, extreme
# input gates and strongly forgetting or remembering forget gates.
FORWARD_CASES = {
    "S1": (1, 1, 1, 16, 16, None, {}),
    "odd-S-states": (2, 3, 7, 32, 16, None, {"states": True}),
    "blocks-tail-dhv-extreme": (1, 2, 37, 16, 64, NARROW, {"igate": "extreme"}),
    "blocks-closed-states": (2, 1, 40, 64, 32, NARROW, {"states": True, "fgate": "closed", "igate": "extreme"}),
    "blocks-exact-open": (1, 1, 64, 32, 16, SequenceKernelConfig(block_dhv=16, chunk_size=32), {"fgate": "open"}),
    "steps-states-extreme": (2, 1, 11, 32, 32, STEPS, {"states": True, "igate": "extreme"}),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(FORWARD_CASES), ids=list(FORWARD_CASES))
def test_sequence_matches_reference(case, dtype):
    B, NH, S, DHQK, DHV, config, kwargs = FORWARD_CASES[case]
    x = random_inputs(B * 1000 + S * 10 + NH, B, NH, S, DHQK, DHV, **kwargs)
    check_forward(_form(config), x, dtype)


@pytest.mark.parametrize(
    ("shape", "states"), [((1, 1, 20, 16, 16), True), ((1, 2, 3, 16, 32), False)], ids=["states", "no-states"]
)
def test_sequence_gradients(shape, states):
    """The custom_vjp (backward recomputed with the XLA chunkwise form) against central differences in float64."""
    x = random_inputs(5, *shape, states=states)
    check_gradients(_form(NARROW), x, "float32")


def test_sequence_h_only_and_bf16_initial_states():
    """Without ``return_last_states`` only h comes back; last states keep the initial states' dtypes."""
    B, NH, S, DHQK, DHV = 1, 2, 6, 16, 16
    x = random_inputs(11, B, NH, S, DHQK, DHV, states=True)
    args = [jnp.asarray(x[name], jnp.float32) for name in ("q", "k", "v", "i", "f")]
    states = [jnp.asarray(x[name], jnp.bfloat16) for name in ("c0", "n0", "m0")]
    h = recurrent_sequence_pallas(*args, *states, interpret=INTERPRET)
    h2, last = recurrent_sequence_pallas(*args, *states, return_last_states=True, interpret=INTERPRET)
    assert all(s.dtype == jnp.bfloat16 for s in last)
    np.testing.assert_array_equal(h, h2)
    names = ("c0", "n0", "m0")
    rounded = {name: np.asarray(s.astype(jnp.float32), np.float64) for name, s in zip(names, states, strict=True)}
    h_ref, _, scale = recurrent_ref(*(x[name] for name in ("q", "k", "v", "i", "f")), **rounded)
    assert_close("h", h_ref, h, TOL["float32"], scale=scale)


def test_sequence_input_errors():
    x = random_inputs(0, 1, 1, 3, 16, 16)
    args = [jnp.asarray(x[name], jnp.float32) for name in ("q", "k", "v", "i", "f")]
    with pytest.raises(ValueError, match="float32"):
        recurrent_sequence_pallas(*args, state_dtype="bfloat16", interpret=INTERPRET)
    with pytest.raises(ValueError, match="DHV=1024"):
        recurrent_sequence_pallas(*args[:2], jnp.ones((1, 1, 3, 1024)), *args[3:], interpret=INTERPRET)
    with pytest.raises(ValueError, match="given all together"):
        recurrent_sequence_pallas(*args, c_initial=jnp.ones((1, 1, 16, 16)), interpret=INTERPRET)
    with pytest.raises(TypeError, match="SequenceKernelConfig"):
        recurrent_sequence_pallas(*args, config=(16, 1), interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_dhv"):
        SequenceKernelConfig(block_dhv=12)
    with pytest.raises(ValueError, match="block_dhv=8 must be at least 16"):
        SequenceKernelConfig(block_dhv=8)
    for bad in (0, 8, 48, 512):
        with pytest.raises(ValueError, match=f"chunk_size={bad}"):
            SequenceKernelConfig(chunk_size=bad)


def test_backend_registered_and_matches_the_function():
    assert BACKENDS["recurrent_pallas"] is mLSTMBackendRecurrentPallas
    x = random_inputs(4, 1, 2, 5, 16, 32, states=True)
    args = [jnp.asarray(x[name], jnp.float32) for name in ("q", "k", "v", "i", "f", "c0", "n0", "m0")]
    backend = create_mlstm_backend("recurrent_pallas", interpret=INTERPRET, kernel_config=NARROW, eps=1e-5)
    h, states = backend.apply({}, *args, return_last_states=True)
    h_fn, states_fn = recurrent_sequence_pallas(
        *args, return_last_states=True, eps=1e-5, config=NARROW, interpret=INTERPRET
    )
    np.testing.assert_array_equal(h, h_fn)
    for s, s_fn in zip(states, states_fn, strict=True):
        np.testing.assert_array_equal(s, s_fn)
    config = mLSTMBackendRecurrentPallasConfig()
    assert (config.context_length, config.eps, config.state_dtype, config.kernel_config) == (-1, 1e-6, None, None)
    config.assign_model_config_params(type("ModelConfig", (), {"context_length": 256})())
    assert config.context_length == 256
    with pytest.raises(ValueError, match="float32"):
        mLSTMBackendRecurrentPallasConfig(state_dtype="bfloat16")
    with pytest.raises(TypeError, match="SequenceKernelConfig"):
        mLSTMBackendRecurrentPallasConfig(kernel_config={"block_dhv": 16})


@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without a GPU")
def test_sequence_without_gpu_falls_back_or_raises():
    x = random_inputs(9, 1, 2, 4, 16, 16, states=True)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v", "i", "f")]
    states = [jnp.asarray(x[name], jnp.float32) for name in ("c0", "n0", "m0")]
    out = recurrent_sequence_pallas(*args, *states, return_last_states=True)  # interpret=None: the XLA form
    expected = recurrent_sequence_fw(*args, *states, return_last_states=True, state_dtype="float32", use_scan=True)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="needs a GPU"):
        recurrent_sequence_pallas(*args, interpret=False)


def test_kernel_supports_head_dims():
    from xlstm_jax.kernels.config import kernel_supports_head_dims

    supported = (16, 32, 64, 128, 256, 512)
    for DHQK in (8, 16, 24, 48, 64, 96, 512, 1024):
        for DHV in (16, 96, 256, 2048):
            assert kernel_supports_head_dims(DHQK, DHV) == (DHQK in supported and DHV in supported), (DHQK, DHV)


@pytest.mark.parametrize(("DHQK", "DHV"), [(24, 16), (16, 96), (96, 128)])
@pytest.mark.parametrize("interpret", [None, INTERPRET] if ON_GPU else [None, True, False])
def test_unsupported_head_dims_raise_on_every_platform(DHQK, DHV, interpret):
    """Asking for the kernel (the function or the backend) on a head it does not cover is a ValueError naming
    the sizes, also where interpret=None would run the XLA form (no GPU) and before interpret=False's missing
    GPU is reported."""
    x = random_inputs(1, 1, 2, 5, DHQK, DHV)
    args = [jnp.asarray(x[name], jnp.float32) for name in ("q", "k", "v", "i", "f")]
    bad = ", ".join(f"{n}={d}" for n, d in (("DHQK", DHQK), ("DHV", DHV)) if d not in (16, 128))
    pattern = rf"\{{16, 32, 64, 128, 256, 512\}}.*got {bad} \(DHQK={DHQK}, DHV={DHV}\)"
    with pytest.raises(ValueError, match=pattern):
        recurrent_sequence_pallas(*args, interpret=interpret)
    backend = create_mlstm_backend("recurrent_pallas", interpret=interpret)
    with pytest.raises(ValueError, match=pattern):
        jax.jit(backend)(*args)


# The Mosaic GPU path (backend="mosaic"/"auto" on Hopper): the chunkwise Mosaic kernel, interpreted on a CPU.
MOSAIC_RUNS = ON_HOPPER or mosaic_interpret_params() is not None
SEGMENTS = np.repeat(np.array([[0, 1, 2], [3, 4, 5]]), [40, 60, 50], axis=1)  # documents across 64-step chunks


@pytest.mark.skipif(not MOSAIC_RUNS, reason="needs a Hopper GPU or a JAX with Mosaic GPU's interpreter")
@pytest.mark.parametrize("segments", [False, True], ids=["states", "states-documents"])
def test_mosaic_backend_matches_reference(segments):
    """backend="mosaic": bf16 h and float32 last states against the float64 reference, with initial states,
    extreme input gates, an odd S (the last chunk padded) and packed documents; the same call as
    ``chunkwise_mosaic_fw`` on the same inputs."""
    x = random_inputs(21 + segments, 2, 1, 150, 64, 64, states=True, igate="extreme")
    ids = SEGMENTS if segments else None
    form = functools.partial(recurrent_sequence_pallas, backend="mosaic", interpret=not ON_HOPPER)
    check_forward(form, x, "bfloat16", segment_ids=ids)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v", "i", "f")]
    states = [jnp.asarray(x[name], jnp.float32) for name in ("c0", "n0", "m0")]
    seg = None if ids is None else jnp.asarray(ids, jnp.int32)
    h, last = form(*args, *states, return_last_states=True, segment_ids=seg)
    h_kernel, last_kernel = chunkwise_mosaic_fw(
        *args, *states, return_last_states=True, state_dtype="float32", segment_ids=seg, interpret=not ON_HOPPER
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_kernel, np.float32))
    for a, b in zip(last, last_kernel, strict=True):
        np.testing.assert_array_equal(a, b)


def _runs_mosaic(DHQK: int = 64, **kwargs) -> bool:
    """Whether ``recurrent_sequence_pallas`` on bf16 inputs (DHV = 64) traces the Mosaic kernel."""
    x = random_inputs(3, 1, 1, 70, DHQK, 64)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v", "i", "f")]
    jaxpr = jax.make_jaxpr(functools.partial(recurrent_sequence_pallas, **kwargs))(*args)
    return "mlstm_chunkwise_mosaic" in str(jaxpr)


@pytest.mark.skipif(mosaic_interpret_params() is None, reason="needs a JAX with Mosaic GPU's interpreter")
def test_backend_choice_and_errors():
    """ "auto" interprets the Triton kernel (the Mosaic kernel only compiled on Hopper); "mosaic" asks for the
    Mosaic kernel, and is an error for float32 inputs, a Triton tiling or an unknown name."""
    assert _runs_mosaic(backend="mosaic", interpret=True)
    assert _runs_mosaic(512, backend="mosaic", interpret=True)  # one chunk in flight (chunkwise_mosaic's auto_depth)
    assert not _runs_mosaic(backend="auto", interpret=True)
    assert not _runs_mosaic(backend="triton", interpret=True)
    x = random_inputs(3, 1, 1, 70, 64, 64)
    args32 = [jnp.asarray(x[name], jnp.float32) for name in ("q", "k", "v", "i", "f")]
    with pytest.raises(ValueError, match="cannot run this call: inputs must be bfloat16 or float16"):
        recurrent_sequence_pallas(*args32, backend="mosaic", interpret=True)
    args = [a.astype(jnp.bfloat16) for a in args32]
    with pytest.raises(ValueError, match="config is a tiling of the Triton kernel"):
        recurrent_sequence_pallas(*args, backend="mosaic", config=NARROW, interpret=True)
    with pytest.raises(ValueError, match=r"backend='cuda' must be one of \('auto', 'triton', 'mosaic'\)"):
        recurrent_sequence_pallas(*args, backend="cuda")
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        mLSTMBackendRecurrentPallasConfig(kernel_backend="cuda")
    backend = create_mlstm_backend("recurrent_pallas", interpret=True, kernel_backend="mosaic")
    h = backend.apply({}, *args)
    np.testing.assert_array_equal(
        np.asarray(h), np.asarray(recurrent_sequence_pallas(*args, backend="mosaic", interpret=True))
    )
