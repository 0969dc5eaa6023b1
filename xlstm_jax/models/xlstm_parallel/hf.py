"""Load and save xLSTM weights in the Hugging Face format (``config.json`` + safetensors), as published
for xLSTM-7B and as written by ``transformers``' ``xLSTMForCausalLM.save_pretrained``.

A model directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (``{"weight_map": {tensor name: file name}}``); where both exist,
``model.safetensors`` is read, as ``transformers`` does. Tensors are read with the ``safetensors`` library
(no pickle). Names map onto our parameters as follows (torch kernels are (out, in) and ours (in, out), so
kernels are transposed; a fused parameter is its tensors side by side along the output axis, in the order
listed, and saving splits it back)::

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
    lm_head.weight                                    lm_head/kernel (D, V)

``config.json`` is read as ``transformers``' ``xLSTMConfig`` and its model read it (see
:func:`config_from_hf`). ``transformers``' xLSTM keeps its own ``lm_head`` whatever ``tie_word_embeddings``
says, and writes it: a checkpoint whose ``lm_head.weight`` differs from the embedding loads untied, one
whose ``lm_head.weight`` equals it (or lacks it) loads tied, and :func:`save_hf` writes the embedding as
``lm_head.weight`` for a tied model, so that ``transformers`` computes the same function.

Loading checks the whole set before converting anything: missing tensors, unexpected tensors, shape
mismatches, non-float tensors and non-finite weights are each reported in one ``ValueError`` that lists
them; a file that is not valid JSON or safetensors, and an index entry that points outside the model
directory, raise ``ValueError`` naming the file. :func:`save_hf` never leaves the directory without a
loadable checkpoint (see there).

With a mesh (``load_hf(..., mesh=mesh)``), each parameter is made on its devices from the blocks they hold
(:mod:`~xlstm_jax.models.xlstm_parallel.sharding`), each block read from the files alone, so neither the host
nor a device ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.models.xlstm_parallel.config import _is_int, xLSTMLMConfig

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

# transformers' xLSTMConfig defaults for the keys read here; a config.json that leaves a key out gets these.
# None: the key follows its alias (embedding_dim follows hidden_size, num_blocks follows num_hidden_layers).
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50304,
    "hidden_size": 4096,
    "embedding_dim": None,
    "num_hidden_layers": 32,
    "num_blocks": None,
    "num_heads": 8,
    "qk_dim_factor": 0.5,
    "v_dim_factor": 1.0,
    "ffn_proj_factor": 2.667,
    "ffn_round_up_to_multiple_of": 64,
    "gate_soft_cap": 15.0,
    "output_logit_soft_cap": 30.0,
    "norm_eps": 1e-6,
    "eps": 1e-6,
    "norm_reduction_force_float32": True,
    "tie_word_embeddings": False,
    "add_out_norm": True,
    "use_bias": False,
    "weight_mode": "single",
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "dtype": None,
    "inference_state_dtype": "float32",
}

# Hugging Face config keys that are our fields of the same name and meaning.
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
    "tie_word_embeddings",
    "bos_token_id",
    "pad_token_id",
    "eos_token_id",
)

# Settings transformers' xLSTM offers that this model does not implement: the only supported value of each.
_FIXED_KEYS = {"use_bias": False, "weight_mode": "single"}


def _read_alias(hf_config: Mapping[str, Any], key: str, alias: str) -> tuple[int | None, int | None]:
    """``(hf[key], hf[alias])`` resolved as transformers does: a None (or absent alias) takes the other's value."""
    values = []
    for name in (key, alias):
        value = hf_config.get(name, _HF_DEFAULTS[name])
        if value is not None and not _is_int(value):
            raise TypeError(f"config.json: {name} must be an int, got {name}={value!r} ({type(value).__name__})")
        values.append(value)
    first, second = values
    first = second if first is None else first
    second = first if second is None else second
    if first is None:
        raise ValueError(f"config.json gives neither {key} nor {alias} (both null)")
    return first, second


