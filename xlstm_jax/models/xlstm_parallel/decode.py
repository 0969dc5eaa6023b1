"""The mLSTM layer's decode step: one token through the cell on the model's states, the form chosen here.

The layer hands over its two projections of the token as computed, the fused ``qkv`` (B, W) with columns
``[q (NH·DHQK) | k (NH·DHQK) | v (NH·DHV) | o (NH·DHV)]`` and the gate pre-activations ``gates`` (B, 2·NH),
``[i | f]``, and the states: one layer's ``(c, n, m)``, or with ``layer`` every layer's stacked on a leading
axis L (the model's ``ModelStates``, unrolled blocks). :func:`mlstm_decode_step` picks the form:

- ``runtime.step_form(DHQK, DHV)``: the XLA step (``"recurrent"``) or the Pallas step (``"recurrent_pallas"``);
- for the Pallas step, ``runtime.interpret`` (``runtime.kernel_mode``): interpret mode, compiled, or on a
  machine without a GPU the XLA step (after the same checks as the kernel, so that errors do not depend on
  the platform); the kernel package picks its Triton or Mosaic kernel (``runtime.step_kernel``).

On stacked states the Pallas step steps the layer's slice of c in place (:func:`~xlstm_jax.kernels.
recurrent_step.recurrent_step_kernel`) and reads q, k, v and both gates where they lie in the projections, so
a decode step makes no copy of the states and no slicing copies of its inputs. With ``head_norm`` (the
model's fused decode, ``RuntimeConfig.decode_fusion``) it returns the layer's read-out ``sigmoid(o) *
(LayerNorm_head(h) * weight)`` instead of h: the read-out kernel (:func:`~xlstm_jax.kernels.head_norm.
head_norm_gate_pallas`) combines the step's partial sums, normalises, gates, and writes the layer's n' and m'
into the stacks, in place of XLA's epilogue, norm, gate and slice-update kernels. The XLA form computes the
same function (``blocks.norm.head_norm_gate``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.kernels.head_norm import head_norm_gate_pallas
from xlstm_jax.kernels.recurrent_step import check_step_kernel_call, recurrent_step_kernel, recurrent_step_pallas
from xlstm_jax.mlstm.checks import check_stacked_states, check_step_inputs
from xlstm_jax.mlstm.recurrent import recurrent_step_fw
from xlstm_jax.models.xlstm_parallel.blocks.norm import head_norm_gate
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig
from xlstm_jax.models.xlstm_parallel.sharding import logical_shards, shard_map_batch_heads

__all__ = ["mlstm_decode_step", "split_gates", "split_qkv"]

States = tuple[jax.Array, jax.Array, jax.Array]

# Logical names of the step's arrays (``sharding.shard_map_batch_heads``): one layer's states c, n, m (B, NH, 1),
# the stacked ones (L first), inputs (B, NH, DH) and gates (B, NH).
_C, _N, _BH1 = ("batch", "heads", None, None), ("batch", "heads", None), ("batch", "heads", None)
_LC, _LN, _LM = ("layers", *_C), ("layers", *_N), ("layers", "batch", "heads")
_BHD, _BH = ("batch", "heads", None), ("batch", "heads")


def split_qkv(
    qkv: jax.Array, NH: int, DHQK: int, DHV: int, with_o: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q (B, NH, DHQK), k (B, NH, DHQK), v (B, NH, DHV) from a fused projection ``qkv`` (B, W) whose columns
    are q of all heads, then k, then v (head h's q at columns ``h·DHQK`` onwards), then anything else (with
    ``with_o``, first the output gate o (NH·DHV), which the width must include).

    Raises:
        ValueError: qkv is not (B, W) with W >= NH·(2·DHQK + DHV) (+ NH·DHV with ``with_o``).
        TypeError: qkv is not a floating-point array.
    """
    QK, V = NH * DHQK, NH * DHV
    if not jnp.issubdtype(qkv.dtype, jnp.floating):
        raise TypeError(f"qkv must be a floating-point array, got qkv.dtype={qkv.dtype}")
    width = 2 * QK + V * (2 if with_o else 1)
    if qkv.ndim != 2 or qkv.shape[1] < width:
        raise ValueError(
            f"qkv must be (B, W) with W >= NH·(2·DHQK + {'2·' if with_o else ''}DHV) = {width} (NH={NH}, "
            f"DHQK={DHQK}, DHV={DHV}), got qkv.shape={tuple(qkv.shape)}"
        )
    B = qkv.shape[0]
    return (
        qkv[:, :QK].reshape(B, NH, DHQK),
        qkv[:, QK : 2 * QK].reshape(B, NH, DHQK),
        qkv[:, 2 * QK : 2 * QK + V].reshape(B, NH, DHV),
    )


