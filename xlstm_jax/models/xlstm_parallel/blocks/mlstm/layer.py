"""The mLSTM layer of the xLSTM block: projections, gates, the cell (a backend), per-head norm, output gate.

::

    [q k v o i f] = x W_qkvoif           one product, D -> 2 qk_dim + 2 v_dim + 2 NH, float32 output
    q, k (qk_dim each), v, o (v_dim each): cast to config.dtype; no biases
    i, f = cap · tanh((x Wi + bi) / cap), same for f    (NH each, with bias; cap = gate_soft_cap)
    h    = mLSTM(q, k, v, i, f)     per head: q, k (B, NH, S, DHQK), v (B, NH, S, DHV)
    y    = (sigmoid(o) * MultiHeadLayerNorm(h)) Wout     (v_dim -> D)

The cell runs on a whole sequence with the prefill backend (``config.prefill_backend``, a registry name
of :mod:`...blocks.mlstm.backend`), or on one token with the decode step (``config.step_backend``, a
name in ``STEP_FUNCTIONS``). Both take the layer's carried states ``(c, n, m)`` and return the new ones.

Padding: where ``valid`` is False the gate pre-activations become ``i = PAD_IGATE`` and ``f = +inf``.
Then ``logsigmoid(f) = 0``, ``m' = max(m, i) = m`` and ``i' = exp(i - m') = 0``: the step leaves ``m``,
``c`` and ``n`` exactly unchanged (``c' = 1·c + 0·k vᵀ``), so padded positions do not touch the state.
``PAD_IGATE`` is ``-inf``: every form handles a chunk made only of such steps (the chunkwise and parallel
forms take a block's own max with ``stabilizer.finite_max``), ``tests/models/test_generation.py`` checks
bit-identical states for every backend and step form, and ``tests/models/test_model.py`` finite gradients
with padding.

Fused projection: the six input projections are one matrix product with one fused kernel parameter
``qkvoif_kernel`` (D, 2 qk_dim + 2 v_dim + 2 NH), columns in the order q, k, v, o, i, f, and the gate
biases are ``if_bias`` (2 NH,), i then f. One product reads x once and launches one kernel instead of six
(at batch 1 decode each product is a matrix-vector product bound by reading its weights, so the launches
and tails of the small ones are what fusing saves). The weights are stored fused, so nothing is
concatenated at run time; :mod:`...hf` splits and joins the ``transformers`` tensors on save and load.

Precision: the product accumulates in float32 and returns float32 (``preferred_element_type``); q, k, v
and o are rounded to ``config.dtype`` once, which is what a product in ``config.dtype`` returns, and the
gate pre-activations stay float32 (they are summed in log space over the whole sequence, see
``mlstm/stabilizer.py``), as a float32 product of the same ``config.dtype`` operands would give. The
states are in ``config.state_dtype``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import BACKENDS, create_mlstm_backend
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend
from xlstm_jax.models.xlstm_parallel.blocks.norm import MultiHeadLayerNorm
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig

__all__ = [
    "PAD_IGATE",
    "STEP_FUNCTIONS",
    "LayerStates",
    "create_prefill_backend",
    "mLSTMLayer",
    "resolve_step_fn",
    "soft_cap",
]

LayerStates = tuple[jax.Array, jax.Array, jax.Array]  # c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH)

# Decode step forms by name: module and function, all with the signature of ``recurrent_step_fw``
# ``(c, n, m, q, k, v, i, f, eps) -> (h, (c', n', m'))`` with m and the gates shaped (B, NH, 1).
# The input gate pre-activation of a padded position (see the module docstring); the forget gate's is +inf.
PAD_IGATE = -float("inf")

STEP_FUNCTIONS: dict[str, tuple[str, str]] = {
    "recurrent": ("xlstm_jax.mlstm.recurrent", "recurrent_step_fw"),
    "recurrent_pallas": ("xlstm_jax.kernels.recurrent_step", "recurrent_step_pallas"),
}


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """``cap * tanh(x / cap)``: smooth, odd, slope 1 at 0, bounded by ``cap``."""
    return cap * jnp.tanh(x / cap)


def resolve_step_fn(name: str) -> Callable[..., tuple[jax.Array, LayerStates]]:
    """The decode step function registered as ``name`` in ``STEP_FUNCTIONS``.

    Raises:
        ValueError: unknown name.
    """
    if name not in STEP_FUNCTIONS:
        raise ValueError(f"unknown decode step backend {name!r}; known: {sorted(STEP_FUNCTIONS)}")
    module, attr = STEP_FUNCTIONS[name]
    return getattr(importlib.import_module(module), attr)


def create_prefill_backend(config: xLSTMLMConfig) -> mLSTMBackend:
    """The prefill backend named by ``config.prefill_backend``, configured from the model config.

    The backend's config gets the model's ``eps`` and ``state_dtype`` (where it has those fields), a
    scanned time loop for the recurrent form (an unrolled Python loop over a long prompt would compile
    for minutes), then ``config.prefill_backend_kwargs`` on top, and the model-wide settings through
    ``assign_model_config_params``.

    Raises:
        ValueError: unknown backend name.
        TypeError: a key of ``prefill_backend_kwargs`` that the backend's config does not have.
    """
    name = config.prefill_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown prefill backend {name!r} (config.prefill_backend); known: {sorted(BACKENDS)}")
    config_class = BACKENDS[name].config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    kwargs: dict[str, Any] = {}
    if "eps" in fields:
        kwargs["eps"] = config.eps
    if "state_dtype" in fields:
        kwargs["state_dtype"] = config.state_dtype
    if "use_scan" in fields:
        kwargs["use_scan"] = True
    kwargs.update(dict(config.prefill_backend_kwargs))
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"prefill_backend_kwargs {unknown} are not fields of {config_class.__name__}: {sorted(fields)}")
    backend_config = config_class(**kwargs)
    backend_config.assign_model_config_params(config)
    return create_mlstm_backend(backend_config)


class mLSTMLayer(nn.Module):
    """The mLSTM layer. Parameters: ``qkvoif_kernel`` (D, 2 qk_dim + 2 v_dim + 2 NH), the fused input
    projections of ``transformers``' ``q``, ``k``, ``v``, ``ogate_preact``, ``igate_preact`` and
    ``fgate_preact``; ``if_bias`` (2 NH,), the two gate biases; ``multihead_norm/weight`` (v_dim,);
    ``out_proj/kernel`` (v_dim, D). Kernels are (in, out).

    Attributes:
        config: The model config.
        decode: Run the one-token decode step (S must be 1) instead of the prefill backend.
    """

    config: xLSTMLMConfig
    decode: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # (B, S, D)
        state: LayerStates,  # c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH) in config.state_dtype
        valid: jax.Array | None = None,  # (B, S) bool: False marks padding (an exact no-op step)
    ) -> tuple[jax.Array, LayerStates]:
        """Returns ``y (B, S, D)`` in ``config.dtype`` and the states after the last position."""
        cfg = self.config
        B, S, _ = x.shape
        NH, DHQK, DHV = cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim

        widths = cfg.mlstm_projection_widths
        kernel = self.param(
            "qkvoif_kernel", nn.initializers.lecun_normal(), (x.shape[-1], sum(widths)), cfg.jnp_param_dtype
        )
        gate_bias = self.param("if_bias", nn.initializers.zeros, (2 * NH,), cfg.jnp_param_dtype)
        x = x.astype(cfg.compute_dtype)
        qkvoif = jax.lax.dot_general(
            x, kernel.astype(cfg.compute_dtype), (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # (B, S, sum(widths)) float32
        q, k, v, o, i, f = jnp.split(qkvoif, np.cumsum(widths)[:-1].tolist(), axis=-1)
        q, k, v, o = (t.astype(cfg.compute_dtype) for t in (q, k, v, o))
        gate_bias = gate_bias.astype(jnp.float32)
        i = soft_cap(i + gate_bias[:NH], cfg.gate_soft_cap)  # (B, S, NH)
        f = soft_cap(f + gate_bias[NH:], cfg.gate_soft_cap)
        if valid is not None:
            i = jnp.where(valid[..., None], i, PAD_IGATE)
            f = jnp.where(valid[..., None], f, jnp.inf)

        def heads(t: jax.Array, dh: int) -> jax.Array:  # (B, S, NH * dh) -> (B, NH, S, dh)
            return t.reshape(B, S, NH, dh).transpose(0, 2, 1, 3)

        q, k, v = heads(q, DHQK), heads(k, DHQK), heads(v, DHV)
        i, f = i.transpose(0, 2, 1), f.transpose(0, 2, 1)  # (B, NH, S)
        c0, n0, m0 = state
        if self.decode:
            if S != 1:
                raise ValueError(f"the decode step takes one token per call, got x.shape={tuple(x.shape)}")
            step = resolve_step_fn(cfg.step_backend)
            h, (c, n, m) = step(c0, n0, m0[..., None], q[:, :, 0], k[:, :, 0], v[:, :, 0], i, f, eps=cfg.eps)
            h, m = h[:, :, None], m[..., 0]
        else:
            backend = create_prefill_backend(cfg)
            h, (c, n, m) = backend(q, k, v, i, f, c_initial=c0, n_initial=n0, m_initial=m0, return_last_states=True)
        h = h.astype(cfg.compute_dtype).transpose(0, 2, 1, 3)  # (B, S, NH, DHV)
        h = MultiHeadLayerNorm(
            eps=cfg.norm_eps,
            force_float32_reductions=cfg.norm_reduction_force_float32,
            param_dtype=cfg.jnp_param_dtype,
            name="multihead_norm",
        )(h)
        out_proj = nn.Dense(
            cfg.embedding_dim, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.jnp_param_dtype, name="out_proj"
        )
        y = out_proj(nn.sigmoid(o) * h)
        return y, (c, n, m)
