"""The chunkwise Mosaic GPU kernel (``chunkwise_mosaic_fw``) against the float64 reference.

On a Hopper GPU the kernel runs compiled; elsewhere it runs in Mosaic GPU's interpreter (where this JAX has one)
on the same cases, and its CUDA lowering (layouts, swizzles, shared memory) is checked on the CPU. Cases: odd S
(padding inside), S below one chunk, several chunks, initial states, extreme and closed gates, resets, packed
documents on and across chunk borders, both column tilings, one and two warpgroups per program; gradients (the
XLA form's backward, and the Mosaic GPU backward kernels with ``backward="mosaic"``) through the custom_vjp; the
errors for what the kernel does not run.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import ON_GPU
from tests.mlstm.form_checks import check_forward, random_inputs
from tests.numerics import TOL, assert_close
from xlstm_jax.generation import prefill
from xlstm_jax.kernels.chunkwise_mosaic import (
    CHUNK,
    IN_KERNEL_SCORES_MAX_CHUNKS,
    SCORES,
    SPLIT_MIN_CHUNKS,
    auto_consumers,
    auto_depth,
    auto_scores,
    auto_split,
    auto_tiling,
    chunkwise_mosaic_fw,
    chunkwise_mosaic_unsupported,
    forward_tiling,
    mosaic_chunkwise,
    shared_memory_bytes,
)
from xlstm_jax.kernels.chunkwise_mosaic_bw import backward_block_dhv, chunkwise_split_fw, mosaic_backward_unsupported
from xlstm_jax.kernels.chunkwise_mosaic_grads import chunk_gradients_unsupported
from xlstm_jax.kernels.chunkwise_mosaic_scan import state_scan_unsupported
from xlstm_jax.kernels.mosaic import HeadColumns, mosaic_interpret_params
from xlstm_jax.kernels.recurrent_step_mosaic import device_supports_mosaic
from xlstm_jax.mlstm.chunkwise import chunkwise_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import create_mlstm_backend
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig
from xlstm_jax.training.init import init_params
from xlstm_jax.training.optim import OptimizerConfig, make_optimizer
from xlstm_jax.training.step import create_train_state, make_train_step, model_loss

ON_HOPPER = ON_GPU and device_supports_mosaic()
INTERPRET = not ON_HOPPER
runs = pytest.mark.skipif(
    INTERPRET and mosaic_interpret_params() is None,
    reason="needs a Hopper GPU or a JAX with Mosaic GPU's interpreter",
)


def kernel(block_dhv: int = 32, consumers: int = 1, scores: str = "in_kernel"):
    return functools.partial(
        chunkwise_mosaic_fw, block_dhv=block_dhv, consumers=consumers, interpret=INTERPRET, scores=scores
    )  # fmt: skip


# (B, NH, S, DHQK, DHV, initial states, forget gates, input gates, block_dhv, consumers)
CASES = [
    (1, 2, 100, 64, 64, False, "mixed", "wide", 32, 1),  # two chunks, the second padded
    (2, 1, 150, 64, 128, True, "mixed", "extreme", 64, 1),  # three chunks, initial states, input gates of ±50
    (1, 1, 37, 128, 64, True, "closed", "wide", 32, 1),  # shorter than one chunk
    (1, 1, 64, 64, 32, True, "open", "extreme", 32, 1),  # exactly one chunk, long memory
    (1, 1, 200, 64, 64, True, "mixed", "extreme", 32, 2),  # two warpgroups, four chunks (slots refilled)
]
CASE_IDS = ["two-chunks", "states-extreme", "short", "one-chunk-open", "two-wg-states-extreme"]
CASE_ARGS = ("B", "NH", "S", "DHQK", "DHV", "states", "fgate", "igate", "block_dhv", "consumers")


SCORES_ARGS = pytest.mark.parametrize("scores", SCORES)


# Clusters (compiled only): (B, NH, S, DHQK, DHV, initial states, forget gates, input gates, block_dhv, consumers,
# cluster, scores); every case refills its pipeline slots (more chunks than depth) and has several clusters.
CLUSTER_CASES = [
    (2, 1, 200, 64, 128, True, "mixed", "extreme", 32, 1, 2, "kernel"),
    (1, 2, 150, 64, 128, True, "mixed", "extreme", 32, 1, 4, "precomputed"),
    (1, 2, 200, 64, 256, False, "mixed", "wide", 64, 2, 2, "in_kernel"),
]
on_hopper_only = pytest.mark.skipif(
    not ON_HOPPER, reason="clusters run compiled only (Mosaic GPU's interpreter has no cluster barriers)"
)


@on_hopper_only
@pytest.mark.parametrize(
    ("B", "NH", "S", "DHQK", "DHV", "states", "fgate", "igate", "block_dhv", "consumers", "cluster", "scores"),
    CLUSTER_CASES,
    ids=["cluster2-scores-kernel", "cluster4-precomputed", "cluster2-two-wg-in-kernel"],
)
def test_clusters_match_reference(B, NH, S, DHQK, DHV, states, fgate, igate, block_dhv, consumers, cluster, scores):
    """Programs in clusters that share the q, k, plan and P tiles by TMA multicast: h and the last states against
    the float64 recurrence, and h equal to the same kernel's without clusters (the same products, bit for bit)."""
    x = random_inputs(S + DHV + cluster, B, NH, S, DHQK, DHV, states=states, fgate=fgate, igate=igate)
    form = functools.partial(kernel(block_dhv, consumers, scores), cluster=cluster)
    check_forward(form, x, "bfloat16")
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v", "i", "f")]
    alone = jax.jit(functools.partial(kernel(block_dhv, consumers, scores), cluster=1))(*args)
    np.testing.assert_array_equal(np.asarray(jax.jit(form)(*args), np.float32), np.asarray(alone, np.float32))


@runs
@SCORES_ARGS
@pytest.mark.parametrize(CASE_ARGS, CASES, ids=CASE_IDS)
def test_matches_reference(B, NH, S, DHQK, DHV, states, fgate, igate, block_dhv, consumers, scores):
    """h and the last states (c from the kernel, n and m from the gate plan) against the float64 recurrence, with
    the chunks' scores computed in the kernel and precomputed."""
    x = random_inputs(S + DHV, B, NH, S, DHQK, DHV, states=states, fgate=fgate, igate=igate)
    check_forward(kernel(block_dhv, consumers, scores), x, "bfloat16")


@runs
@SCORES_ARGS
def test_head_size_512_with_one_chunk_in_flight(scores):
    """DHQK=512 (the largest head the issue asks for) fits a Hopper block only with one chunk in flight (depth=1:
    q and k alone are 128 KiB per slot); against the float64 recurrence, with initial states and extreme gates."""
    assert chunkwise_mosaic_unsupported(512, 64, jnp.bfloat16, 32, scores=scores) is not None  # depth=2
    assert chunkwise_mosaic_unsupported(512, 64, jnp.bfloat16, 32, depth=1, scores=scores) is None
    assert auto_depth(512, 64, jnp.bfloat16, 32, scores=scores) == 1  # depth=None
    assert auto_depth(256, 512, jnp.bfloat16, 32, scores=scores) == 2
    x = random_inputs(17, 1, 1, 100, 512, 64, states=True, igate="extreme")
    check_forward(kernel(scores=scores), x, "bfloat16")


def test_backend_runs_the_kernel_at_head_size_512():
    """The backend's defaults run the kernel at DHQK=512 (one chunk in flight), not the XLA form."""
    x = random_inputs(4, 1, 2, 100, 512, 64)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")]
    args += [jnp.asarray(x[name], jnp.float32) for name in ("i", "f")]
    jaxpr = str(jax.make_jaxpr(create_mlstm_backend("chunkwise_mosaic", interpret=True))(*args))
    assert "mlstm_chunkwise_mosaic" in jaxpr


@runs
@SCORES_ARGS
def test_resets(scores):
    """Forget gates of -inf empty the state: in a chunk's first step, inside a chunk and in its last step."""
    x = random_inputs(5, 1, 2, 130, 64, 32, states=True)
    x["f"][0, 0, [CHUNK, 90, 2 * CHUNK - 1]] = -np.inf
    x["f"][0, 1, 3] = -np.inf
    check_forward(kernel(scores=scores), x, "bfloat16")


def _ids(lengths: list[int]) -> list[int]:
    return [n for n, length in enumerate(lengths) for _ in range(length)]


# S = 150, chunks of 64: row 0 has a document of 1 at the start, one ending on the first border, one filling
# chunk 1 exactly, one of 1 on the second border and one crossing into the padded tail; row 1 has documents
# crossing borders and two of 1 inside a chunk.
SEGMENTS = np.array([_ids([1, 63, 64, 1, 21]), _ids([70, 1, 1, 78])])


@runs
@pytest.mark.parametrize(
    ("states", "consumers", "scores"),
    [(True, 1, "in_kernel"), (False, 1, "in_kernel"), (True, 2, "in_kernel"), (True, 2, "precomputed")],
    ids=["states", "zeros", "two-wg", "two-wg-precomputed"],
)
def test_packed_documents(states, consumers, scores):
    """Each document as if run alone (the reference runs them one by one), with a reset inside one of them."""
    x = random_inputs(11 + states, 2, 2, 150, 64, 32 * consumers, states=states, igate="extreme")
    x["f"][1, 1, 100] = -np.inf
    check_forward(kernel(consumers=consumers, scores=scores), x, "bfloat16", segment_ids=SEGMENTS)


