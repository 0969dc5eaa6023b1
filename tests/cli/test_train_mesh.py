"""``xlstm-jax train`` on a 2x2x2 mesh of 8 CPU devices: the same losses as on one device, and its checkpoint
resumes on one device.

The 8-device run is a separate process (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set
before jax is imported); the one-device runs are this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.numerics import TOL, assert_close
from tests.training import tiny_run
from xlstm_jax.cli import main
from xlstm_jax.training.loop import METRICS_NAME

REPO = Path(__file__).resolve().parents[2]


def _losses(logs: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (logs / METRICS_NAME).read_text().splitlines()]
    return {r["step"]: r["train/loss"] if "train/loss" in r else r["loss"] for r in records if r["kind"] == "train"}


def test_mesh_run_equals_one_device_and_resumes_on_one(tmp_path):
    corpus = tiny_run.write_corpus(tmp_path / "corpus")
    optimizer = "\n".join(f"{k} = {v}" for k, v in {**tiny_run.OPTIMIZER, "total_steps": 3}.items())
    config = tmp_path / "run.toml"
    config.write_text(  # two heads, so that the tensor axis of 2 splits them
        'model = "tiny"\nlog_every = 1\neval_every = 0\ncheckpoint_every = 2\n'
        "[model_overrides]\nembedding_dim = 32\nnum_blocks = 1\nnum_heads = 2\n"
        f'[data]\nkind = "text"\npaths = ["{corpus}"]\nseq_len = {tiny_run.SEQ_LEN}\n'
        f"batch_size = {tiny_run.BATCH_SIZE}\nvalidation_fraction = {tiny_run.VALIDATION_FRACTION}\n"
        f"[optimizer]\n{optimizer}\n"
    )

    def args(name: str, mesh: str, steps: int) -> list[str]:
        return ["train", "--config", str(config), "--checkpoint-dir", str(tmp_path / name / "ckpt"), "--log-dir",
                str(tmp_path / name / "logs"), "--mesh", mesh, "--steps", str(steps), "--no-progress"]  # fmt: skip

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    code = f"import sys; from xlstm_jax.cli import main; sys.exit(main({args('mesh', '2,2,2', 2)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "trained to step 2 (from step 0)" in proc.stdout  # (TrainConfig.validate refuses a mesh of the wrong size)

    assert main(args("one", "1,1,1", 3)) == 0  # one device, straight through
    # The 8-device checkpoint of step 2, resumed on one device for step 3.
    (tmp_path / "resumed").mkdir()
    os.symlink(tmp_path / "mesh" / "ckpt", tmp_path / "resumed" / "ckpt")
    assert main([*args("resumed", "1,1,1", 3), "--resume"]) == 0

    one, mesh, resumed = (_losses(tmp_path / n / "logs") for n in ("one", "mesh", "resumed"))
    assert sorted(one) == [1, 2, 3] and sorted(mesh) == [1, 2] and sorted(resumed) == [3]
    # The same function on a different layout: only the reduction order of the sums differs.
    got = np.array([mesh[1], mesh[2], resumed[3]])
    assert_close("losses on the mesh, then resumed on one device", np.array([one[1], one[2], one[3]]), got,
                 TOL["float32-model"])  # fmt: skip
