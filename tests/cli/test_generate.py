"""``xlstm-jax generate`` on the tiny fixture (weights and tokenizer.json): the text, and every bad input as
``error: ...`` with exit status 2, checked before the model loads, on real (copied, then corrupted) files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from tests.models.fixture import FIXTURE, load
from xlstm_jax.cli import main
from xlstm_jax.generation import MAX_NEW_TOKENS, generate

REPO = Path(__file__).resolve().parents[2]
PROMPT = "the forget gate decays the memory"
SHARD = "model-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"


def _run(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["generate", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_generate_command_streams_the_greedy_text(capsys):
    status, out, err = _run(capsys, str(FIXTURE), "--prompt", PROMPT, "--max-new-tokens", "10", "--no-stop")
    assert status == 0, err
    tokenizer = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    config, params, _ = load()
    ids = tokenizer.encode(PROMPT).ids
    tokens = np.asarray(generate(config, params, [ids], 10, stop_tokens=()).tokens[0]).tolist()
    assert out == tokenizer.decode(tokens) + "\n"
    assert "generated: 10 tokens" in err
    assert "time to first token:" in err and "tokens/s" in err


def test_warmup_and_sampling(capsys):
    """A sampled run with a warm-up run first prints what a run without one prints, and says it was warm."""
    args = [str(FIXTURE), "--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "0.9", "--top-k", "8"]
    status, cold, err = _run(capsys, *args, "--seed", "5")
    assert status == 0 and "(includes compilation)" in err
    status, warm, err = _run(capsys, *args, "--seed", "5", "--warmup")
    assert status == 0 and "(includes compilation)" not in err and "generated: " in err
    assert warm == cold
    status, other, _ = _run(capsys, *args, "--seed", "6")
    assert status == 0 and other != cold


def test_float64_and_wide_seeds_with_x64(capsys):
    """With 64-bit JAX, --dtype float64 runs (on the XLA forms) and seeds up to 2**63 are distinct keys."""
    args = [str(FIXTURE), "--prompt", PROMPT, "--max-new-tokens", "3", "--dtype", "float64"]
    with jax.enable_x64(True):
        status, out, err = _run(
            capsys, *args, "--step-backend", "recurrent", "--decode-fusion", "off", "--seed", "2**40"
        )
        assert status == 2 and "--seed: must be an integer" in err
        status, out, err = _run(
            capsys, *args, "--step-backend", "recurrent", "--decode-fusion", "off", "--seed", str(2**40)
        )
        assert status == 0, err
        status, _, err = _run(capsys, *args, "--seed", str(2**63))
        assert status == 2 and "--seed: must be in [0, 2**63)" in err


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the compiled kernels run on a GPU")
def test_settings_the_model_cannot_run_with(capsys):
    """Compiled kernels without a GPU: found when the prompt runs, reported as an error, not a traceback."""
    status, out, err = _run(capsys, str(FIXTURE), "--prompt", PROMPT, "--kernel-mode", "compiled")
    assert status == 2 and "error: the model cannot run with these settings" in err and "GPU" in err, err
    assert out == ""


# Bad arguments, each with a piece of the message that names it. MODEL_DIR does not exist: were the arguments
# checked after looking at the model, the error would name the directory instead.
BAD_ARGUMENTS = {
    "max tokens 0": (["--max-new-tokens", "0"], "max_new_tokens must be in [1,"),
    "max tokens negative": (["--max-new-tokens", "-3"], "max_new_tokens must be in [1,"),
    "max tokens beyond int32": (["--max-new-tokens", str(MAX_NEW_TOKENS + 1)], "max_new_tokens must be in [1,"),
    "max tokens float": (["--max-new-tokens", "2.5"], "--max-new-tokens: must be an int"),
    "unknown prefill backend": (["--prefill-backend", "flash"], "prefill_backend must be one of"),
    "unknown step backend": (["--step-backend", "triton"], "step_backend must be one of"),
    "fusion on with scanned blocks": (["--decode-fusion", "on", "--scan-blocks"], "scan_blocks=False"),
    "unknown decode fusion": (["--decode-fusion", "yes"], "--decode-fusion: invalid choice"),
    "seed negative": (["--seed", "-1"], "--seed: must be in [0, 2**32)"),
    "seed beyond 32 bits": (["--seed", str(2**32)], "--seed: must be in [0, 2**32)"),
    "seed beyond int64": (["--seed", str(2**64)], "--seed: must be in [0, 2**32)"),
    "seed not an int": (["--seed", "1e3"], "--seed: must be an integer"),
    "unknown dtype": (["--dtype", "float8"], "--dtype: invalid choice"),
    "integer dtype": (["--dtype", "int32"], "--dtype: invalid choice"),
    "float64 without x64": (["--dtype", "float64"], "JAX_ENABLE_X64=1"),
    "temperature negative": (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    "temperature nan": (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    "temperature inf": (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    "top-k negative": (["--temperature", "1", "--top-k", "-1"], "--top-k must be an int >= 0"),
    "top-p zero": (["--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
    "top-p above one": (["--temperature", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    "top-p nan": (["--temperature", "1", "--top-p", "nan"], "--top-p must be in (0, 1]"),
    "top-k while greedy": (["--top-k", "5"], "need --temperature > 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_are_errors_before_the_model(case, tmp_path, capsys):
    extra, message = BAD_ARGUMENTS[case]
    status, out, err = _run(capsys, str(tmp_path / "no-model"), "--prompt", PROMPT, *extra)
    assert status == 2
    assert message in err and "error: " in err and "no-model" not in err, err
    assert out == ""


def test_empty_prompt_is_an_error(capsys):
    status, _, err = _run(capsys, str(FIXTURE), "--prompt", "")
    assert status == 2 and "error: --prompt is empty" in err
    status, _, err = _run(capsys, str(FIXTURE), "--prompt", "  ")  # the tokenizer drops whitespace
    assert status == 2 and "error: --prompt '  ' encodes to no tokens" in err


def test_usage_errors_keep_argparse_status(capsys):
    assert main(["generate", str(FIXTURE)]) == 2  # no --prompt
    assert "the following arguments are required: --prompt" in capsys.readouterr().err
    assert main(["generate", str(FIXTURE), "--prompt", "x", "--top-k", "many"]) == 2
    assert "--top-k: invalid int value" in capsys.readouterr().err


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A copy of the fixture to corrupt."""
    target = tmp_path / "model"
    shutil.copytree(FIXTURE, target, ignore=shutil.ignore_patterns("peer.npz"))
    return target


