"""Train an xLSTM language model (or fine-tune one from a Hugging Face directory).

``xlstm-jax train [--config FILE] [flags]``: the settings come from a TOML or JSON file (see
:mod:`xlstm_jax.training.config` for its layout), and each flag given replaces the file's value (a flag of
a section, such as ``--lr``, replaces that one field of it). Without ``--config`` the flags and the defaults
of :class:`~xlstm_jax.training.config.TrainConfig` describe the run.

Every setting is checked before the model is built or anything compiles (the files it names, the model's
overrides, the batch against the mesh and ``--accum-steps``, the heads against the mesh's tensor axis, the
checkpoint folder against ``--resume``); all problems are reported at once, then the command exits with
status 2. A progress bar shows the loss, tokens/s and MFU (and the peak rate MFU is taken against); metrics
go to ``LOG_DIR/metrics.jsonl`` and TensorBoard. After Ctrl-C the newest step is saved, and ``--resume``
continues from it.

Examples:
    $ xlstm-jax train --preset byte-small --data-kind stdlib --steps 2000 --checkpoint-dir runs/ckpt
    $ xlstm-jax train --config run.toml --resume
    $ xlstm-jax train --init-from path/to/xLSTM-7b --data corpus/ --tokenizer path/to/xLSTM-7b/tokenizer.json \\
          --mesh 1,-1,1 --lr 1e-5 --steps 500 --export-hf runs/finetuned
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from xlstm_jax.cli import CommandError, mesh_shape, non_negative_int, positive_float, positive_int, prng_seed

__all__ = ["HELP", "add_arguments", "config_from_arguments", "run"]

HELP = "train an xLSTM language model (or fine-tune one from a Hugging Face directory)"


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _override(text: str) -> tuple[str, Any]:
    """``NAME=VALUE``: VALUE read as JSON (numbers, true, false, null) or else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"must be NAME=VALUE with NAME a field of xLSTMLMConfig, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The config file and a flag per setting (each replaces the file's value where given)."""
    from xlstm_jax.models.xlstm_parallel.runtime import Remat
    from xlstm_jax.training.config import DATA_KINDS, PRESETS
    from xlstm_jax.training.optim import SCHEDULES

    p = parser
    p.add_argument("--config", metavar="FILE", help="a TOML or JSON file of settings (the flags replace its values)")

    model = p.add_argument_group("model")
    which = model.add_mutually_exclusive_group()
    which.add_argument("--preset", choices=list(PRESETS), help="train a new model of this size (default tiny)")
    which.add_argument("--init-from", metavar="HF_DIR", help="fine-tune the model in this Hugging Face directory")
    model.add_argument(
        "--model-override",
        metavar="NAME=VALUE",
        type=_override,
        action="append",
        help="set a field of the model config (xLSTMLMConfig), e.g. embedding_dim=256 or dtype=bfloat16; repeatable",
    )
    model.add_argument("--remat", choices=[r.value for r in Remat], help="rematerialisation of each block")
    model.add_argument(
        "--scan-blocks", action=argparse.BooleanOptionalAction, default=None, help="blocks under nn.scan"
    )
    model.add_argument(
        "--mlstm-backward",
        choices=["xla", "mosaic"],
        help="the mLSTM backward where its Mosaic GPU kernel runs (Hopper): the Mosaic kernels (default) or XLA",
    )

    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="PATH", nargs="+", help="text files, folders or glob patterns; or a token file")
    data.add_argument("--data-kind", choices=DATA_KINDS, help="text files, a token-id file, or the Python stdlib")
    data.add_argument("--tokenizer", metavar="bytes|FILE", help="'bytes' (default) or a tokenizer.json")
    data.add_argument("--suffix", metavar="SUFFIX", action="append", help="only files ending so (repeatable)")
    data.add_argument("--eos-id", type=non_negative_int, help="token files: the id that ends each document")
    data.add_argument("--token-dtype", help="token files: the element type of a raw binary file, e.g. uint16")
    data.add_argument("--seq-len", type=positive_int, help="tokens per row (default 256)")
    data.add_argument("--batch-size", type=positive_int, help="rows per step over all devices (default 16)")
    data.add_argument("--validation-fraction", type=_float, help="share of documents held out (default 0.05)")

    run = p.add_argument_group("run")
    run.add_argument("--steps", type=positive_int, help="the step the run ends at (default 1000)")
    run.add_argument("--accum-steps", type=positive_int, help="micro-batches per step (default 1)")
    run.add_argument("--mesh", type=mesh_shape, metavar="DATA,FSDP,TENSOR", help="device mesh (default 1,-1,1)")
    run.add_argument("--seed", type=prng_seed, help="seed of the initialisation and the data order (default 0)")

    opt = p.add_argument_group("optimizer")
    opt.add_argument("--lr", type=positive_float, help="peak learning rate (default 3e-4)")
    opt.add_argument("--warmup", type=non_negative_int, help="warmup steps (default min(1000, steps // 10))")
    opt.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule after the warmup (default cosine)")
    opt.add_argument("--min-lr-ratio", type=_float, help="final learning rate / peak (default 0.1)")
    opt.add_argument("--weight-decay", type=_float, help="AdamW weight decay of the matrices (default 0.1)")
    opt.add_argument("--clip-norm", type=positive_float, help="global gradient-norm clip (default 1.0)")

    out = p.add_argument_group("checkpoints and logs")
    out.add_argument("--checkpoint-dir", metavar="DIR", help="where checkpoints go (default: none)")
    out.add_argument("--checkpoint-every", type=positive_int, help="steps between checkpoints (default 500)")
    out.add_argument("--checkpoint-keep", type=positive_int, help="newest checkpoints kept (default 3)")
    out.add_argument("--resume", action="store_true", default=None, help="continue from the newest checkpoint")
    out.add_argument("--eval-every", type=non_negative_int, help="steps between validation losses (0: never)")
    out.add_argument("--eval-batches", type=positive_int, help="validation batches per loss (default 8)")
    out.add_argument("--log-dir", metavar="DIR", help="metrics.jsonl and TensorBoard events (default: none)")
    out.add_argument("--log-every", type=positive_int, help="steps between metric records (default 10)")
    out.add_argument("--export-hf", metavar="DIR", help="write the trained model here as Hugging Face safetensors")
    out.add_argument("--peak-tflops", type=positive_float, help="peak TFLOP/s of one device for MFU")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


