"""The Mosaic GPU state scan (``mosaic_state_scan``) against a float64 loop over chunks of its two recurrences.

On a Hopper GPU the kernel runs compiled; elsewhere it runs in Mosaic GPU's interpreter (where this JAX has one),
and its CUDA lowering (layouts, swizzles, the transposed operand) is checked on the CPU. Cases: both directions,
both column tilings, pipelines shallower than, as deep as and deeper than the chunks, bf16 and f16, decays of 0
and 1, gains of 0 (a whole chunk's and single steps'), a nonzero initial state; two warpgroups per program (one
program per head, and two), their slots refilled several times; the errors for what it does not run.
"""

from __future__ import annotations

import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import ON_GPU
from tests.numerics import TOL, assert_close
from xlstm_jax.kernels.chunkwise_mosaic import CHUNK
from xlstm_jax.kernels.chunkwise_mosaic_scan import (
    X_OPERANDS,
    mosaic_state_scan,
    run_chunks,
    segment_starts,
    state_scan_shared_memory_bytes,
    state_scan_unsupported,
)
from xlstm_jax.kernels.mosaic import Rows, interpreter_threads, mosaic_interpret_params, require_mosaic_interpreter
from xlstm_jax.kernels.recurrent_step_mosaic import device_supports_mosaic

ON_HOPPER = ON_GPU and device_supports_mosaic()
INTERPRET = not ON_HOPPER
runs = pytest.mark.skipif(
    INTERPRET and mosaic_interpret_params() is None,
    reason="needs a Hopper GPU or a JAX with Mosaic GPU's interpreter",
)

BH, NC, DHA, DHB = 2, 3, 64, 64


