"""Load and save xLSTM weights in the Hugging Face format (``config.json`` + safetensors), as published
for xLSTM-7B and as written by ``transformers``' ``xLSTMForCausalLM.save_pretrained``.

A model directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (``{"weight_map": {tensor name: file name}}``). Tensors are read with
the ``safetensors`` library (no pickle). Names map onto our parameters as follows (torch kernels are
(out, in) and ours (in, out), so kernels are transposed; a fused parameter is its tensors side by side
along the output axis, in the order listed, and saving splits it back)::

    backbone.embeddings.weight                        embedding/embedding            (V, D)
    backbone.blocks.{l}.norm_mlstm.weight             blocks/norm_mlstm/weight       (D,)
    backbone.blocks.{l}.mlstm_layer.{q,k,v,ogate_preact}.weight
                                                      blocks/mlstm_layer/qkvo_kernel (D, 2 qk + 2 v)
    backbone.blocks.{l}.mlstm_layer.{igate,fgate}_preact.weight
                                                      blocks/mlstm_layer/if_kernel   (D, 2 NH)
    backbone.blocks.{l}.mlstm_layer.{igate,fgate}_preact.bias
                                                      blocks/mlstm_layer/if_bias     (2 NH,)
    backbone.blocks.{l}.mlstm_layer.out_proj.weight   blocks/mlstm_layer/out_proj/kernel
    backbone.blocks.{l}.mlstm_layer.multihead_norm.weight
    backbone.blocks.{l}.norm_ffn.weight
    backbone.blocks.{l}.ffn.{proj_up_gate,proj_up}.weight
                                                      blocks/ffn/proj_gate_up/kernel (D, 2 ffn_dim)
    backbone.blocks.{l}.ffn.proj_down.weight          blocks/ffn/proj_down/kernel
    backbone.out_norm.weight                          out_norm/weight
    lm_head.weight                                    lm_head/kernel (D, V)          (absent if tied)

Loading checks the whole set before converting anything: missing tensors, unexpected tensors and shape
mismatches are all reported in one ``ValueError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig

__all__ = [
    "config_from_hf",
    "config_to_hf",
    "expected_hf_shapes",
    "hf_tensors_to_params",
    "load_hf",
    "params_to_hf_tensors",
    "save_hf",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Hugging Face config key -> our field, for the keys that carry over unchanged.
_SAME_KEYS = (
    "vocab_size",
    "num_heads",
    "qk_dim_factor",
    "v_dim_factor",
    "ffn_proj_factor",
    "ffn_round_up_to_multiple_of",
    "gate_soft_cap",
    "output_logit_soft_cap",
    "norm_eps",
    "eps",
    "norm_reduction_force_float32",
    "add_out_norm",
    "tie_word_embeddings",
    "use_bias",
    "weight_mode",
    "chunk_size",
    "bos_token_id",
    "pad_token_id",
    "eos_token_id",
)


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> xLSTMLMConfig:
    """Our config from a Hugging Face xLSTM ``config.json`` dict, then ``overrides`` (our own fields).

    The parameter dtype defaults to the checkpoint's ``dtype`` (``torch_dtype`` in older files), and the
    activation dtype to the same.

    Raises:
        ValueError: not an xLSTM config, or a setting this model does not implement.
    """
    if hf_config.get("model_type", "xlstm") != "xlstm":
        raise ValueError(f"config.json has model_type={hf_config.get('model_type')!r}, expected 'xlstm'")
    fields: dict[str, Any] = {k: hf_config[k] for k in _SAME_KEYS if k in hf_config}
    width = hf_config.get("hidden_size", hf_config.get("embedding_dim"))
    depth = hf_config.get("num_hidden_layers", hf_config.get("num_blocks"))
    if width is None or depth is None:
        raise ValueError("config.json must give hidden_size (or embedding_dim) and num_hidden_layers (or num_blocks)")
    fields.update(embedding_dim=width, num_blocks=depth)
    if isinstance(fields.get("eos_token_id"), list):
        eos = fields["eos_token_id"]
        fields["eos_token_id"] = eos[0] if eos else None
    dtype = hf_config.get("dtype", hf_config.get("torch_dtype"))
    if dtype in ("float32", "bfloat16", "float16"):
        fields.update(param_dtype=dtype, dtype=dtype)
    if "inference_state_dtype" in hf_config:
        fields["state_dtype"] = hf_config["inference_state_dtype"]
    fields.update(overrides)
    return xLSTMLMConfig(**fields)


def config_to_hf(config: xLSTMLMConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of ``config`` (what ``transformers``' xLSTMConfig reads)."""
    out: dict[str, Any] = {"architectures": ["xLSTMForCausalLM"], "model_type": "xlstm"}
    out.update({k: getattr(config, k) for k in _SAME_KEYS})
    out.update(
        hidden_size=config.embedding_dim,
        embedding_dim=config.embedding_dim,
        num_hidden_layers=config.num_blocks,
        num_blocks=config.num_blocks,
        dtype=config.param_dtype,
        inference_state_dtype=config.state_dtype,
        mode="inference",
        return_last_states=True,
    )
    return out


