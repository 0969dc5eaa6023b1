"""How the xLSTM language model is laid out over devices: one ``jax.sharding.Mesh``, one table of rules.

The mesh has three named axes, in this order (:class:`MeshConfig`, :func:`make_mesh`):

- ``data``: data parallelism. The batch is split; parameters are replicated.
- ``fsdp``: fully sharded data parallelism. The batch is split further, and each parameter (so each optimiser
  state of it) is split on one dimension.
- ``tensor``: tensor parallelism. Heads, FFN columns, the fused projections' columns and the vocabulary are
  split.

One code path serves 1 to N devices. A 1x1x1 mesh is a single device, and the code never asks how many
devices there are.

**Logical axes.** Every dimension of a parameter, activation or state has a logical name. The table
:data:`LOGICAL_AXIS_RULES` maps each name onto mesh axes, as MaxText's ``logical_axis_rules`` does. Where
the mesh axes do not divide a dimension, the dimension takes the longest prefix of them whose sizes divide
it (``("data", "fsdp")`` falls back to ``("data",)``). Failing that it is replicated. So every mesh shape
works for every model; on a mesh that does not fit, a part is simply not split. A mesh axis is used at most
once per array.

**Parameters** (:func:`param_specs`) are named by their path in the model's tree (see
:mod:`~xlstm_jax.models.xlstm_parallel.model`). The leading L axis of scanned blocks (``blocks/...``) is never
split. The model width ``embed`` goes over ``fsdp``. A parameter with no such dimension that ``fsdp`` divides
(the per-head norm's weight, the gate bias) takes ``fsdp`` on its largest dimension that is not split yet
and that ``fsdp`` divides; failing that, on the largest dimension whose ``tensor`` blocks ``fsdp`` divides
(split over both); failing that, it is replicated over ``fsdp``.

Fused parameters are split contiguously over ``tensor``. Their column order is fixed by the checkpoint
format: ``qkvo_kernel`` is q, k, v, o and ``proj_gate_up`` is gate, up. So a device's block of columns is
not whole heads, and XLA reshards the product before the heads are split.

The specs tree has the params tree's structure exactly, so ``optax.tree_map_params`` maps it onto an
optimiser state (see :func:`param_specs`).

**The mesh inside the model.** The model takes no mesh argument. It reads the *context mesh*: run the
jitted model, train step or ``generate`` under ``with jax.set_mesh(mesh):``. Under that context:

- :func:`logical_constraint` pins activations to their logical layout;
- :func:`shard_map_batch_heads` runs the Pallas kernels inside ``jax.shard_map`` over the batch and head
  axes (GSPMD cannot partition a Pallas call).

``jax.jit`` keys its cache on the context mesh, so a function traced without a mesh is traced again under
one. Without a context mesh both helpers do nothing. Sharded parameters then still compute the same
function, but each kernel call needs its operands whole on every device.

Example:
    >>> mesh = make_mesh(MeshConfig(data=2, tensor=2))  # fsdp: the remaining devices
    >>> config, params = load_hf("xLSTM-7b", dtype="bfloat16", mesh=mesh)  # each device reads its shards
    >>> with jax.set_mesh(mesh):
    ...     out = generate(config, params, prompts, max_new_tokens=32)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from xlstm_jax.kernels.mosaic import as_array
from xlstm_jax.models.xlstm_parallel.config import _is_int, xLSTMLMConfig

__all__ = [
    "BATCH_AXES",
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "MeshConfig",
    "batch_sharding",
    "logical_constraint",
    "logical_shards",
    "logical_spec",
    "make_mesh",
    "param_logical_axes",
    "param_shardings",
    "param_specs",
    "shard_map_batch_heads",
    "shard_map_sequence_form",
    "shard_params",
    "state_specs",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> the mesh axes it is split over (None: never split).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),  # activations, batches and states: B
    ("embed", "fsdp"),  # parameters: the model width D
    ("vocab", "tensor"),  # V of the embedding, the LM head and the logits
    ("heads", "tensor"),  # NH, or flattened heads NH·DH (per-head norm weight, out_proj input, states)
    ("qkvo", "tensor"),  # the fused q, k, v, o columns (2 qk_dim + 2 v_dim)
    ("ffn", "tensor"),  # FFN columns (the fused gate/up: 2 ffn_dim; proj_down's input: ffn_dim)
    ("gates", None),  # the fused input and forget gate columns (2 NH): tiny
    ("layers", None),  # L of scanned blocks and of the stacked states
    ("seq", None),  # S
    ("act_embed", None),  # D of activations (the batch carries fsdp there)
    ("head_dim", None),  # DHQK, DHV
)
_RULES = dict(LOGICAL_AXIS_RULES)

Names = tuple[str | None, ...]  # one logical name (or None: not split) per dimension


@dataclass(frozen=True)
class MeshConfig:
    """The mesh shape: ``data`` x ``fsdp`` x ``tensor`` devices (frozen, hashable).

    Attributes:
        data: Devices over which the batch is split, parameters replicated.
        fsdp: Devices over which the batch and every parameter are split; -1 (the default): the devices the
            other two axes leave.
        tensor: Devices over which heads, FFN columns and the vocabulary are split.

    Each field is a positive int or -1 (at most one -1). :meth:`shape` resolves -1 for a device count.

    Example:
        >>> MeshConfig(data=2, tensor=2).shape(8)
        (2, 2, 2)
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"MeshConfig.{name} must be an int, got {name}={value!r} ({type(value).__name__})")
            if value < 1 and value != -1:
                raise ValueError(f"MeshConfig.{name} must be a positive int or -1 (the rest), got {name}={value}")
            object.__setattr__(self, name, int(value))
        rest = [name for name in MESH_AXES if getattr(self, name) == -1]
        if len(rest) > 1:
            raise ValueError(f"at most one MeshConfig field may be -1 (the remaining devices), got {rest} all -1")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """``(data, fsdp, tensor)`` for ``num_devices`` devices, -1 resolved.

        Raises:
            ValueError: the sizes do not multiply to ``num_devices`` (or do not divide it, with a -1). The
                message names the fields and the device count.
        """
        if not _is_int(num_devices) or num_devices < 1:
            raise ValueError(f"num_devices must be a positive int, got {num_devices!r}")
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        rest = [name for name, size in sizes.items() if size == -1]
        fixed = math.prod(size for size in sizes.values() if size != -1)
        given = ", ".join(f"{name}={size}" for name, size in sizes.items())
        if rest:
            if num_devices % fixed:
                raise ValueError(
                    f"MeshConfig({given}): {rest[0]}=-1 takes the remaining devices, but the other axes' product "
                    f"{fixed} does not divide the device count {num_devices}"
                )
            sizes[rest[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(
                f"MeshConfig({given}) asks for data*fsdp*tensor = {fixed} devices, but the device count is "
                f"{num_devices}; set one field to -1 to take the remaining devices"
            )
        return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_config: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``mesh_config`` over ``devices`` (None: ``jax.devices()``).

    The axes are ``Auto``: XLA partitions what the code does not pin (``jax.make_mesh`` would default to
    ``Explicit``, which makes every op name its output sharding).

    Raises:
        TypeError: ``mesh_config`` is not a ``MeshConfig``.
        ValueError: the mesh shape does not fit the number of devices (see :meth:`MeshConfig.shape`).
    """
    if not isinstance(mesh_config, MeshConfig):
        raise TypeError(f"mesh_config must be a MeshConfig, got {type(mesh_config).__name__}")
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_config.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _mesh_sizes(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    """Size of each mesh axis that the code may split over (Manual axes, inside a ``shard_map``, excluded)."""
    types = getattr(mesh, "axis_types", (AxisType.Auto,) * len(mesh.axis_names))
    return {name: size for (name, size), kind in zip(mesh.shape.items(), types, strict=True) if kind != AxisType.Manual}


def _check_mesh(mesh: Any) -> dict[str, int]:
    if not isinstance(mesh, Mesh | AbstractMesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or AbstractMesh, got {type(mesh).__name__}")
    missing = [name for name in MESH_AXES if name not in mesh.axis_names]
    if missing:
        raise ValueError(f"the mesh must have the axes {MESH_AXES}, got {tuple(mesh.axis_names)} (missing {missing})")
    return _mesh_sizes(mesh)


def _axes_of(name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in _RULES:
        raise ValueError(f"unknown logical axis name {name!r}; the rules name {sorted(_RULES)}")
    axes = _RULES[name]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _fit(axes: Sequence[str], sizes: Mapping[str, int], dims: Sequence[int], used: set[str]) -> tuple[str, ...]:
    """The longest prefix of ``axes`` (those in the mesh and not in ``used``) whose product divides every dim."""
    axes = [axis for axis in axes if axis in sizes and axis not in used]
    while axes and any(dim % math.prod(sizes[axis] for axis in axes) for dim in dims):
        axes.pop()
    return tuple(axes)


def _entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    """A PartitionSpec entry: None, one axis name, or a tuple of them (size-one axes kept: they cost nothing)."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


def logical_spec(names: Names, shape: Sequence[int], mesh: Mesh | AbstractMesh) -> PartitionSpec:
    """The ``PartitionSpec`` of an array of ``shape`` whose dimensions have the logical ``names``.

    Each name takes its mesh axes from :data:`LOGICAL_AXIS_RULES`, shortened to the longest prefix whose
    sizes divide the dimension (else the dimension is replicated); a mesh axis serves one dimension at most.

    Raises:
        ValueError: ``names`` and ``shape`` differ in length, or a name is not in the rules.
    """
    names, shape = tuple(names), tuple(shape)
    if len(names) != len(shape):
        raise ValueError(f"names {names} must give one logical name per dimension of shape {shape}")
    sizes, used, spec = _mesh_sizes(mesh), set(), []
    for name, dim in zip(names, shape, strict=True):
        axes = _fit(_axes_of(name), sizes, [dim], used)
        used.update(axes)
        spec.append(_entry(axes))
    return PartitionSpec(*spec)


# Logical names of each parameter by its path under a block (without the leading L of scanned blocks), and
# of the parameters outside the blocks.
_BLOCK_PARAM_AXES: dict[tuple[str, ...], Names] = {
    ("norm_mlstm", "weight"): ("embed",),
    ("mlstm_layer", "qkvo_kernel"): ("embed", "qkvo"),
    ("mlstm_layer", "if_kernel"): ("embed", "gates"),
    ("mlstm_layer", "if_bias"): ("gates",),
    ("mlstm_layer", "multihead_norm", "weight"): ("heads",),
    ("mlstm_layer", "out_proj", "kernel"): ("heads", "embed"),
    ("norm_ffn", "weight"): ("embed",),
    ("ffn", "proj_gate_up", "kernel"): ("embed", "ffn"),
    ("ffn", "proj_down", "kernel"): ("ffn", "embed"),
}
_TOP_PARAM_AXES: dict[tuple[str, ...], Names] = {
    ("embedding", "embedding"): ("vocab", "embed"),
    ("out_norm", "weight"): ("embed",),
    ("lm_head", "kernel"): ("embed", "vocab"),
}


def param_logical_axes(path: Sequence[str]) -> Names:
    """The logical names of the parameter at ``path`` (keys from the root of the params tree), e.g.
    ``("blocks_0", "ffn", "proj_down", "kernel")`` -> ``("ffn", "embed")``; a scanned block's leaf
    (``("blocks", ...)``) has ``"layers"`` first.

    Raises:
        ValueError: the path is not a parameter of the xLSTM model.
    """
    path = tuple(path)
    if path in _TOP_PARAM_AXES:
        return _TOP_PARAM_AXES[path]
    if path and path[1:] in _BLOCK_PARAM_AXES:
        if path[0] == "blocks":
            return ("layers", *_BLOCK_PARAM_AXES[path[1:]])
        if path[0].startswith("blocks_") and path[0][7:].isdigit():
            return _BLOCK_PARAM_AXES[path[1:]]
    raise ValueError(f"{'/'.join(path)!r} is not a parameter of the xLSTM language model (see model.py's tree)")


def _param_spec(path: tuple[str, ...], shape: tuple[int, ...], sizes: Mapping[str, int]) -> PartitionSpec:
    names = param_logical_axes(path)
    if len(names) != len(shape):
        raise ValueError(f"parameter {'/'.join(path)} has shape {shape}; expected {len(names)} dims {names}")
    used: set[str] = set()
    axes = []
    for n, d in zip(names, shape, strict=True):
        axes.append(_fit(_axes_of(n), sizes, [d], used))
        used.update(axes[-1])
    fsdp = sizes.get("fsdp", 1)
    if fsdp > 1 and not any("fsdp" in a for a in axes):
        # No "embed" dimension that fsdp divides: the largest dimension (never L) that fsdp divides after what
        # the dimension is split into already (by the unit-size axes only, preferably).
        def blocks(j: int) -> int:
            return math.prod(sizes[a] for a in axes[j])

        fits = [j for j, n in enumerate(names) if n != "layers" and shape[j] % (blocks(j) * fsdp) == 0]
        if fits:
            j = max(fits, key=lambda j: (blocks(j) == 1, shape[j] // blocks(j)))
            axes[j] = ("fsdp",) if blocks(j) == 1 else (*axes[j], "fsdp")
    return PartitionSpec(*(_entry(a) for a in axes))


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_specs(params_or_shapes: Any, config: xLSTMLMConfig, mesh: Mesh | AbstractMesh) -> Any:
    """The ``PartitionSpec`` of every parameter, in a tree of the params tree's structure.

    Args:
        params_or_shapes: The params tree (arrays, or anything with ``.shape``, such as
            ``jax.eval_shape(model.init, ...)["params"]``), either block layout.
        config: The model config; a scanned block's leading axis must be ``config.num_blocks``.
        mesh: A mesh with the axes ``data``, ``fsdp``, ``tensor`` (or an ``AbstractMesh``).

    Returns:
        A tree like ``params_or_shapes`` with a ``PartitionSpec`` per leaf (see the module docstring for the
        layout and the fallbacks where a mesh axis does not divide a dimension). For the optimiser state:

        >>> specs = param_specs(params, config, mesh)
        >>> opt_specs = optax.tree_map_params(optimizer, lambda _, s: s, opt_state, specs,
        ...     transform_non_params=lambda _: PartitionSpec(), is_leaf=lambda x: isinstance(x, PartitionSpec))

    Raises:
        TypeError: ``config`` is not an ``xLSTMLMConfig`` or ``mesh`` not a mesh.
        ValueError: the mesh lacks an axis, or a leaf is not a parameter of the model or has the wrong rank or
            layer count.
    """
    if not isinstance(config, xLSTMLMConfig):
        raise TypeError(f"config must be an xLSTMLMConfig, got {type(config).__name__}")
    sizes = _check_mesh(mesh)

    def spec(key_path: tuple, leaf: Any) -> PartitionSpec:
        path = tuple(_key_name(k) for k in key_path)
        shape = tuple(getattr(leaf, "shape", ()))
        if path[:1] == ("blocks",) and shape[:1] != (config.num_blocks,):
            raise ValueError(
                f"scanned parameter {'/'.join(path)} has shape {shape}; its leading axis must be "
                f"num_blocks={config.num_blocks}"
            )
        return _param_spec(path, shape, sizes)

    return jax.tree_util.tree_map_with_path(spec, params_or_shapes)


def param_shardings(params_or_shapes: Any, config: xLSTMLMConfig, mesh: Mesh) -> Any:
    """:func:`param_specs` as ``NamedSharding`` on ``mesh`` (a tree of the params tree's structure)."""
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec),
        param_specs(params_or_shapes, config, mesh),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_params(params: Any, mesh: Mesh, config: xLSTMLMConfig) -> Any:
    """``params`` placed on ``mesh`` by :func:`param_shardings` (``jax.device_put``; each device receives its
    shards only). To load a checkpoint straight onto its shards, use ``hf.load_hf(..., mesh=mesh)``."""
    return jax.device_put(params, param_shardings(params, config, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a (B, S) batch array: B split over ``("data", "fsdp")``, S whole.

    B must be a multiple of ``data * fsdp`` when the arrays are placed with it (``jax.device_put`` raises
    otherwise); the model itself replicates a batch that the axes do not divide.
    """
    _check_mesh(mesh)
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


_STATE_NAMES: tuple[Names, Names, Names] = (
    ("layers", "batch", "heads", "head_dim", "head_dim"),  # c (L, B, NH, DHQK, DHV)
    ("layers", "batch", "heads", "head_dim"),  # n (L, B, NH, DHQK)
    ("layers", "batch", "heads"),  # m (L, B, NH)
)


def state_specs(config: xLSTMLMConfig, batch_size: int, mesh: Mesh | AbstractMesh) -> Any:
    """The ``PartitionSpec`` of each of the model's states, as ``ModelStates(c, n, m)``: B over
    ``("data", "fsdp")``, NH over ``tensor`` (each where the axes divide it), L and the head dims whole.

    Raises:
        TypeError: ``config`` is not an ``xLSTMLMConfig`` or ``mesh`` not a mesh.
        ValueError: ``batch_size`` is not a positive int, or the mesh lacks an axis.
    """
    from xlstm_jax.models.xlstm_parallel.model import ModelStates  # the model imports this module

    if not isinstance(config, xLSTMLMConfig):
        raise TypeError(f"config must be an xLSTMLMConfig, got {type(config).__name__}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _check_mesh(mesh)
    L, B, NH = config.num_blocks, batch_size, config.num_heads
    shapes = ((L, B, NH, config.qk_head_dim, config.v_head_dim), (L, B, NH, config.qk_head_dim), (L, B, NH))
    return ModelStates(*(logical_spec(n, s, mesh) for n, s in zip(_STATE_NAMES, shapes, strict=True)))


def _context_mesh() -> AbstractMesh | None:
    """The context mesh (``jax.set_mesh``) if it has one of the axes ``data``, ``fsdp``, ``tensor`` that the code
    may split over (not Manual), else None: a mesh of other axes leaves the model's layout to XLA."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not set(_mesh_sizes(mesh)) & set(MESH_AXES):
        return None
    return mesh


def logical_shards(name: str, size: int) -> int:
    """Into how many blocks the context mesh splits a dimension of ``size`` named ``name`` (1 without a mesh),
    as :func:`logical_spec` and :func:`shard_map_batch_heads` split it."""
    mesh = _context_mesh()
    if mesh is None:
        _axes_of(name)
        return 1
    sizes = _mesh_sizes(mesh)
    return math.prod(sizes[axis] for axis in _fit(_axes_of(name), sizes, [size], set()))


def logical_constraint(x: jax.Array, names: Names) -> jax.Array:
    """``x`` pinned to the layout of its logical ``names`` (one per dimension) on the context mesh, e.g.
    ``logical_constraint(x, ("batch", "seq", "act_embed"))`` for the (B, S, D) residual stream; x itself
    when no mesh is set (``jax.set_mesh``).

    Raises:
        ValueError: ``names`` does not give one known name per dimension of x.
    """
    mesh = _context_mesh()
    if mesh is None:
        if len(tuple(names)) != x.ndim:
            raise ValueError(f"names {tuple(names)} must give one logical name per dimension of x.shape={x.shape}")
        for name in names:
            _axes_of(name)
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh))


_SPLIT_NAMES = ("batch", "heads")  # the axes shard_map_batch_heads splits


def _is_names(x: Any) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def shard_map_batch_heads(fn: Callable[..., Any], in_names: Sequence[Names | None], out_names: Any) -> Callable:
    """``fn`` run inside ``jax.shard_map`` over the batch and head axes of the context mesh (``jax.set_mesh``),
    for a Pallas kernel call, which XLA cannot partition; ``fn`` itself without a mesh.

    Each device runs ``fn`` on its block of the arguments: every dimension named ``"batch"`` split over
    ``("data", "fsdp")``, every one named ``"heads"`` over ``"tensor"``, the rest whole. A name is split
    only as far as its mesh axes divide every argument dimension that bears it (the longest prefix of its
    axes, as :func:`logical_spec`), so the blocks of all arguments agree; a batch that the axes do not divide
    runs whole on every device. ``fn`` must compute each output row from the same rows and heads of its
    inputs (no reduction over the batch or the heads).

    Args:
        fn: Takes the positional arguments, returns a pytree of arrays (or None leaves).
        in_names: Per positional argument, the logical name of each dimension (a tuple of names; None in it:
            not split), or None for an argument passed whole (any pytree, e.g. a weight or None).
        out_names: ``fn``'s output structure with a tuple of names per array.

    Returns:
        A function of the same arguments and result.

    Raises:
        ValueError: (when called) an argument's rank differs from its names, or an output names an axis that
            no argument has (its block size would be unknown).
    """
    in_names = tuple(in_names)

    def wrapped(*args: Any) -> Any:
        if len(args) != len(in_names):
            raise ValueError(f"{len(args)} arguments given for {len(in_names)} entries of in_names")
        mesh = _context_mesh()
        if mesh is None:
            return fn(*args)
        sizes = _mesh_sizes(mesh)
        dims: dict[str, list[int]] = {}
        for j, (arg, names) in enumerate(zip(args, in_names, strict=True)):
            if names is None:
                continue
            if len(names) != arg.ndim:
                raise ValueError(f"argument {j} has shape {tuple(arg.shape)} but in_names[{j}]={names}")
            for name, dim in zip(names, arg.shape, strict=True):
                if name is not None:
                    dims.setdefault(name, []).append(dim)
        used: set[str] = set()
        axes: dict[str, tuple[str, ...]] = {}
        for name in _SPLIT_NAMES:  # the batch first: it takes ("data", "fsdp")
            if name in dims:
                axes[name] = _fit(_axes_of(name), sizes, dims[name], used)
                used.update(axes[name])

        def spec(names: Names) -> PartitionSpec:
            entries = []
            for n in names:
                if n in _SPLIT_NAMES and n not in axes:
                    raise ValueError(f"names {names}: no argument has a {n!r} axis, so its block size is unknown")
                _axes_of(n)  # a known name (the others than batch and heads stay whole)
                entries.append(_entry(axes[n]) if n in axes else None)
            return PartitionSpec(*entries)

        in_specs = tuple(PartitionSpec() if names is None else spec(names) for names in in_names)
        out_specs = jax.tree_util.tree_map(spec, out_names, is_leaf=_is_names)
        # The kernels' out_shape carry no varying-axes types, so the checks of check_vma cannot run on them.
        mapped = jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        return mapped(*args)

    return wrapped


def shard_map_sequence_form(form: Callable[..., Any]) -> Callable[..., Any]:
    """A sequence form of the mLSTM (the signature of the backends' ``form``: ``form(q, k, v, i, f, c_initial,
    n_initial, m_initial, return_last_states, *, segment_ids, **settings)``) run per device on its rows and
    heads under the context mesh (:func:`shard_map_batch_heads`), itself without a mesh: for a Pallas form.

    Every array argument is split on its first two axes (B, NH), ``segment_ids`` (B, S) on B; the states and
    h come back split alike. With ``layout="BSND"`` among the settings, q, k, v and h are (B, S, NH, D), split on
    B and NH (under a mesh a :class:`~xlstm_jax.kernels.mosaic.HeadColumns` block is first taken as an array).
    Gradients flow through (``jax.shard_map`` sums the cotangents of what each device received whole).
    """

    def run(
        q: jax.Array,  # (B, NH, S, DHQK)
        k: jax.Array,  # (B, NH, S, DHQK)
        v: jax.Array,  # (B, NH, S, DHV)
        i: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
        f: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
        c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
        n_initial: jax.Array | None = None,  # (B, NH, DHQK)
        m_initial: jax.Array | None = None,  # (B, NH)
        return_last_states: bool = False,
        *,
        segment_ids: jax.Array | None = None,  # (B, S)
        **settings: Any,
    ) -> Any:
        def call(q, k, v, i, f, c, n, m, segment_ids):
            return form(
                q, k, v, i, f, c_initial=c, n_initial=n, m_initial=m, return_last_states=return_last_states,
                segment_ids=segment_ids, **settings,
            )  # fmt: skip

        def names(x: Any, split: int = 2) -> Names | None:  # B, NH first; None: passed as it is (None)
            ndim = getattr(x, "ndim", None)
            return None if ndim is None or ndim < split else ("batch", "heads")[:split] + (None,) * (ndim - split)

        if _context_mesh() is not None:  # a block of a wider array's columns, as an array of its own to split
            q, k, v = (as_array(x) for x in (q, k, v))
        args = (q, k, v, i, f, c_initial, n_initial, m_initial)
        in_names = [names(x) for x in args] + [names(segment_ids, 1)]
        c = ("batch", "heads", None, None)
        h = ("batch", None, "heads", None) if settings.get("layout") == "BSND" else c  # as q, k and v
        in_names[:3] = [h] * 3
        out_names = (h, (c, ("batch", "heads", None), ("batch", "heads"))) if return_last_states else h
        return shard_map_batch_heads(call, in_names, out_names)(*args, segment_ids)

    run.__name__ = run.__qualname__ = getattr(form, "__name__", "form")
    run.__doc__ = form.__doc__
    return run
