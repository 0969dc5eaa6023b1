"""The mLSTM backend ``"chunkwise_mosaic"``: the chunkwise form with its products in a Mosaic GPU kernel on Hopper.

Declares the backend around :func:`xlstm_jax.kernels.chunkwise_mosaic.chunkwise_mosaic_fw` (chunks of 64 steps,
c kept on chip per head and column block), for prompts and, with its Mosaic GPU backward kernels, for training.
Where the kernel does not apply (no Hopper GPU, float32 inputs, a
head shape it does not tile, a state dtype other than float32) the backend runs the XLA chunkwise form
(:func:`xlstm_jax.mlstm.chunkwise.chunkwise_fw`) with ``chunk_size``: the same function. Under a mesh the kernel
runs per device on its rows and heads (``shard_map``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.chunkwise_mosaic import (
    BACKWARDS,
    C_OPERANDS,
    CHUNK,
    CLUSTERS,
    SCORES,
    auto_scores,
    chunkwise_mosaic_fw,
    chunkwise_mosaic_unsupported,
    forward_tiling,
)
from xlstm_jax.kernels.mosaic import LAYOUTS, as_array
from xlstm_jax.kernels.recurrent_step_mosaic import device_supports_mosaic
from xlstm_jax.mlstm.checks import resolve_state_dtype
from xlstm_jax.mlstm.chunkwise import check_chunk_size, chunkwise_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import check_bool, mLSTMBackend, mLSTMBackendConfig
from xlstm_jax.models.xlstm_parallel.sharding import shard_map_sequence_form

__all__ = ["chunkwise_hopper_fw", "mLSTMBackendChunkwiseMosaic", "mLSTMBackendChunkwiseMosaicConfig"]


def chunkwise_hopper_fw(
    q: jax.Array,  # (B, NH, S, DHQK); layout="BSND": (B, S, NH, DHQK)
    k: jax.Array,  # (B, NH, S, DHQK); layout="BSND": (B, S, NH, DHQK)
    v: jax.Array,  # (B, NH, S, DHV); layout="BSND": (B, S, NH, DHV)
    i: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    f: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    c_initial: jax.Array | None = None,
    n_initial: jax.Array | None = None,
    m_initial: jax.Array | None = None,
    return_last_states: bool = False,
    eps: float = 1e-6,
    state_dtype: Any = None,
    *,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 256,
    block_dhv: int | None = None,
    consumers: int | None = None,
    interpret: bool | None = None,
    backward: str = "mosaic",
    backward_consumers: int = 2,
    scores: str | None = None,
    backward_scan_block_dhv: int | None = None,
    cluster: int | None = None,
    split: int | None = None,
    c_operand: str | None = None,
    layout: str = "BNSD",
) -> Any:
    """The chunkwise form: the Mosaic GPU kernel where it applies, else the XLA form with ``chunk_size`` (which also
    runs under differentiation: :func:`~xlstm_jax.kernels.chunkwise_mosaic.chunkwise_mosaic_fw`).

    Arguments and results as :func:`xlstm_jax.mlstm.chunkwise.chunkwise_fw`. ``interpret``: None picks the kernel
    on a Hopper GPU; True runs it in Mosaic GPU's interpreter (tests); False always runs the XLA form.
    ``block_dhv`` and ``consumers``: the kernel's columns of c per warpgroup and warpgroups per program (None:
    :func:`~xlstm_jax.kernels.chunkwise_mosaic.auto_tiling`). ``backward``: what runs under differentiation
    where the kernel runs, the Mosaic GPU backward kernels (``"mosaic"``, where they cover the shape) or the XLA
    form (``"xla"``); ``backward_consumers``: the backward kernels' warpgroups per program, 1 or 2. ``scores``:
    where the kernel's chunk scores are computed, ``"precomputed"`` (once per head in XLA), ``"kernel"`` (once per
    head in a Mosaic GPU kernel of their own), ``"in_kernel"`` or None
    (:func:`~xlstm_jax.kernels.chunkwise_mosaic.auto_scores`: in the kernel for at most 256 steps, the scores
    kernel beyond).
    ``backward_scan_block_dhv``: the columns per warpgroup of the backward's reverse state scan (None: the
    backward kernels' block, ``block_dhv`` where their tiles fit, else 32). ``cluster``: the forward kernel's
    programs per cluster, 1, 2 or 4 (None: :func:`~xlstm_jax.kernels.chunkwise_mosaic.auto_cluster`). ``split``:
    segments of each head that the forward kernel runs side by side where it divides the call's chunks of 64 steps,
    else 1 (None: :func:`~xlstm_jax.kernels.chunkwise_mosaic.auto_split`). ``c_operand``: where the forward kernel's
    q C takes the state from, ``"shared"`` or ``"registers"``
    (:data:`~xlstm_jax.kernels.chunkwise_mosaic.C_OPERANDS`; None: the tiling's pick). ``layout``: of q, k, v and
    h (:data:`~xlstm_jax.kernels.mosaic.LAYOUTS`), ``"BNSD"`` as above or ``"BSND"``, heads-minor (B, S, NH, D),
    which the kernels read and write in place (the XLA form runs on transposed views); heads-minor q, k and v may
    be :class:`~xlstm_jax.kernels.mosaic.HeadColumns` blocks of one array (the layer's fused projection).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    heads_minor = layout == "BSND"
    use_kernel = interpret if interpret is not None else device_supports_mosaic()
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    states_dtype = resolve_state_dtype(state_dtype)
    if c_initial is not None and states_dtype is None:
        states_dtype = jnp.dtype(c_initial.dtype)
    DHQK, DHV = q.shape[-1], v.shape[-1]
    S, NH = (q.shape[1], q.shape[2]) if heads_minor else (q.shape[2], q.shape[1])
    scores = auto_scores(S) if scores is None else scores
    if split is not None and -(-S // CHUNK) % split:
        split = 1  # a served prompt's chunks vary: the configured split where it divides them
    block_dhv, consumers, depth, cluster, split, c_operand = forward_tiling(
        q.shape[0] * NH, S, DHQK, DHV, dtype, scores, block_dhv=block_dhv, consumers=consumers,
        cluster=cluster, split=split, interpret=bool(interpret), c_operand=c_operand,
    )  # fmt: skip
    fits = chunkwise_mosaic_unsupported(
        DHQK, DHV, dtype, block_dhv, depth=depth, consumers=consumers, scores=scores, cluster=cluster,
        c_operand=c_operand,
    )  # fmt: skip
    if use_kernel and fits is None and states_dtype in (None, jnp.dtype(jnp.float32)):
        return chunkwise_mosaic_fw(
            q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states, eps, state_dtype,
            segment_ids=segment_ids, block_dhv=block_dhv, depth=depth, consumers=consumers, interpret=bool(interpret),
            xla_chunk_size=chunk_size, backward=backward, backward_consumers=backward_consumers, scores=scores,
            backward_scan_block_dhv=backward_scan_block_dhv, cluster=cluster, split=split, c_operand=c_operand,
            layout=layout,
        )  # fmt: skip
    if heads_minor:  # the XLA form on heads-major views, h back heads-minor
        q, k, v = (jnp.swapaxes(as_array(t), 1, 2) for t in (q, k, v))
    out = chunkwise_fw(
        q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states, eps, state_dtype, chunk_size,
        segment_ids=segment_ids,
    )  # fmt: skip
    if not heads_minor:
        return out
    return (jnp.swapaxes(out[0], 1, 2), out[1]) if return_last_states else jnp.swapaxes(out, 1, 2)


@dataclass(frozen=True)
class mLSTMBackendChunkwiseMosaicConfig(mLSTMBackendConfig):
    """Settings of the Mosaic chunkwise backend (frozen, hashable).

    Attributes:
        context_length: The model's context length (-1: not set); set by ``assign_model_config_params``.
        eps: Added to the normaliser after the max. Defaults to 1e-6.
        state_dtype: Name of the state dtype, or None (float32, or the initial states' dtype). The kernel keeps
            its states in float32; other state dtypes run the XLA form.
        chunk_size: The XLA form's chunk size where the kernel does not run and under differentiation (the kernel's
            chunks are 64 steps).
        block_dhv: Columns of c per kernel warpgroup: 32 or 64; None picks by the number of heads per device
            and ``scores`` (``auto_tiling``: 64 with one warpgroup where precomputed scores leave that grid
            filling the GPU, else 32). BENCHMARKS.md compares them.
        consumers: Warpgroups per kernel program, 1 or 2, sharing the q and k tiles (BENCHMARKS.md); None picks by
            the number of heads per device (``auto_tiling``: 2 with 32 columns where their grid still fills the
            GPU). Where
            DHV is not a multiple of ``consumers * block_dhv``, or the tiles exceed the shared memory (2 with
            block_dhv=64 at DHQK=256), the XLA form runs.
        interpret: None: the kernel on a Hopper GPU, the XLA form elsewhere; True: the kernel in Mosaic GPU's
            interpreter (slow; for tests); False: always the XLA form.
        backward: Under differentiation where the kernel runs: ``"mosaic"``, the kernel forward and the Mosaic
            GPU backward kernels where they cover the shape (DHQK up to 256), else the XLA form; ``"xla"``, the
            XLA form forward and backward (``chunk_size``). BENCHMARKS.md compares them.
        backward_consumers: Warpgroups per program of the Mosaic GPU backward kernels, 1 or 2 (2, the faster on
            an H200: BENCHMARKS.md; each kernel runs one where two do not fit).
        scores: Where the kernel's chunk scores and denominators are computed: ``"precomputed"``, once per head
            in XLA before the kernel (:func:`~xlstm_jax.kernels.chunkwise_mosaic.normalised_scores`); ``"kernel"``
            (the faster forward at long S: BENCHMARKS.md), the same once per head in a Mosaic GPU kernel of their
            own, which reads q and k once
            (:mod:`~xlstm_jax.kernels.chunkwise_mosaic_scores`); ``"in_kernel"``, by every warpgroup;
            None (the default) picks by the sequence length
            (:func:`~xlstm_jax.kernels.chunkwise_mosaic.auto_scores`): in the kernel for at most 4 chunks of 64
            steps, where computing them ahead costs more kernel launches than it saves work, in their own
            Mosaic GPU kernel (``"kernel"``) beyond.
        backward_scan_block_dhv: Columns per warpgroup of the Mosaic GPU backward's reverse state scan, 32 or 64
            (None: the backward kernels' block, ``block_dhv`` where their tiles fit, else 32: at DHQK=256 the
            gradient kernel's tiles fit 32 columns only). BENCHMARKS.md compares them.
        cluster: Programs per cluster of the forward kernel, 1, 2 or 4: consecutive column blocks of a head that
            share each chunk's q, k and score tiles by TMA multicast; None picks
            (:func:`~xlstm_jax.kernels.chunkwise_mosaic.auto_cluster`). Where it does not divide a head's
            programs, the XLA form runs.
        split: Segments of each head's chunks that the forward kernel runs side by side, each from the state before
            it, so that a few heads (a batch of one) fill the GPU; a positive integer, used where it divides a
            call's chunks of 64 steps (else 1), or None to pick
            (:func:`~xlstm_jax.kernels.chunkwise_mosaic.auto_split`: 2 for xLSTM-7B's 8 heads at batch 1 from
            8192 steps).
        c_operand: Where the forward kernel's q C takes the state from: ``"shared"``, C rounded into shared
            memory every chunk; ``"registers"``, Cᵀ kept in registers as the product's A operand (64 columns per
            warpgroup, precomputed scores); None picks (:func:`~xlstm_jax.kernels.chunkwise_mosaic.forward_tiling`).
            Where the tiling does not take it, the XLA form runs.
        layout: Of q, k, v and h: ``"BNSD"`` (B, NH, S, D), the backends' documented layout; or ``"BSND"``, (B, S,
            NH, D), as the layer's projections write them, which the kernels read and write in place (no transposes
            around the call). The mLSTM layer lays its heads out as the backend's config says.
    """

    chunk_size: int = 256
    block_dhv: int | None = None
    consumers: int | None = None
    interpret: bool | None = None
    backward: str = "mosaic"
    backward_consumers: int = 2
    scores: str | None = None
    backward_scan_block_dhv: int | None = None
    cluster: int | None = None
    split: int | None = None
    c_operand: str | None = None
    layout: str = "BNSD"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_chunk_size(self.chunk_size)
        if self.block_dhv not in (None, 32, 64) or isinstance(self.block_dhv, bool):
            raise ValueError(f"block_dhv must be None, 32 or 64, got {self.block_dhv!r}")
        if self.consumers is not None and (self.consumers not in (1, 2) or isinstance(self.consumers, bool)):
            raise ValueError(f"consumers must be 1 or 2 (warpgroups per kernel program), got {self.consumers!r}")
        if self.interpret is not None:
            check_bool("interpret", self.interpret)
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}, got {self.backward!r}")
        if self.backward_consumers not in (1, 2) or isinstance(self.backward_consumers, bool):
            raise ValueError(f"backward_consumers must be 1 or 2 (warpgroups), got {self.backward_consumers!r}")
        if self.scores is not None and self.scores not in SCORES:
            raise ValueError(f"scores must be None or one of {SCORES}, got {self.scores!r}")
        if self.backward_scan_block_dhv is not None and (
            self.backward_scan_block_dhv not in (32, 64) or isinstance(self.backward_scan_block_dhv, bool)
        ):
            raise ValueError(f"backward_scan_block_dhv must be None, 32 or 64, got {self.backward_scan_block_dhv!r}")
        if self.cluster is not None and (self.cluster not in CLUSTERS or isinstance(self.cluster, bool)):
            raise ValueError(f"cluster must be None or one of {CLUSTERS} (programs per cluster), got {self.cluster!r}")
        if self.split is not None and (
            not isinstance(self.split, int) or isinstance(self.split, bool) or self.split < 1
        ):
            raise ValueError(f"split must be None or a positive integer (segments per head), got {self.split!r}")
        if self.c_operand is not None and self.c_operand not in C_OPERANDS:
            raise ValueError(f"c_operand must be None or one of {C_OPERANDS}, got {self.c_operand!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")


class mLSTMBackendChunkwiseMosaic(mLSTMBackend):
    """The mLSTM in chunkwise form with the Mosaic GPU kernel on Hopper (``chunkwise_hopper_fw``).

    Example:
        >>> backend = create_mlstm_backend("chunkwise_mosaic")
        >>> h, (c, n, m) = backend(q, k, v, i, f, return_last_states=True)  # h (B, NH, S, DHV)
    """

    config: mLSTMBackendChunkwiseMosaicConfig
    config_class = mLSTMBackendChunkwiseMosaicConfig
    form = staticmethod(shard_map_sequence_form(chunkwise_hopper_fw))  # per device under a mesh

    @property
    def can_vmap_over_heads(self) -> bool:
        """False: the kernel takes the heads dimension as part of its grid and is not tested under vmap."""
        return False
