"""The settings of a training run: :class:`TrainConfig` (with :class:`DataConfig`), from a file, flags or code.

A run is described by one frozen ``TrainConfig``: the model (a preset or a Hugging Face directory to
fine-tune, plus field overrides), the data, the device mesh, the optimiser, the number of steps, and where
checkpoints and logs go. :meth:`TrainConfig.validate` checks every setting, including the files it names
and how the batch and the heads split over the mesh, before any model is built or compiled, and reports all
problems at once in one ``ValueError`` whose lines each name a setting.

A config file is TOML (``.toml``) or JSON (``.json``) holding the fields by name, with the nested configs as
tables; relative paths are taken from the current folder::

    model = "tiny"                      # a preset (PRESETS) or a Hugging Face directory
    steps = 2000
    checkpoint_dir = "runs/tiny/checkpoints"
    log_dir = "runs/tiny/logs"

    [model_overrides]                   # fields of xLSTMLMConfig
    embedding_dim = 256

    [data]                              # DataConfig
    kind = "text"
    paths = ["corpus/"]
    seq_len = 256
    batch_size = 32

    [mesh]                              # MeshConfig: data x fsdp x tensor devices
    fsdp = -1

    [optimizer]                         # OptimizerConfig
    learning_rate = 1e-3
    warmup_steps = 100

Example:
    >>> config = TrainConfig.from_file("run.toml", steps=500)   # a keyword replaces the file's value
    >>> config.validate()                                       # ValueError listing every bad setting
    >>> model_config = config.model_config()
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlstm_jax.kernels.chunkwise_mosaic import BACKWARDS
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.hf import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, config_from_hf
from xlstm_jax.models.xlstm_parallel.runtime import Remat
from xlstm_jax.models.xlstm_parallel.sharding import MeshConfig
from xlstm_jax.training.optim import OptimizerConfig

__all__ = ["DATA_KINDS", "PRESETS", "DataConfig", "TrainConfig"]

# Model presets: fields of xLSTMLMConfig. Parameters are float32 (the optimiser updates them); ``dtype`` is the
# compute dtype. A preset without ``vocab_size`` takes the data's vocabulary (the tokenizer's size).
PRESETS: dict[str, dict[str, Any]] = {
    # xLSTMLMConfig.tiny's sizes: D=128, 2 blocks, 2 heads (DHQK=32, DHV=64).
    "tiny": {"embedding_dim": 128, "num_blocks": 2, "num_heads": 2},
    # A small byte-level model: D=256, 4 blocks, 4 heads (DHQK=32, DHV=64), 3.7M parameters with 258 byte ids.
    "byte-small": {"embedding_dim": 256, "num_blocks": 4, "num_heads": 4},
    # A 1.3B-class model (1.4B parameters): D=2048, 24 blocks, 4 heads (DHQK=256, DHV=512), bfloat16 compute.
    "1.3b": {"vocab_size": 50304, "embedding_dim": 2048, "num_blocks": 24, "num_heads": 4, "dtype": "bfloat16"},
    # The xLSTM-7B architecture: D=4096, 32 blocks, 8 heads (DHQK=256, DHV=512), bfloat16 compute.
    "7b": {"vocab_size": 50304, "embedding_dim": 4096, "num_blocks": 32, "num_heads": 8, "dtype": "bfloat16"},
}

# Where the documents come from: text files, a token-id array on disk, or the Python standard library's sources.
DATA_KINDS = ("text", "tokens", "stdlib")

# The byte-level tokenizer's name in DataConfig.tokenizer.
BYTES = "bytes"

# Fields of xLSTMLMConfig that an override may change on a model loaded from a Hugging Face directory (the
# others define the shapes of its weights).
_HF_OVERRIDABLE = ("dtype", "param_dtype", "state_dtype", "bos_token_id", "pad_token_id", "eos_token_id")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _str_tuple(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str | os.PathLike):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str | os.PathLike) for v in value):
        raise TypeError(f"{name} must be a list of paths (strings), got {name}={value!r}")
    return tuple(os.fspath(v) for v in value)


@dataclass(frozen=True)
class DataConfig:
    """Where the training documents come from and how they are cut into batches (frozen, hashable).

    Attributes:
        kind: ``"text"``: text files, one document per file; ``"tokens"``: one ``.npy`` (or raw binary) array
            of token ids; ``"stdlib"``: the ``.py`` files of this Python's standard library (``paths`` empty).
        paths: Files, directories (searched recursively) or glob patterns (``"text"``), or the one token file
            (``"tokens"``).
        tokenizer: ``"bytes"`` (UTF-8 bytes: ids 0-255, BOS 256, EOS 257) or the path of a ``tokenizer.json``
            (documents framed with the model's ``bos_token_id`` and ``eos_token_id``). Text and stdlib only.
        suffixes: Keep only the files whose names end with one of these (``"text"``; empty: every file).
        eos_id: ``"tokens"``: the id that ends each document in the array; None: the array is one stream,
            cut into rows of ``seq_len + 1`` tokens.
        token_dtype: ``"tokens"``: the element type of a raw binary file (e.g. ``"uint16"``); None for ``.npy``.
        seq_len: S, tokens per row that the model reads.
        batch_size: B, rows per optimiser step over all devices and processes (the global batch).
        validation_fraction: The expected share of documents held out for the validation loss, in [0, 1).
        num_threads: Host threads that read and tokenise documents.
    """

    kind: str = "text"
    paths: tuple[str, ...] = ()
    tokenizer: str = BYTES
    suffixes: tuple[str, ...] = ()
    eos_id: int | None = None
    token_dtype: str | None = None
    seq_len: int = 256
    batch_size: int = 16
    validation_fraction: float = 0.05
    num_threads: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", _str_tuple("data.paths", self.paths))
        object.__setattr__(self, "suffixes", _str_tuple("data.suffixes", self.suffixes))
        if isinstance(self.tokenizer, os.PathLike):
            object.__setattr__(self, "tokenizer", os.fspath(self.tokenizer))

    def problems(self) -> list[str]:
        """Every bad setting, one message each naming it (empty: none); reads no document."""
        out = []
        for name in ("seq_len", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                out.append(f"data.{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.num_threads) or self.num_threads < 0:
            out.append(f"data.num_threads must be an integer >= 0, got {self.num_threads!r}")
        fraction = self.validation_fraction
        if not isinstance(fraction, numbers.Real) or isinstance(fraction, bool) or not 0 <= fraction < 1:
            out.append(f"data.validation_fraction must be a number in [0, 1), got {fraction!r}")
        if self.kind not in DATA_KINDS:
            return [*out, f"data.kind must be one of {list(DATA_KINDS)}, got {self.kind!r}"]
        if not isinstance(self.tokenizer, str):
            out.append(f"data.tokenizer must be {BYTES!r} or the path of a tokenizer.json, got {self.tokenizer!r}")
        elif self.tokenizer != BYTES and self.kind != "tokens":
            path = Path(self.tokenizer)
            if not (path.is_file() or (path / "tokenizer.json").is_file()):
                out.append(f"data.tokenizer={self.tokenizer!r} is neither {BYTES!r} nor a tokenizer.json file")
        if self.kind == "stdlib" and self.paths:
            out.append(f"data.paths must be empty with data.kind='stdlib' (the standard library), got {self.paths}")
        if self.kind in ("text", "tokens") and not self.paths:
            out.append(f"data.paths is empty: data.kind={self.kind!r} needs the files to train on")
        if self.kind == "tokens":
            if len(self.paths) > 1:
                out.append(f"data.paths must name one token file with data.kind='tokens', got {len(self.paths)}")
            elif self.paths and not Path(self.paths[0]).is_file():
                out.append(f"data.paths: the token file {self.paths[0]!r} is not a file")
            elif self.paths and not self.paths[0].endswith(".npy") and self.token_dtype is None:
                out.append(f"data.token_dtype is needed to read the raw binary file {self.paths[0]!r} (or use .npy)")
            if self.tokenizer != BYTES:
                out.append("data.tokenizer applies to text; a token file holds ids already")
            if self.eos_id is not None and (not _is_int(self.eos_id) or self.eos_id < 0):
                out.append(f"data.eos_id must be a token id >= 0 or None, got {self.eos_id!r}")
        else:
            for name in ("eos_id", "token_dtype"):
                if getattr(self, name) is not None:
                    out.append(f"data.{name} applies to data.kind='tokens' only, got data.kind={self.kind!r}")
        if self.kind == "text":
            for entry in self.paths:
                if not (Path(entry).exists() or any(c in entry for c in "*?[")):
                    out.append(f"data.paths: {entry!r} does not exist")
        return out

    def vocab_size(self) -> int | None:
        """The size of the tokenizer's vocabulary (258 for bytes), or None for a token file (not known)."""
        if self.kind == "tokens":
            return None
        if self.tokenizer == BYTES:
            from xlstm_jax.training.data import ByteTokenizer

            return ByteTokenizer.vocab_size
        from xlstm_jax.training.data import load_tokenizer

        return load_tokenizer(self.tokenizer).vocab_size

    def tokenizer_for(self, model: xLSTMLMConfig) -> Any:
        """The tokenizer of text data (:class:`~xlstm_jax.training.data.ByteTokenizer` or an ``HFTokenizer``
        framing documents with the model's BOS and EOS ids where it has them), or None for a token file."""
        from xlstm_jax.training.data import ByteTokenizer, load_tokenizer

        if self.kind == "tokens":
            return None
        if self.tokenizer == BYTES:
            return ByteTokenizer()
        size = load_tokenizer(self.tokenizer).vocab_size
        ids = [i if i is not None and i < size else None for i in (model.bos_token_id, model.eos_token_id)]
        return load_tokenizer(self.tokenizer, bos_id=ids[0], eos_id=ids[1])

    def source(self, model: xLSTMLMConfig) -> Any:
        """The documents (a ``TextFileSource`` or ``TokenArraySource``) for a model of config ``model``.

        Raises:
            ValueError: the paths match no file, or the token file cannot be read.
        """
        from xlstm_jax.training.data import TextFileSource, TokenArraySource, stdlib_python_files

        if self.kind == "tokens":
            chunk = self.seq_len + 1 if self.eos_id is None else None
            return TokenArraySource(
                self.paths[0], eos_id=self.eos_id, chunk_len=chunk, vocab_size=model.vocab_size, dtype=self.token_dtype
            )
        paths = stdlib_python_files() if self.kind == "stdlib" else list(self.paths)
        return TextFileSource(paths, self.tokenizer_for(model), suffixes=self.suffixes)


def _pairs(value: Any) -> tuple[tuple[str, Any], ...]:
    """Model overrides as sorted ``(name, value)`` pairs (hashable), from a mapping or pairs."""
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list | tuple) and all(isinstance(p, list | tuple) and len(p) == 2 for p in value):
        items = [tuple(p) for p in value]
    else:
        raise TypeError(f"model_overrides must be a mapping of xLSTMLMConfig fields, got {value!r}")
    if not all(isinstance(k, str) for k, _ in items):
        raise TypeError(f"model_overrides keys must be field names, got {[k for k, _ in items]!r}")
    return tuple(sorted(items))


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs (frozen). :meth:`validate` checks it before anything is built.

    Attributes:
        model: A preset name (:data:`PRESETS`: ``"tiny"``, ``"byte-small"``, ``"1.3b"``, ``"7b"``) or a Hugging
            Face xLSTM directory whose weights the run starts from (fine-tuning).
        model_overrides: Fields of ``xLSTMLMConfig`` set on top of the preset (any field) or of the directory's
            ``config.json`` (dtypes and special token ids only), as a mapping or ``(name, value)`` pairs.
            Parameters are float32 unless ``param_dtype`` is given.
        data: The data (:class:`DataConfig`).
        mesh: The device mesh, ``data`` x ``fsdp`` x ``tensor`` (``MeshConfig``; by default every device on
            ``fsdp``).
        optimizer: AdamW and its schedule (``OptimizerConfig``); None: the defaults with ``total_steps=steps``
            and ``warmup_steps=min(1000, steps // 10)`` (see :attr:`optimizer_config`).
        steps: The optimiser step at which the run ends (a resumed run continues up to it).
        accum_steps: Micro-batches per step (gradient accumulation): ``data.batch_size / accum_steps`` rows each.
        remat: Rematerialisation of each block: ``"none"``, ``"full"`` or ``"dots"`` (``Remat``).
        scan_blocks: Run the blocks under ``nn.scan`` (faster compilation of deep models).
        mlstm_backward: The mLSTM cell's backward pass where its Mosaic GPU forward kernel runs (Hopper):
            ``"mosaic"``, the kernel forward and the Mosaic GPU backward kernels (where they cover the head
            shape), or ``"xla"``, the XLA chunkwise form forward and backward (BENCHMARKS.md). Elsewhere the XLA
            form runs either way.
        checkpoint_dir: Where checkpoints go (None: no checkpoints).
        checkpoint_every: Save every this many steps (and at the end).
        checkpoint_keep: Keep the newest this many checkpoints.
        resume: Continue from the newest checkpoint in ``checkpoint_dir`` (which must hold one). Without it,
            ``checkpoint_dir`` must hold none, so that no earlier run is overwritten.
        eval_every: Compute the validation loss every this many steps and at the end (0: never).
        eval_batches: Batches of the validation split each validation loss is computed over (the same ones
            every time).
        log_dir: Where ``metrics.jsonl``, the TensorBoard events and ``train_config.json`` go (None: no files).
        log_every: Log the training metrics every this many steps.
        export_hf: A directory to write the trained model to as Hugging Face safetensors at the end (None: none).
        seed: Seed of the parameters' initialisation and of the data order.
        peak_flops: The peak FLOP/s of one device that MFU is measured against; None: the default for the
            device (see :mod:`xlstm_jax.training.loop`).
    """

    model: str = "tiny"
    model_overrides: tuple[tuple[str, Any], ...] = ()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    optimizer: OptimizerConfig | None = None
    steps: int = 1000
    accum_steps: int = 1
    remat: str = "none"
    scan_blocks: bool = False
    mlstm_backward: str = "mosaic"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    checkpoint_keep: int = 3
    resume: bool = False
    eval_every: int = 500
    eval_batches: int = 8
    log_dir: str | None = None
    log_every: int = 10
    export_hf: str | None = None
    seed: int = 0
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_overrides", _pairs(self.model_overrides))
        for name in ("model", "checkpoint_dir", "log_dir", "export_hf"):
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.remat, Remat):
            object.__setattr__(self, "remat", self.remat.value)
        for name, kind in (("data", DataConfig), ("mesh", MeshConfig)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        if self.optimizer is not None and not isinstance(self.optimizer, OptimizerConfig):
            raise TypeError(f"optimizer must be an OptimizerConfig or None, got {type(self.optimizer).__name__}")

    # ------------------------------------------------------------------------------------------------------
    # Construction from files and dicts
    # ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A config from a dict of fields, with ``data``, ``mesh`` and ``optimizer`` as dicts of their fields.

        Raises:
            ValueError: unknown keys (named, with the known ones) or a nested config that rejects a value
                (its message prefixed with the section, e.g. ``mesh: ...``).
            TypeError: a section that is not a table.
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"a training config must be a table of settings, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown settings {unknown}; the settings are {sorted(known)}")
        kwargs = dict(values)
        for name, kind in (("data", DataConfig), ("mesh", MeshConfig), ("optimizer", OptimizerConfig)):
            section = kwargs.get(name)
            if section is None or isinstance(section, kind):
                continue
            if not isinstance(section, Mapping):
                raise TypeError(f"{name} must be a table of {kind.__name__} fields, got {section!r}")
            fields = {f.name for f in dataclasses.fields(kind)}
            bad = sorted(set(section) - fields)
            if bad:
                raise ValueError(f"unknown settings {[f'{name}.{k}' for k in bad]}; {name} has {sorted(fields)}")
            if name == "optimizer":
                section = cls._optimizer_defaults(section, kwargs.get("steps", cls.steps))
            try:
                kwargs[name] = kind(**section)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{name}: {e}") from None
        return cls(**kwargs)

    @staticmethod
    def _optimizer_defaults(section: Mapping[str, Any], steps: Any) -> dict[str, Any]:
        """An optimizer section with ``total_steps`` and ``warmup_steps`` derived from ``steps`` where absent."""
        section = dict(section)
        if _is_int(steps) and steps >= 1:
            section.setdefault("total_steps", int(steps))
            section.setdefault("warmup_steps", min(1000, int(section["total_steps"]) // 10))
        return section

    @classmethod
    def from_file(cls, path: str | os.PathLike, **changes: Any) -> TrainConfig:
        """A config from a TOML or JSON file, with ``changes`` (fields, or for a section a dict of its fields
        that is merged into the file's section) applied on top.

        Raises:
            ValueError: the file does not exist, is not valid TOML/JSON, or holds unknown or bad settings.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        text = path.read_bytes()
        try:
            if path.suffix == ".json":
                values = json.loads(text)
            elif path.suffix == ".toml":
                import tomllib

                values = tomllib.loads(text.decode("utf-8"))
            else:
                raise ValueError(f"config file {str(path)!r} must end in .toml or .json")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {e}") from None
        except Exception as e:
            if type(e).__name__ == "TOMLDecodeError":
                raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from None
            raise
        if not isinstance(values, dict):
            raise ValueError(f"config file {str(path)!r} must hold a table of settings, got {type(values).__name__}")
        return cls.from_dict(_merge(values, changes))

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values (what :meth:`from_dict` reads back)."""
        out = dataclasses.asdict(self)
        out["model_overrides"] = dict(self.model_overrides)
        out["data"]["paths"], out["data"]["suffixes"] = list(self.data.paths), list(self.data.suffixes)
        return out

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------------------
    # Derived settings
    # ------------------------------------------------------------------------------------------------------

    @property
    def is_preset(self) -> bool:
        """Whether ``model`` names a preset (else it is a Hugging Face directory)."""
        return self.model in PRESETS

    @property
    def optimizer_config(self) -> OptimizerConfig:
        """``optimizer``, or the defaults with ``total_steps=steps`` and ``warmup_steps=min(1000, steps // 10)``."""
        if self.optimizer is not None:
            return self.optimizer
        return OptimizerConfig(**self._optimizer_defaults({}, self.steps))

    def model_config(self, *, data_vocab_size: int | None = None) -> xLSTMLMConfig:
        """The architecture of the trained model (reads the directory's ``config.json``, never its weights).

        A preset without ``vocab_size`` takes the data's vocabulary; byte-level data gets BOS 256, EOS 257
        and padding 0. Parameters are float32 unless overridden.

        Args:
            data_vocab_size: The data's vocabulary size where already known (None: asked of ``data``).

        Raises:
            ValueError, TypeError: a bad preset, directory or override (see :meth:`validate`).
        """
        overrides = dict(self.model_overrides)
        if self.is_preset:
            fields = {"param_dtype": "float32", **PRESETS[self.model]}
            if self.data.kind != "tokens" and self.data.tokenizer == BYTES:
                fields.update(bos_token_id=256, eos_token_id=257, pad_token_id=0)
            if "vocab_size" not in fields and "vocab_size" not in overrides:
                vocab = self.data.vocab_size() if data_vocab_size is None else data_vocab_size
                if vocab is None:
                    raise ValueError(
                        f"model_overrides.vocab_size is needed: preset {self.model!r} takes its vocabulary from the "
                        "data, and a token file does not give one"
                    )
                fields["vocab_size"] = vocab
            return xLSTMLMConfig(**{**fields, **overrides})
        directory = Path(self.model)
        hf_config = json.loads((directory / CONFIG_NAME).read_text())
        return config_from_hf(hf_config, **{"param_dtype": "float32", **overrides})

    def mesh_shape(self, num_devices: int | None = None) -> tuple[int, int, int]:
        """``(data, fsdp, tensor)`` on ``num_devices`` devices (None: ``jax.device_count()``)."""
        if num_devices is None:
            import jax

            num_devices = jax.device_count()
        return self.mesh.shape(num_devices)

    # ------------------------------------------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------------------------------------------

    def validate(self, num_devices: int | None = None) -> None:
        """Checks every setting before anything is built: numbers in range, the model (preset or directory,
        overrides), the data's files and tokenizer, the vocabulary, the mesh against the device count, the
        batch against the mesh and ``accum_steps``, the heads against ``tensor``, and the checkpoint folder
        against ``resume``. Builds no model and compiles nothing; reads no weights and no document.

        Args:
            num_devices: The device count the mesh must fit (None: ``jax.device_count()``).

        Raises:
            ValueError: every problem found, one per line, each naming its setting.
        """
        data_problems = self.data.problems()
        problems = self._number_problems() + data_problems
        data_vocab = None
        if not data_problems:
            try:
                data_vocab = self.data.vocab_size()
            except (TypeError, ValueError, OSError) as e:
                problems.append(f"data.tokenizer: {e}")
                data_problems.append(str(e))
        model = None
        model_problems = self._model_problems()
        problems += model_problems
        if not model_problems and self.is_preset and not data_problems:
            # A preset's own or overridden vocabulary that the data does not fit: said before the model's
            # special ids (which the data's tokenizer sets) fail for the same reason.
            given = dict(self.model_overrides).get("vocab_size", PRESETS[self.model].get("vocab_size"))
            if _is_int(given) and data_vocab is not None and data_vocab > given:
                model_problems = self._data_vocab_problems(given, data_vocab)
                problems += model_problems
        if not model_problems:
            try:
                # With broken data the vocabulary is unknown: a stand-in lets the other model settings be checked.
                model = self.model_config(data_vocab_size=256 if data_problems else data_vocab)
            except (TypeError, ValueError, OSError) as e:
                problems.append(f"model: {e}")
        try:
            shape = self.mesh_shape(num_devices)
        except ValueError as e:
            problems.append(f"mesh: {e}")
            shape = None
        if shape is not None:
            problems += self._split_problems(shape, model)
        if model is not None and not data_problems:
            problems += self._data_vocab_problems(model.vocab_size, data_vocab)
        problems += self._folder_problems()
        if problems:
            raise ValueError("bad training settings:\n  " + "\n  ".join(problems))

    def _number_problems(self) -> list[str]:
        out = []
        for name, minimum in (
            ("steps", 1),
            ("accum_steps", 1),
            ("checkpoint_every", 1),
            ("checkpoint_keep", 1),
            ("eval_every", 0),
            ("eval_batches", 1),
            ("log_every", 1),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                out.append(f"{name} must be an integer >= {minimum}, got {value!r}")
        if _is_int(self.seed) and self.seed >= 2**32:
            out.append(f"seed must be < 2**32, got {self.seed}")
        if self.remat not in [r.value for r in Remat]:
            out.append(f"remat must be one of {[r.value for r in Remat]}, got {self.remat!r}")
        if self.mlstm_backward not in BACKWARDS:
            out.append(f"mlstm_backward must be one of {list(BACKWARDS)}, got {self.mlstm_backward!r}")
        for name in ("scan_blocks", "resume"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        peak = self.peak_flops
        if peak is not None and (
            not isinstance(peak, numbers.Real) or isinstance(peak, bool) or not (math.isfinite(peak) and peak > 0)
        ):
            out.append(f"peak_flops must be a positive number of FLOP/s or None, got {peak!r}")
        if _is_int(self.eval_every) and self.eval_every > 0 and self.data.validation_fraction == 0:
            out.append(f"eval_every={self.eval_every} needs data.validation_fraction > 0 (a held-out split)")
        return out

    def _model_problems(self) -> list[str]:
        if not isinstance(self.model, str) or not self.model:
            return [f"model must be a preset name or a Hugging Face directory, got {self.model!r}"]
        fields = {f.name for f in dataclasses.fields(xLSTMLMConfig)}
        unknown = sorted(k for k, _ in self.model_overrides if k not in fields)
        if unknown:
            return [f"model_overrides {unknown} are not fields of xLSTMLMConfig: {sorted(fields)}"]
        if self.is_preset:
            return []
        directory = Path(self.model)
        if not directory.is_dir():
            return [f"model={self.model!r} is neither a preset ({', '.join(PRESETS)}) nor a Hugging Face directory"]
        out = []
        if not (directory / CONFIG_NAME).is_file():
            out.append(f"model: the Hugging Face directory {self.model!r} has no {CONFIG_NAME}")
        if not any((directory / name).is_file() for name in (WEIGHTS_NAME, INDEX_NAME)):
            out.append(f"model: the Hugging Face directory {self.model!r} has no {WEIGHTS_NAME} (or its index)")
        fixed = sorted(k for k, _ in self.model_overrides if k not in _HF_OVERRIDABLE)
        if fixed:
            out.append(
                f"model_overrides {fixed} would change the shapes of the weights in {self.model!r}; a Hugging Face "
                f"directory takes overrides of {list(_HF_OVERRIDABLE)} only"
            )
        if not out:
            try:
                json.loads((directory / CONFIG_NAME).read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                out.append(f"model: {directory / CONFIG_NAME} is not readable JSON: {e}")
        return out

    def _split_problems(self, shape: tuple[int, int, int], model: xLSTMLMConfig | None) -> list[str]:
        data, fsdp, tensor = shape
        out = []
        batch = self.data.batch_size
        if _is_int(batch) and batch >= 1:
            if _is_int(self.accum_steps) and self.accum_steps >= 1 and batch % self.accum_steps:
                out.append(f"data.batch_size={batch} must be divisible by accum_steps={self.accum_steps}")
            elif _is_int(self.accum_steps) and self.accum_steps >= 1 and (batch // self.accum_steps) % (data * fsdp):
                micro = batch // self.accum_steps
                out.append(
                    f"data.batch_size={batch} / accum_steps={self.accum_steps} = {micro} rows per micro-batch must "
                    f"be divisible by the mesh's data*fsdp = {data}*{fsdp} = {data * fsdp} devices"
                )
        if model is not None:
            for name, size in (("num_heads", model.num_heads), ("FFN width", model.ffn_dim)):
                if size % tensor:
                    out.append(f"the model's {name}={size} must be divisible by the mesh's tensor={tensor}")
        return out

    def _data_vocab_problems(self, model_vocab: int, vocab: int | None) -> list[str]:
        if vocab is not None and vocab > model_vocab:
            return [
                f"the data's vocabulary ({vocab} ids) exceeds the model's vocab_size={model_vocab}: set "
                "model_overrides.vocab_size or use another tokenizer"
            ]
        if self.data.eos_id is not None and _is_int(self.data.eos_id) and self.data.eos_id >= model_vocab:
            return [f"data.eos_id={self.data.eos_id} must be < the model's vocab_size={model_vocab}"]
        return []

    def _folder_problems(self) -> list[str]:
        out = []
        for name in ("checkpoint_dir", "log_dir", "export_hf"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                out.append(f"{name} must be a folder path or None, got {value!r}")
            elif value is not None and Path(value).exists() and not Path(value).is_dir():
                out.append(f"{name}={value!r} exists and is not a folder")
        if out:
            return out
        if self.resume and self.checkpoint_dir is None:
            out.append("resume needs checkpoint_dir: the folder of the checkpoints to continue from")
        elif self.checkpoint_dir is not None:
            steps = _checkpoint_steps(Path(self.checkpoint_dir))
            if self.resume and not steps:
                out.append(f"resume: checkpoint_dir={self.checkpoint_dir!r} holds no checkpoint to continue from")
            if not self.resume and steps:
                out.append(
                    f"checkpoint_dir={self.checkpoint_dir!r} holds checkpoints of an earlier run (steps {steps}): "
                    "continue it with resume, or choose an empty folder"
                )
        if self.export_hf is not None and self.model == self.export_hf:
            out.append(f"export_hf={self.export_hf!r} is the directory the run starts from; choose another")
        return out


def _checkpoint_steps(directory: Path) -> list[int]:
    """The steps of the checkpoints in ``directory`` (folders named by an integer), sorted."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _merge(values: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with ``changes`` applied: a field replaced, a section (a dict in both) merged key by key."""
    out = dict(values)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out