def split_gates(gates: jax.Array, B: int, NH: int) -> tuple[jax.Array, jax.Array]:
    """i (B, NH) and f (B, NH) from both gates side by side, ``gates`` (B, 2·NH): all i, then all f.

    Raises:
        ValueError: gates is not (B, 2·NH).
    """
    if tuple(gates.shape) != (B, 2 * NH):
        raise ValueError(f"the gates side by side must be (B, 2·NH)={(B, 2 * NH)}, got shape {tuple(gates.shape)}")
    return gates[:, :NH], gates[:, NH:]


def _o_columns(qkv: jax.Array, NH: int, DHQK: int, DHV: int) -> jax.Array:
    """The output gate o (B, NH·DHV): the columns of ``qkv`` after v."""
    start = NH * (2 * DHQK + DHV)
    return qkv[:, start : start + NH * DHV]


def mlstm_decode_step(
    state: States,  # one layer's c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH); or stacked on an axis L
    qkv: jax.Array,  # (B, W): [q (NH·DHQK) | k (NH·DHQK) | v (NH·DHV) | o (NH·DHV) | ...]
    gates: jax.Array,  # (B, 2·NH): [i | f]
    *,
    layer: int | None = None,
    eps: float = 1e-6,
    runtime: RuntimeConfig | None = None,
    head_norm: tuple[jax.Array, float] | None = None,
) -> tuple[jax.Array, States]:
    """One mLSTM decode step of one layer, in the form ``runtime`` selects (the module docstring).

    Args:
        state: The states ``(c, n, m)`` in the model's state dtype: one layer's, c (B, NH, DHQK, DHV), n (B, NH,
            DHQK), m (B, NH); or with ``layer`` every layer's, stacked: (L, B, NH, DHQK, DHV), (L, B, NH, DHQK),
            (L, B, NH). The Pallas step needs float32 states.
        qkv: The layer's fused projection of the token (B, W), q, k, v of all heads side by side (head h's q at
            columns ``h·DHQK`` onwards), then, with ``head_norm``, the output gate o (NH·DHV). h is in its dtype.
        gates: The gate pre-activations (B, 2·NH), all i then all f.
        layer: None: ``state`` is one layer's. An int in [0, L): the layer to step in the stacks (a Python int
            for the Pallas step, which compiles it in; the XLA step also takes a traced scalar).
        eps: The cell's eps; a Python number for the Pallas step.
        runtime: Picks the form (``step_form``, ``interpret``, ``step_kernel``); None for ``RuntimeConfig()``.
        head_norm: ``(weight (NH·DHV,), eps)`` of the layer's per-head norm: return the read-out
            ``sigmoid(o) * (LayerNorm_head(h) * weight)`` (B, NH·DHV) in qkv's dtype instead of h. On stacked
            states the Pallas step computes it in its read-out kernel; otherwise XLA does.

    Returns:
        ``h (B, NH, DHV)`` in qkv's dtype (with ``head_norm``, the read-out (B, NH·DHV)), and the states as given
        (the stacks with layer ``layer`` stepped, the others unchanged; in place under ``jax.jit`` when donated).

    Raises:
        ValueError: a shape does not match, layer is out of range, or the Pallas step is asked for heads its
            kernels do not cover; as the step functions.
        TypeError: the Pallas step with a layer that is not a Python int, states that are not float32, or an
            eps that is traced; as the step functions.
        RuntimeError: ``kernel_mode="compiled"`` without a GPU.
    """
    runtime = RuntimeConfig() if runtime is None else runtime
    c, n, m = state
    if layer is None:
        if c.ndim != 4:
            raise ValueError(f"one layer's c must be (B, NH, DHQK, DHV), got c.shape={tuple(c.shape)}")
        B, NH, DHQK, DHV = c.shape
    else:
        check_stacked_states(c, n, m, layer)
        _, B, NH, DHQK, DHV = c.shape
    q, k, v = split_qkv(qkv, NH, DHQK, DHV, with_o=head_norm is not None)
    i, f = split_gates(gates, B, NH)
    form = runtime.step_form(DHQK, DHV, qkv.dtype, c.dtype)
    if layer is None:  # the step on one layer's states (the blocks under nn.scan)
        if form == "recurrent":
            h, (c, n, m) = recurrent_step_fw(c, n, m[..., None], q, k, v, i, f, eps=eps)
        else:
            kernel = {"config": runtime.step_kernel, "interpret": runtime.interpret}
            step = shard_map_batch_heads(
                lambda *a: recurrent_step_pallas(*a, eps=eps, **kernel),
                (_C, _N, _BH1, _BHD, _BHD, _BHD, _BH, _BH),
                (_BHD, (_C, _N, _BH1)),
            )
            h, (c, n, m) = step(c, n, m[..., None], q, k, v, i, f)
        if head_norm is not None:
            h = head_norm_gate(h, _o_columns(qkv, NH, DHQK, DHV), *head_norm)
        return h, (c, n, m[..., 0])
    if form == "recurrent":
        return _stacked_step_xla(c, n, m, layer, (q, k, v, i, f), qkv, eps, head_norm)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"layer must be a Python int for the Pallas step (it is compiled in), got {layer!r}")
    one_layer = (
        jax.ShapeDtypeStruct(c.shape[1:], c.dtype),
        jax.ShapeDtypeStruct(n.shape[1:], n.dtype),
        jax.ShapeDtypeStruct((*m.shape[1:], 1), m.dtype),
    )
    i, f = check_step_inputs(*one_layer, q, k, v, i, f)
    mode, config = check_step_kernel_call(c, q, k, v, i, f, eps, runtime.step_kernel, runtime.interpret)
    if mode == "xla":  # no GPU: the kernel's function in XLA
        return _stacked_step_xla(c, n, m, layer, (q, k, v, i, f), qkv, eps, head_norm)
    return _stacked_step_pallas(c, n, m, layer, qkv, gates, eps, config, mode == "interpret", head_norm)