# Segments (``split``): (B, NH, S, DHQK, DHV, initial states, forget gates, input gates, block_dhv, consumers, split,
# scores). SPLIT_SEGMENTS (S=300) starts row 0's documents on the borders of segments of one chunk, row 1's inside.
SPLIT_CASES = [
    (1, 2, 256, 64, 64, True, "mixed", "extreme", 32, 1, 2, "kernel"),  # two segments of two chunks, initial states
    (2, 1, 300, 64, 64, False, "open", "wide", 32, 1, 5, "precomputed"),  # five segments of one chunk, the last padded
    (1, 1, 256, 64, 128, True, "mixed", "extreme", 64, 2, 4, "in_kernel"),  # two warpgroups
]
SPLIT_SEGMENTS = np.array([_ids([64, 64, 100, 72]), _ids([10, 100, 1, 189])])


@runs
@pytest.mark.parametrize(
    ("B", "NH", "S", "DHQK", "DHV", "states", "fgate", "igate", "block_dhv", "consumers", "split", "scores"),
    SPLIT_CASES,
    ids=["two-segments-states", "five-segments-padded", "two-wg-four-segments"],
)
def test_split_matches_reference(B, NH, S, DHQK, DHV, states, fgate, igate, block_dhv, consumers, split, scores):
    """Each head's chunks cut into ``split`` segments that the kernel runs side by side from the states before them
    (``segment_starts``): h and the last states against the float64 recurrence; with resets on a segment border and
    inside a segment, and with packed documents that start on segment borders and inside segments."""
    form = functools.partial(kernel(block_dhv, consumers, scores), split=split)
    x = random_inputs(S + split, B, NH, S, DHQK, DHV, states=states, fgate=fgate, igate=igate)
    check_forward(form, x, "bfloat16")
    x["f"][0, 0, [S // split // CHUNK * CHUNK, 90]] = -np.inf  # on the second segment's first step, and inside one
    check_forward(form, x, "bfloat16")
    if B == 2:  # documents of 64, 64, 100, 72 and of 10, 100, 1, 189 steps: starts on borders of segments and inside
        check_forward(form, x, "bfloat16", segment_ids=SPLIT_SEGMENTS)


def heads_minor(fused: bool = False, **settings):
    """``chunkwise_mosaic_fw(layout="BSND")`` behind the documented (B, NH, S, D) signature: the transposes are the
    test's, so the kernels read q, k, v and write h heads-minor, (B, S, NH, D). ``fused``: q, k and v as
    ``HeadColumns`` blocks of one (B, S, W) array, with an unread block of 32 columns before each (a fused
    projection's output, as the layer passes it)."""
    fw = functools.partial(chunkwise_mosaic_fw, interpret=INTERPRET, layout="BSND", **settings)

    def form(q, k, v, i, f, *states, return_last_states=False, **kwargs):
        swap = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
        q, k, v = swap(q), swap(k), swap(v)
        if fused:
            (B, S, NH, _), gap = q.shape, jnp.full((*q.shape[:2], 32), jnp.nan, q.dtype)
            blocks = [part for t in (q, k, v) for part in (gap, t.reshape(B, S, -1))]
            array, starts = jnp.concatenate(blocks, axis=-1), np.cumsum([0] + [b.shape[-1] for b in blocks])
            q, k, v = (HeadColumns(array, int(starts[2 * n + 1]), NH, t.shape[-1]) for n, t in enumerate((q, k, v)))
        out = fw(q, k, v, i, f, *states, return_last_states=return_last_states, **kwargs)
        return (swap(out[0]), out[1]) if return_last_states else swap(out)

    return form


# Heads-minor operands: (B, NH, S, DHQK, DHV, initial states, packed documents, the kernel's settings). At B=1 with
# the scores kernel the keys' sums kernel, the scores kernel and the segments' scan read k (and q, v) in place and
# XLA reads none of them: those cases equal the heads-major call bit for bit. Elsewhere XLA's gate plan reads q or k
# through a transposed view, whose sums a GPU may order otherwise.
HEADS_MINOR_CASES = [
    (1, 2, 256, 64, 64, True, False, {"fused": True, "scores": "kernel", "split": 2, "block_dhv": 32}),
    (2, 2, 150, 64, 64, False, True, {"scores": "kernel"}),  # padded, documents, the gate plan in XLA
    (1, 2, 150, 64, 64, True, False, {"fused": True, "scores": "precomputed", "block_dhv": 32}),  # padded
    (1, 2, 130, 64, 64, True, False, {"scores": "in_kernel", "consumers": 2, "block_dhv": 32}),
    (1, 2, 128, 64, 128, True, False, {"scores": "kernel", "block_dhv": 64, "c_operand": "registers"}),
]


@runs
@pytest.mark.parametrize(
    ("B", "NH", "S", "DHQK", "DHV", "states", "documents", "settings"),
    HEADS_MINOR_CASES,
    ids=["fused-key-sums-split", "padded-documents", "fused-precomputed-padded", "two-wg-in-kernel", "registers"],
)
def test_heads_minor_layout(B, NH, S, DHQK, DHV, states, documents, settings):
    """``layout="BSND"``: h and the last states against the float64 recurrence, with q, k and v as arrays and as
    blocks of one wider array's columns (``HeadColumns``, NaN between them: a read outside a block shows); where only
    the kernels read q, k and v (batch 1, the scores kernel), equal bit for bit to the heads-major call's (the same
    kernels on the same tiles, read and written in place)."""
    x = random_inputs(S + DHV + B, B, NH, S, DHQK, DHV, states=states, igate="extreme")
    segment_ids = SEGMENTS if documents else None
    check_forward(heads_minor(**settings), x, "bfloat16", segment_ids=segment_ids)
    if B > 1 or settings["scores"] != "kernel":
        return
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")]
    args += [jnp.asarray(x[name], jnp.float32) for name in ("i", "f", "c0", "n0", "m0") if name in x]
    kernel_settings = {name: value for name, value in settings.items() if name != "fused"}
    major = functools.partial(chunkwise_mosaic_fw, interpret=INTERPRET, return_last_states=True, **kernel_settings)
    major = jax.jit(major)
    minor = jax.jit(functools.partial(heads_minor(**settings), return_last_states=True))
    for a, b in zip(jax.tree.leaves(major(*args)), jax.tree.leaves(minor(*args)), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@runs
def test_heads_minor_gradients_are_the_heads_major_ones():
    """Under differentiation ``layout="BSND"`` runs the heads-major form on transposed views (here its XLA
    backward, ``backward="xla"``; the Mosaic GPU one has its own tests): every gradient, the initial states' included,
    equals the heads-major call's within twice the bf16 gradient bound (XLA may fuse the transposes into other
    sums), and is finite."""
    x = random_inputs(5, 1, 2, 128, 64, 64, states=True)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")]
    args += [jnp.asarray(x[name], jnp.float32) for name in ("i", "f", "c0", "n0", "m0")]
    settings = {"scores": "kernel", "split": 2, "block_dhv": 32, "backward": "xla"}

    def grads(form):
        def loss(*args):
            h, (c, n, m) = form(*args, return_last_states=True)
            h = h.astype(jnp.float32)
            return jnp.sum(h * jnp.cos(h)) + jnp.sum(c * c) + jnp.sum(n) + jnp.sum(m)

        return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)

    major = grads(functools.partial(chunkwise_mosaic_fw, interpret=INTERPRET, **settings))
    minor = grads(heads_minor(**settings))
    bound = 2 * TOL["bfloat16-grad"].max_err
    for name, a, b in zip(("q", "k", "v", "i", "f", "c0", "n0", "m0"), major, minor, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.isfinite(b).all() and np.max(np.abs(a - b)) <= bound * np.max(np.abs(a)), name


def test_heads_minor_errors():
    """A layout other than BNSD or BSND, heads-minor q, k, v that disagree on (B, S, NH), and a ``HeadColumns``
    block outside its array raise ValueError naming the shapes; a block's value is its columns, one head after
    another, and it is a pytree of its array."""
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    i = jnp.zeros((1, 2, 128), jnp.float32)
    with pytest.raises(ValueError, match=r"layout='BHSD' must be one of \('BNSD', 'BSND'\)"):
        chunkwise_mosaic_fw(q, q, q, i, i, layout="BHSD")
    with pytest.raises(ValueError, match=r"k.shape=\(1, 128, 1, 64\)"):
        chunkwise_mosaic_fw(q, q[:, :, :1], q, i, i, layout="BSND")
    array = jnp.arange(2 * 3 * 10, dtype=jnp.float32).reshape(2, 3, 10)
    block = HeadColumns(array, 2, 2, 3)  # columns 2 to 8: two heads of three
    assert block.shape == (2, 3, 2, 3) and block.dtype == jnp.float32
    np.testing.assert_array_equal(block.value(), np.asarray(array)[..., 2:8].reshape(2, 3, 2, 3))
    leaves, tree = jax.tree.flatten(block)
    assert leaves == [array] and jax.tree.unflatten(tree, leaves).rows() == block.rows()
    with pytest.raises(ValueError, match=r"columns 6 to 6 \+ 2 \* 3 must lie within .* array.shape=\(2, 3, 10\)"):
        HeadColumns(array, 6, 2, 3)


def test_heads_minor_lowers_for_cuda():
    """The heads-minor forward at the xLSTM-7B head shape, batch 1 (the keys' sums kernel, the scores kernel, the
    segments' scan and the chunk kernel, each reading its head's window of columns), lowers for CUDA on any
    machine, with no transpose of q, k or v in the program (nothing bf16 is transposed or sliced): the kernels take
    them as they come; and from one fused (B, S, 2 QK + 2 V) array through ``HeadColumns`` blocks, unsliced."""
    B, NH, S, DHQK, DHV, A = 1, 2, 16 * CHUNK, 256, 128, jax.ShapeDtypeStruct
    QK, V = NH * DHQK, NH * DHV
    gates = [A((B, NH, S), jnp.float32)] * 2
    fw = functools.partial(chunkwise_mosaic_fw, layout="BSND", scores="kernel", split=2, block_dhv=64)

    def fused(qkvo, i, f):
        q, k = HeadColumns(qkvo, 0, NH, DHQK), HeadColumns(qkvo, QK, NH, DHQK)
        return fw(q, k, HeadColumns(qkvo, 2 * QK, NH, DHV), i, f)

    kernels = (
        "mlstm_key_sums_mosaic",
        "mlstm_chunk_scores_mosaic",
        "mlstm_state_scan_mosaic",
        "mlstm_chunkwise_mosaic",
    )
    for call, avals in [
        (fw, [A((B, S, NH, DHQK), jnp.bfloat16)] * 2 + [A((B, S, NH, DHV), jnp.bfloat16), *gates]),
        (fused, [A((B, S, 2 * QK + 2 * V), jnp.bfloat16), *gates]),
    ]:
        jaxpr = str(jax.make_jaxpr(call)(*avals))
        assert all(name in jaxpr for name in kernels)
        text = jax.jit(call).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
        copies = [
            line for line in text.splitlines() if "bf16" in line and re.search(r"stablehlo\.(transpose|slice)", line)
        ]
        assert "mosaic_gpu" in text and not copies, copies[:3]


def test_auto_split_fills_the_gpu_with_a_few_heads():
    """split=None: the smallest power of two that gives a full wave of programs (128), in segments of at least
    SPLIT_MIN_CHUNKS chunks; 1 where the grid fills the GPU already, and with the scores in the kernel."""
    assert auto_split(8, 128, 512) == 2  # xLSTM-7B at batch 1, 8192 steps: 64 programs of 64 columns, then 128
    assert auto_split(8, 1024, 512) == 2
    assert auto_split(1, 1024, 512) == 16  # one head: 8 programs
    assert auto_split(1, 1024, 512, 32, 1) == 8
    assert auto_split(64, 1024, 512) == 1  # B=8, NH=8: 512 programs
    assert auto_split(8, 2 * SPLIT_MIN_CHUNKS - 1, 512) == 1  # an odd number of chunks
    assert auto_split(8, SPLIT_MIN_CHUNKS, 512) == 1  # segments would be too short
    assert auto_split(1, 4 * SPLIT_MIN_CHUNKS, 512) == 4
    tiling = forward_tiling(8, 8192, 256, 512, jnp.bfloat16, "kernel")
    assert (tiling.split, tiling.block_dhv, tiling.consumers) == (2, 64, 1)  # the wide tiling, for 16 sequences
    assert forward_tiling(8, 8192, 256, 512, jnp.bfloat16, "in_kernel").split == 1
    assert forward_tiling(8, 8192, 256, 512, jnp.bfloat16, "kernel", block_dhv=32).split == 1  # 128 programs
    assert forward_tiling(8, 4096, 256, 512, jnp.bfloat16, "kernel").block_dhv == 32  # no split: 32 columns
    with pytest.raises(
        ValueError, match=r"split=3 must be None or a positive integer dividing the sequence's 2 chunks"
    ):
        forward_tiling(1, 100, 64, 64, jnp.bfloat16, "kernel", split=3)


def test_split_reaches_the_kernel_grid():
    """``split`` (the function's and the backend config's) runs each head's segments as rows of the kernel's grid;
    a configured split that does not divide a call's chunks runs unsplit; a split that is not a positive integer
    is an error."""
    x = random_inputs(6, 1, 2, 256, 64, 64)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")] + [jnp.asarray(x[n]) for n in "if"]

    def grid(form, *a) -> tuple[int, int]:
        text = str(jax.make_jaxpr(form)(*a))
        # the forward kernel's grid (the segments' state scan has one too)
        (found,) = re.findall(r"grid=\((\d+), (\d+)\)(?:(?!grid=).)*?name=mlstm_chunkwise_mosaic\b", text, re.S)
        return tuple(map(int, found))

    fw = functools.partial(chunkwise_mosaic_fw, block_dhv=32, scores="kernel", interpret=True)
    assert grid(fw, *args) == (2, 2)
    assert grid(functools.partial(fw, split=4), *args) == (8, 2)
    backend = functools.partial(create_mlstm_backend, "chunkwise_mosaic", interpret=True, block_dhv=32, scores="kernel")
    assert grid(backend(split=2), *args) == (4, 2)
    assert grid(backend(split=3), *args) == (2, 2)  # 4 chunks: unsplit
    assert create_mlstm_backend("chunkwise_mosaic").config.split is None
    with pytest.raises(ValueError, match=r"split must be None or a positive integer \(segments per head\), got 0"):
        create_mlstm_backend("chunkwise_mosaic", split=0)
    with pytest.raises(ValueError, match=r"split=3 must be None or a positive integer dividing the sequence's 4"):
        fw(*args, split=3)


def _kernel_outputs(closed: jax.extend.core.ClosedJaxpr, name: str) -> list[tuple[int, ...]]:
    """The output shapes of the first Pallas kernel called ``name`` in a jaxpr, searched through its sub-jaxprs."""

    def search(jaxpr):
        for eqn in jaxpr.eqns:
            info = eqn.params.get("name_and_src_info")  # a pallas_call's; a kernel on a mesh (mpmd_map) has a name
            if name in (eqn.params.get("name"), getattr(info, "name", None)):
                return [tuple(var.aval.shape) for var in eqn.outvars]
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns") and (found := search(inner)) is not None:
                        return found
        return None

    found = search(closed.jaxpr)
    assert found is not None, f"no kernel {name} in the jaxpr"
    return found


def test_split_writes_h_in_the_heads_rows():
    """With segments the kernel writes h (BH, S, DHV), each head's segments one after another, as unsplit: XLA
    reads it without reshaping its rows. (Reshaped from (BH * split, S / split, DHV), h kept XLA from fusing the
    model's head norm and output gate into one kernel: compiled for an H200, three kernels and a float32 copy of h
    written and read again; BENCHMARKS.md.)"""
    x = random_inputs(6, 1, 2, 256, 64, 32)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")] + [jnp.asarray(x[n]) for n in "if"]
    fw = functools.partial(chunkwise_mosaic_fw, block_dhv=32, scores="kernel", interpret=True)
    for split in (1, 2, 4):
        h, *_ = _kernel_outputs(jax.make_jaxpr(functools.partial(fw, split=split))(*args), "mlstm_chunkwise_mosaic")
        assert h == (2, 256, 32), split


@runs
def test_gradients_are_the_xla_forms():
    """``backward="xla"``: under differentiation the XLA chunkwise form runs (at ``xla_chunk_size``): every
    input's gradient, the initial states' included, equals jax.vjp of that form on the same bf16 inputs, for
    cotangents on h and on all three last states; the forward values under jax.vjp are the XLA form's, and agree
    with the kernel's."""
    x = random_inputs(3, 1, 1, 80, 64, 32, states=True)
    names = ("q", "k", "v", "i", "f")
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in names] + [
        jnp.asarray(x[name], jnp.float32) for name in ("c0", "n0", "m0")
    ]
    ids = jnp.asarray(np.array([_ids([30, 50])]), jnp.int32)

    def outputs(form, *a):
        h, (c, n, m) = form(*a, return_last_states=True, segment_ids=ids)
        return h.astype(jnp.float32), c, n, m

    mosaic = functools.partial(outputs, functools.partial(kernel(), xla_chunk_size=16, backward="xla"))
    xla = functools.partial(outputs, functools.partial(chunkwise_fw, chunk_size=16))
    rng = np.random.default_rng(0)
    outs = mosaic(*args)
    cotangents = tuple(jnp.asarray(rng.standard_normal(o.shape), jnp.float32) for o in outs)
    grads = jax.jit(lambda *a: jax.vjp(mosaic, *a)[1](cotangents))(*args)
    expected = jax.jit(lambda *a: jax.vjp(xla, *a)[1](cotangents))(*args)
    for name, g, e in zip((*names, "c0", "n0", "m0"), grads, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(e, np.float32), err_msg=name)
    under_vjp = jax.jit(lambda *a: jax.vjp(mosaic, *a)[0])(*args)
    for name, a, b in zip("hcnm", under_vjp, jax.jit(xla)(*args), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    for name, a, b in zip("hcnm", under_vjp, jax.jit(mosaic)(*args), strict=True):  # kernel against XLA form
        scale = np.max(np.abs(np.asarray(b)))
        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= TOL["bfloat16/float32"].max_err * scale, name


@runs
def test_forward_without_states_starts_from_zeros_under_either_backward(monkeypatch):
    """A call with no initial states runs the kernel from zeros (no zero state written and read) whichever backward
    is set: with ``backward="xla"`` h and the last states match the float64 recurrence and equal the default
    backward's bit for bit, and neither hands the kernel a c0."""
    from xlstm_jax.kernels import chunkwise_mosaic

    given, original = [], chunkwise_mosaic.mosaic_chunkwise

    def spy(q, k, v, plan, decay, c0, **kwargs):
        given.append(c0 is None)
        return original(q, k, v, plan, decay, c0, **kwargs)

    monkeypatch.setattr(chunkwise_mosaic, "mosaic_chunkwise", spy)
    x = random_inputs(11, 1, 2, 150, 64, 64, states=False, igate="extreme")
    xla_backward = functools.partial(kernel(scores="kernel"), backward="xla")
    check_forward(xla_backward, x, "bfloat16")
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v", "i", "f")]
    got = jax.jit(functools.partial(xla_backward, return_last_states=True))(*args)
    want = jax.jit(functools.partial(kernel(scores="kernel"), return_last_states=True))(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert given and all(given)


def _grad_case(seed: int, B: int, NH: int, states: bool, segments: bool):
    """bf16 inputs (S = 150: three chunks, the last padded; DHQK = DHV = 64), float32 initial states, a reset."""
    x = random_inputs(seed, B, NH, 150, 64, 64, states=states, igate="extreme")
    x["f"][0, 0, [CHUNK, 90]] = -np.inf
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v", "i", "f")]
    if states:
        args += [jnp.asarray(x[name], jnp.float32) for name in ("c0", "n0", "m0")]
    ids = jnp.asarray(SEGMENTS[:B], jnp.int32) if segments else None
    return args, ids


def _outputs(form, ids, *a):
    states = a[5:] if len(a) > 5 else (None, None, None)
    h, (c, n, m) = form(*a[:5], *states, return_last_states=True, segment_ids=ids)
    return h.astype(jnp.promote_types(a[0].dtype, jnp.float32)), c, n, m


@runs
@pytest.mark.parametrize(
    ("states", "segments", "consumers", "scores", "scan_block", "cluster", "split"),
    [(True, True, 1, "in_kernel", None, 1, 1), (False, False, 1, "in_kernel", None, 1, 1),
     (True, True, 2, "in_kernel", None, 1, 1), (True, True, 2, "precomputed", 64, 1, 1),
     (True, True, 1, "kernel", None, 1, 1), (True, True, 1, "kernel", None, 1, 3),
     pytest.param(True, True, 1, "kernel", None, 2, 1, marks=on_hopper_only)],
    ids=["states-documents", "zeros", "two-wg-states-documents", "precomputed-scan64-states-documents",
         "scores-kernel-states-documents", "split3-scores-kernel-states-documents",
         "cluster2-scores-kernel-states-documents"],
)  # fmt: skip
def test_mosaic_backward_matches_float64(states, segments, consumers, scores, scan_block, cluster, split):
    """``backward="mosaic"``: the gradients of every input (q, k, v, i, f and the initial states) for random
    cotangents on h and on all three last states, against float64 autodiff of the same split with its
    hand-derived backward (``chunkwise_split_fw``, checked against the float64 reference's central differences in
    test_chunkwise_mosaic_bw.py) on the same bf16-rounded inputs; each gradient scaled by its largest element.
    Extreme input gates, a reset, packed documents across chunk borders, with and without initial states; the
    backward kernels with one and with two warpgroups per program; the forward's scores in the kernel,
    precomputed (which also gives the backward its h, border states and normaliser), with the reverse state scan
    on 64 columns per warpgroup, and from the scores kernel, with the forward's programs alone, in clusters of
    two, and in three segments of one chunk (the reset and a document start on segment borders)."""
    args, ids = _grad_case(13 + states, 2, 1, states, segments)
    if consumers == 2:  # both backward kernels do run two warpgroups at this shape (DHQK = DHV = 64)
        assert state_scan_unsupported(64, 64, jnp.bfloat16, 32, 2, consumers=2) is None
        assert chunk_gradients_unsupported(64, 64, jnp.bfloat16, 32, consumers=2) is None
    form = functools.partial(
        kernel(scores=scores), backward="mosaic", backward_consumers=consumers, backward_scan_block_dhv=scan_block,
        cluster=cluster, split=split,
    )  # fmt: skip
    mosaic = functools.partial(_outputs, form, ids)
    outs = jax.jit(mosaic)(*args)
    rng = np.random.default_rng(5)
    cotangents = tuple(jnp.asarray(rng.standard_normal(o.shape), jnp.float32) for o in outs)
    grads = jax.jit(lambda *a: jax.vjp(mosaic, *a)[1](cotangents))(*args)
    with jax.enable_x64(True):
        wide = [jnp.asarray(np.asarray(a, np.float32), jnp.float64) for a in args]
        split = functools.partial(_outputs, chunkwise_split_fw, None if ids is None else ids)
        expected = jax.jit(lambda *a: jax.vjp(split, *a)[1](tuple(c.astype(jnp.float64) for c in cotangents)))(*wide)
        expected = [np.asarray(e) for e in expected]
    names = ("q", "k", "v", "i", "f", "c0", "n0", "m0")
    for name, g, e in zip(names, grads, expected, strict=False):
        scale = None
        if name == "m0":  # dm0 sums <dc0, c0> + <dn0, n0>-sized terms that cancel: measured against their size
            c0, n0 = (np.asarray(a, np.float64) for a in args[5:7])
            scale = np.sum(np.abs(expected[5] * c0), axis=(-2, -1)) + np.sum(np.abs(expected[6] * n0), axis=-1)
        assert_close(f"d{name}", e, g, TOL["bfloat16-grad"], scale)


@pytest.mark.skipif(not ON_HOPPER, reason="a race shows only compiled, with many programs (a Hopper GPU)")
@SCORES_ARGS
def test_mosaic_backward_is_deterministic_at_scale(scores):
    """``backward="mosaic"`` at the xLSTM-7B head shape with hundreds of programs per kernel (B=2, NH=8, S=1024):
    two calls give the same gradients bit for bit, and every element is within twice the bf16 gradient bound of
    the XLA chunkwise form's bf16 gradients (each of the two errs by up to TOL["bfloat16-grad"])."""
    B, NH, S, DHQK, DHV = 2, 8, 1024, 256, 512
    keys = jax.random.split(jax.random.key(7), 6)
    q, k = (jax.random.normal(key, (B, NH, S, DHQK), jnp.bfloat16) for key in keys[:2])
    v = jax.random.normal(keys[2], (B, NH, S, DHV), jnp.bfloat16)
    i = jax.random.normal(keys[3], (B, NH, S), jnp.float32)
    f = 3.0 + jax.random.normal(keys[4], (B, NH, S), jnp.float32)
    ct = jax.random.normal(keys[5], (B, NH, S, DHV), jnp.float32)

    def grads(form):
        return jax.jit(jax.grad(lambda *a: jnp.sum(form(*a).astype(jnp.float32) * ct), argnums=(0, 1, 2, 3, 4)))

    mosaic = grads(functools.partial(chunkwise_mosaic_fw, backward="mosaic", scores=scores))
    first, second = mosaic(q, k, v, i, f), mosaic(q, k, v, i, f)
    expected = grads(functools.partial(chunkwise_fw, chunk_size=256))(q, k, v, i, f)
    bound = 2 * TOL["bfloat16-grad"].max_err
    for name, a, b, e in zip("qkvif", first, second, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"d{name} differs between two calls")
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert np.max(np.abs(a - e)) <= bound * np.max(np.abs(e)), f"d{name}"


def _kernels_in_gradient(DHQK: int, **kwargs) -> set[str]:
    """The Mosaic GPU kernels in the jaxpr of a gradient through ``chunkwise_mosaic_fw`` (traced, not run)."""
    x = random_inputs(1, 1, 1, 70, DHQK, 64)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")]
    args += [jnp.asarray(x[name], jnp.float32) for name in ("i", "f")]
    form = functools.partial(chunkwise_mosaic_fw, interpret=True, **kwargs)
    jaxpr = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(form(*a).astype(jnp.float32)), argnums=(0, 1, 2)))(*args)
    names = ("mlstm_chunkwise_mosaic", "mlstm_state_scan_mosaic", "mlstm_chunk_gradients_mosaic")
    return {name for name in names if f"name={name}" in str(jaxpr) or f"'{name}'" in str(jaxpr)}


@pytest.mark.skipif(mosaic_interpret_params() is None, reason="needs a JAX with Mosaic GPU's interpreter")
def test_backward_defaults_to_the_kernels_where_they_cover_the_shape():
    """The default ``backward="mosaic"`` differentiates through the backward kernels; a head shape they do not
    cover (DHQK=320 > 256: dq's accumulator in registers) differentiates through the XLA form, as ``"xla"`` does."""
    assert mosaic_backward_unsupported(256, 512, jnp.bfloat16, 32, 2) is None
    assert "DHQK=320" in mosaic_backward_unsupported(320, 64, jnp.bfloat16, 32, 2)
    assert chunkwise_mosaic_unsupported(320, 64, jnp.bfloat16, 32) is None  # the forward kernel does run it
    assert _kernels_in_gradient(64) == {
        "mlstm_chunkwise_mosaic",
        "mlstm_state_scan_mosaic",
        "mlstm_chunk_gradients_mosaic",
    }
    assert _kernels_in_gradient(64, backward="xla") == set()
    assert _kernels_in_gradient(320) == set()


@pytest.mark.skipif(mosaic_interpret_params() is None, reason="needs a JAX with Mosaic GPU's interpreter")
def test_backward_kernels_take_their_own_block_behind_a_wide_forward():
    """Behind a forward of 64 columns at DHQK=256, whose backward tiles would not fit 64 columns (the gradient
    kernel's need 284 KiB of shared memory), the backward kernels run 32 columns rather than the XLA form."""
    bf16 = jnp.bfloat16
    assert "284 KiB" in chunk_gradients_unsupported(256, 512, bf16, 64)
    assert backward_block_dhv(256, 512, bf16, 64, 2) == 32
    assert backward_block_dhv(128, 128, bf16, 64, 2) == 64  # fits: the forward's block
    assert backward_block_dhv(256, 512, bf16, 32, 2) == 32
    assert mosaic_backward_unsupported(256, 512, bf16, 64, 2, "precomputed") is None
    every = {"mlstm_chunkwise_mosaic", "mlstm_state_scan_mosaic", "mlstm_chunk_gradients_mosaic"}
    assert _kernels_in_gradient(256, block_dhv=64, consumers=1, scores="precomputed") == every


@pytest.mark.skipif(mosaic_interpret_params() is None, reason="needs a JAX with Mosaic GPU's interpreter")
def test_backend_backward_runs_two_warpgroups_by_default():
    """The backend's gradients run the backward kernels with two warpgroups per program by default (the faster on
    an H200, BENCHMARKS.md), one with ``backward_consumers=1``; other values are refused."""
    x = random_inputs(1, 1, 1, 70, 64, 64)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")]
    args += [jnp.asarray(x[name], jnp.float32) for name in ("i", "f")]

    def threads(**kwargs) -> list[str]:
        backend = create_mlstm_backend("chunkwise_mosaic", interpret=True, **kwargs)
        loss = lambda *a: jnp.sum(backend(*a).astype(jnp.float32))  # noqa: E731
        return re.findall(r"num_threads=(\d)", str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args)))

    assert create_mlstm_backend("chunkwise_mosaic").config.backward_consumers == 2
    assert threads().count("2") == 2  # the state scan and the gradient kernel; the forward kernel runs one here
    assert threads(backward_consumers=1).count("2") == 0
    with pytest.raises(ValueError, match="backward_consumers must be 1 or 2"):
        create_mlstm_backend("chunkwise_mosaic", backward_consumers=3)


