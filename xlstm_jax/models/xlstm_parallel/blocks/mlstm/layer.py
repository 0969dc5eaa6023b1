"""The mLSTM layer of the xLSTM block: projections, gates, the cell (a backend), per-head norm, output gate.

::

    [q k v o] = x W_qkvo      one product, D -> 2 qk_dim + 2 v_dim, in config.dtype; no biases
    [i f] = x W_if + b_if     one product, D -> 2 NH, float32;  i, f = cap · tanh(. / cap) (cap = gate_soft_cap)
    h    = mLSTM(q, k, v, i, f)     per head: q, k (B, NH, S, DHQK), v (B, NH, S, DHV); or (B, S, NH, ·), below
    y    = (sigmoid(o) * MultiHeadLayerNorm(h)) Wout     (v_dim -> D)

The cell runs on a whole sequence with the prefill backend (``runtime.prefill_backend``, a registry name
of :mod:`...blocks.mlstm.backend`), or on one token with the decode step
(:func:`~xlstm_jax.models.xlstm_parallel.decode.mlstm_decode_step`, which picks its form from the runtime).
Both take the layer's carried states ``(c, n, m)`` and return the new ones.

Padding: where ``valid`` is False the gate pre-activations become ``i = PAD_IGATE`` and ``f = +inf``.
Then ``logsigmoid(f) = 0``, ``m' = max(m, i) = m`` and ``i' = exp(i - m') = 0``: the step leaves ``m``,
``c`` and ``n`` exactly unchanged (``c' = 1·c + 0·k vᵀ``), so padded positions do not touch the state.
``PAD_IGATE`` is ``-inf``: every form handles a chunk made only of such steps (the chunkwise and parallel
forms take a block's own max with ``stabilizer.finite_max``), ``tests/models/test_generation.py`` checks
bit-identical states for every backend and step form, and ``tests/models/test_model.py`` finite gradients
with padding.

Fused projections: the four wide input projections share one fused kernel parameter ``qkvo_kernel``
(D, 2 qk_dim + 2 v_dim), columns in the order q, k, v, o; the two gate projections are one product with
``if_kernel`` (D, 2 NH) and ``if_bias`` (2 NH,), i then f. In decode the four are one product: it reads x
once and launches one kernel instead of several (at batch 1 each product is a matrix-vector product bound
by reading its weights, so the launches and tails of the small ones are what fusing saves). In prefill
and training they are one product each from ``dense.SPLIT_MIN_ROWS`` rows on (``dense.project_split``:
the fused product's backward would concatenate the four cotangents into one activation-sized tensor).
The gates are kept out of the wide product: they need a float32 result, and 16 more
columns make its width 12304 = 16 x 769 for xLSTM-7B, for which XLA's Triton GEMM picked 16-column tiles
and ran at about half the bandwidth of the other products on an H200. The
weights are stored fused, so nothing is concatenated at run time; :mod:`...hf` splits and joins the
``transformers`` tensors on save and load.

Heads' layout: the documented backends take q, k, v as (B, NH, S, D) and return h so, which costs a copy of each
around the cell (the column block of the fused product, transposed). A ``chunkwise_mosaic`` backend configured with
``layout="BSND"`` takes them heads-minor and returns h so: the layer then runs the four projections as one product
and passes q, k and v as blocks of its columns (:class:`~xlstm_jax.kernels.mosaic.HeadColumns`), which the kernels
read in place, so nothing is copied. Under differentiation the fused product's cotangent is then one
activation-sized array, as ``dense.project_split`` avoids for training; ``"BSND"`` is for prefill.

Precision: projections run in ``config.dtype``; the gate pre-activations in float32 (float64 in a float64
model; the product of the
``config.dtype`` operands accumulated and returned in float32; they are summed in log space over the whole
sequence, see ``mlstm/stabilizer.py``); the states in ``config.state_dtype``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlstm_jax.kernels.mosaic import HeadColumns
from xlstm_jax.models.xlstm_parallel.blocks.dense import Dense, project, project_split, project_wide
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import BACKENDS, create_mlstm_backend
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend
from xlstm_jax.models.xlstm_parallel.blocks.norm import MultiHeadLayerNorm, RMSNorm, add_rms_norm
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.decode import mlstm_decode_step
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig

__all__ = ["PAD_IGATE", "LayerStates", "create_prefill_backend", "mLSTMLayer", "soft_cap"]

LayerStates = tuple[jax.Array, jax.Array, jax.Array]  # c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH)

# The input gate pre-activation of a padded position (see the module docstring); the forget gate's is +inf.
PAD_IGATE = -float("inf")


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """``cap * tanh(x / cap)``: smooth, odd, slope 1 at 0, bounded by ``cap``."""
    return cap * jnp.tanh(x / cap)


def create_prefill_backend(config: xLSTMLMConfig, runtime: RuntimeConfig) -> mLSTMBackend:
    """The prefill backend named by ``runtime.prefill_backend``, configured from the model config.

    The backend's config gets the model's ``eps`` and ``state_dtype`` and the runtime's kernel mode (where it
    has those fields), a scanned time loop for the recurrent form (an unrolled Python loop over a long prompt
    would compile for minutes), then ``runtime.prefill_backend_kwargs`` on top (``RuntimeConfig`` checked
    their names).
    """
    config_class = BACKENDS[runtime.prefill_backend].config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    kwargs: dict[str, Any] = {"eps": config.eps, "state_dtype": config.state_dtype, "use_scan": True}
    kwargs["interpret"] = runtime.interpret
    kwargs = {k: v for k, v in kwargs.items() if k in fields}
    kwargs.update(dict(runtime.prefill_backend_kwargs))
    return create_mlstm_backend(config_class(**kwargs))


class mLSTMLayer(nn.Module):
    """The mLSTM layer. Parameters: ``qkvo_kernel`` (D, 2 qk_dim + 2 v_dim), the fused input projections
    of ``transformers``' ``q``, ``k``, ``v`` and ``ogate_preact``; ``if_kernel`` (D, 2 NH) and ``if_bias``
    (2 NH,), its ``igate_preact`` and ``fgate_preact``; ``multihead_norm/weight`` (v_dim,);
    ``out_proj/kernel`` (v_dim, D). Kernels are (in, out).

    Attributes:
        config: The model config.
        runtime: How it runs (backends, kernels).
        decode: Run the one-token decode step (S must be 1) instead of the prefill backend.
        layer_index: None: ``state`` is this layer's ``(c, n, m)``. An int: ``state`` is every layer's states
            stacked on a leading axis L (``ModelStates``), this layer's slice is the one at ``layer_index``, and
            the stacks are returned with that slice replaced. The decode step then updates the slice in place
            (``mlstm_decode_step(..., layer=layer_index)``): no copy of the layer's state per token.
    """

    config: xLSTMLMConfig
    runtime: RuntimeConfig = RuntimeConfig()
    decode: bool = False
    layer_index: int | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # (B, S, D)
        state: LayerStates | None,  # c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH) in state_dtype (or stacked)
        valid: jax.Array | None = None,  # (B, S) bool: False marks padding (an exact no-op step)
        norm: RMSNorm | None = None,
        residuals: tuple[jax.Array, ...] = (),  # each (B, S, D)
        segment_ids: jax.Array | None = None,  # (B, S) int: packed documents (prefill only)
    ) -> tuple[jax.Array, LayerStates]:
        """Returns ``y (B, S, D)`` in ``config.dtype`` and the states after the last position (stacked as given).

        A ``state`` of None starts the cell from zero states, without reading any (not in decode); the last states
        are returned unstacked.

        With ``segment_ids`` the prefill backend runs each row as packed documents: a position whose id differs
        from the previous one starts from zero states (:mod:`xlstm_jax.mlstm.segments`). The decode step
        ignores them (one token continues the last document).

        With ``norm`` (the block's ``RMSNorm``; a fused decode, ``runtime.decode_fusion``), the layer's input is
        ``norm(x + residuals)``: the adds, the norm and the gate product with its soft cap run in one
        ``add_rms_norm_pallas`` call.
        """
        cfg = self.config
        B, S, _ = x.shape
        NH, DHQK, DHV = cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim

        D, QK, V = x.shape[-1], cfg.qk_dim, cfg.v_dim
        init = nn.initializers.lecun_normal()
        qkvo_kernel = self.param("qkvo_kernel", init, (D, 2 * QK + 2 * V), cfg.jnp_param_dtype)
        if_kernel = self.param("if_kernel", init, (D, 2 * NH), cfg.jnp_param_dtype)
        if_bias = self.param("if_bias", nn.initializers.zeros, (2 * NH,), cfg.jnp_param_dtype)
        x = x.astype(cfg.compute_dtype)

        def precision(dtype: Any) -> Any:
            return jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else None  # no TF32

        def product(x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:  # (B, S, D) x (D, F) -> (B, S, F)
            return project(x, kernel, dtype, precision(dtype))

        gate_dtype = jnp.promote_types(cfg.compute_dtype, jnp.float32)  # float32, or wider for a wider model
        if norm is None:
            gates = project_wide(x, if_kernel, gate_dtype) + if_bias.astype(gate_dtype)  # (B, S, 2 NH)
            gates = soft_cap(gates, cfg.gate_soft_cap)
        else:  # the same function: the adds, the norm and the gates in one kernel
            side = {"side_weight": if_kernel, "side_bias": if_bias, "side_cap": cfg.gate_soft_cap}
            _, x, gates = add_rms_norm(norm, x, residuals, return_sum=False, interpret=self.runtime.interpret, **side)
        if valid is not None:
            pad = jnp.repeat(jnp.array([PAD_IGATE, jnp.inf], gates.dtype), NH)  # i, then f (the module docstring)
            gates = jnp.where(valid[..., None], gates, pad)

        head_norm_module = MultiHeadLayerNorm(
            eps=cfg.norm_eps,
            force_float32_reductions=cfg.norm_reduction_force_float32,
            param_dtype=cfg.jnp_param_dtype,
            name="multihead_norm",
        )
        h_shape = jax.ShapeDtypeStruct((B, S, NH, DHV), cfg.compute_dtype)
        out_proj = Dense(
            cfg.embedding_dim, cfg.compute_dtype, cfg.jnp_param_dtype, cfg.matmul_precision, name="out_proj"
        )

        layer = None if state is None else self.layer_index
        heads_minor = False  # h (B, NH, S, DHV) from the cell, or (B, S, NH, DHV)
        if self.decode:
            if state is None:
                raise ValueError("the decode step continues from states: state must be given, got None")
            qkvo = product(x, qkvo_kernel, cfg.compute_dtype)  # (B, 1, 2 QK + 2 V)
            o = qkvo[..., 2 * QK + V :]
            if S != 1:
                raise ValueError(f"the decode step takes one token per call, got x.shape={tuple(x.shape)}")
            # fused decode: the step also computes the per-head norm and the output gate (its read-out kernel)
            head_norm = (head_norm_module(h_shape, normalize=False), cfg.norm_eps) if norm is not None else None
            h, (c, n, m) = mlstm_decode_step(
                state, qkvo[:, 0], gates[:, 0], layer=layer, eps=cfg.eps, runtime=self.runtime, head_norm=head_norm
            )
            if head_norm is not None:
                return out_proj(h[:, None]), (c, n, m)
            h = h[:, :, None]
        else:
            backend = create_prefill_backend(cfg, self.runtime)
            # The backend's layout of the heads (the module docstring): (B, NH, S, dh), or (B, S, NH, dh) blocks of
            # the fused product's columns that its kernels read in place (a chunkwise_mosaic config's "BSND").
            heads_minor = getattr(backend.config, "layout", "BNSD") == "BSND"
            if heads_minor:
                qkvo = product(x, qkvo_kernel, cfg.compute_dtype)  # (B, S, 2 QK + 2 V)
                q, k = HeadColumns(qkvo, 0, NH, DHQK), HeadColumns(qkvo, QK, NH, DHQK)
                v, o = HeadColumns(qkvo, 2 * QK, NH, DHV), qkvo[..., 2 * QK + V :]
            else:
                sizes = (QK, QK, V, V)
                q, k, v, o = project_split(x, qkvo_kernel, sizes, cfg.compute_dtype, precision(cfg.compute_dtype))

                def heads(t: jax.Array, dh: int) -> jax.Array:  # (B, S, NH * dh) -> (B, NH, S, dh)
                    return t.reshape(B, S, NH, dh).transpose(0, 2, 1, 3)

                q, k, v = heads(q, DHQK), heads(k, DHQK), heads(v, DHV)
            i, f = gates[..., :NH].transpose(0, 2, 1), gates[..., NH:].transpose(0, 2, 1)  # (B, NH, S)
            c0, n0, m0 = (None, None, None) if state is None else state if layer is None else (t[layer] for t in state)
            h, (c, n, m) = backend(
                q,
                k,
                v,
                i,
                f,
                c_initial=c0,
                n_initial=n0,
                m_initial=m0,
                return_last_states=True,
                segment_ids=segment_ids,
            )
            if layer is not None:
                # The new states and the stacks pass one barrier before the slices are written, which orders the
                # new states' reads of the old ones before the writes: XLA then writes in place, where it copied
                # m's stack once per layer in xLSTM-7B's 256-token prefill chunk (benchmarks/launches.py).
                c, n, m, state = jax.lax.optimization_barrier((c, n, m, state))
                c, n, m = (t.at[layer].set(u) for t, u in zip(state, (c, n, m), strict=True))
        h = h.astype(cfg.compute_dtype)
        if not heads_minor:
            h = h.transpose(0, 2, 1, 3)  # (B, S, NH, DHV)
        if heads_minor:
            # The output gate per head, (B, S, NH, DHV): on h as the kernel wrote it XLA then fuses the gate into the
            # norm's kernel (compiled for an H200, one kernel a block; on the merged heads, two).
            gated = nn.sigmoid(o.reshape(B, S, NH, DHV)) * head_norm_module(h).reshape(B, S, NH, DHV)
            y = out_proj(gated.reshape(B, S, NH * DHV))
        else:
            y = out_proj(nn.sigmoid(o) * head_norm_module(h))
        return y, (c, n, m)
