"""Packed documents (``segment_ids``) in every sequence form: each document computed as if run alone.

The reference is the definition itself: every document of a row run alone through the float64 recurrence
(``tests.reference.documents_ref``), the row's first one from the initial states, the others from zeros; the
last states are those of the row's last document. The layouts put documents of length 1 on and off chunk
borders, documents that end on a border, fill a chunk exactly or cross several borders (chunkwise with chunks
of 4; the kernel with blocks of 16 and a tail of single steps).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import INTERPRET
from tests.mlstm.form_checks import check_forward, check_gradients, random_inputs, reference_gradients
from tests.numerics import TOL, assert_close
from tests.reference import documents_ref, recurrent_ref
from xlstm_jax.kernels import SequenceKernelConfig, recurrent_sequence_pallas
from xlstm_jax.mlstm.chunkwise import chunkwise_fw
from xlstm_jax.mlstm.parallel import parallel_stabilized_fw
from xlstm_jax.mlstm.recurrent import recurrent_sequence_segments_fw
from xlstm_jax.mlstm.segments import document_starts

CHUNK = 4
XLA_FORMS = {
    "recurrent-scan": functools.partial(recurrent_sequence_segments_fw, use_scan=True),
    "recurrent-loop": recurrent_sequence_segments_fw,
    "parallel": parallel_stabilized_fw,
    "chunkwise": functools.partial(chunkwise_fw, chunk_size=CHUNK),
}
PALLAS = functools.partial(
    recurrent_sequence_pallas, config=SequenceKernelConfig(block_dhv=16, chunk_size=16), interpret=INTERPRET
)


def _ids(lengths: list[int], labels: list[int] | None = None) -> list[int]:
    """A row of document ids from document lengths (labels: the ids, only their changes matter)."""
    labels = labels if labels is not None else list(range(len(lengths)))
    return [label for label, length in zip(labels, lengths, strict=True) for _ in range(length)]


# S = 23, chunks of 4: row 0 has a document of 1 at the start, one ending on a border, one filling chunk 1
# exactly, one of 1 on a border, one crossing two borders and a last one crossing one; row 1 has two documents
# of 1 inside a chunk and a long last one; ids repeat non-adjacently (only changes start a document).
XLA_SEGMENTS = np.array([_ids([1, 3, 4, 1, 9, 5]), _ids([6, 1, 1, 15], [5, 3, 5, 2])])
# S = 37, blocks of 16 and 5 single steps: a document ending on the block border, one filling block 1, one of 1
# at the first single step; row 1: documents crossing the block border and running into the single steps.
KERNEL_SEGMENTS = np.array([_ids([1, 15, 16, 1, 4]), _ids([10, 1, 20, 6])])


def _packed_inputs(seed: int, segment_ids: np.ndarray, NH: int, DHQK: int, DHV: int, states: bool) -> dict:
    """Random inputs with extreme input gates, where head 0 of each document start has an input gate (-30) below
    its log forget gate (so that the start's running max ``logsigmoid(f)`` differs from ``i``), and a reset
    (f = -inf) inside one document and on one document start."""
    B, S = segment_ids.shape
    x = random_inputs(seed, B, NH, S, DHQK, DHV, states=states, igate="extreme")
    starts = np.asarray(document_starts(jnp.asarray(segment_ids)))
    b, t = np.nonzero(starts)
    x["i"][b, 0, t] = -30.0
    x["f"][b, 0, t] = np.abs(x["f"][b, 0, t])  # logsigmoid(f) > -0.7 > i
    x["f"][0, NH - 1, (t[b == 0][-1] + S) // 2] = -np.inf  # inside row 0's last document
    x["f"][1, NH - 1, t[b == 1][0]] = -np.inf  # on row 1's first start
    return x


def test_reference_resets_equal_documents_alone():
    """The float64 reference with segment ids (states zeroed at each start) is the documents run alone."""
    x = _packed_inputs(0, XLA_SEGMENTS, 2, 3, 5, states=True)
    args = [x[name] for name in ("q", "k", "v", "i", "f", "c0", "n0", "m0")]
    h, last, scale = recurrent_ref(*args, segment_ids=XLA_SEGMENTS)
    h_alone, last_alone, _ = documents_ref(*args, segment_ids=XLA_SEGMENTS)
    assert_close("h", h_alone, h, TOL["float64"], scale=scale)
    for name, a, b in zip("cnm", last_alone, last, strict=True):
        assert_close(f"{name} (last state)", a, b, TOL["float64"])
    # Not the same as a forget gate of -inf at the starts: that starts from m' = i, not max(logsigmoid(f), i).
    starts = np.asarray(document_starts(jnp.asarray(XLA_SEGMENTS)))[:, None, :]
    f_reset = np.where(starts, -np.inf, x["f"])
    h_reset, _, _ = recurrent_ref(*args[:4], f_reset, *args[5:])
    # The difference is of the order of eps (1e-6 of h), far above the float64 tolerance the forms are held to.
    assert np.max(np.abs(h_reset - h) / scale) > 1e2 * TOL["float64"].max_err


# The unrolled loop shares the scan's step (and compiles slowly): one case, eager.
XLA_CASES = [
    (form, *case) for form in XLA_FORMS if form != "recurrent-loop" for case in (("float64", True), ("float32", False))
]


@pytest.mark.parametrize(("form", "dtype", "states"), [*XLA_CASES, ("recurrent-loop", "float64", True)])
def test_xla_forms_match_documents_alone(form, dtype, states):
    """h and the last states of every XLA form on packed rows equal the documents run alone."""
    x = _packed_inputs(1 + states, XLA_SEGMENTS, 2, 3, 5, states=states)
    check_forward(XLA_FORMS[form], x, dtype, jit=form != "recurrent-loop", segment_ids=XLA_SEGMENTS)


@pytest.mark.parametrize(("dtype", "states"), [("float32", True), ("bfloat16", False)])
def test_kernel_matches_documents_alone(dtype, states):
    """The fused sequence kernel: documents that start inside a closed-form block, on its border and in the
    single steps after the blocks."""
    x = _packed_inputs(3 + states, KERNEL_SEGMENTS, 2, 16, 16, states=states)
    check_forward(PALLAS, x, dtype, segment_ids=KERNEL_SEGMENTS)


# Gradients: one row of S = 17 with documents of 1, 3 (ending on a chunk border), 4 (filling a chunk), 5
# (crossing a border), 3 (ending on a border) and 1 (the chunk after it): for the kernel (blocks of 16) five
# starts inside its block and one at the single step after it. One set of finite differences serves every form.
GRAD_SEGMENTS = np.array([_ids([1, 3, 4, 5, 3, 1])])


@functools.cache
def _gradient_case() -> tuple[dict, tuple]:
    x = _packed_inputs(7, np.concatenate([GRAD_SEGMENTS, GRAD_SEGMENTS]), 1, 16, 16, states=True)
    x = {name: value[:1] for name, value in x.items()}
    x["f"][np.isinf(x["f"])] = 4.0  # finite differences need finite gates; the resets have their own tests
    return x, reference_gradients(x, segment_ids=GRAD_SEGMENTS)


@pytest.mark.parametrize("form", ["recurrent-scan", "parallel", "chunkwise", "pallas"])
def test_gradients(form):
    """jax.vjp of every form on packed rows against central differences of the float64 reference: every input's
    gradient, the initial states' included; float64 for the XLA forms, float32 for the kernel's custom_vjp
    (backward by the chunkwise form)."""
    x, reference = _gradient_case()
    fn, dtype = (PALLAS, "float32") if form == "pallas" else (XLA_FORMS[form], "float64")
    check_gradients(fn, x, dtype, segment_ids=GRAD_SEGMENTS, reference=reference)


@pytest.mark.parametrize("form", [*XLA_FORMS.values(), PALLAS])
def test_segment_ids_errors(form):
    x = random_inputs(0, 2, 1, 5, 16, 16)
    args = [jnp.asarray(x[name], jnp.float32) for name in ("q", "k", "v", "i", "f")]
    with pytest.raises(ValueError, match=r"segment_ids.shape=\(2, 4\) must be \(B, S\)=\(2, 5\)"):
        form(*args, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        form(*args, segment_ids=jnp.zeros((2, 5), jnp.float32))