@pytest.mark.skipif(mosaic_interpret_params() is None, reason="needs a JAX with Mosaic GPU's interpreter")
def test_backend_backward_scan_block():
    """``backward_scan_block_dhv=64`` in the backend's config reaches the backward's reverse state scan (half its
    column programs at DHV=128 with two warpgroups) and leaves the gradient kernel's blocks; other values are
    refused."""
    x = random_inputs(1, 1, 1, 70, 64, 128)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")]
    args += [jnp.asarray(x[name], jnp.float32) for name in ("i", "f")]

    def grids(**kwargs) -> dict[str, tuple[int, int]]:
        backend = create_mlstm_backend("chunkwise_mosaic", interpret=True, **kwargs)
        loss = lambda *a: jnp.sum(backend(*a).astype(jnp.float32))  # noqa: E731
        text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args))
        found = re.findall(r"grid=\((\d+), (\d+)\).{0,400}?name=(mlstm_\w+)", text, re.S)
        return {name: (int(a), int(b)) for a, b, name in found}

    assert create_mlstm_backend("chunkwise_mosaic").config.backward_scan_block_dhv is None
    default, wide = grids(), grids(backward_scan_block_dhv=64)
    assert default["mlstm_state_scan_mosaic_reverse"] == (1, 2) and wide["mlstm_state_scan_mosaic_reverse"] == (1, 1)
    assert default["mlstm_chunk_gradients_mosaic"] == wide["mlstm_chunk_gradients_mosaic"]
    with pytest.raises(ValueError, match="backward_scan_block_dhv must be None, 32 or 64, got 48"):
        create_mlstm_backend("chunkwise_mosaic", backward_scan_block_dhv=48)


