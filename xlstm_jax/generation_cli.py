"""``xlstm-jax generate MODEL_DIR --prompt "..." --max-new-tokens N``: stream text from an xLSTM model.

MODEL_DIR is a Hugging Face xLSTM directory (``config.json``, safetensors weights, ``tokenizer.json``).
The generated text goes to stdout as it is produced; the timings go to stderr: time to first token
(prefill and the first draw, compilation included unless ``--warmup``) and decode tokens per second
(the tokens after the first, over the time since the first).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xlstm-jax generate", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="Hugging Face xLSTM directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    p.add_argument("--dtype", default=None, help="activation and parameter dtype (default: the checkpoint's)")
    p.add_argument("--prefill-backend", default=None, help="mLSTM form for the prompt (registry name)")
    p.add_argument(
        "--step-backend",
        default=None,
        help="mLSTM decode step: auto (default: the Pallas kernel on a GPU where it covers the head shape, the XLA "
        "step elsewhere), recurrent or recurrent_pallas",
    )
    p.add_argument(
        "--scan-blocks",
        action="store_true",
        help="run the blocks under nn.scan (faster compile; decode is about 2x slower on an H200, see BENCHMARKS.md)",
    )
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--warmup", action="store_true", help="compile with one untimed run first")
    return p


class _TextStream:
    """Turns a growing list of token ids into newly completed text, for printing as it comes."""

    def __init__(self, tokenizer) -> None:
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


def main(argv: Sequence[str]) -> int:
    """Runs the command; ``argv`` are the arguments after ``generate``. Returns the exit status."""
    args = _parser().parse_args(list(argv))
    try:
        from tokenizers import Tokenizer
    except ImportError:
        sys.stderr.write("xlstm-jax generate needs the 'tokenizers' package\n")
        return 2
    import jax

    from xlstm_jax.generation import SamplingConfig, stream
    from xlstm_jax.models.xlstm_parallel.hf import load_hf
    from xlstm_jax.models.xlstm_parallel.runtime import RuntimeConfig

    tokenizer_file = args.model_dir / "tokenizer.json"
    if not tokenizer_file.exists():
        sys.stderr.write(f"{tokenizer_file} does not exist\n")
        return 2
    overrides = {}
    if args.dtype is not None:
        overrides.update(dtype=args.dtype, param_dtype=args.dtype)
    runtime_fields = {"scan_blocks": args.scan_blocks}
    if args.prefill_backend is not None:
        runtime_fields["prefill_backend"] = args.prefill_backend
    if args.step_backend is not None:
        runtime_fields["step_backend"] = args.step_backend
    try:
        runtime = RuntimeConfig(**runtime_fields)
        config, params = load_hf(args.model_dir, scan_blocks=runtime.scan_blocks, **overrides)
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except (FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        sys.stderr.write("error: the prompt encodes to no tokens\n")
        return 2
    kwargs = {
        "sampling": sampling,
        "key": jax.random.key(args.seed),
        "stop_tokens": () if args.no_stop else None,
        "runtime": runtime,
    }
    if args.warmup:
        for _ in stream(config, params, [prompt_ids], args.max_new_tokens, **kwargs):
            pass

    text = _TextStream(tokenizer)
    start = time.perf_counter()
    first = None
    count = 0
    for tokens in stream(config, params, [prompt_ids], args.max_new_tokens, **kwargs):
        if first is None:
            first = time.perf_counter()
        count += 1
        sys.stdout.write(text.push(int(tokens[0])))
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
