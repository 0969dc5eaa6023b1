"""The xLSTM language model (Flax linen): embedding, mLSTM blocks, output norm, LM head, logit soft cap.

::

    x = embedding[input_ids]                                  (B, S, D)
    for each block:  x = x + mLSTM(RMSNorm(x));  x = x + FFN(RMSNorm(x))
    logits = cap * tanh(RMSNorm(x) W_head / cap)              (B, S, V), float32 (float64 for a float64 model)

The model is stateful: every call takes the mLSTM states of all blocks and returns the states after its
last position, stacked over the blocks (``ModelStates``). A prompt is run in one call with the prefill
backend (``decode=False``), then each generated token in one call with the decode step
(``decode=True``); see :mod:`xlstm_jax.generation`. Which backends, kernels and block loop compute it is
the module's second attribute, a :class:`~xlstm_jax.models.xlstm_parallel.runtime.RuntimeConfig`.

Parameter tree (names follow ``transformers`` except the fused projections; :mod:`.hf` maps them)::

    embedding/embedding (V, D)
    blocks/{norm_mlstm/weight, mlstm_layer/{qkvo_kernel, if_kernel, if_bias, multihead_norm/weight,
            out_proj/kernel}, norm_ffn/weight, ffn/{proj_gate_up/kernel, proj_down/kernel}}
    out_norm/weight (D,)        lm_head/kernel (D, V)  (absent with tied embeddings)

``qkvo_kernel`` is ``transformers``' q, k, v and ogate_preact kernels side by side (D, 2 qk_dim + 2 v_dim),
``if_kernel`` and ``if_bias`` its igate_preact and fgate_preact (D, 2 NH), ``proj_gate_up`` the FFN's
proj_up_gate and proj_up (D, 2 ffn_dim): one matrix product each (see the layer modules).

With ``runtime.scan_blocks`` the blocks run under ``nn.scan`` and every leaf under ``blocks`` has a
leading axis of size L; otherwise they are ``blocks_0`` ... ``blocks_{L-1}``. With ``runtime.remat`` other than
``none`` each block of a prefill/training call is rematerialised (``nn.remat`` with ``runtime.remat_policy()``);
the parameter tree is the same.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlstm_jax.models.xlstm_parallel.blocks.feedforward import FeedForward
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.layer import LayerStates, mLSTMLayer, soft_cap
from xlstm_jax.models.xlstm_parallel.blocks.norm import RMSNorm, add_rms_norm
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.runtime import Remat, RuntimeConfig
from xlstm_jax.models.xlstm_parallel.sharding import logical_constraint

__all__ = ["ModelStates", "xLSTMBlock", "xLSTMLMModel"]


class ModelStates(NamedTuple):
    """The mLSTM states of every block, stacked on a leading axis L (float ``config.state_dtype``)."""

    c: jax.Array  # (L, B, NH, DHQK, DHV)
    n: jax.Array  # (L, B, NH, DHQK)
    m: jax.Array  # (L, B, NH)

    @classmethod
    def zeros(cls, config: xLSTMLMConfig, batch_size: int) -> ModelStates:
        """The initial states (all zero, as the cell's running max starts from 0)."""
        L, B, NH = config.num_blocks, batch_size, config.num_heads
        dtype = config.jnp_state_dtype
        return cls(
            jnp.zeros((L, B, NH, config.qk_head_dim, config.v_head_dim), dtype),
            jnp.zeros((L, B, NH, config.qk_head_dim), dtype),
            jnp.zeros((L, B, NH), dtype),
        )


class xLSTMBlock(nn.Module):
    """``x + mLSTM(RMSNorm(x))``, then ``x + FFN(RMSNorm(x))``.

    Attributes:
        config: The model config.
        runtime: How it runs.
        decode: Use the one-token decode step in the mLSTM layer.
        layer_index: None: ``state`` is this block's ``(c, n, m)``; an int: the stacked states of all blocks,
            of which this block updates slice ``layer_index`` (see ``mLSTMLayer``). A ``state`` of None (not in
            decode) starts the block's cell from zero states and returns its last states unstacked.
    """

    config: xLSTMLMConfig
    runtime: RuntimeConfig = RuntimeConfig()
    decode: bool = False
    layer_index: int | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array | tuple[jax.Array, jax.Array | None],  # (B, S, D); fused decode: (stream, pending addend)
        state: LayerStates | None,  # this block's (c, n, m), every block's stacked (with layer_index), or None
        valid: jax.Array | None,  # (B, S) bool or None
        segment_ids: jax.Array | None = None,  # (B, S) int or None: packed documents (prefill only)
    ) -> tuple[jax.Array | tuple[jax.Array, jax.Array], LayerStates]:
        cfg = self.config

        def norm(name: str) -> RMSNorm:
            return RMSNorm(cfg.norm_eps, cfg.norm_reduction_force_float32, cfg.jnp_param_dtype, name=name)

        layer = mLSTMLayer(cfg, self.runtime, self.decode, self.layer_index, name="mlstm_layer")
        ffn = FeedForward(cfg, name="ffn")
        norm_mlstm, norm_ffn = norm("norm_mlstm"), norm("norm_ffn")
        if self.decode and self.runtime.fuse_decode(cfg.norm_reduction_force_float32, cfg.dtype):
            # x is (stream, pending): the residual stream before its last add and that addend (None: none).
            # Each add runs in the kernel of the norm after it (add_rms_norm): the layer's, with the gates, and
            # the FFN's; this block's last add is left pending for the next block's (or the output norm's).
            x, pending = x
            residuals = () if pending is None else (pending,)
            y, state = layer(x, state, valid, norm=norm_mlstm, residuals=residuals)
            x, h, _ = add_rms_norm(norm_ffn, x, (*residuals, y), interpret=self.runtime.interpret)
            return (x, ffn(h)), state
        y, state = layer(norm_mlstm(x), state, valid, segment_ids=segment_ids)
        x = x + y
        return x + ffn(norm_ffn(x)), state