def _shard(model_dir: Path) -> None:
    """The weights as one shard listed in an index file, as sharded checkpoints are."""
    (model_dir / "model.safetensors").rename(model_dir / SHARD)
    with safe_open(model_dir / SHARD, framework="numpy") as f:
        keys = list(f.keys())  # noqa: SIM118 - safe_open handles are not iterable
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, SHARD)}
    (model_dir / INDEX).write_text(json.dumps(index))


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# File damage -> the name of the file that the error must contain.
BAD_FILES = {
    "model dir is a file": (lambda d: shutil.rmtree(d) or d.write_text("x"), "is not a directory"),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
    "tokenizer truncated": (lambda d: _truncate(d / "tokenizer.json", 300), "tokenizer.json"),
    "tokenizer not json": (lambda d: (d / "tokenizer.json").write_text("vocab: 40"), "tokenizer.json"),
    "no config": (lambda d: (d / "config.json").unlink(), "config.json"),
    "config truncated": (lambda d: _truncate(d / "config.json", 200), "config.json"),
    "config not an object": (lambda d: (d / "config.json").write_text("[]"), "config.json"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "weights header garbage": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64), "model.safetensors"),
    "weights truncated": (lambda d: _truncate(d / "model.safetensors", 100_000), "model.safetensors"),
    "index truncated": (lambda d: _shard(d) or _truncate(d / INDEX, 50), INDEX),
    "index without weight_map": (lambda d: _shard(d) or (d / INDEX).write_text("{}"), INDEX),
    "index names a missing shard": (lambda d: _shard(d) or (d / SHARD).rename(d / "moved.safetensors"), SHARD),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_errors_naming_the_file(case, model_dir, capsys):
    damage, name = BAD_FILES[case]
    damage(model_dir)
    status, out, err = _run(capsys, str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "2")
    assert status == 2, err
    assert err.startswith("xlstm-jax generate: error: ") and name in err, err
    assert out == ""


def test_a_process_reports_errors_without_a_traceback(model_dir):
    """``python -m xlstm_jax generate`` as a user runs it: a corrupted file, then a bad argument."""
    _truncate(model_dir / "tokenizer.json", 300)
    for extra, name in (([], "tokenizer.json"), (["--max-new-tokens", "0"], "max_new_tokens")):
        cmd = [sys.executable, "-m", "xlstm_jax", "generate", str(model_dir), "--prompt", PROMPT, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "error: " in proc.stderr and name in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stdout == ""
