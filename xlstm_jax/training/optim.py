"""The optimiser of xLSTM training: AdamW with a learning-rate schedule, masked weight decay, gradient clipping.

::

    updates = adamw(schedule, b1, b2, eps, weight_decay, mask=decay_mask)(clip_by_global_norm(grads, clip_norm))

The schedule rises linearly from 0 over ``warmup_steps`` to ``learning_rate``, then follows ``schedule``:

- ``"cosine"``: cosine decay to ``min_lr_ratio * learning_rate`` at ``total_steps``, constant after;
- ``"wsd"`` (warmup-stable-decay): constant until the last ``decay_fraction`` of ``total_steps``, then linear
  decay to ``min_lr_ratio * learning_rate`` at ``total_steps``;
- ``"constant"``: constant after the warmup.

Weight decay applies to matrices only (the projection kernels, the embedding and the LM head), never to the
norms' weights or the gate biases (:func:`decay_mask`). The optimiser state has the parameters' dtype
(float32 in training; see :mod:`xlstm_jax.training.step`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import jax
import optax

__all__ = ["SCHEDULES", "OptimizerConfig", "decay_mask", "make_optimizer", "make_schedule"]

SCHEDULES = ("cosine", "wsd", "constant")


def _number(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {name}={value!r} ({type(value).__name__})")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {name}={value!r} ({type(value).__name__})")
    return int(value)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a schedule, masked weight decay and global-norm clipping. Frozen and hashable.

    Attributes:
        learning_rate: Peak learning rate (after the warmup).
        total_steps: Length of the schedule in optimiser steps (the decay ends here).
        warmup_steps: Linear warmup from 0 (at step 0) to ``learning_rate`` (at ``warmup_steps``).
        schedule: ``"cosine"``, ``"wsd"`` or ``"constant"`` (see the module docstring).
        decay_fraction: With ``"wsd"``: the fraction of ``total_steps`` at its end over which the rate decays.
        min_lr_ratio: The final learning rate as a fraction of ``learning_rate`` (cosine and wsd).
        b1: Adam's first-moment decay.
        b2: Adam's second-moment decay.
        eps: Adam's epsilon.
        weight_decay: Decoupled weight decay of the matrices (:func:`decay_mask`).
        decay_embedding: Whether the embedding matrix is decayed too.
        clip_norm: Gradients are scaled down to this global norm where it is exceeded; None: no clipping.

    Raises:
        TypeError: a field of the wrong type (named).
        ValueError: a field out of range (named, with its value).
    """

    learning_rate: float = 3e-4
    total_steps: int = 10_000
    warmup_steps: int = 1_000
    schedule: str = "cosine"
    decay_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embedding: bool = True
    clip_norm: float | None = 1.0

    def __post_init__(self) -> None:
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("learning_rate", "decay_fraction", "min_lr_ratio", "b1", "b2", "eps", "weight_decay"):
            store(name, _number(name, getattr(self, name)))
        for name in ("total_steps", "warmup_steps"):
            store(name, _integer(name, getattr(self, name)))
        if self.clip_norm is not None:
            store("clip_norm", _number("clip_norm", self.clip_norm))
            if self.clip_norm <= 0:
                raise ValueError(
                    f"clip_norm must be positive (or None for no clipping), got clip_norm={self.clip_norm}"
                )
        if not isinstance(self.decay_embedding, bool):
            raise TypeError(f"decay_embedding must be a bool, got decay_embedding={self.decay_embedding!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got schedule={self.schedule!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got learning_rate={self.learning_rate}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be positive, got total_steps={self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={self.total_steps}], got warmup_steps={self.warmup_steps}"
            )
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got decay_fraction={self.decay_fraction}")
        if self.schedule == "wsd" and self.warmup_steps > self.total_steps - self._decay_steps:
            raise ValueError(
                f"schedule='wsd': warmup_steps={self.warmup_steps} overlaps the decay, which starts at step "
                f"{self.total_steps - self._decay_steps} (total_steps={self.total_steps} x (1 - decay_fraction="
                f"{self.decay_fraction}))"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got min_lr_ratio={self.min_lr_ratio}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {name}={getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got eps={self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got weight_decay={self.weight_decay}")

    @property
    def _decay_steps(self) -> int:
        """Length of the wsd decay in steps (at least 1)."""
        return max(1, round(self.total_steps * self.decay_fraction))

    def replace(self, **changes: Any) -> OptimizerConfig:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
    """The learning rate as a function of the optimiser step (0 before the first update); see the module docstring."""
    if not isinstance(config, OptimizerConfig):
        raise TypeError(f"config must be an OptimizerConfig, got {type(config).__name__}")
    peak, warmup, total = config.learning_rate, config.warmup_steps, config.total_steps
    low = peak * config.min_lr_ratio
    rise = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if config.schedule == "constant":
        return optax.join_schedules([rise, optax.constant_schedule(peak)], [warmup])
    if config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=config.min_lr_ratio)
        return optax.join_schedules([rise, after], [warmup])
    decay_start = total - config._decay_steps
    stable = optax.constant_schedule(peak)
    decay = optax.linear_schedule(peak, low, config._decay_steps)
    return optax.join_schedules([rise, stable, decay], [warmup, decay_start])


def decay_mask(params: Any, *, decay_embedding: bool = True) -> Any:
    """Which parameters are weight-decayed: a tree of bools with the structure of ``params``.

    True for matrices (every ``kernel``: the fused ``qkvo_kernel`` and ``if_kernel``, ``out_proj``, the FFN
    and the LM head; and ``embedding/embedding`` unless ``decay_embedding`` is False), False for the norms'
    ``weight`` and the gate biases ``if_bias``. Decided by the parameter's name (the last key of its path), so
    both block layouts (unrolled and stacked under ``nn.scan``) get the same mask.

    Raises:
        ValueError: a parameter name that is neither (the model's tree is listed in its module docstring).
    """

    def rule(path: tuple, leaf: Any) -> bool:
        name = getattr(path[-1], "key", str(path[-1]))
        where = "/".join(str(getattr(p, "key", p)) for p in path)
        if name.endswith("kernel"):
            return True
        if name == "embedding":
            return decay_embedding
        if name in ("weight", "if_bias") or name.endswith("bias"):
            return False
        raise ValueError(f"decay_mask: parameter {where} is neither a kernel, an embedding, a norm weight nor a bias")

    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """``optax.chain(clip_by_global_norm(clip_norm), adamw(make_schedule(config), ..., mask=decay_mask))``.

    Example:
        >>> optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=100, warmup_steps=10))
        >>> opt_state = optimizer.init(params)
    """
    if not isinstance(config, OptimizerConfig):
        raise TypeError(f"config must be an OptimizerConfig, got {type(config).__name__}")

    def mask(params: Any) -> Any:
        return decay_mask(params, decay_embedding=config.decay_embedding)

    adamw = optax.adamw(
        make_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=mask,
    )
    if config.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