def test_cluster_reaches_the_kernel_grid():
    """``cluster`` (the function's and the backend config's) groups a head's column programs into clusters: the
    kernel's grid has that many times fewer column entries, each a cluster; the interpreter, which has no cluster
    barriers, refuses it with a clear error; other values are refused."""
    x = random_inputs(2, 1, 2, 130, 64, 256)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")]
    args += [jnp.asarray(x[name], jnp.float32) for name in ("i", "f")]

    def mesh(cluster: int) -> str:
        form = functools.partial(chunkwise_mosaic_fw, block_dhv=64, consumers=1, scores="kernel", cluster=cluster)
        text = str(jax.make_jaxpr(form)(*args))  # traced only: the compiled kernel runs on a Hopper GPU
        (found,) = re.findall(r"grid=\((\d+), (\d+)\), grid_names=\('bh', 'vb'\), cluster=\(([\d, ]*)\)", text)
        return found

    assert mesh(1) == ("2", "4", "") and mesh(2) == ("2", "2", "2,") and mesh(4) == ("2", "1", "4,")
    assert create_mlstm_backend("chunkwise_mosaic").config.cluster is None
    if mosaic_interpret_params() is not None:
        with pytest.raises(ValueError, match="cluster=2 cannot run in Mosaic GPU's interpreter"):
            create_mlstm_backend("chunkwise_mosaic", interpret=True, cluster=2)(*args)
    with pytest.raises(ValueError, match=r"cluster must be None or one of \(1, 2, 4\)"):
        create_mlstm_backend("chunkwise_mosaic", cluster=3)


