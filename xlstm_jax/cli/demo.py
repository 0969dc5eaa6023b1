"""Train a small byte-level xLSTM on the Python standard library, reload it, sample from it, check the backends.

``xlstm-jax demo`` (also ``xlstm-jax`` and ``python -m xlstm_jax`` without a subcommand, and ``make run``) is
the library end to end on a CPU in a few minutes, with no download:

1. **Corpus**: the ``.py`` files of this Python's standard library (tests left out), read as UTF-8 bytes;
   5% of the files are held out for validation. The entropy of their byte frequencies is printed: the loss
   per byte of a model that knows nothing but how often each byte occurs.
2. **Training** (:func:`xlstm_jax.training.loop.train`): the ``tiny`` preset (D=128, 2 blocks, 2 heads, 258
   byte ids) on rows of 128 bytes, 16 rows a step, AdamW with warmup and cosine decay. The training loss and
   the validation loss are printed as they fall beside that entropy; the job fails unless the final
   validation loss ends below it.
3. **Checkpoint**: the final state is saved with Orbax, reloaded, and compared array by array with the
   trained state (they must be equal); the model is exported as Hugging Face safetensors and loaded back
   with ``load_hf`` (equal parameters too).
4. **Sample**: bytes generated from the reloaded model after a prompt, decoded and printed.
5. **Backends**: every mLSTM backend checked against the recurrent form, as ``xlstm-jax verify`` does
   (``--verify quick``: a small workload; ``off``: skipped).

The exit status is 0 when every check passes, 1 when one fails.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from xlstm_jax.cli import CommandError, positive_int, prng_seed

__all__ = ["HELP", "add_arguments", "run"]

HELP = "train a byte-level xLSTM on the Python stdlib, reload it, sample from it, check the backends (default)"

PROMPT = "import os\n\n\ndef "
SEQ_LEN = 128
BATCH_SIZE = 16
LEARNING_RATE = 3e-3
# The verify workloads: its own defaults, or a small one.
VERIFY_QUICK = ["--B", "1", "--NH", "2", "--S", "16", "--DHQK", "32", "--DHV", "16", "--repeats", "1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Steps, where the files go, the verification workload, the seed."""
    p = parser
    p.add_argument("--steps", type=positive_int, default=300, help="training steps (default 300)")
    p.add_argument(
        "--workdir",
        metavar="DIR",
        type=Path,
        default=None,
        help="keep the checkpoints, logs and exported model here (default: a temporary folder, removed at the end)",
    )
    p.add_argument(
        "--verify",
        choices=("full", "quick", "off"),
        default="full",
        help="check the backends on verify's default workload (full, default), a small one (quick), or not (off)",
    )
    p.add_argument("--sample-bytes", type=positive_int, default=200, help="bytes to generate (default 200)")
    p.add_argument("--seed", type=prng_seed, default=0, help="seed of the initialisation, data order and sampling")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _say(text: str = "") -> None:
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def _equal_trees(a: Any, b: Any) -> tuple[bool, int]:
    """Whether two trees have the same structure and bit-identical leaves; and their number of leaves."""
    import jax
    import numpy as np

    leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False, len(leaves_a)
    same = all(
        x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
        for x, y in zip(map(np.asarray, leaves_a), map(np.asarray, leaves_b), strict=True)
    )
    return same, len(leaves_a)