def scan_inputs(seed: int, dtype, NC: int = NC, DHB: int = DHB, DHA: int = DHA) -> tuple[jax.Array, ...]:
    """Random a, b (in ``dtype``), gain, decay, x0 (float32), never zeros but for the chosen gates: decays of 0 and
    1 in both heads (at the scan's start and end in either direction), a chunk of zero gains, zero gains at single
    steps."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((BH, NC * CHUNK, DHA))
    b = rng.standard_normal((BH, NC * CHUNK, DHB))
    gain = rng.uniform(0.1, 2.0, (BH, NC, CHUNK))
    gain[0, 1] = 0.0
    gain[1, NC - 1, ::5] = 0.0
    decay = rng.uniform(0.2, 0.95, (BH, NC))
    decay[0, 0], decay[0, NC - 1], decay[1, 0], decay[1, NC - 2] = 1.0, 0.0, 0.0, 1.0
    x0 = rng.standard_normal((BH, DHA, DHB))
    return tuple(jnp.asarray(x, dtype) for x in (a, b)) + tuple(jnp.asarray(x, jnp.float32) for x in (gain, decay, x0))


def reference(a, b, gain, decay, x0, reverse: bool) -> tuple[np.ndarray, np.ndarray]:
    """The recurrences in float64 from the same inputs, gain ⊙ b rounded to the inputs' dtype (as the kernel
    feeds it to the matrix units): borders (BH, NC, DHA, DHB) unrounded, and the last state."""
    A, B = np.asarray(a, np.float64), np.asarray(b, np.float64)
    G, D = np.asarray(gain, np.float64), np.asarray(decay, np.float64)
    NC, DHA, DHB = D.shape[1], A.shape[-1], B.shape[-1]
    borders = np.zeros((BH, NC, DHA, DHB))
    last = np.zeros((BH, DHA, DHB))
    for h in range(BH):
        x = np.asarray(x0[h], np.float64)
        for j in reversed(range(NC)) if reverse else range(NC):
            rows = slice(j * CHUNK, (j + 1) * CHUNK)
            gb = np.asarray(jnp.asarray(G[h, j][:, None] * B[h, rows], jnp.float32).astype(a.dtype), np.float64)
            borders[h, j] = x
            x = D[h, j] * x + A[h, rows].T @ gb
        last[h] = x
    return borders, last


# (reverse, block_dhv, depth, dtype, consumers, NC, DHB)
CASES = [
    (False, 32, 2, jnp.bfloat16, 1, NC, DHB),  # two column blocks, one slot refilled
    (True, 32, 2, jnp.bfloat16, 1, NC, DHB),
    (False, 64, 1, jnp.bfloat16, 1, NC, DHB),  # one column block, every slot refilled
    (True, 64, 4, jnp.float16, 1, NC, DHB),  # a pipeline deeper than the chunks
    # Two warpgroups: one program per head (DHB=64), or two (DHB=128); five chunks refill every slot, some twice.
    (False, 32, 2, jnp.bfloat16, 2, 5, 64),
    (True, 32, 2, jnp.bfloat16, 2, 5, 64),
    (False, 32, 3, jnp.bfloat16, 2, 5, 128),
    (True, 32, 3, jnp.float16, 2, 5, 128),
    # 64 columns per warpgroup with two (the backward's backward_scan_block_dhv=64)
    (True, 64, 2, jnp.bfloat16, 2, 3, 128),
]
CASE_IDS = [
    "forward",
    "reverse",
    "forward-depth1-wide",
    "reverse-depth4-wide-f16",
    "forward-two-wg",
    "reverse-two-wg",
    "forward-two-wg-depth3-two-programs",
    "reverse-two-wg-depth3-two-programs-f16",
    "reverse-two-wg-64-columns",
]


@runs
@pytest.mark.parametrize(("reverse", "block_dhv", "depth", "dtype", "consumers", "NC", "DHB"), CASES, ids=CASE_IDS)
def test_matches_reference(reverse, block_dhv, depth, dtype, consumers, NC, DHB):
    """Every border (rounded to the inputs' dtype) and the last state (float32) against the float64 loop, within
    the bf16 bound (f16 rounds finer)."""
    args = scan_inputs(block_dhv + depth + reverse + 10 * (consumers - 1), dtype, NC, DHB)
    borders, last = mosaic_state_scan(
        *args, reverse=reverse, block_dhv=block_dhv, depth=depth, consumers=consumers, interpret=INTERPRET
    )
    assert borders.shape == (BH, NC * DHA, DHB) and borders.dtype == dtype
    assert last.shape == (BH, DHA, DHB) and last.dtype == jnp.float32
    ref_borders, ref_last = reference(*args, reverse)
    tol = TOL["bfloat16/float32"]
    assert_close("borders", ref_borders, np.asarray(borders, np.float32).reshape(BH, NC, DHA, DHB), tol)
    assert_close("last state", ref_last, last, tol)


@runs
@pytest.mark.parametrize(("reverse", "block_dhv", "consumers"), [(False, 64, 1), (True, 32, 2)])
def test_last_state_alone_of_some_rows_from_zeros(reverse, block_dhv, consumers):
    """``borders=False``, ``x0=None`` and ``rows=(1, 2, offset)`` (one of every two rows from the ``offset``-th: 4
    rows of 3 chunks, the last states of rows 0 and 2, or of rows 1 and 3): only the last state, from zeros, of the
    rows picked, against the float64 loop on those rows; no borders returned."""
    a, b, gain, decay, _ = (jnp.concatenate([x, x[:, ::-1]]) for x in scan_inputs(21, jnp.bfloat16, NC, 128))
    for offset in (0, 1):
        borders, last = mosaic_state_scan(
            a, b, gain, decay, None, reverse=reverse, block_dhv=block_dhv, consumers=consumers, interpret=INTERPRET,
            borders=False, rows=(1, 2, offset),
        )  # fmt: skip
        assert borders is None and last.shape == (BH, DHA, 128)
        picked = [x[offset::2] for x in (a, b, gain, decay)]
        _, ref_last = reference(*picked, np.zeros((BH, DHA, 128)), reverse)
        assert_close("last state", ref_last, last, TOL["bfloat16/float32"])
    with pytest.raises(ValueError, match=r"rows=\(2, 2, 1\) must be \(per, stride, offset\)"):
        mosaic_state_scan(a, b, gain, decay, None, reverse=reverse, interpret=INTERPRET, rows=(2, 2, 1))


# (reverse, consumers, depth, x0 given): the state as Xᵀ with the gated operand in registers (x_operand="registers")
REGISTER_CASES = [(False, 1, 2, False), (True, 1, 1, True), (False, 2, 2, True), (True, 2, 3, False)]


@runs
@pytest.mark.parametrize(("reverse", "consumers", "depth", "given"), REGISTER_CASES)
def test_gated_operand_in_registers_matches_reference(reverse, consumers, depth, given):
    """``x_operand="registers"`` (64 columns a warpgroup, no borders): each warpgroup holds Xᵀ and runs the
    transposed product with r(gain ⊙ b)ᵀ in registers; the last state against the float64 loop (from x0 or from
    zeros, five chunks: slots refilled, decays of 0 and 1, zero gains), with one and two warpgroups, equal to the
    shared-memory form's within float32 rounding."""
    DHB_ = 64 * consumers
    a, b, gain, decay, x0 = scan_inputs(40 + consumers + depth, jnp.bfloat16, 5, DHB_, 128)
    start = x0 if given else None
    scan = functools.partial(
        mosaic_state_scan, reverse=reverse, block_dhv=64, depth=depth, consumers=consumers, interpret=INTERPRET,
        borders=False,
    )  # fmt: skip
    borders, last = scan(a, b, gain, decay, start, x_operand="registers")
    assert borders is None and last.shape == (BH, 128, DHB_) and last.dtype == jnp.float32
    begin = np.asarray(x0, np.float64) if given else np.zeros((BH, 128, DHB_))
    _, ref_last = reference(a, b, gain, decay, begin, reverse)
    assert_close("last state", ref_last, last, TOL["bfloat16/float32"])
    _, shared = scan(a, b, gain, decay, start)
    assert_close("last state against the shared-memory form", np.asarray(shared, np.float64), last, TOL["float32"])


@runs
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("split", [2, 3, 6])
def test_segment_starts_are_the_states_entering_each_segment(split, reverse):
    """``segment_starts`` against the float64 loop of the full scan (6 chunks: segments of 3 chunks summed in runs
    of one, of 2 in one run, of 1), forward and in reverse, from a given state and from zeros, with decays of 0 and
    1 and zero gains: each segment's entry state is the loop's state where it enters the segment."""
    a, b, gain, decay, x0 = scan_inputs(30 + split + reverse, jnp.bfloat16, 6, 64)
    NC_ = 6
    for start in (x0, None):
        got = segment_starts(a, b, gain, decay, start, split, reverse=reverse, interpret=INTERPRET)
        begin = np.zeros((BH, DHA, 64)) if start is None else np.asarray(start, np.float64)
        borders, last = reference(a, b, gain, decay, begin, reverse)
        per = NC_ // split
        if reverse:  # entering segment g after its last chunk: the border of chunk (g + 1)·per - 1, X_{(g+1)·per}
            expected = [borders[:, (g + 1) * per - 1] for g in range(split)]
        else:  # before its first chunk: X_{g·per}
            expected = [borders[:, g * per] for g in range(split)]
        expected = np.stack(expected, axis=1).reshape(BH * split, DHA, 64)
        assert_close("segment starts", expected, np.asarray(got), TOL["bfloat16/float32"])


@runs
def test_gains_read_in_place_from_every_few_rows():
    """``gain_rows=(per, row)``: the gains as one row of every ``per`` of a wider array (the gate plan's), read in
    place: the same borders and last state, bit for bit, as from the gains alone, and ``segment_starts`` likewise;
    other rows hold NaN, so a read of the wrong row shows."""
    a, b, gain, decay, x0 = scan_inputs(43, jnp.bfloat16, 6, 64)
    rows = jnp.full((BH, 6, 3, CHUNK), jnp.nan, jnp.float32).at[:, :, 1].set(gain).reshape(BH, 18, CHUNK)
    alone = mosaic_state_scan(a, b, gain, decay, x0, reverse=False, interpret=INTERPRET)
    inside = mosaic_state_scan(a, b, rows, decay, x0, reverse=False, interpret=INTERPRET, gain_rows=(3, 1))
    for want, got in zip(alone, inside, strict=True):
        np.testing.assert_array_equal(np.asarray(want, np.float32), np.asarray(got, np.float32))
    starts = segment_starts(a, b, gain, decay, x0, 3, reverse=False, interpret=INTERPRET)
    starts_inside = segment_starts(a, b, rows, decay, x0, 3, reverse=False, interpret=INTERPRET, gain_rows=(3, 1))
    np.testing.assert_array_equal(np.asarray(starts), np.asarray(starts_inside))
    with pytest.raises(ValueError, match=r"gain_rows=\(3, 3\) must be"):
        mosaic_state_scan(a, b, rows, decay, x0, reverse=False, interpret=INTERPRET, gain_rows=(3, 3))


@runs
def test_segment_starts_read_heads_minor_operands_in_place():
    """Heads-minor a and b (``sequences``): (B, S, NH·D), each run of chunks read in place from its head's window of
    columns (``Rows``): the same entry states, bit for bit, as from the (B·NH, S, D) rows, forward and in reverse."""
    a, b, gain, decay, x0 = scan_inputs(41, jnp.bfloat16, 6, 64)

    def minor(x):  # the BH = 2 rows as one sequence of two heads
        return x.reshape(1, BH, *x.shape[1:]).swapaxes(1, 2).reshape(1, x.shape[1], -1)

    for split, reverse in ((3, False), (2, True)):
        rows = segment_starts(a, b, gain, decay, x0, split, reverse=reverse, interpret=INTERPRET)
        got = segment_starts(
            minor(a), minor(b), gain, decay, x0, split, reverse=reverse, interpret=INTERPRET, sequences=(Rows(BH),) * 2
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(rows), np.asarray(got))


@runs
@pytest.mark.parametrize(("reverse", "consumers"), [(True, 2), (False, 1)])
def test_border_staged_before_the_product(reverse, consumers):
    """At DHA=256 with 64 columns per warpgroup the state and its accumulator would need 256 registers a thread
    side by side, so each border is staged at the end of the chunk before instead of during the product: every
    border and the last state still match the float64 loop."""
    DHA_WIDE, DHB_WIDE = 256, 64 * consumers
    args = scan_inputs(5 + consumers, jnp.bfloat16, NC, DHB_WIDE, DHA_WIDE)
    borders, last = mosaic_state_scan(
        *args, reverse=reverse, block_dhv=64, depth=2, consumers=consumers, interpret=INTERPRET
    )  # fmt: skip
    ref_borders, ref_last = reference(*args, reverse)
    tol = TOL["bfloat16/float32"]
    got = np.asarray(borders, np.float32).reshape(BH, NC, DHA_WIDE, DHB_WIDE)
    assert_close("borders", ref_borders, got, tol)
    assert_close("last state", ref_last, last, tol)


@pytest.mark.parametrize(
    ("reverse", "block_dhv", "consumers", "DHB"),
    [(False, 32, 1, 128), (True, 64, 1, 128), (True, 32, 2, 512), (True, 64, 2, 512)],
)
def test_lowers_for_cuda(reverse, block_dhv, consumers, DHB):
    """Tracing and Mosaic GPU lowering at the xLSTM-7B head shape (DHA=256; layouts, the operands' shared swizzle,
    the transposed a operand; with two warpgroups their shared and own tiles and barriers; the product accumulated
    onto the decayed state) succeed on any machine."""
    S, f32, A = 2 * CHUNK, jnp.float32, jax.ShapeDtypeStruct
    avals = (
        A((BH, S, 256), jnp.bfloat16), A((BH, S, DHB), jnp.bfloat16), A((BH, 2, CHUNK), f32), A((BH, 2), f32),
        A((BH, 256, DHB), f32),
    )  # fmt: skip
    step = functools.partial(mosaic_state_scan, reverse=reverse, block_dhv=block_dhv, consumers=consumers)
    text = jax.jit(step).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_run_chunks_keeps_two_waves_of_programs():
    """``run_chunks``: the longest power of two up to 64 dividing the segment, shortened while the runs' grid has
    fewer than 256 programs, never below 8 chunks, and never a size that does not divide the segment."""
    assert run_chunks(8, 4, 256, 8) == 64  # 1 x 65536, four segments: 768 programs
    assert run_chunks(16, 2, 256, 8) == 64  # 2 x 32768, two segments: 512
    assert run_chunks(8, 2, 64, 8) == 16  # 1 x 8192 (the 7B prefill), two segments: 256
    assert run_chunks(1, 2, 64, 8) == 8  # never below 8
    assert run_chunks(8, 2, 24, 8) == 8  # gcd(24, 64)
    assert run_chunks(8, 3, 3, 8) == 1  # segments of 3 chunks: runs of one
    for BH, split, per, cols in itertools.product((1, 8, 64), (2, 3, 4), (3, 48, 64, 96, 256, 512), (2, 8, 16)):
        size = run_chunks(BH, split, per, cols)
        assert per % size == 0 and 1 <= size <= 64


def test_last_state_alone_lowers_for_cuda():
    """The scan that sums the runs of a split scan's segments (``segment_starts``: 64 columns at DHA=256, from zeros,
    no borders, every other row read in place) lowers for CUDA on any machine."""
    S, f32, A = 2 * CHUNK, jnp.float32, jax.ShapeDtypeStruct
    avals = (A((4, S, 256), jnp.bfloat16), A((4, S, 512), jnp.bfloat16), A((4, 2, CHUNK), f32), A((4, 2), f32))
    for x_operand in X_OPERANDS:
        step = functools.partial(
            mosaic_state_scan, x0=None, reverse=False, block_dhv=64, borders=False, rows=(1, 2, 1),
            x_operand=x_operand,
        )  # fmt: skip
        text = jax.jit(step).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


def test_bad_inputs_raise():
    """Shapes and dtypes that do not fit raise ValueError naming the argument; state_scan_unsupported explains."""
    a, b, gain, decay, x0 = scan_inputs(0, jnp.bfloat16)
    scan = functools.partial(mosaic_state_scan, reverse=False, interpret=INTERPRET)
    with pytest.raises(ValueError, match="inputs must be bfloat16 or float16"):
        scan(a.astype(jnp.float32), b.astype(jnp.float32), gain, decay, x0)
    with pytest.raises(ValueError, match=r"b.dtype=float16 must equal a.dtype=bfloat16"):
        scan(a, b.astype(jnp.float16), gain, decay, x0)
    with pytest.raises(ValueError, match=r"a.shape=\(2, 190, 64\): the steps S=190 must be a positive multiple"):
        scan(a[:, :190], b[:, :190], gain, decay, x0)
    with pytest.raises(ValueError, match=r"a.shape=\(192, 64\) must have 3 axes"):
        scan(a[0], b, gain, decay, x0)
    with pytest.raises(ValueError, match=r"b.shape=\(1, 192, 64\) must be \(BH, S, DHB\) = \(2, 192, DHB\)"):
        scan(a, b[:1], gain, decay, x0)
    with pytest.raises(ValueError, match=r"gain.shape=\(2, 3, 32\) must be \(2, 3, 64\)"):
        scan(a, b, gain[..., :32], decay, x0)
    with pytest.raises(ValueError, match=r"decay.shape=\(2, 2\) must be \(2, 3\)"):
        scan(a, b, gain, decay[:, :2], x0)
    with pytest.raises(ValueError, match=r"x0.shape=\(2, 64, 32\) must be \(2, 64, 64\)"):
        scan(a, b, gain, decay, x0[..., :32])
    with pytest.raises(ValueError, match="gain.dtype=bfloat16 must be float32"):
        scan(a, b, gain.astype(jnp.bfloat16), decay, x0)
    with pytest.raises(ValueError, match=r"a.shape=\(2, 192, 32\).*DHA=32 must be a positive multiple of 64"):
        scan(a[..., :32], b, gain, decay, x0[:, :32])
    with pytest.raises(ValueError, match="block_dhv=48 must be 32 or 64 and divide DHB=64"):
        scan(a, b, gain, decay, x0, block_dhv=48)
    with pytest.raises(ValueError, match=r"DHB=64 must be a multiple of consumers \* block_dhv = 128"):
        scan(a, b, gain, decay, x0, block_dhv=64, consumers=2)
    with pytest.raises(ValueError, match="consumers=3 must be 1 or 2"):
        scan(a, b, gain, decay, x0, consumers=3)
    with pytest.raises(ValueError, match=r'x_operand="registers" takes borders=False'):
        scan(a, b, gain, decay, x0, block_dhv=64, x_operand="registers")
    with pytest.raises(ValueError, match=r'x_operand="registers" takes block_dhv=64 .*got 32'):
        scan(a, b, gain, decay, x0, block_dhv=32, borders=False, x_operand="registers")
    with pytest.raises(ValueError, match=r"x_operand='tile' must be one of \('shared', 'registers'\)"):
        scan(a, b, gain, decay, x0, borders=False, x_operand="tile")
    assert state_scan_unsupported(256, 512, jnp.bfloat16, 64, 2) is None
    assert state_scan_unsupported(96, 64, jnp.bfloat16, 32, 2) == "DHA=96 must be a positive multiple of 64"
    assert state_scan_unsupported(64, 96, jnp.bfloat16, 64, 2) == "block_dhv=64 must be 32 or 64 and divide DHB=96"
    assert (
        state_scan_unsupported(64, 64, jnp.bfloat16, 32, 0) == "depth=0 must be a positive integer (chunks in flight)"
    )
    assert "float32" in state_scan_unsupported(64, 64, jnp.float32, 32, 2)
    assert state_scan_shared_memory_bytes(256, jnp.bfloat16, 32) == 92.5 * 1024  # the module docstring's budget
    # With the gated operand in registers: no gated tile and no borders' tile (the docstring's 80.5 KiB at 64 columns)
    assert state_scan_shared_memory_bytes(256, jnp.bfloat16, 64, x_operand="registers") == 80.5 * 1024
    too_big = state_scan_unsupported(256, 512, jnp.bfloat16, 64, 5)
    assert too_big is not None and "241.25 KiB of shared memory" in too_big and "227 KiB" in too_big
    assert state_scan_unsupported(256, 512, jnp.bfloat16, 32, 2, consumers=2) is None
    assert state_scan_shared_memory_bytes(256, jnp.bfloat16, 32, consumers=2) == 120.5 * 1024  # the docstring's
    # Two warpgroups, block_dhv=64, depth 1: the two float32 tiles of X in and out outweigh the chunk loop's tiles.
    assert state_scan_shared_memory_bytes(320, jnp.bfloat16, 64, 1, consumers=2) == 2 * 320 * 64 * 4
    too_big = state_scan_unsupported(256, 512, jnp.bfloat16, 64, 3, consumers=2)
    assert too_big is not None and "224.75 KiB of shared memory" in too_big and "consumers=2" in too_big


@pytest.mark.skipif(mosaic_interpret_params() is None, reason="needs a JAX with Mosaic GPU's interpreter")
def test_interpret_mode_needs_a_pool_thread_per_warpgroup_and_one_more(monkeypatch):
    """Two warpgroups on an XLA CPU pool of two threads can deadlock in the interpreter: a clear error instead,
    naming the fix; one warpgroup runs inline and needs no pool thread."""
    args = scan_inputs(3, jnp.bfloat16, NC, 128)
    monkeypatch.setenv("NPROC", "2")
    assert interpreter_threads() == 2
    with pytest.raises(
        RuntimeError, match=r"2 threads needs at least 3 threads in XLA's CPU pool, which has 2: set NPROC=3"
    ):
        mosaic_state_scan(*args, reverse=False, consumers=2, interpret=True)
    assert require_mosaic_interpreter(1) is not None
    monkeypatch.setenv("NPROC", "3")
    assert require_mosaic_interpreter(2) is not None
    monkeypatch.delenv("NPROC")
    assert interpreter_threads() == len(os.sched_getaffinity(0))  # the CPUs this process may run on (Linux)