# The state in registers as q C's A operand (``c_operand="registers"``): (B, NH, S, DHQK, DHV, initial states,
# forget gates, input gates, consumers, scores, split); 64 columns per warpgroup, precomputed scores.
REGISTER_CASES = [
    (2, 1, 150, 64, 128, True, "mixed", "extreme", 1, "kernel", 1),  # three chunks, the last padded; c0 in, c out
    (1, 2, 200, 128, 128, False, "mixed", "wide", 2, "precomputed", 1),  # two warpgroups, slots refilled
    (1, 1, 256, 64, 64, True, "open", "extreme", 1, "kernel", 2),  # two segments from the states before them
]


@runs
@pytest.mark.parametrize(
    ("B", "NH", "S", "DHQK", "DHV", "states", "fgate", "igate", "consumers", "scores", "split"),
    REGISTER_CASES,
    ids=["states-extreme", "two-wg", "two-segments"],
)
def test_state_in_registers_matches_reference(B, NH, S, DHQK, DHV, states, fgate, igate, consumers, scores, split):
    """Cᵀ held in registers as the A operand of q C (hᵀ stored transposed, c0 and c in and out through transposed
    views): h and the last states against the float64 recurrence, with a reset inside a chunk and on a border, and
    packed documents (S=150)."""
    form = functools.partial(kernel(64, consumers, scores), split=split, c_operand="registers")
    x = random_inputs(S + 3 * consumers + split, B, NH, S, DHQK, DHV, states=states, fgate=fgate, igate=igate)
    check_forward(form, x, "bfloat16")
    x["f"][0, 0, [90, 2 * CHUNK]] = -np.inf
    check_forward(form, x, "bfloat16")
    if SEGMENTS.shape[1] == S:
        check_forward(form, x, "bfloat16", segment_ids=SEGMENTS[:B])


def test_forward_tiling_takes_two_warpgroups_with_the_state_in_registers_where_their_grid_fills():
    """With precomputed scores and nothing else given, two warpgroups of 64 columns with the state in registers
    where their grid (after their own segments) has a full wave of programs; else the tiling of before, with the
    state in registers where it has 64 columns. The scores in the kernel, 32 columns, a given tiling of one
    warpgroup or ``c_operand="shared"`` keep C in shared memory or one warpgroup as asked."""
    bf16 = jnp.bfloat16
    assert forward_tiling(64, 8192, 256, 512, bf16, "kernel") == (64, 2, 2, 2, 1, "registers")  # 256 programs
    assert forward_tiling(8, 65536, 256, 512, bf16, "kernel") == (64, 2, 2, 2, 4, "registers")  # 4 segments: 128
    assert forward_tiling(16, 32768, 256, 512, bf16, "precomputed") == (64, 2, 2, 2, 2, "registers")
    # 8 heads of 8192 steps: two warpgroups would have 64 programs (segments of 64 chunks at least)
    assert forward_tiling(8, 8192, 256, 512, bf16, "kernel") == (64, 1, 2, 2, 2, "registers")
    assert forward_tiling(64, 8192, 256, 512, bf16, "kernel", consumers=1) == (64, 1, 2, 2, 1, "registers")
    assert forward_tiling(64, 8192, 256, 512, bf16, "kernel", c_operand="shared") == (64, 1, 2, 2, 1, "shared")
    assert forward_tiling(64, 8192, 256, 512, bf16, "kernel", block_dhv=32).c_operand == "shared"
    assert forward_tiling(64, 8192, 256, 512, bf16, "in_kernel").c_operand == "shared"


