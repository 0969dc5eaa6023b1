"""How the xLSTM language model runs, apart from what it is: backends, block loop, fused decode, kernels.

:class:`~xlstm_jax.models.xlstm_parallel.config.xLSTMLMConfig` describes the architecture (what a Hugging
Face ``config.json`` describes: sizes, epsilons, dtypes, special tokens); :class:`RuntimeConfig` holds the
choices that change how the same function is computed. ``RuntimeConfig()`` is the one default, shared by
the library (``xLSTMLMModel``, ``generate``) and the command line.

Both are frozen and hashable, so both can be Flax module attributes and static arguments of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.config import StepKernelConfig, kernel_supports_dtypes, kernel_supports_head_dims

__all__ = ["STEP_BACKENDS", "DecodeFusion", "KernelMode", "Remat", "RuntimeConfig"]

# Decode step forms by name. "auto": the Pallas step where its kernels cover the head shape, else the XLA step.
STEP_BACKENDS = ("auto", "recurrent", "recurrent_pallas")


class KernelMode(enum.Enum):
    """Where the model's Pallas kernels (decode step, fused norms, the ``recurrent_pallas`` forms) run.

    AUTO: compiled on a GPU, their XLA form elsewhere. COMPILED: compiled (raises without a GPU).
    INTERPRET: Pallas interpret mode on any platform (slow; for tests of the kernels' code on a CPU).
    """

    AUTO = "auto"
    COMPILED = "compiled"
    INTERPRET = "interpret"

    @property
    def interpret(self) -> bool | None:
        """The kernels' ``interpret`` argument for this mode."""
        return {KernelMode.AUTO: None, KernelMode.COMPILED: False, KernelMode.INTERPRET: True}[self]


class DecodeFusion(enum.Enum):
    """Whether the decode step runs each residual add with the RMSNorm after it (the first with the mLSTM gate
    product) as one ``add_rms_norm_pallas`` kernel, and the mLSTM read-out (per-head norm and output gate) as
    one more kernel after the step: 11 kernels per block instead of 18, the same function.

    AUTO: where it applies (unrolled blocks and float32 norm statistics). ON: required (raises where it does
    not apply). OFF: never.
    """

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Remat(enum.Enum):
    """Rematerialisation of each block in training: which of its activations the backward pass keeps and which
    it recomputes (``jax.checkpoint`` with a policy; see :meth:`RuntimeConfig.remat_policy`).

    NONE: no rematerialisation (every activation the backward pass needs is kept; the most memory).
    FULL: only the block's input is kept; the whole block runs again in the backward pass (the least memory).
    DOTS: the results of matrix products without batch dimensions are kept (the projections: q, k, v, o, gates,
    FFN), everything else (norms, the mLSTM cell, activations) is recomputed.
    """

    NONE = "none"
    FULL = "full"
    DOTS = "dots"


def _enum(cls: type[enum.Enum], name: str, value: Any) -> enum.Enum:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = [m.value for m in cls]
        raise ValueError(f"{name} must be one of {choices} (or {cls.__name__}), got {name}={value!r}") from None


@dataclass(frozen=True)
class RuntimeConfig:
    """How the model computes (not what): the defaults are the fastest choices that apply everywhere.

    Attributes:
        prefill_backend: Registry name (``BACKENDS``) of the mLSTM form for whole sequences (prompts,
            training): ``"chunkwise_mosaic"`` by default, the Mosaic GPU chunkwise kernel for prompts on Hopper
            GPUs and the XLA chunkwise form (chunks of 256) elsewhere and under differentiation (training).
        prefill_backend_kwargs: Extra config fields of that backend, as ``((name, value), ...)`` (hashable),
            e.g. ``(("chunk_size", 64),)``.
        step_backend: The one-token decode step: ``"recurrent"`` (XLA), ``"recurrent_pallas"`` (the fused
            Pallas step; raises for head sizes or dtypes its kernels do not cover), or ``"auto"`` (default: the
            Pallas step where its kernels cover the head shape and dtypes, else the XLA step).
        scan_blocks: Run the blocks under ``nn.scan`` (parameters stacked on a leading axis of size L):
            compile time flat in depth, slower decode. Default False (unrolled blocks, parameters
            ``blocks_0`` ... ``blocks_{L-1}``; the decode step updates each layer's states in place).
        decode_fusion: :class:`DecodeFusion` (or its value as a string).
        kernel_mode: :class:`KernelMode` (or its value as a string).
        step_kernel: Tiling of the Pallas decode step, or None for its default for the head shape.
        remat: :class:`Remat` (or its value as a string): rematerialisation of each block in training.
    """

    prefill_backend: str = "chunkwise_mosaic"
    prefill_backend_kwargs: tuple[tuple[str, Any], ...] = ()
    step_backend: str = "auto"
    scan_blocks: bool = False
    decode_fusion: DecodeFusion = DecodeFusion.AUTO
    kernel_mode: KernelMode = KernelMode.AUTO
    step_kernel: StepKernelConfig | None = None
    remat: Remat = Remat.NONE

    def __post_init__(self) -> None:
        from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import BACKENDS

        if self.prefill_backend not in BACKENDS:
            raise ValueError(
                f"prefill_backend must be one of {sorted(BACKENDS)}, got prefill_backend={self.prefill_backend!r}"
            )
        kwargs = self.prefill_backend_kwargs
        if not isinstance(kwargs, tuple) or not all(
            isinstance(kv, tuple) and len(kv) == 2 and isinstance(kv[0], str) for kv in kwargs
        ):
            raise TypeError(f"prefill_backend_kwargs must be a tuple of (name, value) pairs (hashable), got {kwargs!r}")
        fields = {f.name for f in dataclasses.fields(BACKENDS[self.prefill_backend].config_class)}
        unknown = sorted({k for k, _ in kwargs} - fields)
        if unknown:
            raise ValueError(
                f"prefill_backend_kwargs {unknown} are not fields of the {self.prefill_backend!r} backend's config: "
                f"{sorted(fields)}"
            )
        if self.step_backend not in STEP_BACKENDS:
            raise ValueError(
                f"step_backend must be one of {list(STEP_BACKENDS)}, got step_backend={self.step_backend!r}"
            )
        if not isinstance(self.scan_blocks, bool):
            raise TypeError(f"scan_blocks must be a bool, got scan_blocks={self.scan_blocks!r}")
        object.__setattr__(self, "decode_fusion", _enum(DecodeFusion, "decode_fusion", self.decode_fusion))
        object.__setattr__(self, "kernel_mode", _enum(KernelMode, "kernel_mode", self.kernel_mode))
        object.__setattr__(self, "remat", _enum(Remat, "remat", self.remat))
        if self.step_kernel is not None and not isinstance(self.step_kernel, StepKernelConfig):
            raise TypeError(f"step_kernel must be a StepKernelConfig or None, got {self.step_kernel!r}")
        if self.decode_fusion is DecodeFusion.ON and self.scan_blocks:
            raise ValueError(
                "decode_fusion='on' needs unrolled blocks (scan_blocks=False); 'auto' applies it where it can"
            )

    @property
    def interpret(self) -> bool | None:
        """The ``interpret`` argument of the Pallas kernels (``kernel_mode``)."""
        return self.kernel_mode.interpret

    def replace(self, **changes: Any) -> RuntimeConfig:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def remat_policy(self) -> Any:
        """The ``jax.checkpoint`` policy of each block (``remat``), or None for no rematerialisation.

        ``Remat.FULL`` gives ``jax.checkpoint_policies.nothing_saveable`` and ``Remat.DOTS``
        ``dots_with_no_batch_dims_saveable``; the model wraps each block in ``nn.remat(..., policy=...)``
        unless this is None.
        """
        policies = jax.checkpoint_policies
        return {
            Remat.NONE: None,
            Remat.FULL: policies.nothing_saveable,
            Remat.DOTS: policies.dots_with_no_batch_dims_saveable,
        }[self.remat]

    def step_form(self, DHQK: int, DHV: int, dtype: Any = "float32", state_dtype: Any = "float32") -> str:
        """The decode step that runs for heads of (DHQK, DHV) with inputs of ``dtype`` and states of
        ``state_dtype``: ``"recurrent"`` or ``"recurrent_pallas"``.

        Raises:
            ValueError: ``step_backend="recurrent_pallas"`` for a head shape its kernels do not cover (an
                explicit request for the kernel with dtypes it does not take fails in the kernel's own check).
        """
        supported = kernel_supports_head_dims(DHQK, DHV)
        if self.step_backend == "auto":
            takes = kernel_supports_dtypes(dtype) and jnp.dtype(state_dtype) == jnp.float32
            return "recurrent_pallas" if supported and takes else "recurrent"
        if self.step_backend == "recurrent_pallas" and not supported:
            raise ValueError(
                f"step_backend='recurrent_pallas': the Pallas step does not cover heads of DHQK={DHQK}, DHV={DHV} "
                "(powers of two from 16 to 512); use step_backend='auto' or 'recurrent'"
            )
        return self.step_backend

    def fuse_decode(self, norm_reduction_force_float32: bool, dtype: Any = "float32") -> bool:
        """Whether decoding uses the fused kernels (``decode_fusion`` resolved for a model whose norms take
        float32 statistics or not, with activations of ``dtype``).

        Raises:
            ValueError: ``decode_fusion='on'`` with norm statistics that are not float32 (the kernel's).
        """
        if self.decode_fusion is DecodeFusion.OFF:
            return False
        if self.decode_fusion is DecodeFusion.ON:
            if not norm_reduction_force_float32:
                raise ValueError(
                    "decode_fusion='on' computes the RMSNorm statistics in float32: the model needs "
                    "norm_reduction_force_float32=True"
                )
            return True
        return norm_reduction_force_float32 and not self.scan_blocks and kernel_supports_dtypes(dtype)