class xLSTMLMModel(nn.Module):
    """The xLSTM language model.

    Attributes:
        config: The model config (the architecture).
        runtime: How it runs (backends, kernels, block loop); the default ``RuntimeConfig()`` unless given.

    Example:
        >>> config = xLSTMLMConfig.tiny()
        >>> model = xLSTMLMModel(config, RuntimeConfig(prefill_backend="parallel_stabilized"))
        >>> ids = jnp.ones((2, 7), jnp.int32)
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> logits, states = model.apply({"params": params}, ids, return_states=True)
        >>> logits.shape, states.c.shape
        ((2, 7, 99), (2, 2, 2, 32, 64))
    """

    config: xLSTMLMConfig
    runtime: RuntimeConfig = RuntimeConfig()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,  # (B, S) int
        states: ModelStates | None = None,
        valid: jax.Array | None = None,  # (B, S) bool: False marks padding, which leaves the states untouched
        *,
        segment_ids: jax.Array | None = None,  # (B, S) int: packed documents
        decode: bool = False,
        return_states: bool = False,
        last_only: bool = False,
        raw_logits: bool = False,
    ) -> jax.Array | tuple[jax.Array, ModelStates]:
        """Runs the model on ``input_ids``, starting from ``states``.

        Args:
            input_ids: Token ids (B, S).
            states: The states to start from (``ModelStates``), or None for zeros.
            valid: Which positions are real tokens (B, S), or None for all. Padded positions are exact
                no-op steps of the cell; their logits are meaningless.
            segment_ids: Document ids (B, S) of packed rows, or None for one document per row. A position whose
                id differs from the previous one starts a document from zero mLSTM states in every block; only
                a row's first document starts from ``states``. The returned states are those of each row's last
                document. Decode steps ignore them (a token continues the last document).
            decode: Use the one-token decode step (S must be 1) instead of the prefill backend.
            return_states: Also return the states after the last position.
            last_only: Compute the logits of the last position only (B, 1, V): what generation needs after
                a prompt, without the (B, S, V) LM-head product.
            raw_logits: Return the LM head's output as it comes, in ``config.dtype`` and before the output soft cap
                (``cross_entropy(..., soft_cap=config.output_logit_soft_cap)`` applies the cap inside its own
                passes; a float32 copy of (B, S, V) logits is what training's loss would otherwise write and read).

        Returns:
            ``logits`` (B, S, V) float32, or float64 for a float64 model (S=1 with ``last_only``; ``config.dtype``
            and uncapped with ``raw_logits``), or ``(logits, states)``.

        Raises:
            ValueError: input_ids is not (B, S) integers, the states do not fit, or valid or segment_ids is not
                (B, S) (segment_ids also when not integer).
        """
        cfg = self.config
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"input_ids must be integer (B, S), got input_ids.shape={tuple(input_ids.shape)} "
                f"dtype={input_ids.dtype}"
            )
        B, S = input_ids.shape
        if valid is not None and tuple(valid.shape) != (B, S):
            raise ValueError(f"valid.shape={tuple(valid.shape)} must be (B, S)={(B, S)} of input_ids")
        if segment_ids is not None and (
            tuple(segment_ids.shape) != (B, S) or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
        ):
            raise ValueError(
                f"segment_ids must be integer (B, S)={(B, S)} of input_ids, got segment_ids.shape="
                f"{tuple(segment_ids.shape)} dtype={segment_ids.dtype}"
            )
        if decode:
            segment_ids = None  # one token continues the last document
        # Nothing reads the states (training, scoring): each block's cell starts from zeros itself (below).
        stateless = states is None and not return_states and not decode and not self.runtime.scan_blocks
        if states is None:
            states = None if stateless else ModelStates.zeros(cfg, B)
        else:
            states = ModelStates(*states)
            want = jax.eval_shape(lambda: ModelStates.zeros(cfg, B))
            got = [tuple(x.shape) for x in states]
            if got != [tuple(x.shape) for x in want]:
                raise ValueError(
                    f"states shapes {got} must be {[tuple(x.shape) for x in want]} (L, B, NH, ...) for B={B}"
                )

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.embedding_dim,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.jnp_param_dtype,
            name="embedding",
        )
        x = logical_constraint(embed(input_ids), ("batch", "seq", "act_embed"))  # (B, S, D), rows over data/fsdp
        runtime = self.runtime
        fused = decode and runtime.fuse_decode(cfg.norm_reduction_force_float32, cfg.dtype)  # unrolled blocks only
        if fused:  # the blocks carry (stream, pending addend): see xLSTMBlock
            x = (x, None)
        # Rematerialisation (training): each block is a jax.checkpoint with the runtime's policy. Its saved
        # inputs are x and that block's own states, so the remat path below hands each block its slice of the
        # states rather than the stacked states of all blocks (which every block would otherwise save).
        policy = None if decode else runtime.remat_policy()
        remat = runtime.remat is not Remat.NONE and not decode
        block_class = nn.remat(xLSTMBlock, policy=policy, prevent_cse=not runtime.scan_blocks) if remat else xLSTMBlock

        if stateless:
            # A stack of zero states would be read by every cell, written back slice by slice, and under
            # differentiation carry the cells' initial-state gradients from block to block (0.4 GB a block at B=8
            # of a 1.4e9-parameter model), all for nothing.
            for layer in range(cfg.num_blocks):
                block = block_class(cfg, runtime, decode, name=f"blocks_{layer}")
                x, _ = block(x, None, valid, segment_ids)
            new_states = None
        elif runtime.scan_blocks:
            # The block's (x, state, valid, segment_ids) signature is nn.scan's (carry, xs, broadcast, broadcast).
            blocks = nn.scan(
                block_class,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=cfg.num_blocks,
            )(cfg, runtime, decode, name="blocks")
            try:
                x, new_states = blocks(x, tuple(states), valid, segment_ids)
            except ValueError as e:
                # Seen on an H200 with jax 0.11.2 and flax 0.12.10 (not with jax 0.10 on a CPU): flax's scan
                # rejects the body when the Pallas decode step is compiled in it. Say what to do instead.
                if decode and "broadcasted variable" in str(e):
                    raise ValueError(
                        f"the decode step {runtime.step_backend!r} failed under nn.scan over the blocks ({e}); decode "
                        "with unrolled blocks instead (scan_blocks=False: the stacked step, which also updates each "
                        "layer's states in place) or with step_backend='recurrent'"
                    ) from e
                raise
            new_states = ModelStates(*new_states)
        elif remat:
            block_states = []
            for layer in range(cfg.num_blocks):
                block = block_class(cfg, runtime, decode, name=f"blocks_{layer}")
                x, state = block(x, tuple(s[layer] for s in states), valid, segment_ids)
                block_states.append(state)
            new_states = ModelStates(*(jnp.stack(s) for s in zip(*block_states, strict=True)))
        else:
            # Each block gets the stacked states and writes its new states into them at its index (in place
            # when the caller donates the states) rather than the states being stacked at the end, which would
            # copy all states once more per call: at batch 16 of xLSTM-7B that is 2.1 GB. The decode step
            # updates the slice in place itself (the Pallas step inside its kernel).
            new_states = tuple(states)
            for layer in range(cfg.num_blocks):
                block = xLSTMBlock(cfg, runtime, decode, layer, name=f"blocks_{layer}")
                x, new_states = block(x, new_states, valid, segment_ids)
            new_states = ModelStates(*new_states)

        out_norm = RMSNorm(cfg.norm_eps, cfg.norm_reduction_force_float32, cfg.jnp_param_dtype, name="out_norm")
        residuals = ()
        if fused:
            x, pending = x
            residuals = () if pending is None else (pending,)
        if last_only:
            x, residuals = x[:, -1:], tuple(r[:, -1:] for r in residuals)
        x = add_rms_norm(out_norm, x, residuals, interpret=runtime.interpret)[1] if fused else out_norm(x)
        if cfg.tie_word_embeddings:
            # embed.attend, with the model's matmul precision (attend has no precision argument)
            weight = embed.embedding.astype(cfg.compute_dtype)
            logits = jnp.dot(x.astype(cfg.compute_dtype), weight.T, precision=cfg.matmul_precision)
        else:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.jnp_param_dtype,
                precision=cfg.matmul_precision,
                name="lm_head",
            )(x)
        if not raw_logits:
            logits = logits.astype(jnp.promote_types(cfg.compute_dtype, jnp.float32))  # never below float32
        logits = logical_constraint(logits, ("batch", "seq", "vocab"))  # the vocabulary split for the loss
        if not raw_logits:
            logits = soft_cap(logits, cfg.output_logit_soft_cap)
        if return_states:
            return logits, new_states
        return logits