@runs
def test_backend_runs_the_state_in_registers():
    """The backend's ``c_operand`` reaches the kernel: its h is the function's with the same settings."""
    x = random_inputs(21, 1, 2, 150, 64, 128, states=True, igate="extreme")
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")] + [jnp.asarray(x[n]) for n in "if"]
    settings = {"block_dhv": 64, "scores": "kernel", "c_operand": "registers"}
    backend = create_mlstm_backend("chunkwise_mosaic", interpret=True if INTERPRET else None, **settings)
    form = functools.partial(chunkwise_mosaic_fw, interpret=INTERPRET, **settings)
    np.testing.assert_array_equal(np.asarray(backend(*args), np.float32), np.asarray(form(*args), np.float32))


def test_state_in_registers_takes_64_columns_and_precomputed_scores():
    """Where ``c_operand="registers"`` cannot run, and its shared memory: no C tile, so two warpgroups of 64
    columns fit with two chunks in flight."""
    bf16 = jnp.bfloat16
    assert chunkwise_mosaic_unsupported(256, 512, bf16, 64, scores="kernel", c_operand="registers") is None
    assert chunkwise_mosaic_unsupported(256, 512, bf16, 64, consumers=2, scores="kernel", c_operand="registers") is None
    assert shared_memory_bytes(256, bf16, 64, consumers=2, scores="kernel", c_operand="registers") == 209 * 1024
    assert chunkwise_mosaic_unsupported(256, 512, bf16, 32, scores="kernel", c_operand="registers") == (
        'c_operand="registers" takes block_dhv=64 (Cᵀ is the A operand, 64 rows) and precomputed scores, '
        "got block_dhv=32, scores='kernel'"
    )
    assert "precomputed scores" in chunkwise_mosaic_unsupported(256, 512, bf16, 64, c_operand="registers")
    assert chunkwise_mosaic_unsupported(256, 512, bf16, 64, c_operand="smem") == (
        "c_operand='smem' must be one of ('shared', 'registers')"
    )
    with pytest.raises(ValueError, match=r"c_operand must be None or one of \('shared', 'registers'\), got 'smem'"):
        create_mlstm_backend("chunkwise_mosaic", c_operand="smem")
    operands = (jnp.zeros((1, CHUNK, 64), bf16),) * 3 + (jnp.zeros((1, 2, CHUNK)), jnp.zeros((1, 1)), None)
    with pytest.raises(ValueError, match='borders=True takes c_operand="shared"'):
        mosaic_chunkwise(*operands, eps=1e-6, block_dhv=64, scores="precomputed", c_operand="registers", borders=True)


def test_unsupported_calls_raise():
    x = random_inputs(0, 1, 1, 8, 64, 32)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v", "i", "f")]
    with pytest.raises(ValueError, match="inputs must be bfloat16 or float16"):
        chunkwise_mosaic_fw(*(a.astype(jnp.float32) for a in args))
    with pytest.raises(ValueError, match="block_dhv=48 must be 32 or 64 and divide DHV=32"):
        chunkwise_mosaic_fw(*args, block_dhv=48)
    assert chunkwise_mosaic_unsupported(96, 64, jnp.bfloat16, 32) == "DHQK=96 must be a multiple of 64"
    assert chunkwise_mosaic_unsupported(256, 512, jnp.bfloat16, 64) is None
    assert chunkwise_mosaic_unsupported(256, 512, jnp.bfloat16, 32, consumers=2) is None
    with pytest.raises(ValueError, match=r"DHV=32 must be a multiple of consumers \* block_dhv = 64"):
        chunkwise_mosaic_fw(*args, consumers=2)
    with pytest.raises(ValueError, match="consumers=3 must be 1 or 2"):
        chunkwise_mosaic_fw(*args, consumers=3)
    with pytest.raises(ValueError, match="backward_consumers=3 must be 1 or 2"):
        chunkwise_mosaic_fw(*args, backward_consumers=3)
    with pytest.raises(ValueError, match="backward_scan_block_dhv=48 must be None, 32 or 64"):
        chunkwise_mosaic_fw(*args, backward_scan_block_dhv=48)
    too_big = chunkwise_mosaic_unsupported(256, 512, jnp.bfloat16, 64, consumers=2)
    assert too_big is not None and "276 KiB of shared memory" in too_big and "227 KiB" in too_big
    assert "shared memory" in chunkwise_mosaic_unsupported(256, 512, jnp.bfloat16, 32, depth=3)
    assert shared_memory_bytes(256, jnp.bfloat16, 32) == 172 * 1024  # the module docstring's budget
    assert shared_memory_bytes(256, jnp.bfloat16, 32, consumers=2) == 212 * 1024
    # Precomputed scores: P per pipeline slot (shared), a 2-row plan, no per-warpgroup P (the module docstring's).
    assert shared_memory_bytes(256, jnp.bfloat16, 32, scores="precomputed") == 177 * 1024
    assert shared_memory_bytes(256, jnp.bfloat16, 32, consumers=2, scores="precomputed") == 209 * 1024
    assert chunkwise_mosaic_unsupported(256, 512, jnp.bfloat16, 32, scores="xla") == (
        "scores='xla' must be one of ('in_kernel', 'precomputed', 'kernel')"
    )
    with pytest.raises(ValueError, match="scores='xla' must be one of"):
        chunkwise_mosaic_fw(*args, scores="xla")
    assert chunkwise_mosaic_unsupported(256, 512, jnp.bfloat16, 64, cluster=3) == (
        "cluster=3 must be one of (1, 2, 4) (programs per cluster)"
    )
    assert chunkwise_mosaic_unsupported(256, 512, jnp.bfloat16, 64, cluster=4) is None  # 8 programs a head
    assert chunkwise_mosaic_unsupported(256, 128, jnp.bfloat16, 64, cluster=4) == (
        "cluster=4 must divide the 2 programs of a head (DHV=128, consumers=1, block_dhv=64)"
    )
    with pytest.raises(ValueError, match="cluster=2 must divide the 1 programs of a head"):
        chunkwise_mosaic_fw(*args, cluster=2)
    with pytest.raises(ValueError, match="cluster=2 cannot run in Mosaic GPU's interpreter"):
        mosaic_chunkwise(
            *(jnp.zeros((1, CHUNK, 64), jnp.bfloat16),) * 3, jnp.zeros((1, 8, CHUNK)), jnp.zeros((1, 1)),
            jnp.zeros((1, 64, 64)), eps=1e-6, cluster=2, interpret=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"k.shape=\(1, 1, 8, 64\) must be"):  # the shared checks come first
        chunkwise_mosaic_fw(args[0][..., :32], *args[1:])


def test_auto_consumers_keeps_small_grids_on_one_warpgroup():
    """consumers=None: two warpgroups where their grid still has a full wave of 128 programs and the tiles fit."""
    bf16 = jnp.bfloat16
    assert auto_consumers(64, 256, 512, bf16) == 2  # B=8, NH=8: 512 programs of two warpgroups
    assert auto_consumers(16, 256, 512, bf16) == 2  # exactly 128
    assert auto_consumers(8, 256, 512, bf16) == 1  # B=1 prefill of xLSTM-7B: 64 programs would leave SMs idle
    assert auto_consumers(64, 256, 96, bf16) == 1  # DHV not a multiple of 2 * 32
    assert auto_consumers(64, 256, 512, bf16, block_dhv=64) == 1  # two would not fit in shared memory


def test_auto_tiling_takes_wide_blocks_where_the_grid_still_fills():
    """block_dhv=None: 64 columns with one warpgroup where the scores are precomputed and BH * DHV / 64 programs
    still make a full wave; else 32 columns with ``auto_consumers``. Given values are kept."""
    bf16 = jnp.bfloat16
    assert auto_tiling(64, 256, 512, bf16) == (64, 1)  # B=8, NH=8: 512 programs
    assert auto_tiling(16, 256, 512, bf16) == (64, 1)  # exactly 128
    assert auto_tiling(8, 256, 512, bf16) == (32, 1)  # B=1 prefill of xLSTM-7B: 128 programs of 32 columns
    assert auto_tiling(64, 256, 512, bf16, scores="in_kernel") == (32, 2)  # 64 columns recompute scores (spills)
    assert auto_tiling(64, 256, 512, bf16, consumers=2) == (32, 2)  # two warpgroups of 64 do not fit
    assert auto_tiling(64, 256, 512, bf16, block_dhv=32) == (32, 2)
    assert auto_tiling(64, 512, 512, bf16) == (32, 1)  # DHQK=512: the tiles fit one chunk in flight only
    assert create_mlstm_backend("chunkwise_mosaic").config.scores is None  # auto_scores, by S
    assert create_mlstm_backend("chunkwise_mosaic").config.block_dhv is None


