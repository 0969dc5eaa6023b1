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

from xlstm_jax.kernels.head_norm import head_norm_gate_pallas
from xlstm_jax.kernels.recurrent_step import check_step_kernel_call, recurrent_step_kernel, recurrent_step_pallas
from xlstm_jax.mlstm.checks import check_stacked_states, check_step_inputs
from xlstm_jax.mlstm.recurrent import recurrent_step_fw
from xlstm_jax.models.xlstm_parallel.blocks.norm import head_norm_gate
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig

__all__ = ["mlstm_decode_step", "split_gates", "split_qkv"]

States = tuple[jax.Array, jax.Array, jax.Array]


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
            h, (c, n, m) = recurrent_step_pallas(c, n, m[..., None], q, k, v, i, f, eps=eps, **kernel)
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
    ``head_norm`` the read-out kernel after it (which also writes n', m' into the stacks)."""
    L, B, NH, DHQK, DHV = c.shape
    BH = B * NH
    stacks = (c.reshape(L, BH, DHQK, DHV), n.reshape(L, BH, DHQK), m.reshape(L, BH))
    layout = {"qkv_heads": NH, "qkv_offsets": (0, NH * DHQK, 2 * NH * DHQK), "gate_heads": NH, "gate_offsets": (0, NH)}
    kernel = {"layer": layer, "eps": eps, "config": config, "interpret": interpret, "combine": head_norm is None}
    h, c_new, n_new, m_new = recurrent_step_kernel(*stacks, qkv, qkv, qkv, gates, gates, **layout, **kernel)
    c_new = c_new.reshape(c.shape)
    if head_norm is None:
        n_new = n.at[layer].set(n_new.reshape(n.shape[1:]))
        m_new = m.at[layer].set(m_new.reshape(m.shape[1:]))
        return h.reshape(B, NH, DHV), (c_new, n_new, m_new)
    weight, norm_eps = head_norm
    y, (n_stack, m_stack) = head_norm_gate_pallas(
        h, qkv, weight, num_heads=NH, o_offset=NH * (2 * DHQK + DHV), norm_eps=norm_eps, m=m_new, eps=eps,
        states=(n_new, stacks[1], stacks[2], layer), interpret=interpret,
    )  # fmt: skip
    return y, (c_new, n_stack.reshape(n.shape), m_stack.reshape(m.shape))