def _train(args: argparse.Namespace, workdir: Path, entropy: float) -> Any:
    """Trains the demo model, printing each metric record beside the unigram entropy; the TrainResult."""
    from xlstm_jax.training.config import DataConfig, TrainConfig
    from xlstm_jax.training.loop import train
    from xlstm_jax.training.optim import OptimizerConfig

    steps = args.steps
    config = TrainConfig(
        model="tiny",
        data=DataConfig(kind="stdlib", seq_len=SEQ_LEN, batch_size=BATCH_SIZE, validation_fraction=0.05),
        optimizer=OptimizerConfig(
            learning_rate=LEARNING_RATE, total_steps=steps, warmup_steps=min(20, steps // 10), schedule="cosine"
        ),
        steps=steps,
        log_every=max(1, min(25, steps // 10)),
        eval_every=max(1, min(100, steps // 2)),
        eval_batches=8,
        checkpoint_dir=str(workdir / "checkpoints"),
        checkpoint_every=steps,
        log_dir=str(workdir / "logs"),
        export_hf=str(workdir / "hf"),
        seed=args.seed,
    )
    try:
        config.validate()
    except ValueError as e:
        raise CommandError(str(e)) from None
    model = config.model_config()
    _say(
        f"model: preset 'tiny', D={model.embedding_dim}, {model.num_blocks} blocks, {model.num_heads} heads, "
        f"{model.vocab_size} byte ids, {model.num_params() / 1e6:.2f} M parameters; rows of S={SEQ_LEN} bytes, "
        f"B={BATCH_SIZE} rows a step, {steps} steps, AdamW at {LEARNING_RATE:g} (warmup, cosine decay)"
    )
    _say(f"{'step':>6s}  {'train loss':>10s}  {'validation loss':>15s}   nats/byte; unigram entropy {entropy:.3f}")

    def show(record: dict[str, Any]) -> None:
        if record["kind"] == "train":
            _say(f"{record['step']:6d}  {record['loss']:10.3f}")
        else:
            _say(f"{record['step']:6d}  {'-':>10s}  {record['loss']:15.3f}")

    return config, train(config, progress=not args.no_progress, on_record=show)


def _reload(config: Any, result: Any) -> tuple[bool, Any]:
    """Reloads the newest checkpoint and the Hugging Face export; prints whether each equals the trained state.
    Returns whether both do and the reloaded parameters."""
    from xlstm_jax.models.xlstm_parallel.hf import load_hf
    from xlstm_jax.training.checkpoint import TrainCheckpointer

    with TrainCheckpointer(config.checkpoint_dir, save_every=config.checkpoint_every, max_to_keep=1) as ckpt:
        restored = ckpt.restore_latest(result.state)
    if restored is None:
        _say(f"checkpoint: none found in {config.checkpoint_dir}")
        return False, None
    state, _ = restored
    same_state, count = _equal_trees(state, result.state)
    _say(
        f"checkpoint: step {int(state.step)} saved in {config.checkpoint_dir} and reloaded: {count} arrays "
        f"(parameters, optimiser state, step, key) {'equal to' if same_state else 'DIFFERENT from'} the trained state"
    )
    hf_config, hf_params = load_hf(config.export_hf)
    same_hf, count = _equal_trees(hf_params, result.state.params)
    same_hf = same_hf and hf_config == result.model_config
    _say(
        f"Hugging Face export: {config.export_hf} loaded back with load_hf: {count} parameter arrays and the config "
        f"{'equal to' if same_hf else 'DIFFERENT from'} the trained model"
    )
    return same_state and same_hf, state.params


def _sample(model_config: Any, params: Any, num_bytes: int, seed: int) -> None:
    import jax
    import numpy as np

    from xlstm_jax.generation import SamplingConfig, generate
    from xlstm_jax.training.data import ByteTokenizer

    tokenizer = ByteTokenizer()
    prompt = tokenizer.encode(PROMPT, add_bos=True)
    sampling = SamplingConfig(temperature=0.8)
    out = generate(model_config, params, [prompt.tolist()], num_bytes, sampling=sampling, key=jax.random.key(seed))
    count = int(np.asarray(out.num_generated)[0])
    text = tokenizer.decode(np.asarray(out.tokens)[0, :count])
    _say(f"sample from the reloaded model (temperature 0.8, seed {seed}, {count} bytes after the prompt):")
    _say("-" * 72)
    _say(PROMPT + text)
    _say("-" * 72)


def _verify(mode: str) -> bool:
    from xlstm_jax.cli import verify

    parser = argparse.ArgumentParser()
    verify.add_arguments(parser)
    a = parser.parse_args(VERIFY_QUICK if mode == "quick" else [])
    return verify.check_backends(a.B, a.NH, a.S, a.DHQK, a.DHV, a.seed, a.repeats)


def run(args: argparse.Namespace) -> int:
    """Runs the five parts; 0 if every check passes, else 1."""
    import sysconfig

    from xlstm_jax.training.data import stdlib_python_files, unigram_entropy

    if (
        args.workdir is not None
        and args.workdir.exists()
        and (not args.workdir.is_dir() or any(args.workdir.iterdir()))
    ):
        raise CommandError(f"--workdir {args.workdir} is not an empty folder; give a new or empty one")
    start = time.perf_counter()
    files = stdlib_python_files()
    entropy = unigram_entropy(files)
    size = sum(f.stat().st_size for f in files)
    _say(
        f"corpus: the {len(files)} .py files of the Python standard library in {sysconfig.get_paths()['stdlib']} "
        f"({size / 1e6:.1f} MB; 5% of the files held out for validation)"
    )
    _say(
        f"unigram entropy of its bytes: {entropy:.3f} nats/byte (the loss of a model that knows only how often "
        "each byte occurs)"
    )
    workdir = args.workdir if args.workdir is not None else Path(tempfile.mkdtemp(prefix="xlstm-demo-"))
    failures = []
    try:
        config, result = _train(args, workdir, entropy)
        final = result.validation_records[-1]["loss"]
        below = final < entropy
        _say(
            f"final validation loss {final:.3f} nats/byte: {final / entropy:.2f} x the unigram entropy "
            f"{entropy:.3f} ({'below' if below else 'NOT below'} it)"
        )
        if not below:
            failures.append("the validation loss did not fall below the unigram entropy")
        reloaded, params = _reload(config, result)
        if not reloaded:
            failures.append("a reloaded model differs from the trained one")
        if params is not None:
            _sample(result.model_config, params, args.sample_bytes, args.seed)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.verify != "off":
        _say()
        if not _verify(args.verify):
            failures.append("some mLSTM forms disagree with the recurrent form")
    _say(f"\ndone in {time.perf_counter() - start:.0f} s")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0