def _stacked_step_xla(c, n, m, layer, inputs, qkv, eps, head_norm) -> tuple[jax.Array, States]:
    """The stacked step in XLA: the layer's slice stepped by ``recurrent_step_fw`` and written back
    (``.at[layer].set``, in place under ``jax.jit`` when the stacks are donated)."""
    NH, DHQK, DHV = c.shape[2:]
    h, (c_l, n_l, m_l) = recurrent_step_fw(c[layer], n[layer], m[layer][..., None], *inputs, eps=eps)
    if head_norm is not None:
        h = head_norm_gate(h, _o_columns(qkv, NH, DHQK, DHV), *head_norm)
    return h, (c.at[layer].set(c_l), n.at[layer].set(n_l), m.at[layer].set(m_l[..., 0]))


def _stacked_step_pallas(c, n, m, layer, qkv, gates, eps, config, interpret, head_norm) -> tuple[jax.Array, States]:
    """The stacked step by the step kernel, q, k, v and the gates read in place from the projections; with
    ``head_norm`` the read-out kernel after it (which also writes n', m' into the stacks).

    Under a mesh the kernels run per device on its rows and heads (``sharding.shard_map_batch_heads``). Where
    the heads are split over devices, each device needs its heads' columns of q, k, v, o and the gates, which
    are not one block of the fused projections: these are then sliced into separate sources first.
    """
    L, B, NH, DHQK, DHV = c.shape
    weight = None if head_norm is None else head_norm[0]
    if logical_shards("heads", NH) == 1:  # every device holds all heads: the fused projections as they are
        sources, source_names = (qkv, gates), (("batch", None), ("batch", None))
    else:
        widths = [NH * DHQK, NH * DHQK, NH * DHV, NH * DHV]
        sources = (*jnp.split(qkv[:, : sum(widths)], np.cumsum(widths)[:-1], axis=-1), *jnp.split(gates, 2, axis=-1))
        source_names = (("batch", "heads"),) * 6

    def step(c, n, m, weight, *sources):  # one device's rows and heads (all of them without a mesh)
        L, B, NH = c.shape[:3]
        BH = B * NH
        if len(sources) == 2:  # q, k, v, o at their offsets in qkv; i then f in gates
            (qkv, gates), fused = sources, 1
            q = k = v = o = qkv
            i = f = gates
        else:
            (q, k, v, o, i, f), fused = sources, 0
        stacks = (c.reshape(L, BH, DHQK, DHV), n.reshape(L, BH, DHQK), m.reshape(L, BH))
        offsets = (0, fused * NH * DHQK, fused * 2 * NH * DHQK)
        layout = {"qkv_heads": NH, "qkv_offsets": offsets, "gate_heads": NH, "gate_offsets": (0, fused * NH)}
        kernel = {"layer": layer, "eps": eps, "config": config, "interpret": interpret, "combine": head_norm is None}
        h, c_new, n_new, m_new = recurrent_step_kernel(*stacks, q, k, v, i, f, **layout, **kernel)
        c_new = c_new.reshape(c.shape)
        if head_norm is None:
            n_new = n.at[layer].set(n_new.reshape(n.shape[1:]))
            m_new = m.at[layer].set(m_new.reshape(m.shape[1:]))
            return h.reshape(B, NH, DHV), (c_new, n_new, m_new)
        y, (n_stack, m_stack) = head_norm_gate_pallas(
            h, o, weight, num_heads=NH, o_offset=fused * NH * (2 * DHQK + DHV), norm_eps=head_norm[1], m=m_new,
            eps=eps, states=(n_new, stacks[1], stacks[2], layer), interpret=interpret,
        )  # fmt: skip
        return y, (c_new, n_stack.reshape(n.shape), m_stack.reshape(m.shape))

    out_names = (_BHD if head_norm is None else ("batch", "heads"), (_LC, _LN, _LM))
    weight_names = None if weight is None else ("heads",)
    step = shard_map_batch_heads(step, (_LC, _LN, _LM, weight_names, *source_names), out_names)
    return step(c, n, m, weight, *sources)