def _given(hf_config: Mapping[str, Any], key: str) -> str:
    return "" if key in hf_config else " (absent: transformers' default)"


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> xLSTMLMConfig:
    """Our config from a Hugging Face xLSTM ``config.json`` dict, then ``overrides`` (our own fields).

    Every key is read as ``transformers``' ``xLSTMConfig`` and its model read it:

    - An absent key takes ``transformers``' default (e.g. ``hidden_size`` 4096, ``num_hidden_layers`` 32).
    - The model width is ``hidden_size`` (``embedding_dim`` where ``hidden_size`` is null); ``embedding_dim``
      (``hidden_size`` where absent or null) must equal it, since ``transformers`` embeds tokens in
      ``embedding_dim`` and runs the blocks in ``hidden_size``.
    - The number of blocks is ``num_blocks``, or ``num_hidden_layers`` where ``num_blocks`` is absent or
      null: ``transformers`` builds ``num_blocks`` blocks and sizes only its generation cache by
      ``num_hidden_layers``, so a config written from ``xLSTMConfig(num_blocks=3)`` has 3 blocks although it
      also holds the default ``num_hidden_layers: 32``.
    - The parameter and activation dtypes are ``dtype`` (``torch_dtype`` in older files; float32, torch's
      default, where absent or null), the state dtype ``inference_state_dtype``.
    - ``eos_token_id`` may be a list of one id (or empty: None); several stop ids need ``eos_token_id=``
      among ``overrides`` (and ``stop_tokens=`` for generation).
    - ``add_out_norm`` must be a bool and changes nothing (``transformers`` applies the output norm whatever
      its value); ``use_bias`` must be false and ``weight_mode`` ``"single"``, as in xLSTM-7B. Keys that
      only choose how ``transformers`` computes (``chunk_size``, ``mode``, kernel names, ...) are not read.

    Args:
        hf_config: The parsed ``config.json``.
        **overrides: Fields of :class:`xLSTMLMConfig` that replace what the file gives.

    Raises:
        TypeError: ``hf_config`` is not a mapping, a value has the wrong type (e.g. ``"128"`` or
            ``"false"``), or an override is not a field.
        ValueError: not an xLSTM config, widths that disagree, a value out of range, or a setting this
            model does not implement. Messages name the key.
    """
    if not isinstance(hf_config, Mapping):
        raise TypeError(f"hf_config must be a mapping (the parsed config.json), got {type(hf_config).__name__}")
    model_type = hf_config.get("model_type", "xlstm")
    if model_type != "xlstm":
        raise ValueError(f"config.json has model_type={model_type!r}, expected 'xlstm'")
    for key, supported in _FIXED_KEYS.items():
        value = hf_config.get(key, supported)
        if type(value) is not type(supported) or value != supported:
            raise ValueError(
                f"config.json gives {key}={value!r}; only {key}={supported!r} is supported (the xLSTM-7B architecture)"
            )
    if not isinstance(hf_config.get("add_out_norm", True), bool):
        raise TypeError(f"config.json: add_out_norm must be a bool, got {hf_config['add_out_norm']!r}")

    hidden, embedding = _read_alias(hf_config, "hidden_size", "embedding_dim")
    if hidden != embedding:
        raise ValueError(
            f"config.json gives embedding_dim={embedding}{_given(hf_config, 'embedding_dim')} but "
            f"hidden_size={hidden}{_given(hf_config, 'hidden_size')}: transformers embeds tokens in embedding_dim "
            "and runs the blocks in hidden_size, so the two must be equal"
        )
    num_blocks, _ = _read_alias(hf_config, "num_blocks", "num_hidden_layers")

    fields: dict[str, Any] = {key: hf_config.get(key, _HF_DEFAULTS[key]) for key in _SAME_KEYS}
    fields.update(embedding_dim=hidden, num_blocks=num_blocks)
    eos = fields["eos_token_id"]
    if isinstance(eos, list | tuple) and "eos_token_id" not in overrides:
        if len(eos) > 1:
            raise ValueError(
                f"config.json gives eos_token_id={eos}; the config holds one stop token: pass eos_token_id=... "
                f"to choose it (and stop_tokens={eos} to generation to stop on any of them)"
            )
        fields["eos_token_id"] = eos[0] if eos else None
    dtype = hf_config.get("dtype", hf_config.get("torch_dtype"))
    dtype = "float32" if dtype is None else dtype
    state_dtype = hf_config.get("inference_state_dtype", _HF_DEFAULTS["inference_state_dtype"])
    for key, value in (("dtype", dtype), ("inference_state_dtype", state_dtype)):
        if not isinstance(value, str):
            raise TypeError(f"config.json: {key} must be a dtype name such as 'bfloat16', got {key}={value!r}")
    fields.update(param_dtype=dtype, dtype=dtype, state_dtype=state_dtype)
    where = "config.json" + (f" with {', '.join(sorted(overrides))} overridden" if overrides else "")
    try:
        return xLSTMLMConfig(**{**fields, **overrides})
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None