# Per-block parameters: our path under the block -> (the Hugging Face name suffixes it is made of, in
# order along the last (output) axis, and whether each is transposed). One suffix: a plain copy.
_BLOCK_PARAMS: dict[tuple[str, ...], tuple[tuple[str, ...], bool]] = {
    ("norm_mlstm", "weight"): (("norm_mlstm.weight",), False),
    ("mlstm_layer", "qkvo_kernel"): (tuple(f"mlstm_layer.{p}.weight" for p in ("q", "k", "v", "ogate_preact")), True),
    ("mlstm_layer", "if_kernel"): (("mlstm_layer.igate_preact.weight", "mlstm_layer.fgate_preact.weight"), True),
    ("mlstm_layer", "if_bias"): (("mlstm_layer.igate_preact.bias", "mlstm_layer.fgate_preact.bias"), False),
    ("mlstm_layer", "out_proj", "kernel"): (("mlstm_layer.out_proj.weight",), True),
    ("mlstm_layer", "multihead_norm", "weight"): (("mlstm_layer.multihead_norm.weight",), False),
    ("norm_ffn", "weight"): (("norm_ffn.weight",), False),
    ("ffn", "proj_gate_up", "kernel"): (("ffn.proj_up_gate.weight", "ffn.proj_up.weight"), True),
    ("ffn", "proj_down", "kernel"): (("ffn.proj_down.weight",), True),
}


