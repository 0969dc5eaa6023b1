"""``xlstm-jax serve`` on the tiny fixture: a real server process answers until Ctrl-C, and every bad argument or
file is ``error: ...`` with exit status 2, found before the weights are read."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.models.fixture import FIXTURE, load
from xlstm_jax.cli import main
from xlstm_jax.cli.serve import _select_vmm_allocator
from xlstm_jax.generation import generate
from xlstm_jax.serving.engine import stable_scratch_supported

REPO = Path(__file__).resolve().parents[2]
PROMPT = "the forget gate decays the memory"


def _run(capsys, *args: str) -> tuple[int, str]:
    status = main(["serve", *args])
    return status, capsys.readouterr().err


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A copy of the fixture whose weights cannot be read: any error about another file came before them."""
    out = tmp_path / "model"
    shutil.copytree(FIXTURE, out)
    (out / "model.safetensors").write_bytes(b"not safetensors")
    return out


def test_serve_process_answers_until_interrupted():
    """The server on a mesh of 2 CPU devices (the slots split over data) answers as generate on one device."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    args = [sys.executable, "-m", "xlstm_jax", "serve", str(FIXTURE), "--port", "0", "--num-slots", "2"]
    args += [
        "--model-name",
        "tiny",
        "--log-level",
        "warning",
        "--prefill-chunk-tokens",
        "16",
        "--max-prefill-rows",
        "2",
        "--mesh",
        "2,1,1",
    ]
    if stable_scratch_supported():
        args.append("--stable-scratch")
    process = subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(240, process.kill)  # a hung server fails the test instead of blocking it
    watchdog.start()
    try:
        seen = []
        for line in process.stderr:  # JAX may warn first
            seen.append(line)
            if line.startswith("serving "):
                break
        assert seen and seen[-1].startswith("serving 'tiny' on http://127.0.0.1:"), "".join(seen)
        assert seen[-1].rstrip().endswith("(2 slots, mesh data=2 x fsdp=1 x tensor=1)"), seen[-1]
        url = seen[-1].split()[3]
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/health").json()["status"] == "ok"
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
            text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        tokenizer = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
        config, params, _ = load()
        tokens = generate(config, params, [tokenizer.encode(PROMPT).ids], 5, stop_tokens=()).tokens[0]
        assert text == tokenizer.decode(np.asarray(tokens).tolist())
        process.send_signal(signal.SIGINT)  # a graceful shutdown, then the status of an interrupted command
        assert process.wait(timeout=60) == 130
        assert "Traceback" not in process.stderr.read()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


@pytest.mark.parametrize("version, chosen", [("0.10.2", False), ("0.11.2", True), ("0.12.0.dev20261201", True)])
def test_the_vmm_allocator_is_selected_where_unset_and_jaxlib_has_stable_scratch(monkeypatch, version, chosen):
    """Stable scratch (the default on a GPU) takes effect under jax's VMM allocator only: the command selects it
    before jax starts, unless the variable is set or jaxlib predates the update mode."""
    import jaxlib

    monkeypatch.setattr(jaxlib, "__version__", version)
    environ: dict[str, str] = {}
    assert _select_vmm_allocator(environ) is chosen
    assert environ == ({"XLA_PYTHON_CLIENT_ALLOCATOR": "vmm"} if chosen else {})
    given = {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}
    assert _select_vmm_allocator(given) is False and given == {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}


def test_bad_arguments_and_files_are_errors_before_the_weights_load(capsys, model_dir, tmp_path):
    status, err = _run(capsys, str(tmp_path / "nowhere"))
    assert status == 2 and "error: MODEL_DIR" in err and "is not a directory" in err
    status, err = _run(capsys, str(model_dir), "--port", "70000")
    assert status == 2 and "--port" in err and "[0, 65535]" in err
    status, err = _run(capsys, str(model_dir), "--num-slots", "0")
    assert status == 2 and "--num-slots" in err
    status, err = _run(capsys, str(model_dir), "--prefix-cache-mb", "-1")
    assert status == 2 and "--prefix-cache-mb" in err
    status, err = _run(capsys, str(model_dir), "--mesh", "1,2")
    assert status == 2 and "--mesh" in err and "must be data,fsdp,tensor" in err
    devices = jax.device_count()
    status, err = _run(capsys, str(model_dir), "--mesh", f"{devices + 1},1,1")
    assert status == 2 and f"error: --mesh {devices + 1},1,1:" in err and f"the device count is {devices}" in err
    status, err = _run(capsys, str(model_dir), "--chat-template", "{role} only")
    assert status == 2 and "error: --chat-template" in err and "{content}" in err
    status, err = _run(capsys, str(model_dir), "--tokenizer", "bytes")  # 258 byte ids > the model's 99
    assert status == 2 and "error: the tokenizer has 258 tokens" in err and "vocab_size=99" in err
    status, err = _run(capsys, str(model_dir), "--tokenizer", str(tmp_path / "missing.json"))
    assert status == 2 and "missing.json does not exist" in err
    if not stable_scratch_supported():  # refused before anything is read
        status, err = _run(capsys, str(tmp_path / "nowhere"), "--stable-scratch")
        assert status == 2 and "error: --stable-scratch needs XLA's command buffer update mode SKIP_TEMP or" in err

    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"bos_token_id": None}))
    status, err = _run(capsys, str(model_dir), "--add-bos")
    assert status == 2 and "error: --add-bos needs a bos_token_id" in err
    (model_dir / "config.json").write_text(json.dumps(config | {"eos_token_id": "end"}))
    status, err = _run(capsys, str(model_dir))
    assert status == 2 and "eos_token_id must be a token id" in err
    (model_dir / "config.json").write_text("{")
    status, err = _run(capsys, str(model_dir))
    assert status == 2 and "config.json is not readable JSON" in err
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "tokenizer.json").write_text("{}")
    status, err = _run(capsys, str(model_dir))
    assert status == 2 and "is not a readable tokenizer" in err
    (model_dir / "tokenizer.json").unlink()
    status, err = _run(capsys, str(model_dir))
    assert status == 2 and "tokenizer.json does not exist" in err


def test_a_taken_port_and_unreadable_weights(capsys, model_dir):
    shutil.copy(FIXTURE / "tokenizer.json", model_dir / "tokenizer.json")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        status, err = _run(capsys, str(model_dir), "--port", port)
        assert status == 2 and f"error: cannot listen on 127.0.0.1:{port}" in err
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    status, err = _run(capsys, str(model_dir), "--port", "0")  # the address is free: now the weights are read
    assert status == 2 and "model.safetensors" in err and "Traceback" not in err
    assert "note: tokenizer_config.json has a Jinja chat_template, which is not rendered" in err