@runs
@pytest.mark.parametrize(("DHQK", "primal_folds"), [(64, True), (512, False)])
def test_scores_kernel_takes_q_n_off_the_plan_where_nothing_differentiates(monkeypatch, DHQK, primal_folds):
    """The call without differentiation hands the scores kernel the border normalisers, from which it computes each
    step's q̂·n_border (the gate plan then reads no q; DHQK up to 256); under differentiation the plan keeps that
    row, whose gradient autodiff takes. test_matches_reference checks the values."""
    from xlstm_jax.kernels import chunkwise_mosaic_scores

    given, original = [], chunkwise_mosaic_scores.mosaic_normalised_scores

    def spy(q, k, plan, eps, n_border=None, **kwargs):
        given.append(n_border is not None)
        return original(q, k, plan, eps, n_border, **kwargs)

    monkeypatch.setattr(chunkwise_mosaic_scores, "mosaic_normalised_scores", spy)
    jax.clear_caches()  # an earlier test's trace of the same call would skip the spy
    x = random_inputs(5, 1, 1, 200, DHQK, 64, states=True)
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")]
    args += [jnp.asarray(x[name], jnp.float32) for name in ("i", "f")]
    fw = kernel(scores="kernel")
    jax.make_jaxpr(fw)(*args)
    jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fw(*a).astype(jnp.float32)), argnums=(0, 1, 2)))(*args)
    assert given[0] is primal_folds and not any(given[1:])  # at DHQK=512 the gradient is the XLA form's


@runs
@pytest.mark.parametrize("split", [1, 5])
def test_blocked_border_normalisers_where_nothing_differentiates(monkeypatch, split):
    """The call without differentiation takes the border normalisers in closed form over blocks of chunks
    (border_normalisers_blocked, from _BLOCKED_MIN_CHUNKS chunks; here from one, so that 5 chunks run it in blocks
    of 2, the last padded): h and the last states against the float64 recurrence with initial states, extreme input
    gates, resets and packed documents; under differentiation the plan keeps the associative scan."""
    from xlstm_jax.kernels import chunkwise_mosaic

    called, original = [], chunkwise_mosaic.border_normalisers_blocked

    def spy(*args):
        called.append(True)
        return original(*args)

    monkeypatch.setattr(chunkwise_mosaic, "_BLOCKED_MIN_CHUNKS", 1)
    monkeypatch.setattr(chunkwise_mosaic, "border_normalisers_blocked", spy)
    jax.clear_caches()  # an earlier test's trace of the same call would skip the spy
    form = functools.partial(kernel(scores="kernel"), split=split)
    x = random_inputs(23 + split, 2, 2, 300, 64, 64, states=True, igate="extreme")
    x["f"][0, 1, [64, 150]] = -np.inf  # a reset on a chunk's first step and one inside a chunk
    check_forward(form, x, "bfloat16")
    check_forward(form, x, "bfloat16", segment_ids=SPLIT_SEGMENTS)
    assert called
    called.clear()
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")]
    args += [jnp.asarray(x[name], jnp.float32) for name in ("i", "f")]
    jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(form(*a).astype(jnp.float32)), argnums=(0, 1, 2)))(*args)
    assert not called


@pytest.mark.parametrize(("NC", "blocked"), [(3, False), (4, True), (6, True), (7, False)])
def test_chunk_plan_takes_blocked_border_normalisers_within_its_bounds(monkeypatch, NC, blocked):
    """chunk_plan(blocked_borders=True) takes border_normalisers_blocked from _BLOCKED_MIN_CHUNKS chunks to
    _BLOCKED_MAX_CHUNKS (here 4 to 6; 64 to 4096 by default), else the associative scan, whose plan is the same."""
    from xlstm_jax.kernels import chunkwise_mosaic
    from xlstm_jax.mlstm.chunkwise import chunk_sequence

    called, original = [], chunkwise_mosaic.border_normalisers_blocked
    monkeypatch.setattr(chunkwise_mosaic, "_BLOCKED_MIN_CHUNKS", 4)
    monkeypatch.setattr(chunkwise_mosaic, "_BLOCKED_MAX_CHUNKS", 6)
    monkeypatch.setattr(chunkwise_mosaic, "border_normalisers_blocked", lambda *a: called.append(1) or original(*a))
    x = random_inputs(NC, 1, 2, NC * CHUNK - 5, 64, 32, states=True, igate="extreme")
    x["f"][0, 1, CHUNK + 3] = -np.inf  # a reset

    @functools.partial(jax.jit, static_argnums=0)
    def plan(blocked_borders, *arrays):
        seq = chunk_sequence(*arrays, 1e-6, None, CHUNK, None, True)
        p, decay, (n_last, m_last), n_border = chunkwise_mosaic.chunk_plan(seq, blocked_borders=blocked_borders)
        return p, decay, n_last, m_last, n_border

    with jax.enable_x64(True):  # float64: the two forms' plans agree to its rounding
        arrays = [jnp.asarray(x[n], jnp.float64) for n in ("q", "k", "v", "i", "f", "c0", "n0", "m0")]
        got = plan(True, *arrays)
        assert bool(called) is blocked
        want = plan(False, *arrays)
    for g, w in zip(got, want, strict=True):
        tol = TOL["float64"].max_err
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)  # equal infinities pass


def test_auto_scores_keeps_short_sequences_in_the_kernel():
    """scores=None: the scores in the kernel for at most 4 chunks (a served prompt's chunk: fewer kernels to
    launch), from the scores kernel beyond; the call traces exactly as with the picked value given."""
    assert IN_KERNEL_SCORES_MAX_CHUNKS * CHUNK == 256
    assert [auto_scores(S) for S in (1, 64, 65, 256)] == ["in_kernel"] * 4
    assert [auto_scores(S) for S in (257, 2048, 8192)] == ["kernel"] * 3
    for S, picked, other in [(70, "in_kernel", "kernel"), (300, "kernel", "precomputed")]:
        x = random_inputs(3, 1, 2, S, 64, 32, states=True)
        args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v")]
        args += [jnp.asarray(x[name], jnp.float32) for name in ("i", "f", "c0", "n0", "m0")]

        def jaxpr(args=args, **kwargs) -> str:
            return str(jax.make_jaxpr(functools.partial(chunkwise_mosaic_fw, interpret=True, **kwargs))(*args))

        assert jaxpr() == jaxpr(scores=picked) != jaxpr(scores=other), S


