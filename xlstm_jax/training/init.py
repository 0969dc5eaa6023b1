"""Initial parameters of the xLSTM language model for training from scratch, as ``transformers``' xLSTM draws them.

``transformers``' ``xLSTMPreTrainedModel._init_weights`` decides by module name; on our parameter tree (see
:mod:`xlstm_jax.models.xlstm_parallel.model`) with D = ``embedding_dim``, L = ``num_blocks``::

    embedding/embedding, lm_head/kernel       normal(0, small(D))          small(d) = sqrt(2 / (5 d))
    qkvo_kernel  q, k, v columns               normal(0, small(D))
                 o (output gate) columns       0
    if_kernel                                  0
    if_bias      input gate (first NH)         -10
                 forget gate (last NH)         linspace(3, 6, NH)
    out_proj/kernel                            normal(0, wang(L, D))         wang(L, d) = 2 / L / sqrt(d)
    proj_gate_up/kernel  gate columns          0
                         up columns            normal(0, small(D))
    proj_down/kernel                           normal(0, wang(L, ffn_dim))
    every norm weight                          1

Every fused parameter is initialised column block by column block as the ``transformers`` tensor that block
is (the zero output-gate and FFN-gate kernels follow from its rule "a linear layer whose name contains
``gate`` starts at zero"). So a model initialised here and trained is an ordinary Hugging Face xLSTM model
once written with :func:`~xlstm_jax.models.xlstm_parallel.hf.save_hf`.

NX-AI's own training code for xLSTM-7B (``xlstm-jax``) differs in two tensors: it draws the FFN gate columns
like the up columns (small(D)) and ``proj_down`` with wang(L, D). This module follows ``transformers``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel
from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig

__all__ = ["init_params", "small_init_std", "wang_init_std"]


def small_init_std(dim: int) -> float:
    """``sqrt(2 / (5 dim))``: the "small init" of Nguyen & Salazar (2019), Transformers without Tears."""
    return float(np.sqrt(2.0 / (5.0 * dim)))


def wang_init_std(num_blocks: int, dim: int) -> float:
    """``2 / num_blocks / sqrt(dim)``: the depth-scaled init of the layers that write into the residual stream."""
    return 2.0 / num_blocks / float(np.sqrt(dim))


def _column_blocks(config: xLSTMLMConfig) -> dict[str, list[tuple[int, float | None]]]:
    """Per fused or plain matrix (by its parameter name): its column blocks as (width, std); std None: zeros."""
    D, L, NH = config.embedding_dim, config.num_blocks, config.num_heads
    qk, v, ffn = config.qk_dim, config.v_dim, config.ffn_dim
    small = small_init_std(D)
    return {
        "embedding": [(D, small)],
        "lm_head": [(config.vocab_size, small)],
        "qkvo_kernel": [(qk, small), (qk, small), (v, small), (v, None)],
        "if_kernel": [(2 * NH, None)],
        "out_proj": [(D, wang_init_std(L, D))],
        "proj_gate_up": [(ffn, None), (ffn, small)],
        "proj_down": [(D, wang_init_std(L, ffn))],
    }


def _gate_bias(config: xLSTMLMConfig) -> np.ndarray:
    NH = config.num_heads
    return np.concatenate([np.full(NH, -10.0), np.linspace(3.0, 6.0, NH)])  # (2 NH,) input gates, forget gates


def init_params(
    config: xLSTMLMConfig, key: jax.Array, *, scan_blocks: bool = False, shardings: Any = None
) -> dict[str, Any]:
    """The model's parameters initialised as ``transformers``' xLSTM initialises them (module docstring).

    Args:
        config: The model config; parameters get ``config.param_dtype`` (float32 for training).
        key: A PRNG key.
        scan_blocks: The layout for ``RuntimeConfig(scan_blocks=True)`` (leaves under ``blocks`` stacked on a
            leading axis L, each layer drawn independently); else ``blocks_0`` ... ``blocks_{L-1}``.
        shardings: Where the parameters are created (a tree of shardings matching the result, e.g.
            ``sharding.param_shardings``): each device draws only its shards. None: the default device.

    Returns:
        The parameter tree of ``xLSTMLMModel(config, RuntimeConfig(scan_blocks=scan_blocks))``.

    Raises:
        TypeError: ``config`` is not an ``xLSTMLMConfig``.

    Example:
        >>> params = init_params(xLSTMLMConfig.tiny(), jax.random.key(0))
        >>> logits = xLSTMLMModel(xLSTMLMConfig.tiny()).apply({"params": params}, input_ids)
    """
    if not isinstance(config, xLSTMLMConfig):
        raise TypeError(f"config must be an xLSTMLMConfig, got {type(config).__name__}")
    if shardings is not None:
        return jax.jit(functools.partial(_draw_params, config, bool(scan_blocks)), out_shardings=shardings)(key)
    return _initializer(config, bool(scan_blocks))(key)


@functools.cache
def _initializer(config: xLSTMLMConfig, scan_blocks: bool) -> Any:
    """The jitted draw of every parameter for one config and layout (compiled once; eager draws would compile
    each operation on its own)."""
    return jax.jit(functools.partial(_draw_params, config, scan_blocks))


def _draw_params(config: xLSTMLMConfig, scan_blocks: bool, key: jax.Array) -> dict[str, Any]:
    model = xLSTMLMModel(config, RuntimeConfig(scan_blocks=scan_blocks))
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32)), key)["params"]
    dtype = config.jnp_param_dtype
    blocks = _column_blocks(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))

    def draw(path: tuple, shape: jax.ShapeDtypeStruct, leaf_key: jax.Array) -> jax.Array:
        names = [str(getattr(p, "key", p)) for p in path]
        name = names[-1] if names[-1] not in ("kernel", "embedding") or len(names) < 2 else names[-2]
        if names[-1] == "weight":  # RMSNorm and per-head LayerNorm weights
            return jnp.ones(shape.shape, dtype)
        if name == "if_bias":
            return jnp.broadcast_to(jnp.asarray(_gate_bias(config), dtype), shape.shape)
        if name not in blocks:
            raise ValueError(f"init_params: no rule for parameter {'/'.join(names)}")
        parts = []
        for i, (width, std) in enumerate(blocks[name]):
            part_shape = (*shape.shape[:-1], width)
            if std is None:
                parts.append(jnp.zeros(part_shape, dtype))
            else:
                parts.append(std * jax.random.normal(jax.random.fold_in(leaf_key, i), part_shape, jnp.float32))
        value = jnp.concatenate(parts, axis=-1).astype(dtype)
        if value.shape != shape.shape:
            raise ValueError(f"init_params: {'/'.join(names)} came out {value.shape}, the model has {shape.shape}")
        return value

    return jax.tree_util.tree_unflatten(
        treedef, [draw(path, leaf, k) for (path, leaf), k in zip(leaves, keys, strict=True)]
    )
