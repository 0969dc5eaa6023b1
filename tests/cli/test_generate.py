"""The ``xlstm-jax generate`` command on the tiny fixture (weights and tokenizer.json)."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from tests.models.fixture import FIXTURE, load
from xlstm_jax.generation import generate
from xlstm_jax.generation_cli import main


def test_generate_command_streams_the_greedy_text(capsys):
    prompt = "the forget gate decays the memory"
    status = main(
        [str(FIXTURE), "--prompt", prompt, "--max-new-tokens", "10", "--no-stop", "--prefill-backend", "chunkwise"]
    )
    out, err = capsys.readouterr()
    assert status == 0
    tokenizer = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    config, params, _ = load()
    ids = tokenizer.encode(prompt).ids
    tokens = np.asarray(generate(config, params, [ids], 10, stop_tokens=()).tokens[0]).tolist()
    assert out == tokenizer.decode(tokens) + "\n"
    assert "generated: 10 tokens" in err
    assert "time to first token:" in err and "tokens/s" in err


def test_generate_command_errors(tmp_path, capsys):
    assert main([str(tmp_path), "--prompt", "x"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    (tmp_path / "tokenizer.json").write_text((FIXTURE / "tokenizer.json").read_text())
    assert main([str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err