# Flag -> (section or None, field).
_FIELDS = {
    "remat": (None, "remat"),
    "scan_blocks": (None, "scan_blocks"),
    "mlstm_backward": (None, "mlstm_backward"),
    "data": ("data", "paths"),
    "data_kind": ("data", "kind"),
    "tokenizer": ("data", "tokenizer"),
    "suffix": ("data", "suffixes"),
    "eos_id": ("data", "eos_id"),
    "token_dtype": ("data", "token_dtype"),
    "seq_len": ("data", "seq_len"),
    "batch_size": ("data", "batch_size"),
    "validation_fraction": ("data", "validation_fraction"),
    "steps": (None, "steps"),
    "accum_steps": (None, "accum_steps"),
    "seed": (None, "seed"),
    "lr": ("optimizer", "learning_rate"),
    "warmup": ("optimizer", "warmup_steps"),
    "schedule": ("optimizer", "schedule"),
    "min_lr_ratio": ("optimizer", "min_lr_ratio"),
    "weight_decay": ("optimizer", "weight_decay"),
    "clip_norm": ("optimizer", "clip_norm"),
    "checkpoint_dir": (None, "checkpoint_dir"),
    "checkpoint_every": (None, "checkpoint_every"),
    "checkpoint_keep": (None, "checkpoint_keep"),
    "resume": (None, "resume"),
    "eval_every": (None, "eval_every"),
    "eval_batches": (None, "eval_batches"),
    "log_dir": (None, "log_dir"),
    "log_every": (None, "log_every"),
    "export_hf": (None, "export_hf"),
}


def config_from_arguments(args: argparse.Namespace) -> Any:
    """The ``TrainConfig`` of the file (if any) with the flags given applied, checked (``validate``).

    Raises:
        CommandError: the file or a setting is bad (every problem listed).
    """
    from xlstm_jax.training.config import TrainConfig

    changes: dict[str, Any] = {}
    for flag, (section, field) in _FIELDS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if section is None:
            changes[field] = value
        else:
            changes.setdefault(section, {})[field] = value
    if args.mesh is not None:
        changes["mesh"] = args.mesh
    if args.preset is not None or args.init_from is not None:
        changes["model"] = args.preset if args.preset is not None else args.init_from
    if args.model_override:
        changes["model_overrides"] = dict(args.model_override)
    if args.peak_tflops is not None:
        changes["peak_flops"] = args.peak_tflops * 1e12
    try:
        if args.config is not None:
            config = TrainConfig.from_file(args.config, **changes)
        else:
            config = TrainConfig.from_dict(changes)
        config.validate()
    except (TypeError, ValueError) as e:
        raise CommandError(str(e)) from None
    return config


def _summary(result: Any, config: Any) -> str:
    lines = [f"trained to step {result.step} (from step {result.start_step})"]
    if result.train_records:
        last = result.train_records[-1]
        lines.append(f"last training loss {last['loss']:.4f} (mean of the last {config.log_every} steps or fewer)")
    if result.validation_records:
        lines.append(f"validation loss {result.validation_records[-1]['loss']:.4f}")
    if config.checkpoint_dir is not None:
        lines.append(f"checkpoints in {config.checkpoint_dir}")
    if config.log_dir is not None:
        lines.append(f"metrics in {config.log_dir} (metrics.jsonl, TensorBoard)")
    if config.export_hf is not None:
        lines.append(f"Hugging Face model in {config.export_hf}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Checks every setting, then trains; returns 0."""
    from xlstm_jax.training.loop import train

    config = config_from_arguments(args)
    try:
        result = train(config, progress=not args.no_progress)
    except ValueError as e:  # data found bad while it is read (e.g. a token id beyond the vocabulary)
        raise CommandError(str(e)) from None
    sys.stdout.write(_summary(result, config))
    return 0
