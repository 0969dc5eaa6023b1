"""The README's Python examples run as written (on the tiny fixture model), and their claims hold."""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.fixture import FIXTURE
from tests.numerics import TOL

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_usage_example():
    scope: dict = {}
    exec(compile(_examples()[0], str(README), "exec"), scope)  # noqa: S102
    h_last, h = scope["h_last"], scope["h"]
    assert h_last.shape == h[:, :, -1].shape and h_last.dtype == jnp.bfloat16
    # Both are float32 computations rounded to bf16 (see TOL["bfloat16/float32"]).
    err = np.max(np.abs(np.asarray(h_last, np.float32) - np.asarray(h[:, :, -1], np.float32)))
    assert err <= TOL["bfloat16/float32"].max_err * np.max(np.abs(np.asarray(h, np.float32)))


def test_language_model_examples(tmp_path, capsys):
    """The model examples, with the fixture standing in for the xLSTM-7B directory, run in one scope."""
    examples = _examples()[1:3]
    code = "\n".join(examples)
    code = code.replace('"xLSTM-7b-copy"', repr(str(tmp_path / "copy"))).replace('"xLSTM-7b"', repr(str(FIXTURE)))
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102
    assert scope["out"].tokens.shape == (1, 8) and scope["logits"].shape == (1, 8, scope["config"].vocab_size)
    assert (tmp_path / "copy" / "config.json").exists() and (tmp_path / "copy" / "model.safetensors").exists()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("(2, 16)") and len(printed) == 17  # the shape line, then 16 streamed steps


def test_training_example(capsys):
    """The training example runs as written: three steps on packed stdlib rows, one compilation."""
    code = _examples()[3]
    assert "train_step(" in code
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102
    state, step = scope["state"], scope["train_step"]
    assert int(state.step) == 3 and step._cache_size() == 1
    losses = [float(line.split()[1]) for line in capsys.readouterr().out.splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(np.log(scope["config"].vocab_size), rel=0.1)  # a fresh model: near uniform