def config_to_hf(config: xLSTMLMConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of ``config`` (what ``transformers``' xLSTMConfig reads).

    Both names of each width are written (``hidden_size`` and ``embedding_dim``, ``num_hidden_layers`` and
    ``num_blocks``), with the values this model implements for ``use_bias``, ``weight_mode`` and
    ``add_out_norm``, and ``mode="inference"`` with ``return_last_states=True`` so that ``transformers``
    can generate with the files.
    """
    if not isinstance(config, xLSTMLMConfig):
        raise TypeError(f"config must be an xLSTMLMConfig, got {type(config).__name__}")
    out: dict[str, Any] = {"architectures": ["xLSTMForCausalLM"], "model_type": "xlstm"}
    out.update({key: getattr(config, key) for key in _SAME_KEYS})
    out.update(_FIXED_KEYS)
    out.update(
        hidden_size=config.embedding_dim,
        embedding_dim=config.embedding_dim,
        num_hidden_layers=config.num_blocks,
        num_blocks=config.num_blocks,
        add_out_norm=True,
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
_EMBEDDING, _LM_HEAD = "backbone.embeddings.weight", "lm_head.weight"


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
    """Every tensor of ``transformers``' xLSTM model of ``config`` with its (torch) shape.

    ``lm_head.weight`` is always listed (``transformers`` keeps it even with tied embeddings); loading a
    tied config accepts a checkpoint without it.
    """
    shapes = {_EMBEDDING: (config.vocab_size, config.embedding_dim)}
    for layer in range(config.num_blocks):
        shapes.update({f"backbone.blocks.{layer}.{k}": s for k, s in _block_shapes(config).items()})
    shapes["backbone.out_norm.weight"] = (config.embedding_dim,)
    shapes[_LM_HEAD] = (config.vocab_size, config.embedding_dim)
    return shapes


def _natural(text: str) -> list:
    """Sort key that orders ``blocks.2`` before ``blocks.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    """``  title (n): a, b, ...`` with ``items`` in natural order, the first ``limit`` of them."""
    items = sorted(items, key=_natural)
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"  {title} ({len(items)}): {shown}"


def _block_range(indices: set[int]) -> str:
    if not indices:
        return "no blocks"
    if indices == set(range(max(indices) + 1)):
        return f"blocks 0..{max(indices)}"
    return "blocks " + ", ".join(map(str, sorted(indices)))


def check_hf_tensors(config: xLSTMLMConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raises one ``ValueError`` listing every missing tensor, unexpected tensor and shape mismatch.

    Where the checkpoint's blocks or embedding disagree with the config, the message first says so in
    terms of both (e.g. ``config.json gives num_blocks=3 but the checkpoint has blocks 0..31``).
    """
    expected = expected_hf_shapes(config)
    if config.tie_word_embeddings and _LM_HEAD not in shapes:
        del expected[_LM_HEAD]
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(shapes[k])} != expected {expected[k]}"
        for k in set(expected) & set(shapes)
        if tuple(shapes[k]) != expected[k]
    )
    if not (missing or unexpected or mismatched):
        return
    lines = [
        f"the checkpoint does not fit the xLSTM config (D={config.embedding_dim}, L={config.num_blocks}, "
        f"NH={config.num_heads}, V={config.vocab_size}):"
    ]
    blocks = {int(m.group(1)) for name in shapes if (m := re.match(r"backbone\.blocks\.(\d+)\.", name))}
    if blocks != set(range(config.num_blocks)):
        lines.append(
            f"  config.json gives num_blocks={config.num_blocks} but the checkpoint has {_block_range(blocks)}"
        )
    if _EMBEDDING in shapes and tuple(shapes[_EMBEDDING]) != expected[_EMBEDDING]:
        lines.append(
            f"  config.json gives vocab_size={config.vocab_size}, hidden_size={config.embedding_dim} but "
            f"{_EMBEDDING} has shape {tuple(shapes[_EMBEDDING])}"
        )
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            lines.append(_listing(title, items))
    raise ValueError("\n".join(lines))


def _is_float(dtype: Any) -> bool:
    try:
        return jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:  # a name NumPy and JAX do not know (safetensors' rarer types)
        return False


def _check_dtypes(dtypes: Mapping[str, Any], what: str) -> None:
    """Raises ``ValueError`` listing the tensors (name -> dtype or dtype name) that are not floating point."""
    not_float = sorted(
        f"{name} ({d if isinstance(d, str) else np.dtype(d)})" for name, d in dtypes.items() if not _is_float(d)
    )
    if not_float:
        raise ValueError(_listing(f"{what} must be floating point; not float", not_float).strip())


def _check_finite(counts: Mapping[str, tuple[int, int]], what: str) -> None:
    """Raises ``ValueError`` listing the tensors with NaN or inf, from name -> (non-finite values, size)."""
    non_finite = [f"{name} ({bad} of {size} values)" for name, (bad, size) in sorted(counts.items()) if bad]
    if non_finite:
        raise ValueError(_listing(f"{what} must be finite; NaN or inf in", non_finite).strip())


def _non_finite(x: Any) -> int:
    return int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(jax.device_get(x)))))


def _check_values(tensors: Mapping[str, Any], what: str) -> None:
    """Raises ``ValueError`` listing the tensors that are not floating point, then those with NaN or inf."""
    _check_dtypes({name: getattr(x, "dtype", np.asarray(x).dtype) for name, x in tensors.items()}, what)
    _check_finite({name: (_non_finite(x), int(np.size(x))) for name, x in tensors.items()}, what)


def _tied_head_error() -> ValueError:
    return ValueError(
        f"tie_word_embeddings=True but {_LM_HEAD} differs from {_EMBEDDING}; transformers computes with "
        f"{_LM_HEAD}: load with tie_word_embeddings=False"
    )


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
        tensors: Name -> array (NumPy or JAX), as in the checkpoint. With ``config.tie_word_embeddings``,
            ``lm_head.weight`` may be absent; if present it must equal the embedding.
        scan_blocks: Lay the blocks out for ``RuntimeConfig(scan_blocks=True)`` (one ``blocks`` tree, each
            leaf stacked on a leading axis L) instead of ``blocks_0`` ... ``blocks_{L-1}``.

    Returns:
        The params dict for ``xLSTMLMModel(config).apply({"params": params}, ...)``, in
        ``config.param_dtype``.

    Raises:
        ValueError: missing, unexpected or mis-shaped tensors (all listed), tensors that are not floating
            point or hold NaN or inf (listed), or an ``lm_head.weight`` that differs from the tied embedding.
    """
    if not isinstance(config, xLSTMLMConfig):
        raise TypeError(f"config must be an xLSTMLMConfig, got {type(config).__name__}")
    check_hf_tensors(config, {k: tuple(np.shape(v)) for k, v in tensors.items()})
    _check_values(tensors, "checkpoint tensors")
    head = tensors.get(_LM_HEAD) if config.tie_word_embeddings else None
    if head is not None and not np.array_equal(np.asarray(head), np.asarray(tensors[_EMBEDDING])):
        raise _tied_head_error()
    dtype = config.jnp_param_dtype

    def convert(x: Any, transpose: bool) -> jax.Array:
        x = jnp.asarray(x, dtype)
        return x.T if transpose else x

    params: dict[str, Any] = {}
    _set(params, ("embedding", "embedding"), convert(tensors[_EMBEDDING], False))
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
        _set(params, ("lm_head", "kernel"), convert(tensors[_LM_HEAD], True))
    return params


def expected_param_shapes(config: xLSTMLMConfig, *, scan_blocks: bool = False) -> dict[str, tuple[int, ...]]:
    """Every leaf of our parameter tree (``"blocks_0/ffn/proj_down/kernel"``-style paths) with its shape."""
    hf = _block_shapes(config)
    block = {}
    for path, (suffixes, transpose) in _BLOCK_PARAMS.items():
        first = hf[suffixes[0]]
        if transpose:  # (in, sum of outs)
            block["/".join(path)] = (first[1], sum(hf[s][0] for s in suffixes))
        else:
            block["/".join(path)] = (sum(hf[s][0] for s in suffixes),)
    D, V = config.embedding_dim, config.vocab_size
    shapes = {"embedding/embedding": (V, D)}
    if scan_blocks:
        shapes.update({f"blocks/{k}": (config.num_blocks, *s) for k, s in block.items()})
    else:
        shapes.update({f"blocks_{layer}/{k}": s for layer in range(config.num_blocks) for k, s in block.items()})
    shapes["out_norm/weight"] = (D,)
    if not config.tie_word_embeddings:
        shapes["lm_head/kernel"] = (D, V)
    return shapes


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}/"))
        return out
    return {prefix[:-1]: tree}


def check_params(config: xLSTMLMConfig, params: Mapping[str, Any]) -> None:
    """Raises one ``ValueError`` listing missing, unexpected, mis-shaped and non-float parameters of ``params``
    (either block layout) against ``config``."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping (the model's params tree), got {type(params).__name__}")
    leaves = _flatten(params)
    expected = expected_param_shapes(config, scan_blocks="blocks" in params)
    missing = sorted(set(expected) - set(leaves))
    unexpected = sorted(set(leaves) - set(expected))
    mismatched = sorted(
        f"{k}: {tuple(np.shape(leaves[k]))} != expected {expected[k]}"
        for k in set(expected) & set(leaves)
        if tuple(np.shape(leaves[k])) != expected[k]
    )
    not_float = sorted(
        f"{k} ({np.dtype(getattr(leaves[k], 'dtype', np.asarray(leaves[k]).dtype))})"
        for k in set(expected) & set(leaves)
        if not jnp.issubdtype(getattr(leaves[k], "dtype", np.asarray(leaves[k]).dtype), jnp.floating)
    )
    if missing or unexpected or mismatched or not_float:
        lines = [
            f"params do not fit the xLSTM config (D={config.embedding_dim}, L={config.num_blocks}, "
            f"NH={config.num_heads}, V={config.vocab_size}, tie_word_embeddings={config.tie_word_embeddings}):"
        ]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
            ("not floating point", not_float),
        ):
            if items:
                lines.append(_listing(title, items))
        raise ValueError("\n".join(lines))


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def params_to_hf_tensors(config: xLSTMLMConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Hugging Face tensors (name -> NumPy array, torch layout) from our parameter tree (either block layout).

    With tied embeddings, ``lm_head.weight`` is the embedding (``transformers`` keeps its own head).

    Raises:
        ValueError: parameters missing, unexpected, mis-shaped or not floating point (all listed).
    """
    check_params(config, params)

    def out(x: Any, transpose: bool) -> np.ndarray:
        x = np.asarray(jax.device_get(x))
        return np.ascontiguousarray(x.T if transpose else x)

    shapes = _block_shapes(config)
    tensors = {_EMBEDDING: out(_get(params, ("embedding", "embedding")), False)}
    stacked = "blocks" in params
    for layer in range(config.num_blocks):
        block = params["blocks"] if stacked else params[f"blocks_{layer}"]
        for path, (suffixes, transpose) in _BLOCK_PARAMS.items():
            value = np.asarray(jax.device_get(_get(block, path)))
            value = value[layer] if stacked else value
            widths = [shapes[suffix][0] for suffix in suffixes]  # the output axis: first in torch's layout
            parts = np.split(value, np.cumsum(widths)[:-1], axis=-1)
            for suffix, part in zip(suffixes, parts, strict=True):
                tensors[f"backbone.blocks.{layer}.{suffix}"] = out(part, transpose)
    tensors["backbone.out_norm.weight"] = out(_get(params, ("out_norm", "weight")), False)
    if config.tie_word_embeddings:
        tensors[_LM_HEAD] = tensors[_EMBEDDING]
    else:
        tensors[_LM_HEAD] = out(_get(params, ("lm_head", "kernel")), True)
    return tensors


def _check_file_name(index: Path, tensor: str, name: Any) -> None:
    """Refuses an index entry that is not a relative path inside the model directory."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index}: weight_map[{tensor!r}] must be a file name, got {name!r}")
    windows = PureWindowsPath(name)
    if PurePosixPath(name).is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
        raise ValueError(
            f"{index}: weight_map[{tensor!r}] = {name!r} points outside the model directory; entries must be "
            "relative file names without '..'"
        )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({what}): {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object ({what}), got {type(data).__name__}")
    return data


def _read_index(path: Path) -> dict[str, str]:
    weight_map = _read_json(path, "a safetensors index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path} has no weight_map object (tensor name -> file name), got {weight_map!r}")
    for tensor, name in weight_map.items():
        _check_file_name(path, tensor, name)
    return weight_map


def _open_safetensors(path: Path, stack: contextlib.ExitStack) -> Any:
    """An open ``safe_open`` handle of ``path`` (closed with ``stack``); its tensors are read on demand."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with _naming(path):
        return stack.enter_context(safe_open(path, framework="numpy"))


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Turns an error of the safetensors library while reading ``path`` into a ValueError naming the file."""
    try:
        yield
    except Exception as error:  # safetensors raises its own error type for a malformed file
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def _open_checkpoint(model_dir: Path, stack: contextlib.ExitStack) -> dict[str, tuple[Path, Any]]:
    """Every tensor of the checkpoint in ``model_dir`` -> ``(file, open handle)`` (``model.safetensors`` first,
    as transformers reads), with the index checked against the files' contents; nothing is read yet."""
    if (model_dir / WEIGHTS_NAME).is_file():
        path = model_dir / WEIGHTS_NAME
        handle = _open_safetensors(path, stack)
        with _naming(path):
            return dict.fromkeys(handle.keys(), (path, handle))  # noqa: SIM118 - handles are not iterable
    index = model_dir / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{model_dir} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    weight_map = _read_index(index)
    sources: dict[str, tuple[Path, Any]] = {}
    for name in sorted(set(weight_map.values())):
        path = model_dir / name
        handle = _open_safetensors(path, stack)
        with _naming(path):
            keys = list(handle.keys())
        for key in keys:
            if key in sources:
                raise ValueError(f"tensor {key!r} appears in more than one file of {model_dir}")
            if weight_map.get(key) != name:
                raise ValueError(f"tensor {key!r} is in {name} but {index} maps it to {weight_map.get(key)!r}")
            sources[key] = (path, handle)
    absent = sorted(set(weight_map) - set(sources))
    if absent:
        raise ValueError(_listing(f"{index} lists tensors that no file holds", absent).strip())
    return sources


def _read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint in ``model_dir`` (``model.safetensors`` first, as transformers reads)."""
    with contextlib.ExitStack() as stack:
        tensors = {}
        for key, (path, handle) in _open_checkpoint(model_dir, stack).items():
            with _naming(path):
                tensors[key] = handle.get_tensor(key)
        return tensors


def load_hf(
    model_dir: str | Path, *, scan_blocks: bool = False, mesh: jax.sharding.Mesh | None = None, **config_overrides: Any
) -> tuple[xLSTMLMConfig, dict[str, Any]]:
    """Loads a Hugging Face xLSTM directory.

    Args:
        model_dir: Directory with ``config.json`` and ``model.safetensors`` or a sharded index.
        scan_blocks: Lay the parameters out for ``RuntimeConfig(scan_blocks=True)`` (see
            :func:`hf_tensors_to_params`).
        mesh: None: the whole checkpoint is read into host memory, converted and placed on the default device.
            A ``jax.sharding.Mesh`` with the axes ``data``, ``fsdp``, ``tensor``: each parameter is created
            straight on its shards (``sharding.param_shardings``), each device's block read from the files
            alone (``safe_open(...).get_slice``; a fused parameter's block from the matching rows of the
            tensors it joins). No device holds more than its shards, and the host no more than one block at a
            time (two row blocks of the embedding and the head where a tied config is checked). The values are
            those of the load without a mesh, bit for bit; the checks are the same.
        **config_overrides: Fields of our config to set on top of ``config.json`` (e.g. ``dtype``).

    Returns:
        ``(config, params)``. With ``tie_word_embeddings`` true in ``config.json`` (and not among the
        overrides), the config is untied where ``lm_head.weight`` differs from the embedding, since
        ``transformers`` computes with that tensor.

    Raises:
        FileNotFoundError: no config or weights, or a shard the index names is missing.
        ValueError: a file that is not valid JSON or safetensors, an index entry outside ``model_dir``, a
            config that is not supported, or tensors missing, unexpected, mis-shaped, not floating point or
            not finite (each named); a mesh without the axes.
        TypeError: a config value of the wrong type (named), or a mesh that is not a ``Mesh``.

    Example:
        >>> config, params = load_hf("xLSTM-7b", dtype="bfloat16")
        >>> logits = xLSTMLMModel(config).apply({"params": params}, input_ids)
        >>> mesh = make_mesh(MeshConfig(fsdp=-1))  # every device's 1/N of each parameter, read from disk
        >>> config, params = load_hf("xLSTM-7b", dtype="bfloat16", mesh=mesh)
    """
    model_dir = Path(model_dir)
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if not (model_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{model_dir / CONFIG_NAME} does not exist")
    config = config_from_hf(_read_json(model_dir / CONFIG_NAME, "the model config"), **config_overrides)
    untie = config.tie_word_embeddings and "tie_word_embeddings" not in config_overrides
    if mesh is not None:
        with contextlib.ExitStack() as stack:
            return _load_onto_mesh(_open_checkpoint(model_dir, stack), config, untie, scan_blocks, mesh)
    tensors = _read_tensors(model_dir)
    head, embedding = tensors.get(_LM_HEAD), tensors.get(_EMBEDDING)
    if (
        untie
        and head is not None
        and embedding is not None
        and head.shape == embedding.shape
        and not np.array_equal(head, embedding)
    ):
        config = config.replace(tie_word_embeddings=False)
    return config, hf_tensors_to_params(config, tensors, scan_blocks=scan_blocks)


def _read_block(sources: Mapping[str, tuple[Path, Any]], name: str, index: tuple[slice, ...]) -> np.ndarray:
    """``tensor[index]`` of the checkpoint tensor ``name``, read from its file alone (slices of step 1)."""
    path, handle = sources[name]
    with _naming(path):
        return np.asarray(handle.get_slice(name)[index])


def _equal_rows(sources: Mapping[str, tuple[Path, Any]], a: str, b: str, rows: int, blocks: int = 8) -> bool:
    """Whether two checkpoint tensors of ``rows`` rows are equal, compared ``rows / blocks`` rows at a time."""
    step = max(1, -(-rows // blocks))
    for start in range(0, rows, step):
        index = (slice(start, min(start + step, rows)),)
        if not np.array_equal(_read_block(sources, a, index), _read_block(sources, b, index)):
            return False
    return True


def _param_parts(config: xLSTMLMConfig, path: tuple[str, ...]) -> tuple[list[list[str]], bool]:
    """``(names, transpose)``: the checkpoint tensors of parameter ``path``, side by side along its last axis,
    per layer (scanned blocks, ``blocks/...``: L lists; else one); torch's (out, in) transposed where
    ``transpose``."""
    top = {
        ("embedding", "embedding"): (_EMBEDDING, False),
        ("out_norm", "weight"): ("backbone.out_norm.weight", False),
        ("lm_head", "kernel"): (_LM_HEAD, True),
    }
    if path in top:
        name, transpose = top[path]
        return [[name]], transpose
    suffixes, transpose = _BLOCK_PARAMS[path[1:]]
    layers = range(config.num_blocks) if path[0] == "blocks" else [int(path[0][len("blocks_") :])]
    return [[f"backbone.blocks.{layer}.{suffix}" for suffix in suffixes] for layer in layers], transpose


def _param_block(
    sources: Mapping[str, tuple[Path, Any]],
    names: list[list[str]],  # per layer, the tensors side by side along the last axis (see _param_parts)
    widths: list[int],  # their widths along that axis
    transpose: bool,
    stacked: bool,  # the parameter has a leading layer axis L (scanned blocks)
    shape: tuple[int, ...],  # the parameter's
    dtype: Any,
    counts: dict[str, list[int]],  # tensor -> [non-finite values, size], updated
    seen: set[tuple],  # blocks already counted (a replica asks for the same block again)
    index: tuple[slice, ...],  # the block, one slice per dimension of the parameter
) -> np.ndarray:
    """One device's block of a parameter, read from the checkpoint tensors it is made of: the columns of the
    block that fall in each tensor, from that tensor's matching rows (torch layout) or columns."""
    index = tuple(slice(*s.indices(d)) for s, d in zip(index, shape, strict=True))
    bounds = tuple((s.start, s.stop) for s in index)
    count = bounds not in seen
    seen.add(bounds)
    layers = range(index[0].start, index[0].stop) if stacked else [0]
    *lead, cols = index[1:] if stacked else index
    out = []
    for layer in layers:
        pieces, start = [], 0
        for name, width in zip(names[layer], widths, strict=True):
            lo, hi = max(cols.start, start), min(cols.stop, start + width)
            if lo < hi:
                part = slice(lo - start, hi - start)
                x = _read_block(sources, name, (part, *reversed(lead)) if transpose else (*lead, part))
                if count:
                    counts[name][0] += _non_finite(x)
                pieces.append(np.asarray(x.T if transpose else x, dtype))
            start += width
        out.append(np.concatenate(pieces, axis=-1))
    return np.stack(out) if stacked else out[0]


def _load_onto_mesh(
    sources: Mapping[str, tuple[Path, Any]], config: xLSTMLMConfig, untie: bool, scan_blocks: bool, mesh: Any
) -> tuple[xLSTMLMConfig, dict[str, Any]]:
    """:func:`load_hf` with a mesh: the same checks, then each parameter made from its devices' blocks."""
    from xlstm_jax.models.xlstm_parallel.sharding import param_shardings

    shapes, dtypes = {}, {}
    for name, (path, handle) in sources.items():
        with _naming(path):
            view = handle.get_slice(name)
            shapes[name], dtypes[name] = tuple(view.get_shape()), view.get_dtype()
    head, embedding = shapes.get(_LM_HEAD), shapes.get(_EMBEDDING)
    rows_equal = None
    if head is not None and head == embedding and (untie or config.tie_word_embeddings):
        rows_equal = _equal_rows(sources, _LM_HEAD, _EMBEDDING, head[0])
        if untie and not rows_equal:
            config = config.replace(tie_word_embeddings=False)
    check_hf_tensors(config, shapes)
    _check_dtypes({name: _SAFETENSORS_DTYPES.get(d, d) for name, d in dtypes.items()}, "checkpoint tensors")
    if config.tie_word_embeddings and rows_equal is False:
        raise _tied_head_error()

    dtype = config.jnp_param_dtype
    flat = expected_param_shapes(config, scan_blocks=scan_blocks)
    tree: dict[str, Any] = {}
    for key, shape in flat.items():
        _set(tree, tuple(key.split("/")), jax.ShapeDtypeStruct(shape, dtype))
    shardings = param_shardings(tree, config, mesh)
    counts = {name: [0, math.prod(shape)] for name, shape in shapes.items()}  # non-finite values, size
    params: dict[str, Any] = {}
    for key, shape in flat.items():
        path = tuple(key.split("/"))
        names, transpose = _param_parts(config, path)
        widths = [shapes[name][0 if transpose else -1] for name in names[0]]
        stacked = path[0] == "blocks"
        read = functools.partial(_param_block, sources, names, widths, transpose, stacked, shape, dtype, counts, set())
        _set(params, path, jax.make_array_from_callback(shape, _get(shardings, path), read))
    _check_finite({name: (bad, size) for name, (bad, size) in counts.items()}, "checkpoint tensors")
    return config, params


# safetensors' dtype names -> NumPy's (for the messages and the floating-point check)
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def _old_files(model_dir: Path) -> tuple[set[str] | None, set[str]]:
    """``(live, all)``: the files the checkpoint now in ``model_dir`` is read from, as :func:`load_hf` reads
    it (None where only an unreadable index exists: then every existing file counts as in use), and every
    file that its ``model.safetensors`` and readable index name (removed once a new checkpoint is complete)."""
    single = (model_dir / WEIGHTS_NAME).is_file()
    try:
        indexed = set(_read_index(model_dir / INDEX_NAME).values()) if (model_dir / INDEX_NAME).is_file() else set()
        readable = True
    except ValueError:
        indexed, readable = set(), False
    live = {WEIGHTS_NAME} if single else (indexed if readable else None)
    return live, indexed | ({WEIGHTS_NAME} if single else set())


def _shard_names(model_dir: Path, count: int, live: set[str] | None) -> list[str]:
    """``model-00001-of-0000N.safetensors`` ..., or with a unique tag where those names are in use."""
    width = max(5, len(str(count)))
    names = [f"model-{i:0{width}d}-of-{count:0{width}d}.safetensors" for i in range(1, count + 1)]
    in_use = any((model_dir / n).exists() for n in names) if live is None else bool(live & set(names))
    if in_use:
        tag = uuid.uuid4().hex[:8]
        names = [n.replace(".safetensors", f"-{tag}.safetensors") for n in names]
    return names


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_hf(
    model_dir: str | Path, config: xLSTMLMConfig, params: Mapping[str, Any], max_shard_bytes: int = 5 * 2**30
) -> None:
    """Saves ``config.json`` and the weights as safetensors (sharded with an index above ``max_shard_bytes``).

    The files load in ``transformers`` (``xLSTMForCausalLM.from_pretrained``) and with :func:`load_hf`.

    The parameters are checked against ``config`` before anything is written (every expected parameter
    present, with its shape and a floating dtype). A checkpoint already in ``model_dir`` is never lost:
    every new file is first written and synced under a temporary name in ``model_dir`` (``.<name>.<tag>.tmp``);
    only then are they renamed into place, the weights first (new shards never take the name of a file the
    old checkpoint uses), then the switch (the new ``model.safetensors``, or the new index and the removal
    of an old ``model.safetensors``), then ``config.json``; the old checkpoint's other files are removed last.
    A save that fails while writing (a full disk, a size limit) removes its temporary files and leaves the
    old checkpoint as it was; a process killed outright can leave hidden ``.*.tmp`` files, which no loader
    reads. Between two renames the directory holds one whole set of tensors (old or new) and a config.

    Args:
        model_dir: The directory (created if needed).
        config: The model config.
        params: The parameter tree (either block layout).
        max_shard_bytes: Largest shard in bytes (a tensor larger than this gets a shard of its own).

    Raises:
        TypeError: ``config`` is not an ``xLSTMLMConfig`` or ``params`` not a mapping.
        ValueError: ``max_shard_bytes`` is not a positive int, or ``params`` do not fit ``config`` (all
            differences listed).
        OSError: writing failed (the old checkpoint is left in place).
    """
    from safetensors.numpy import save_file

    if not isinstance(config, xLSTMLMConfig):
        raise TypeError(f"config must be an xLSTMLMConfig, got {type(config).__name__}")
    if not _is_int(max_shard_bytes) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    tensors = params_to_hf_tensors(config, params)  # checks the params first
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    live, old = _old_files(model_dir)
    names = [WEIGHTS_NAME] if len(shards) == 1 else _shard_names(model_dir, len(shards), live)
    files: list[tuple[str, Any]] = list(zip(names, shards, strict=True))
    if len(shards) > 1:
        weight_map = {tensor: name for name, shard in files for tensor in shard}
        index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())}, "weight_map": weight_map}
        files.append((INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n"))
    files.append((CONFIG_NAME, json.dumps(config_to_hf(config), indent=2, sort_keys=True) + "\n"))

    temps: dict[str, Path] = {}
    try:
        for name, content in files:
            temps[name] = tmp = model_dir / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
            if isinstance(content, str):
                tmp.write_text(content)
            else:
                try:
                    save_file(content, tmp, metadata={"format": "pt"})  # transformers needs the format
                except Exception as error:  # safetensors reports write errors as its own type
                    if isinstance(error, OSError):
                        raise
                    raise OSError(f"writing {model_dir / name} failed: {error}") from error
            _fsync(tmp)
        for name in names:
            if name != WEIGHTS_NAME:
                os.replace(temps.pop(name), model_dir / name)
        if len(shards) == 1:
            os.replace(temps.pop(WEIGHTS_NAME), model_dir / WEIGHTS_NAME)
        else:
            os.replace(temps.pop(INDEX_NAME), model_dir / INDEX_NAME)
            (model_dir / WEIGHTS_NAME).unlink(missing_ok=True)  # an old single file would still be read first
        os.replace(temps.pop(CONFIG_NAME), model_dir / CONFIG_NAME)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    stale = old - set(names)
    if len(shards) == 1:
        stale.add(INDEX_NAME)
    for name in stale:
        (model_dir / name).unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):
        _fsync(model_dir)