@pytest.mark.parametrize(
    ("block_dhv", "consumers", "scores", "grad", "DHQK", "depth", "cluster", "split", "c_operand"),
    [
        (32, 1, "in_kernel", False, 256, 2, 1, 1, "shared"),
        (64, 1, "in_kernel", False, 256, 2, 1, 1, "shared"),
        (32, 2, "in_kernel", True, 256, 2, 1, 1, "shared"),
        (32, 1, "precomputed", False, 256, 2, 1, 1, "shared"),
        (64, 1, "precomputed", False, 256, 2, 1, 1, "shared"),
        (64, 1, "precomputed", True, 256, 2, 1, 1, "shared"),
        (32, 2, "precomputed", True, 256, 2, 1, 1, "shared"),
        (32, 1, "precomputed", False, 512, 1, 1, 1, "shared"),
        (64, 1, "kernel", False, 256, 2, 2, 1, "shared"),
        (32, 2, "precomputed", True, 256, 2, 2, 1, "shared"),
        (64, 1, "kernel", True, 256, 2, 2, 2, "shared"),
        (64, 1, "kernel", False, 256, 2, 2, 1, "registers"),
        (64, 2, "precomputed", False, 256, 2, 1, 2, "registers"),
    ],
)
def test_lowers_for_cuda(block_dhv, consumers, scores, grad, DHQK, depth, cluster, split, c_operand):
    """Tracing and Mosaic GPU lowering at the xLSTM-7B head shape (DHQK=256; the layouts, the operands' shared
    swizzle, the shared-memory budget, two warpgroups' barriers, the border states and each step's (qn, den) as
    under differentiation (``grad``), the state update accumulated onto the decayed state with
    precomputed scores; DHQK=512 with one chunk in flight; programs in clusters of two with multicast tiles; two
    segments with their states' scan; the state in registers, its transposed stores and loads) succeed on any
    machine."""
    BH, S, DHV, f32, A = 2, 2 * CHUNK, 128, jnp.float32, jax.ShapeDtypeStruct
    avals = (
        A((BH, S, DHQK), jnp.bfloat16), A((BH, S, DHQK), jnp.bfloat16), A((BH, S, DHV), jnp.bfloat16),
        A((BH, S // CHUNK * 8, CHUNK), f32), A((BH, S // CHUNK), f32), A((BH, DHQK, DHV), f32),
    )  # fmt: skip
    step = functools.partial(
        mosaic_chunkwise, eps=1e-6, block_dhv=block_dhv, consumers=consumers, scores=scores,
        borders=grad, normaliser=grad, depth=depth, cluster=cluster, split=split, c_operand=c_operand,
    )  # fmt: skip
    text = jax.jit(step).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@runs
def test_backend_runs_the_kernel():
    """The ``chunkwise_mosaic`` backend calls the kernel for bf16 inputs (its name is in the jaxpr) and matches the
    float64 reference; float32 inputs run the XLA form (no kernel in the jaxpr); ``consumers=2`` runs the kernel
    with two warpgroups where DHV allows, else the XLA form; ``scores="precomputed"`` and ``"kernel"`` (the scores
    kernel in the jaxpr) match the reference too."""
    backend = create_mlstm_backend("chunkwise_mosaic", interpret=True if INTERPRET else None)
    x = random_inputs(21, 1, 2, 70, 64, 32, states=True)
    check_forward(backend, x, "bfloat16")
    args = [jnp.asarray(x[name], jnp.bfloat16) for name in ("q", "k", "v", "i", "f")]
    assert "mlstm_chunkwise_mosaic" in str(jax.make_jaxpr(backend)(*args))
    assert "mlstm_chunkwise_mosaic" not in str(jax.make_jaxpr(backend)(*(a.astype(jnp.float32) for a in args)))
    two = create_mlstm_backend("chunkwise_mosaic", consumers=2, interpret=True if INTERPRET else None)
    assert "mlstm_chunkwise_mosaic" not in str(jax.make_jaxpr(two)(*args))  # DHV=32 < 2 * block_dhv: XLA form
    wide = [*args[:2], jnp.concatenate([args[2], args[2]], axis=-1), *args[3:]]  # DHV=64
    assert "num_threads=2" in str(jax.make_jaxpr(two)(*wide))
    with pytest.raises(ValueError, match="consumers must be 1 or 2"):
        create_mlstm_backend("chunkwise_mosaic", consumers=3)
    precomputed = create_mlstm_backend(
        "chunkwise_mosaic", scores="precomputed", interpret=True if INTERPRET else None
    )  # fmt: skip
    check_forward(precomputed, x, "bfloat16")
    scores_kernel = create_mlstm_backend("chunkwise_mosaic", scores="kernel", interpret=True if INTERPRET else None)
    check_forward(scores_kernel, x, "bfloat16")
    assert "mlstm_chunk_scores_mosaic" in str(jax.make_jaxpr(scores_kernel)(*args))
    with pytest.raises(ValueError, match=r"scores must be None or one of \('in_kernel', 'precomputed', 'kernel'\)"):
        create_mlstm_backend("chunkwise_mosaic", scores="xla")


@runs
@SCORES_ARGS
def test_model_prefill_with_the_kernel(scores):
    """The language model's prefill with ``prefill_backend="chunkwise_mosaic"`` (one head of DHQK=64, DHV=128, bf16
    compute, a padded chunk; the chunks' scores in the kernel and precomputed) gives the logits and states of the
    XLA chunkwise backend, within the bf16 bound."""
    config = xLSTMLMConfig.tiny(num_heads=1, num_blocks=1, dtype="bfloat16")
    params = init_params(config, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 70), 0, config.vocab_size)
    kernel_runtime = RuntimeConfig(
        prefill_backend="chunkwise_mosaic",
        prefill_backend_kwargs=(("interpret", True if INTERPRET else None), ("scores", scores)),
    )
    xla_runtime = RuntimeConfig(prefill_backend="chunkwise", prefill_backend_kwargs=(("chunk_size", CHUNK),))
    logits, states = prefill(config, params, ids, runtime=kernel_runtime)
    logits_xla, states_xla = prefill(config, params, ids, runtime=xla_runtime)
    bound = TOL["bfloat16/float32"].max_err
    for name, a, b in [("logits", logits, logits_xla), *zip("cnm", states, states_xla, strict=True)]:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= bound * np.max(np.abs(b)), name


@runs
def test_model_prefill_with_heads_minor_operands():
    """``layout="BSND"`` in the backend's config: the layer passes its projections to the cell as (B, S, NH, D) and
    takes h back so (another layout fails the kernel's shape checks), and the prefill's logits and states equal the
    heads-major layout's within the bf16 bound (the products and the gate then run in other XLA fusions): with the
    kernel (two heads of DHQK=64, DHV=128, a padded chunk) and with the XLA form it falls back to
    (``interpret=False``)."""
    config = xLSTMLMConfig.tiny(num_heads=2, num_blocks=1, embedding_dim=256, dtype="bfloat16")
    params = init_params(config, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (1, 150), 0, config.vocab_size)
    bound = TOL["bfloat16/float32"].max_err
    for interpret in (True if INTERPRET else None, False):
        outs = []
        for layout in ("BNSD", "BSND"):
            kwargs = (("interpret", interpret), ("layout", layout))
            runtime = RuntimeConfig(prefill_backend="chunkwise_mosaic", prefill_backend_kwargs=kwargs)
            outs.append(prefill(config, params, ids, runtime=runtime))
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            assert np.max(np.abs(a - b)) <= bound * np.max(np.abs(a)), interpret
    with pytest.raises(ValueError, match="layout must be one of"):
        create_mlstm_backend("chunkwise_mosaic", layout="BHSD")


@runs
def test_model_training_step_with_the_kernels():
    """One training step of the language model with ``prefill_backend="chunkwise_mosaic"`` (the kernel forward and
    the Mosaic GPU backward kernels; one head of DHQK=64, DHV=128, bf16 compute, packed documents, a padded
    chunk): the loss and every parameter's gradient equal the XLA chunkwise backend's within twice the bf16
    gradient bound (both sides round to bf16), and the jitted step runs on it."""
    config = xLSTMLMConfig.tiny(num_heads=1, num_blocks=1, dtype="bfloat16")
    params = init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(2)
    ids = rng.integers(3, config.vocab_size, (2, 71)).astype(np.int32)
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "segment_ids": np.repeat(np.array([[1, 2], [1, 1]], np.int32), [45, 25], axis=1),
        "loss_mask": np.ones((2, 70), np.float32),
    }
    kernel_runtime = RuntimeConfig(
        prefill_backend="chunkwise_mosaic", prefill_backend_kwargs=(("interpret", True if INTERPRET else None),)
    )
    xla_runtime = RuntimeConfig(prefill_backend="chunkwise", prefill_backend_kwargs=(("chunk_size", CHUNK),))

    def loss_and_grads(runtime):
        model = xLSTMLMModel(config, runtime)

        def loss(p):  # the training step's loss (the raw logits, capped inside the cross-entropy)
            total, count = model_loss(model, p, batch)
            return total / count

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        kernels = {name for name in ("mlstm_chunkwise_mosaic", "mlstm_chunk_gradients_mosaic") if name in jaxpr}
        return jax.jit(jax.value_and_grad(loss))(params), kernels

    ((loss, grads), kernels), ((loss_xla, grads_xla), none) = map(loss_and_grads, (kernel_runtime, xla_runtime))
    assert kernels == {"mlstm_chunkwise_mosaic", "mlstm_chunk_gradients_mosaic"} and none == set()
    bound = 2 * TOL["bfloat16-grad"].max_err
    assert abs(float(loss) - float(loss_xla)) <= TOL["bfloat16/float32"].max_err * abs(float(loss_xla))
    flat, flat_xla = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads_xla)
    for (path, g), e in zip(flat, flat_xla, strict=True):
        g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
        assert np.max(np.abs(g - e)) <= bound * np.max(np.abs(e)), jax.tree_util.keystr(path)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=4))
    step = make_train_step(xLSTMLMModel(config, kernel_runtime), optimizer, donate=False)
    _, metrics = step(create_train_state(params, optimizer, 0), {k: jnp.asarray(v) for k, v in batch.items()})
    # The same float32 loss of the same bf16 logits, in another program: within float32-loss of each other.
    assert_close("step loss", np.array(float(loss)), np.asarray(metrics["loss"]), TOL["float32-loss"])


@pytest.mark.skipif(
    not ON_HOPPER, reason="compiled only: jax.checkpoint cannot rematerialise the interpreter's callbacks"
)
@pytest.mark.parametrize(
    ("backward", "scores"), [("mosaic", "in_kernel"), ("xla", "in_kernel"), ("mosaic", "precomputed")]
)
def test_model_training_step_under_remat(backward, scores):
    """The training step with the kernels under per-block remat (``dots`` and ``full``) gives the loss of the step
    without remat, called jitted and compiled ahead of time (as ``benchmarks/train.py`` does), with packed
    documents whose ids are traced arguments of the step; also with the chunks' scores precomputed."""
    config = xLSTMLMConfig.tiny(num_heads=1, num_blocks=2, dtype="bfloat16")
    params = init_params(config, jax.random.PRNGKey(0))
    ids = np.random.default_rng(3).integers(3, config.vocab_size, (2, 71)).astype(np.int32)
    batch = {
        "input_ids": jnp.asarray(ids[:, :-1]),
        "targets": jnp.asarray(ids[:, 1:]),
        "segment_ids": jnp.asarray(np.repeat(np.array([[1, 2], [1, 1]], np.int32), [45, 25], axis=1)),
        "loss_mask": jnp.ones((2, 70), jnp.float32),
    }
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=4))
    losses = {}
    for remat in ("none", "dots", "full"):
        runtime = RuntimeConfig(
            prefill_backend="chunkwise_mosaic",
            prefill_backend_kwargs=(("backward", backward), ("scores", scores)),
            remat=remat,
        )
        step = make_train_step(xLSTMLMModel(config, runtime), optimizer, donate=False)
        state = create_train_state(params, optimizer, 0)
        compiled = jax.jit(lambda s, b: step(s, b)).lower(state, batch).compile()  # noqa: B023
        (_, jitted), (_, ahead) = step(state, batch), compiled(state, batch)
        losses[remat] = (float(jitted["loss"]), float(ahead["loss"]))
    for remat in ("dots", "full"):
        for got in losses[remat]:
            assert got == pytest.approx(losses["none"][0], rel=TOL["bfloat16/float32"].max_err), remat
