"""``xlstm-jax train``: every bad setting is an ``error: ...`` with exit status 2 before anything is built; a real
run writes metrics (JSONL and TensorBoard) and checkpoints, and ``--resume`` continues its step count."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import xlstm_jax.training.loop
from tests.training import tiny_run
from xlstm_jax.cli import main
from xlstm_jax.training.checkpoint import TrainCheckpointer
from xlstm_jax.training.loop import METRICS_NAME


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny_run.write_corpus(tmp_path_factory.mktemp("train") / "corpus")


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if the command gets as far as training (building a model)."""

    def refuse(*args, **kwargs):
        raise AssertionError("train() was called: a bad setting was not caught before the model is built")

    monkeypatch.setattr(xlstm_jax.training.loop, "train", refuse)


BAD_FLAGS = [
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--preset", "tiny", "--init-from", "x"], "argument --init-from: not allowed with argument --preset"),
    (
        ["--init-from", "/nonexistent/model"],
        "model='/nonexistent/model' is neither a preset (tiny, byte-small, 1.3b, 7b) nor a Hugging Face directory",
    ),
    (["--data", "/nonexistent/corpus"], "data.paths: '/nonexistent/corpus' does not exist"),
    (["--seq-len", "0"], "argument --seq-len: must be an integer >= 1, got 0"),
    (["--batch-size", "6", "--accum-steps", "4"], "data.batch_size=6 must be divisible by accum_steps=4"),
    (["--mesh", "1,1,2"], "mesh: MeshConfig(data=1, fsdp=1, tensor=2) asks for data*fsdp*tensor = 2 devices"),
    (["--mesh", "2,x,1"], "argument --mesh: must be data,fsdp,tensor"),
    (["--resume"], "resume needs checkpoint_dir"),
    (["--model-override", "hidden=3"], "model_overrides ['hidden'] are not fields of xLSTMLMConfig"),
    (["--model-override", "num_heads=3"], "must be a positive multiple of num_heads=3"),
    (["--model-override", "vocab_size=100"], "the data's vocabulary (258 ids) exceeds the model's vocab_size=100"),
    (
        ["--warmup", "50", "--steps", "10"],
        "optimizer: warmup_steps must be in [0, total_steps=10], got warmup_steps=50",
    ),
    (["--lr", "-1"], "argument --lr: must be a positive number, got -1"),
    (["--schedule", "linear"], "argument --schedule: invalid choice: 'linear'"),
    (["--remat", "some"], "argument --remat: invalid choice: 'some'"),
    (["--mlstm-backward", "triton"], "argument --mlstm-backward: invalid choice: 'triton'"),
    (["--tokenizer", "/nonexistent/tokenizer.json"], "data.tokenizer='/nonexistent/tokenizer.json' is neither"),
    (["--data-kind", "tokens"], "is not a file"),
    (["--data-kind", "stdlib"], "data.paths must be empty with data.kind='stdlib'"),
    (["--eos-id", "5"], "data.eos_id applies to data.kind='tokens' only"),
    (["--eval-every", "10", "--validation-fraction", "0"], "eval_every=10 needs data.validation_fraction > 0"),
    (["--validation-fraction", "1.5"], "data.validation_fraction must be a number in [0, 1), got 1.5"),
    (["--config", "/nonexistent/run.toml"], "config file '/nonexistent/run.toml' does not exist"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_an_error_before_training(flags, message, corpus, no_training, capsys):
    assert main(["train", "--data", str(corpus), *flags]) == 2
    err = capsys.readouterr().err
    assert "xlstm-jax train: error: " in err and message in err, err
    assert "Traceback" not in err


def test_every_problem_is_reported_at_once(no_training, capsys):
    flags = ["--data", "/nonexistent/corpus", "--batch-size", "6", "--accum-steps", "4", "--resume"]
    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err
    for message in (
        "data.paths: '/nonexistent/corpus' does not exist",
        "data.batch_size=6 must be divisible by accum_steps=4",
        "resume needs checkpoint_dir",
    ):
        assert message in err, err


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("run.toml", "stepz = 3\n", "unknown settings ['stepz']"),
        ("run.toml", "[data]\nseq_length = 3\n", "unknown settings ['data.seq_length']"),
        ("run.toml", "steps = \n", "is not valid TOML"),
        ("run.json", "{'steps': 3}", "is not valid JSON"),
        ("run.yaml", "steps: 3\n", "must end in .toml or .json"),
        ("run.toml", "[mesh]\ndata = 0\n", "mesh: MeshConfig.data must be a positive int or -1"),
        ("run.toml", 'model = "tiny"\nsteps = "ten"\n', "steps must be an integer >= 1, got 'ten'"),
    ],
)
def test_bad_config_file_is_an_error(name, text, message, corpus, tmp_path, no_training, capsys):
    path = tmp_path / name
    path.write_text(text)
    assert main(["train", "--config", str(path), "--data", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err


def test_checkpoints_of_an_earlier_run_need_resume(corpus, tmp_path, no_training, capsys):
    (tmp_path / "ckpt" / "7").mkdir(parents=True)
    assert main(["train", "--data", str(corpus), "--checkpoint-dir", str(tmp_path / "ckpt")]) == 2
    assert "holds checkpoints of an earlier run (steps [7]): continue it with resume" in capsys.readouterr().err
    assert main(["train", "--data", str(corpus), "--checkpoint-dir", str(tmp_path / "empty"), "--resume"]) == 2
    assert "holds no checkpoint to continue from" in capsys.readouterr().err


def _scalar_tags(log_dir: Path) -> set[str]:
    """The scalar tags in the TensorBoard event files of ``log_dir`` (TFRecord framing read directly)."""
    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for path in log_dir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            offset += 12 + length + 4
    return tags


def test_train_writes_metrics_and_checkpoints_and_resumes(corpus, tmp_path, capsys):
    config = tmp_path / "run.toml"
    overrides = "\n".join(f"{k} = {v}" for k, v in tiny_run.MODEL_OVERRIDES.items())
    optimizer = "\n".join(f"{k} = {v}" for k, v in tiny_run.OPTIMIZER.items())
    config.write_text(
        f'model = "tiny"\nlog_every = 1\neval_every = 2\neval_batches = 2\ncheckpoint_every = 2\n'
        f"[model_overrides]\n{overrides}\n"
        f'[data]\nkind = "text"\npaths = ["{corpus}"]\nseq_len = {tiny_run.SEQ_LEN}\n'
        f"batch_size = {tiny_run.BATCH_SIZE}\nvalidation_fraction = {tiny_run.VALIDATION_FRACTION}\n"
        f"[optimizer]\n{optimizer}\n"
    )
    ckpt, logs = tmp_path / "ckpt", tmp_path / "logs"
    common = ["train", "--config", str(config), "--checkpoint-dir", str(ckpt), "--log-dir", str(logs), "--no-progress"]

    assert main([*common, "--steps", "2"]) == 0
    assert "trained to step 2 (from step 0)" in capsys.readouterr().out
    records = [json.loads(line) for line in (logs / METRICS_NAME).read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("validation", 2)]
    assert {"train/loss", "train/tokens_per_s", "train/learning_rate", "validation/loss"} <= _scalar_tags(logs)
    assert json.loads((logs / "train_config.json").read_text())["steps"] == 2
    with TrainCheckpointer(ckpt, save_every=1, max_to_keep=1) as c:
        assert c.all_steps() == [2]

    assert main([*common, "--steps", "4", "--resume"]) == 0
    assert "trained to step 4 (from step 2)" in capsys.readouterr().out
    records = [json.loads(line) for line in (logs / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "validation"] == [2, 4]
    with TrainCheckpointer(ckpt, save_every=1, max_to_keep=1) as c:
        assert c.all_steps()[-1] == 4