def _block_shapes(config: xLSTMLMConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face (torch ``(out, in)``) shapes of one block's tensors."""
    D, NH = config.embedding_dim, config.num_heads
    qk, v, ffn = config.qk_dim, config.v_dim, config.ffn_dim
    return {
        "norm_mlstm.weight": (D,),
        "mlstm_layer.q.weight": (qk, D),
        "mlstm_layer.k.weight": (qk, D),
        "mlstm_layer.v.weight": (v, D),
        "mlstm_layer.ogate_preact.weight": (v, D),
        "mlstm_layer.igate_preact.weight": (NH, D),
        "mlstm_layer.fgate_preact.weight": (NH, D),
        "mlstm_layer.out_proj.weight": (D, v),
        "mlstm_layer.igate_preact.bias": (NH,),
        "mlstm_layer.fgate_preact.bias": (NH,),
        "mlstm_layer.multihead_norm.weight": (v,),
        "norm_ffn.weight": (D,),
        "ffn.proj_up_gate.weight": (ffn, D),
        "ffn.proj_up.weight": (ffn, D),
        "ffn.proj_down.weight": (D, ffn),
    }


def expected_hf_shapes(config: xLSTMLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the Hugging Face checkpoint of ``config`` with its shape."""
    shapes = {"backbone.embeddings.weight": (config.vocab_size, config.embedding_dim)}
    for layer in range(config.num_blocks):
        shapes.update({f"backbone.blocks.{layer}.{k}": s for k, s in _block_shapes(config).items()})
    shapes["backbone.out_norm.weight"] = (config.embedding_dim,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.embedding_dim)
    return shapes


def check_hf_tensors(config: xLSTMLMConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raises one ``ValueError`` listing every missing tensor, unexpected tensor and shape mismatch."""
    expected = expected_hf_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(shapes[k])} != expected {expected[k]}"
        for k in set(expected) & set(shapes)
        if tuple(shapes[k]) != expected[k]
    )
    if missing or unexpected or mismatched:
        lines = [
            f"the checkpoint does not fit the xLSTM config (D={config.embedding_dim}, L={config.num_blocks}, "
            f"NH={config.num_heads}, V={config.vocab_size}):"
        ]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise ValueError("\n".join(lines))


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def hf_tensors_to_params(
    config: xLSTMLMConfig, tensors: Mapping[str, Any], *, scan_blocks: bool = False
) -> dict[str, Any]:
    """Our parameter tree (``{"embedding": ..., "blocks_0": ...}``) from Hugging Face tensors.

    Args:
        config: The model config (decides the shapes and the parameter dtype).
        tensors: Name -> array (NumPy or JAX), as in the checkpoint.
        scan_blocks: Lay the blocks out for ``RuntimeConfig(scan_blocks=True)`` (one ``blocks`` tree, each
            leaf stacked on a leading axis L) instead of ``blocks_0`` ... ``blocks_{L-1}``.

    Returns:
        The params dict for ``xLSTMLMModel(config).apply({"params": params}, ...)``, in
        ``config.param_dtype``.

    Raises:
        ValueError: missing, unexpected or mis-shaped tensors (all listed).
    """
    check_hf_tensors(config, {k: tuple(np.shape(v)) for k, v in tensors.items()})
    dtype = config.jnp_param_dtype

    def convert(x: Any, transpose: bool) -> jax.Array:
        x = jnp.asarray(x, dtype)
        return x.T if transpose else x

    params: dict[str, Any] = {}
    _set(params, ("embedding", "embedding"), convert(tensors["backbone.embeddings.weight"], False))
    blocks = []
    for layer in range(config.num_blocks):
        block: dict[str, Any] = {}
        for path, (suffixes, transpose) in _BLOCK_PARAMS.items():
            parts = [convert(tensors[f"backbone.blocks.{layer}.{suffix}"], transpose) for suffix in suffixes]
            _set(block, path, parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1))
        blocks.append(block)
    if scan_blocks:
        params["blocks"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)
    else:
        params.update({f"blocks_{layer}": block for layer, block in enumerate(blocks)})
    _set(params, ("out_norm", "weight"), convert(tensors["backbone.out_norm.weight"], False))
    if not config.tie_word_embeddings:
        _set(params, ("lm_head", "kernel"), convert(tensors["lm_head.weight"], True))
    return params


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def params_to_hf_tensors(config: xLSTMLMConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Hugging Face tensors (name -> NumPy array, torch layout) from our parameter tree (either block layout)."""

    def out(x: Any, transpose: bool) -> np.ndarray:
        x = np.asarray(jax.device_get(x))
        return np.ascontiguousarray(x.T if transpose else x)

    shapes = _block_shapes(config)
    tensors = {"backbone.embeddings.weight": out(_get(params, ("embedding", "embedding")), False)}
    stacked = "blocks" in params
    for layer in range(config.num_blocks):
        block = params["blocks"] if stacked else params[f"blocks_{layer}"]
        for path, (suffixes, transpose) in _BLOCK_PARAMS.items():
            value = _get(block, path)[layer] if stacked else _get(block, path)
            widths = [shapes[suffix][0] for suffix in suffixes]  # the output axis: first in torch's layout
            if value.shape[-1] != sum(widths):
                raise ValueError(
                    f"blocks {layer} {'/'.join(path)} has shape {tuple(value.shape)}; its last axis must be "
                    f"{sum(widths)} = {' + '.join(map(str, widths))} ({', '.join(suffixes)})"
                )
            parts = np.split(np.asarray(jax.device_get(value)), np.cumsum(widths)[:-1], axis=-1)
            for suffix, part in zip(suffixes, parts, strict=True):
                tensors[f"backbone.blocks.{layer}.{suffix}"] = out(part, transpose)
    tensors["backbone.out_norm.weight"] = out(_get(params, ("out_norm", "weight")), False)
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = out(_get(params, ("lm_head", "kernel")), True)
    return tensors


def _read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    index = model_dir / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (model_dir / WEIGHTS_NAME).exists():
        weight_map, files = None, [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"{model_dir} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        with safe_open(model_dir / name, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if key in tensors:
                    raise ValueError(f"tensor {key!r} appears in more than one file of {model_dir}")
                if weight_map is not None and weight_map.get(key) != name:
                    raise ValueError(f"tensor {key!r} is in {name} but {INDEX_NAME} maps it to {weight_map.get(key)!r}")
                tensors[key] = f.get_tensor(key)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ValueError(f"{INDEX_NAME} lists tensors that no file holds: {', '.join(absent)}")
    return tensors


def load_hf(
    model_dir: str | Path, *, scan_blocks: bool = False, **config_overrides: Any
) -> tuple[xLSTMLMConfig, dict[str, Any]]:
    """Loads a Hugging Face xLSTM directory.

    Args:
        model_dir: Directory with ``config.json`` and ``model.safetensors`` or a sharded index.
        scan_blocks: Lay the parameters out for ``RuntimeConfig(scan_blocks=True)`` (see
            :func:`hf_tensors_to_params`).
        **config_overrides: Fields of our config to set on top of ``config.json`` (e.g. ``dtype``).

    Returns:
        ``(config, params)``.

    Raises:
        FileNotFoundError: no config or weights.
        ValueError: the config is not supported, or tensors are missing, unexpected or mis-shaped.

    Example:
        >>> config, params = load_hf("xLSTM-7b", dtype="bfloat16")
        >>> logits = xLSTMLMModel(config).apply({"params": params}, input_ids)
    """
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{model_dir / CONFIG_NAME} does not exist")
    config = config_from_hf(json.loads((model_dir / CONFIG_NAME).read_text()), **config_overrides)
    return config, hf_tensors_to_params(config, _read_tensors(model_dir), scan_blocks=scan_blocks)


def save_hf(
    model_dir: str | Path, config: xLSTMLMConfig, params: Mapping[str, Any], max_shard_bytes: int = 5 * 2**30
) -> None:
    """Saves ``config.json`` and the weights as safetensors (sharded with an index above ``max_shard_bytes``).

    The files load in ``transformers`` (``xLSTMForCausalLM.from_pretrained``) and with :func:`load_hf`.
    """
    from safetensors.numpy import save_file

    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = params_to_hf_tensors(config, params)
    (model_dir / CONFIG_NAME).write_text(json.dumps(config_to_hf(config), indent=2, sort_keys=True) + "\n")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors without it
    for stale in [model_dir / WEIGHTS_NAME, model_dir / INDEX_NAME, *model_dir.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], model_dir / WEIGHTS_NAME, metadata=metadata)
        return
    weight_map = {}
    width = max(5, int(math.log10(len(shards))) + 1)
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:0{width}d}-of-{len(shards):0{width}d}.safetensors"
        save_file(shard, model_dir / name, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(x.nbytes for x in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
