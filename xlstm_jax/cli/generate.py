"""Stream text from an xLSTM language model in a Hugging Face directory.

``xlstm-jax generate MODEL_DIR --prompt "..." [--max-new-tokens N]``: MODEL_DIR is a Hugging Face xLSTM
directory (``config.json``, safetensors weights, ``tokenizer.json``). The generated text goes to stdout as it
is produced; the timings go to stderr: time to first token (prefill and the first draw, compilation
included unless ``--warmup``) and decode tokens per second (the tokens after the first, over the time since
the first).

Every argument is checked before the model is loaded, and the tokenizer and the prompt before the weights
are read. How the model runs (``--prefill-backend``, ``--step-backend``, ``--scan-blocks``, ...) defaults
to ``RuntimeConfig()``, the library's default; a flag given changes that field only.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from xlstm_jax.cli import CommandError, prng_seed
from xlstm_jax.generation import MAX_NEW_TOKENS, SamplingConfig, _check_max_new_tokens
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import BACKENDS
from xlstm_jax.models.xlstm_parallel.runtime import STEP_BACKENDS, DecodeFusion, KernelMode, RuntimeConfig

__all__ = ["DTYPES", "HELP", "add_arguments", "run"]

HELP = "generate text with an xLSTM language model from a Hugging Face directory"

# Activation and parameter dtypes the model runs in; float64 needs jax_enable_x64 (JAX_ENABLE_X64=1).
DTYPES = ("float32", "bfloat16", "float16", "float64")

TOKENIZER_NAME = "tokenizer.json"


def _max_new_tokens(text: str) -> int:
    """An argparse ``type``: the generation library's check of ``max_new_tokens``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int, got {text!r}") from None
    try:
        return _check_max_new_tokens(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model directory, the prompt, sampling, and how the model runs."""
    default = RuntimeConfig()
    p = parser
    p.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="Hugging Face xLSTM directory")
    p.add_argument("--prompt", required=True, help="the text to continue (not empty)")
    p.add_argument(
        "--max-new-tokens",
        type=_max_new_tokens,
        default=64,
        help=f"tokens to generate at most, 1 to {MAX_NEW_TOKENS} (default 64)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: all)")
    p.add_argument("--seed", type=prng_seed, default=0, help="PRNG seed for sampling (default 0)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="activation and parameter dtype (default: the checkpoint's; float64 needs JAX_ENABLE_X64=1)",
    )
    p.add_argument(
        "--prefill-backend",
        default=None,
        help=f"mLSTM form for the prompt: {', '.join(sorted(BACKENDS))} (default {default.prefill_backend})",
    )
    p.add_argument(
        "--step-backend",
        default=None,
        help=f"mLSTM decode step: {', '.join(STEP_BACKENDS)} (default {default.step_backend}: the Pallas kernel on a "
        "GPU where it covers the head shape, the XLA step elsewhere)",
    )
    p.add_argument(
        "--scan-blocks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"run the blocks under nn.scan: faster compile, slower decode, see BENCHMARKS.md "
        f"(default {default.scan_blocks})",
    )
    p.add_argument(
        "--decode-fusion",
        choices=[m.value for m in DecodeFusion],
        default=None,
        help=f"fused residual-norm kernels in the decode step (default {default.decode_fusion.value})",
    )
    p.add_argument(
        "--kernel-mode",
        choices=[m.value for m in KernelMode],
        default=None,
        help=f"where the Pallas kernels run (default {default.kernel_mode.value})",
    )
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--warmup", action="store_true", help="compile with one untimed run first")


class _TextStream:
    """Turns a growing list of token ids into newly completed text, for printing as it comes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        # Hold back while the text ends in an incomplete multi-byte character or rewrites its past.
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        new, self.text = text[len(self.text) :], text
        return new


def _runtime(args: argparse.Namespace) -> RuntimeConfig:
    """``RuntimeConfig()`` with the fields given on the command line (RuntimeConfig checks them)."""
    given = {
        "prefill_backend": args.prefill_backend,
        "step_backend": args.step_backend,
        "scan_blocks": args.scan_blocks,
        "decode_fusion": args.decode_fusion,
        "kernel_mode": args.kernel_mode,
    }
    try:
        return RuntimeConfig(**{k: v for k, v in given.items() if v is not None})
    except (TypeError, ValueError) as e:
        raise CommandError(str(e)) from None


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    try:
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except (TypeError, ValueError) as e:
        message = str(e)
        for name in ("temperature", "top_k", "top_p"):  # the field's name as the flag's
            if message.startswith(name):
                message = "--" + name.replace("_", "-") + message[len(name) :]
        raise CommandError(message) from None
    if sampling.greedy and (sampling.top_k or sampling.top_p < 1):
        raise CommandError("--top-k and --top-p filter sampled tokens: they need --temperature > 0")
    return sampling


def _check_dtype(dtype: str | None) -> None:
    import jax

    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise CommandError("--dtype float64 needs 64-bit JAX: set JAX_ENABLE_X64=1")


def _tokenizer(model_dir: Path) -> Any:
    """The directory's tokenizer, read (and checked) before the weights."""
    from tokenizers import Tokenizer

    if not model_dir.is_dir():
        raise CommandError(f"MODEL_DIR {model_dir} is not a directory")
    path = model_dir / TOKENIZER_NAME
    if not path.is_file():
        raise CommandError(f"{path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for any unreadable file
        raise CommandError(f"{path} is not a readable tokenizer: {e}") from None


def _first_step(tokens: Iterator[np.ndarray]) -> np.ndarray:
    """The first step's tokens. The prompt runs and the programs compile here, so settings that the model
    cannot run with (a kernel mode without its GPU, a dtype that the kernels do not take) are found here."""
    try:
        return next(tokens)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CommandError(f"the model cannot run with these settings: {e}") from None


def run(args: argparse.Namespace) -> int:
    """Checks the arguments, loads the tokenizer and the model, then streams the text; returns 0."""
    import jax

    from xlstm_jax.generation import stream
    from xlstm_jax.models.xlstm_parallel.hf import load_hf

    runtime = _runtime(args)
    sampling = _sampling(args)
    _check_dtype(args.dtype)
    if not args.prompt:
        raise CommandError("--prompt is empty")
    tokenizer = _tokenizer(args.model_dir)
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        raise CommandError(f"--prompt {args.prompt!r} encodes to no tokens")

    overrides = {} if args.dtype is None else {"dtype": args.dtype, "param_dtype": args.dtype}
    try:
        config, params = load_hf(args.model_dir, scan_blocks=runtime.scan_blocks, **overrides)
    except (OSError, TypeError, ValueError) as e:  # a missing or corrupted file: the loader's message names it
        raise CommandError(str(e)) from None
    kwargs = {
        "sampling": sampling,
        "key": jax.random.key(args.seed),
        "stop_tokens": () if args.no_stop else None,
        "runtime": runtime,
    }
    try:
        runtime.step_form(config.qk_head_dim, config.v_head_dim)
        runtime.fuse_decode(config.norm_reduction_force_float32)
        tokens = stream(config, params, [prompt_ids], args.max_new_tokens, **kwargs)  # checks the prompt's ids
    except (TypeError, ValueError) as e:
        raise CommandError(str(e)) from None

    start = time.perf_counter()
    first_tokens = _first_step(tokens)
    if args.warmup:
        for _ in tokens:
            pass
        tokens = stream(config, params, [prompt_ids], args.max_new_tokens, **kwargs)
        start = time.perf_counter()
        first_tokens = next(tokens)
    first = time.perf_counter()
    text = _TextStream(tokenizer)
    count = 0
    for step in itertools.chain([first_tokens], tokens):
        count += 1
        sys.stdout.write(text.push(int(step[0])))
        sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write("\n")
    rate = (count - 1) / (end - first) if count > 1 and end > first else float("nan")
    sys.stderr.write(
        f"prompt: {len(prompt_ids)} tokens; generated: {count} tokens\n"
        f"time to first token: {(first - start) * 1e3:.1f} ms{'' if args.warmup else ' (includes compilation)'}\n"
        f"decode: {rate:.1f} tokens/s\n"
    )
    return 0
