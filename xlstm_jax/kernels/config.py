"""Tuning settings of the fused mLSTM kernels, the head sizes they support, and where they run.

Both configs are frozen dataclasses, so they are hashable and can be static arguments of ``jax.jit``.
``get_default(DHQK, DHV)`` gives the setting tuned on an H200 for a head shape (see BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "MAX_HEAD_DIM",
    "MIN_HEAD_DIM",
    "STEP_BACKENDS",
    "SequenceKernelConfig",
    "StepKernelConfig",
    "check_head_dims",
    "check_kernel_dtypes",
    "kernel_mode",
    "kernel_supports_dtypes",
    "kernel_supports_head_dims",
]

MIN_HEAD_DIM = 16  # xLSTM models use 64 to 512; 16 and 32 also work (small test shapes) at no cost.
MAX_HEAD_DIM = 512  # a (DHQK, block_dhv) float32 tile of the sequence kernel must stay on chip.

STEP_BACKENDS = ("auto", "triton", "mosaic")  # StepKernelConfig.backend

# Input dtypes the kernels read; they upcast to the float32 state on chip.
_INPUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def kernel_supports_head_dims(DHQK: int, DHV: int) -> bool:
    """Whether the Pallas mLSTM kernels cover heads of (DHQK, DHV): powers of two in [MIN_HEAD_DIM, MAX_HEAD_DIM]."""
    return all(_is_pow2(d) and MIN_HEAD_DIM <= d <= MAX_HEAD_DIM for d in (DHQK, DHV))


def kernel_supports_dtypes(*dtypes: Any) -> bool:
    """Whether the Pallas mLSTM kernels read inputs of every dtype given (float32, bfloat16 or float16)."""
    return all(jnp.dtype(d) in _INPUT_DTYPES for d in dtypes)


def check_head_dims(DHQK: int, DHV: int) -> None:
    """Raises ``ValueError`` unless :func:`kernel_supports_head_dims` (powers of two in [MIN_HEAD_DIM,
    MAX_HEAD_DIM]). The kernels call it on every platform, also where they would run the XLA form (no GPU):
    asking for a kernel on a head it does not cover is an error wherever it runs.

    Triton tiles must have power-of-two sizes, and the sequence kernel keeps a (DHQK, block_dhv) float32
    tile in registers, which bounds DHQK.
    """
    if kernel_supports_head_dims(DHQK, DHV):
        return
    sizes = ", ".join(str(2**e) for e in range(MIN_HEAD_DIM.bit_length() - 1, MAX_HEAD_DIM.bit_length()))
    bad = ", ".join(f"{name}={d}" for name, d in (("DHQK", DHQK), ("DHV", DHV)) if not kernel_supports_head_dims(d, d))
    raise ValueError(
        f"the Pallas mLSTM kernels support head dims DHQK and DHV in {{{sizes}}} (powers of two from {MIN_HEAD_DIM} "
        f"to {MAX_HEAD_DIM}); got {bad} (DHQK={DHQK}, DHV={DHV}). Use an XLA form (backend 'recurrent' or "
        "'chunkwise') for other sizes."
    )


def check_kernel_dtypes(**arrays: Any) -> None:
    """Raises ``TypeError`` unless every given array is float32, bfloat16 or float16."""
    for name, x in arrays.items():
        if x is not None and jnp.dtype(x.dtype) not in _INPUT_DTYPES:
            raise TypeError(
                f"the Pallas mLSTM kernels read float32, bfloat16 or float16 inputs, got {name}.dtype={x.dtype}"
            )


def kernel_mode(interpret: bool | None) -> str:
    """Where a kernel call runs: ``"compiled"``, ``"interpret"`` or ``"xla"`` (the fallback).

    Args:
        interpret: None: the compiled kernel on a GPU, the XLA recurrent form elsewhere. True: the kernel in
            Pallas interpret mode (any platform; slow, for tests). False: the compiled kernel, which needs a GPU.

    Raises:
        RuntimeError: ``interpret=False`` but JAX's default backend is not a GPU.
        TypeError: interpret is not None or a bool.
    """
    if interpret is not None and not isinstance(interpret, bool):
        raise TypeError(f"interpret must be None or a bool, got {interpret!r}")
    on_gpu = jax.default_backend() == "gpu"
    if interpret is None:
        return "compiled" if on_gpu else "xla"
    if interpret:
        return "interpret"
    if not on_gpu:
        raise RuntimeError(
            "interpret=False asks for the compiled Pallas (Triton) kernel, which needs a GPU, but JAX's default "
            f"backend is {jax.default_backend()!r}; pass interpret=None to fall back to the XLA recurrent form "
            "or interpret=True for Pallas interpret mode"
        )
    return "compiled"


def _check_block(name: str, value: int, limit: int, limit_name: str) -> None:
    if not isinstance(value, int) or not _is_pow2(value):
        raise ValueError(f"{name}={value!r} must be a positive power of two")
    if value > limit:
        raise ValueError(f"{name}={value} must be at most {limit_name}={limit}")


def _check_launch(num_warps: int, num_stages: int) -> None:
    if not (isinstance(num_warps, int) and _is_pow2(num_warps) and num_warps <= 32):
        raise ValueError(f"num_warps={num_warps!r} must be a power of two from 1 to 32")
    if not (isinstance(num_stages, int) and num_stages >= 1):
        raise ValueError(f"num_stages={num_stages!r} must be a positive integer")


@dataclass(frozen=True)
class StepKernelConfig:
    """Tiling of the decode-step kernel, and which of its two implementations runs.

    ``backend="triton"``: the Pallas kernel of :mod:`xlstm_jax.kernels.recurrent_step` (any GPU, and
    interpret mode). ``"mosaic"``: the Mosaic GPU kernel of :mod:`xlstm_jax.kernels.recurrent_step_mosaic`
    (Hopper, compiled only; c streamed by the TMA engine, closer to the copy floor at large batches than the
    Triton kernel: BENCHMARKS.md, the decode step). ``"auto"``: Mosaic where it runs and pays (compiled on a
    GPU of compute capability 9.0 or newer, a head shape it tiles, and at least ``mosaic_min_programs``
    programs), Triton otherwise.

    Each (Triton) program owns the state rows of one DHQK split and one block of DHV columns of one head, and walks
    its rows ``block_dhqk`` at a time, each next row block requested one loop iteration ahead. The grid is
    (DHV / block_dhv, dhqk_splits, B·NH), DHV blocks fastest, so that the programs launched together cover
    contiguous memory.

    Attributes:
        block_dhv: Columns of c per program.
        block_dhqk: Rows of c loaded per loop iteration inside a program; None for all the program's rows
            at once (no loop).
        dhqk_splits: Programs across DHQK, or None to pick the fewest (a power of two) that give at least
            ``min_programs`` programs. With more than one, each program writes its partial numerator and
            partial ``q̂·n``; their sums are divided after the kernel (exact: both are sums over DHQK).
        min_programs: Target number of programs for the automatic split (a few per multiprocessor).
        num_warps: Triton warps per program.
        num_stages: Triton software-pipelining stages.
        backend: ``"auto"``, ``"triton"`` or ``"mosaic"`` (above). The Mosaic kernel uses ``block_dhv`` (a
            multiple of 32), ``block_dhqk`` (a multiple of 64; None for 64) and ``pipeline_depth``; one
            program per head and column block, no DHQK split.
        pipeline_depth: Mosaic kernel: row blocks of c in flight per program (2 and 3 measure the same on an
            H200; 1 and 4 slower: BENCHMARKS.md).
        mosaic_min_programs: ``"auto"`` picks the Mosaic kernel from this many programs (B·NH·DHV/block_dhv)
            up. Below it the step is short and the Mosaic launch's larger host cost decides (B <= 8 at xLSTM-7B's
            heads), while from B=32 (2048 programs) the device time decides and the Mosaic kernel wins
            (BENCHMARKS.md, the decode step).
    """

    block_dhv: int = 64
    block_dhqk: int | None = 64
    dhqk_splits: int | None = None
    min_programs: int = 512
    num_warps: int = 4
    num_stages: int = 1
    backend: str = "auto"
    pipeline_depth: int = 2
    mosaic_min_programs: int = 2048

    def __post_init__(self) -> None:
        _check_block("block_dhv", self.block_dhv, MAX_HEAD_DIM, "MAX_HEAD_DIM")
        if self.block_dhqk is not None:
            _check_block("block_dhqk", self.block_dhqk, MAX_HEAD_DIM, "MAX_HEAD_DIM")
        if self.dhqk_splits is not None:
            _check_block("dhqk_splits", self.dhqk_splits, MAX_HEAD_DIM, "MAX_HEAD_DIM")
        if not (isinstance(self.min_programs, int) and self.min_programs >= 1):
            raise ValueError(f"min_programs={self.min_programs!r} must be a positive integer")
        _check_launch(self.num_warps, self.num_stages)
        if self.backend not in STEP_BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {STEP_BACKENDS}")
        if not (isinstance(self.mosaic_min_programs, int) and self.mosaic_min_programs >= 1):
            raise ValueError(f"mosaic_min_programs={self.mosaic_min_programs!r} must be a positive integer")
        if not (isinstance(self.pipeline_depth, int) and 1 <= self.pipeline_depth <= 8):
            raise ValueError(f"pipeline_depth={self.pipeline_depth!r} must be an integer from 1 to 8")

    @classmethod
    def get_default(cls, DHQK: int, DHV: int) -> StepKernelConfig:
        """The default tiling for a head shape: (64, 64) tiles, one per program, DHQK split in blocks of 64.

        Tuned on an H200 at DHQK=256, DHV=512 (BENCHMARKS.md, variant ``bv64-s4-bk64-w4``).
        """
        check_head_dims(DHQK, DHV)
        return cls(block_dhv=min(64, DHV), block_dhqk=min(64, DHQK), dhqk_splits=max(1, DHQK // 64))

    def splits(self, BH: int, DHQK: int, DHV: int) -> tuple[int, int, int]:
        """``(block_dhv, dhqk_splits, block_dhqk)`` for ``BH = B·NH`` heads, each clipped to the head shape."""
        block_dhv = min(self.block_dhv, DHV)
        num_dhv_blocks = DHV // block_dhv
        if self.dhqk_splits is None:
            splits = 1
            while BH * num_dhv_blocks * splits < self.min_programs and splits * 2 * MIN_HEAD_DIM <= DHQK:
                splits *= 2
        else:
            splits = min(self.dhqk_splits, DHQK // min(MIN_HEAD_DIM, DHQK))
        rows = DHQK // splits
        return block_dhv, splits, rows if self.block_dhqk is None else min(self.block_dhqk, rows)


_CHUNK_SIZES = (16, 32, 64, 128, 256)  # closed-form blocks: matrix-unit tiles need at least 16 rows


@dataclass(frozen=True)
class SequenceKernelConfig:
    """Tiling of the whole-sequence kernel.

    The grid is (B·NH, DHV / block_dhv). Each program keeps its (DHQK, block_dhv) float32 tile of c, and
    n and m, on chip across all time steps, and advances them ``chunk_size`` steps at a time.

    Attributes:
        block_dhv: Columns of c per program (at least 16, the smallest matrix-unit tile).
        chunk_size: Time steps per block: a power of two from 16 to 256, whose steps are computed in closed
            form with matrix products; or 1, the literal step-by-step recurrence (slower: one serial chain
            of vector operations per step). The ``S % chunk_size`` steps at the end run step by step.
        num_warps: Triton warps per program.
        num_stages: Triton software-pipelining stages.
    """

    block_dhv: int = 64
    chunk_size: int = 64
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        _check_block("block_dhv", self.block_dhv, MAX_HEAD_DIM, "MAX_HEAD_DIM")
        if self.block_dhv < MIN_HEAD_DIM:
            raise ValueError(f"block_dhv={self.block_dhv} must be at least {MIN_HEAD_DIM}")
        if not (self.chunk_size == 1 or (isinstance(self.chunk_size, int) and self.chunk_size in _CHUNK_SIZES)):
            raise ValueError(f"chunk_size={self.chunk_size!r} must be 1 or one of {_CHUNK_SIZES}")
        _check_launch(self.num_warps, self.num_stages)

    @classmethod
    def get_default(cls, DHQK: int, DHV: int) -> SequenceKernelConfig:
        """The default tiling for a head shape, from the H200 sweeps in BENCHMARKS.md (bf16 inputs, S=2048).

        DHQK=256, DHV=512 (xLSTM-7B): blocks of 64 steps, 128 columns, 8 warps, 2 stages
        (``L64-bv128-w8-s2``), the fastest tiling once the state update accumulated into the tile.
        DHQK=DHV=64: blocks of 64 steps, 32 columns, 4 warps (``L64-bv32-w4``), the fastest of 7.
        DHQK=512 (not compiled on a GPU yet): 64 columns, so the float32 tile stays at 128 values per thread,
        and blocks of 32 steps in one stage, to keep the (L, DHQK) operands within shared memory.
        """
        check_head_dims(DHQK, DHV)
        if DHQK <= 128:
            return cls(block_dhv=min(DHV, 32), chunk_size=64, num_warps=4)
        if DHQK <= 256:
            return cls(block_dhv=min(DHV, 128), chunk_size=64, num_warps=8, num_stages=2)
        return cls(block_dhv=min(DHV, 64), chunk_size=32, num_warps=8, num_stages=1)
