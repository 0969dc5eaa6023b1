"""Where the residual-norm and read-out kernels run as Mosaic GPU kernels, and Mosaic GPU interpret mode.

``add_rms_norm_pallas`` and ``head_norm_gate_pallas`` each have a Triton kernel (any GPU, and Pallas interpret
mode) and a Mosaic GPU kernel (Hopper), chosen by their ``backend`` argument through :func:`use_mosaic`. The
Mosaic GPU kernels also run on a CPU in Mosaic GPU interpret mode where the installed JAX has it
(:func:`mosaic_interpret_params`), which is how CI checks their numbers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
from jax import lax
from jax.experimental import pallas as pl

from xlstm_jax.kernels.config import STEP_BACKENDS
from xlstm_jax.kernels.recurrent_step_mosaic import device_supports_mosaic

__all__ = [
    "HEADS_MAJOR",
    "LAYOUTS",
    "WARPGROUP",
    "HeadColumns",
    "Rows",
    "as_array",
    "check_sequence_operand",
    "heads_minor_operand",
    "chunk_length",
    "finished_when_interpreted",
    "interpreter_threads",
    "map_under_vmap",
    "mosaic_interpret_params",
    "require_mosaic_interpreter",
    "use_mosaic",
]

_F = TypeVar("_F", bound=Callable[..., Any])

WARPGROUP = 128  # threads of a Mosaic GPU program (one warpgroup); vectors are read in multiples of it


# The layouts of a sequence operand (q, k, v, h) that the chunkwise kernels read and write: heads-major
# (B, NH, S, D), the documented backends', or heads-minor (B, S, NH, D), as the layer's projections write them.
LAYOUTS = ("BNSD", "BSND")


class Rows(NamedTuple):
    """Where row ``r`` of a kernel's grid finds its steps in a sequence operand: a static description, so that one
    kernel body reads either layout (:data:`LAYOUTS`) without a copy of the operand.

    ``heads=0``: the operand is heads-major, ``(R, parts · T, D)``. ``heads=NH``: heads-minor, ``(B, parts · T, W)``,
    head h the D = ``width`` columns from ``column + h · D`` (W = NH · D from column 0 for a reshaped (B, S, NH, D);
    or a block of a wider array, such as a fused projection's output, :class:`HeadColumns`): a window of columns,
    which a TMA copy reads as it reads a row block. Each sequence's ``parts · T`` steps are ``parts`` rows of T steps
    of their own (a kernel's segments), so row ``r = (b · NH + h) · parts + p`` (``r = b · parts + p`` heads-major) is
    steps ``p · T`` to ``(p + 1) · T`` of sequence ``(b, h)``.
    """

    heads: int = 0
    parts: int = 1
    column: int = 0
    head_width: int = 0  # D where the operand is wider than NH · D; 0: W / NH

    def steps(self, ref: Any) -> int:
        """T: the steps of one row."""
        return ref.shape[1] // self.parts

    def width(self, ref: Any) -> int:
        """D: the columns of one head."""
        return self.head_width or ref.shape[-1] // max(self.heads, 1)

    def count(self, ref: Any) -> int:
        """The operand's rows."""
        return ref.shape[0] * max(self.heads, 1) * self.parts

    def window(self, ref: Any, row: Any, start: Any, size: int, columns: Any = None) -> Any:
        """``size`` steps of row ``row`` from its step ``start``: a (size, D) view of ``ref`` (GMEM), or with
        ``columns`` (a ``pl.ds`` within D) those columns of it."""
        if self.parts == 1:
            sequence, steps = row, pl.ds(start, size)
        else:
            sequence, steps = row // self.parts, pl.ds((row % self.parts) * self.steps(ref) + start, size)
        if not self.heads:
            return ref.at[sequence, steps] if columns is None else ref.at[sequence, steps, columns]
        D = self.width(ref)
        first = self.column + (sequence % self.heads) * D
        window = pl.ds(first, D) if columns is None else pl.ds(first + columns.start, columns.size)
        return ref.at[sequence // self.heads, steps, window]


HEADS_MAJOR = Rows()  # one row per leading index: (R, T, D)


@jax.tree_util.register_pytree_node_class
class HeadColumns:
    """A heads-minor operand (B, S, NH, D) of the chunkwise kernels that is a block of columns of a wider array:
    head h is columns ``start + h · D`` to ``start + (h + 1) · D`` of ``array`` (B, S, W). The kernels read it in
    place (no copy of the block, which a column slice passed to a kernel would cost); everything else takes its
    ``value()``. A pytree (``array`` its leaf), so it passes through ``jit`` and ``custom_vjp``.
    """

    def __init__(self, array: jax.Array, start: int, heads: int, width: int):
        if array.ndim != 3 or not (start >= 0 and start + heads * width <= array.shape[-1]) or heads < 1 or width < 1:
            raise ValueError(
                f"HeadColumns: columns {start} to {start} + {heads} * {width} must lie within the last axis of a "
                f"(B, S, W) array, got array.shape={tuple(array.shape)}"
            )
        self.array, self.start, self.heads, self.width = array, start, heads, width

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (*self.array.shape[:2], self.heads, self.width)

    @property
    def dtype(self) -> Any:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return 4

    def value(self) -> jax.Array:
        """The block as an array of its own, (B, S, NH, D)."""
        block = self.array[..., self.start : self.start + self.heads * self.width]
        return block.reshape(self.shape)

    def rows(self, parts: int = 1) -> Rows:
        """The kernels' description of this operand (its ``array``)."""
        return Rows(self.heads, parts, self.start, self.width)

    def tree_flatten(self) -> tuple[tuple[jax.Array], tuple[int, int, int]]:
        return (self.array,), (self.start, self.heads, self.width)

    @classmethod
    def tree_unflatten(cls, aux: tuple[int, int, int], children: tuple[Any]) -> HeadColumns:
        obj = object.__new__(cls)  # no checks: autodiff and tracing rebuild it with other leaves
        obj.array, (obj.start, obj.heads, obj.width) = children[0], aux
        return obj


def heads_minor_operand(x: jax.Array | HeadColumns) -> tuple[jax.Array, Rows]:
    """A heads-minor (B, S, NH, D) operand as the kernels take it: the (B, S, W) array and its :class:`Rows`."""
    if not isinstance(x, HeadColumns):
        B, S, NH, D = x.shape
        x = HeadColumns(x.reshape(B, S, NH * D), 0, NH, D)
    return x.array, x.rows()


def as_array(x: jax.Array | HeadColumns) -> jax.Array:
    """``x`` as an array: a :class:`HeadColumns` block's ``value()``, anything else as it is."""
    return x.value() if isinstance(x, HeadColumns) else x


def check_sequence_operand(name: str, x: jax.Array, rows: Rows, multiple: int = 64) -> None:
    """Raises ValueError unless ``x`` is a sequence operand of the chunkwise kernels that ``rows`` describes: (BH, S,
    D) heads-major, or (B, S, W) holding NH windows of D columns; S and D positive multiples of ``multiple``."""
    D = rows.width(x) if x.ndim == 3 else 0
    fits = x.ndim == 3 and (not rows.heads or rows.column + rows.heads * D <= x.shape[-1])
    if rows.heads and not rows.head_width:
        fits = fits and x.shape[-1] % rows.heads == 0
    if not fits or x.shape[1] == 0 or x.shape[1] % multiple or D == 0 or D % multiple:
        form = (
            f"(B, S, W) with NH={rows.heads} heads of D columns from column {rows.column}"
            if rows.heads
            else "(BH, S, D)"
        )
        raise ValueError(f"{name}.shape={tuple(x.shape)} must be {form}, S and D positive multiples of {multiple}")


def chunk_length(n: int) -> int:
    """The length of the chunks in which a kernel reads a vector of n elements (a multiple of ``WARPGROUP``):
    256 or, where n is an odd multiple of 128, 128. A chunk lands in registers 2 (or 1) values a thread in every
    dtype, so that chunks of different dtypes (a bfloat16 row and its float32 weight) combine elementwise
    without a change of layout (a whole 512-element bfloat16 vector would take 4 values a thread, its float32
    weight 2)."""
    return 2 * WARPGROUP if n % (2 * WARPGROUP) == 0 else WARPGROUP


def mosaic_interpret_params() -> Any | None:
    """The ``interpret=`` value that runs a Mosaic GPU ``pl.kernel`` on the CPU, or None where this JAX has none.

    Mosaic GPU interpret mode (JAX 0.10) simulates the GPU's memories, threads and barriers on the CPU. It lives
    in a private module, so its absence (older or newer JAX) is reported as None rather than an error.
    """
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:
        return None
    return InterpretGPUParams()


def interpreter_threads() -> int:
    """The threads of XLA's CPU thread pool, on which Mosaic GPU interpret mode runs the kernel's threads.

    XLA sizes the pool when JAX starts its CPU backend: the ``NPROC`` environment variable where it is set, else
    the CPUs this process may run on. This reads the same sources now, so it is exact where ``NPROC`` is not
    changed after JAX starts.
    """
    nproc = os.environ.get("NPROC", "")
    if nproc.isdigit() and int(nproc) > 0:
        return int(nproc)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def require_mosaic_interpreter(threads: int) -> Any:
    """``mosaic_interpret_params()`` for a kernel of ``threads`` warpgroup threads, or a clear error.

    The interpreter runs a kernel of several threads as one computation per thread, each of which blocks a thread
    of XLA's CPU pool while it waits at a barrier; the call that launches them may hold one more. With fewer pool
    threads than ``threads + 1`` the kernel can deadlock (it did, on a 2-CPU machine, for two warpgroups), so that
    is an error here rather than a hang.

    Raises:
        ValueError: This JAX has no Mosaic GPU interpret mode.
        RuntimeError: XLA's CPU pool (:func:`interpreter_threads`) is too small for ``threads``.
    """
    params = mosaic_interpret_params()
    if params is None:
        raise ValueError(
            f"interpret=True needs a JAX with Mosaic GPU's interpreter (jax 0.10 or newer), not {jax.__version__}"
        )
    available = interpreter_threads()
    if threads > 1 and available < threads + 1:
        raise RuntimeError(
            f"Mosaic GPU interpret mode of a kernel of {threads} threads needs at least {threads + 1} threads in "
            f"XLA's CPU pool, which has {available}: set NPROC={threads + 1} (or more) in the environment before "
            "JAX starts"
        )
    return params


def finished_when_interpreted(kernel: _F) -> _F:
    """``kernel`` (a function with a keyword ``interpret``) made to return only once its results are computed
    when it runs in Mosaic GPU's interpreter outside a trace.

    The interpreter's callbacks dispatch JAX computations of their own, and XLA's CPU client admits a bounded
    number of computations in flight. Called eagerly, an interpreted kernel returns at once; if the caller then
    queues that many computations that wait for its results (an eager gate plan does), the kernel's next
    callback finds no free slot and both wait forever. Compiled calls and calls under a trace are unchanged.
    """

    @functools.wraps(kernel)
    def run(*args: Any, **kwargs: Any) -> Any:
        out = kernel(*args, **kwargs)
        leaves = jax.tree.leaves(out)
        if kwargs.get("interpret") and not any(isinstance(x, jax.core.Tracer) for x in leaves):
            jax.block_until_ready(leaves)
        return out

    return run  # type: ignore[return-value]


def use_mosaic(kernel: str, backend: str, mode: str, unsupported: str | None) -> bool:
    """Whether ``kernel`` runs as its Mosaic GPU kernel (True) or its Triton kernel (False).

    Args:
        kernel: The function's name, for error messages.
        backend: ``"auto"``: Mosaic when compiled on a GPU of compute capability 9.0 or newer for a shape the
            Mosaic kernel covers, Triton otherwise (also in interpret mode). ``"triton"``: always Triton.
            ``"mosaic"``: always Mosaic (compiled on Hopper, or Mosaic GPU interpret mode for ``mode ==
            "interpret"``), or an error.
        mode: Where the call runs, :func:`xlstm_jax.kernels.config.kernel_mode`'s ``"compiled"`` or
            ``"interpret"``.
        unsupported: Why the Mosaic kernel cannot run this call's shapes, or None if it can.

    Raises:
        ValueError: backend is not one of ``STEP_BACKENDS``; ``backend="mosaic"`` for shapes the Mosaic kernel
            does not cover, or in interpret mode with a JAX that has no Mosaic GPU interpret mode.
        RuntimeError: ``backend="mosaic"`` compiled on a device that is not a Hopper (or newer) GPU.
    """
    if backend not in STEP_BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {STEP_BACKENDS}")
    if backend == "triton":
        return False
    if backend == "auto":
        return mode == "compiled" and unsupported is None and device_supports_mosaic()
    if unsupported is not None:
        raise ValueError(f"backend='mosaic': the Mosaic GPU kernel of {kernel} cannot run this call: {unsupported}")
    if mode == "interpret" and mosaic_interpret_params() is None:
        raise ValueError(
            f"backend='mosaic' with interpret=True needs Mosaic GPU interpret mode, which JAX {jax.__version__} "
            "does not have; use backend='triton' for Pallas interpret mode"
        )
    if mode == "compiled" and not device_supports_mosaic():
        raise RuntimeError(
            f"backend='mosaic' needs a GPU of compute capability 9.0 or newer (TMA), got {jax.devices()[0]}; use "
            "backend='auto' or 'triton'"
        )
    return True


def map_under_vmap(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (array arguments, positional) made batchable: under ``jax.vmap`` it runs once per mapped element, in
    a ``lax.map`` over the mapped arguments (a Mosaic GPU ``pl.kernel`` has no batching rule of its own)."""
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *args):
        del axis_size

        def one(mapped):
            it = iter(mapped)
            return wrapped(*[next(it) if b else a for a, b in zip(args, in_batched, strict=True)])

        out = lax.map(one, [a for a, b in zip(args, in_batched, strict=True) if b])
        return out, jax.tree.map(lambda _: True, out)

    return wrapped
