"""``benchmarks/scaling.py --small`` on 8 CPU devices: every table is written, the correctness part compared
the 8-device steps with the one-device step and round-tripped a checkpoint.

The script runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before jax is
imported), with XLA's cheaper CPU compilation (the programs are tiny; their speed is not what is checked).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEVICES = 8
FLAGS = (
    f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)
ARGS = ["--small", "--devices", str(DEVICES), "--parts", "correctness", "scaling", "decode", "--repeats", "1",
        "--warmup", "0", "--ceilings", "nominal", "--tp-batches", "1", "--dp-batch", "16"]  # fmt: skip


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("scaling") / "scaling.json"
    env = {**os.environ, "XLA_FLAGS": FLAGS, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("NCCL_NVLS_ENABLE", None)
    command = [sys.executable, str(REPO / "benchmarks" / "scaling.py"), *ARGS, "--json", str(path)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for table in ("## correctness", "## checkpoint", "## scaling", "## decode"):
        assert table in proc.stdout  # one printed table per part
    return json.loads(path.read_text())


def test_report_names_the_run(result):
    env = result["environment"]
    assert env["platform"] == "cpu" and env["device_count"] == DEVICES and env["jax"]
    assert result["devices"]["used"] == DEVICES
    assert result["devices"]["NCCL_NVLS_ENABLE"] == "0"  # set by the script where the environment has none
    assert sorted(result["tables"]) == ["checkpoint", "correctness", "decode", "scaling"]


def test_correctness_compares_every_mesh_with_one_device(result):
    rows = {r["mesh"]: r for r in result["tables"]["correctness"]}
    # FSDP and data parallel over 8; 8 heads: tensor parallel over 8.
    assert {name: r["mesh_shape"] for name, r in rows.items()} == {"fsdp8": "1x8x1", "data8": "8x1x1",
                                                                     "tensor8": "1x1x8"}  # fmt: skip
    B, S = DEVICES, result["settings"]["correctness_seq"]
    tol = 3 * math.sqrt(B * S) * 2.0**-9  # benchmarks/scaling.py's step_tolerance, restated
    for name, row in rows.items():
        assert row["status"] == "ok" and row["compared"], (name, row.get("error"))
        assert (row["B"], row["S"]) == (B, S)
        assert row["tol"] == pytest.approx(tol)
        assert row["loss_1"] > 0 and math.isfinite(row["loss_n"])
        for key in ("loss_err", "update_err", "param_err"):
            assert 0 <= row[key] <= tol, (name, key, row[key], row.get(key.replace("err", "worst")))
        assert row["ok"] is True


def test_checkpoint_from_8_devices_restores_on_1_and_on_8(result):
    rows = {r["restored_on"]: r for r in result["tables"]["checkpoint"]}
    assert sorted(rows) == ["1 device", "8 devices"]
    for where, row in rows.items():
        assert row["mesh"] == "fsdp8" and row["compared"], (where, row.get("error"))
        assert row["equal"] is True and row["max_abs_diff"] == 0.0
        assert row["data_state"] == {"position": 1}
    assert rows["1 device"]["devices_holding"] == 1 and rows["8 devices"]["devices_holding"] == DEVICES


def test_scaling_rows_and_efficiency(result):
    rows = {r["mesh"]: r for r in result["tables"]["scaling"]}
    assert sorted(rows) == ["data8", "fsdp8", "one", "tensor2"]  # train.py's tiny model has 2 heads
    one = rows["one"]
    per_device = int(result["settings"]["scaling_case"].split(":")[0])
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row.get("error"))
        assert row["B"] == row["devices"] * per_device
        assert row["tokens_per_s"] == pytest.approx(row["B"] * row["S"] / row["median_s"])
    for name in ("fsdp8", "data8", "tensor2"):
        row = rows[name]
        assert row["efficiency"] == pytest.approx(row["tokens_per_s"] / (DEVICES * one["tokens_per_s"]))
        assert row["target_met"] == (row["efficiency"] >= 0.9)


def test_decode_cases(result):
    rows = [(r["case"], r["B"]) for r in result["tables"]["decode"]]
    assert rows == [("one", 1), ("tensor2", 1), ("one", 16), (f"data{DEVICES}", 16)]
    for row in result["tables"]["decode"]:
        # On 2 cores one token's time can drown in noise: such a row gives no time, and a note names it.
        assert row["status"] in ("ok", "noise"), row.get("error")
        assert row["tokens"] == [3, 4] and row["short_median_s"] > 0 and row["long_median_s"] > 0
        if row["status"] == "ok":
            assert row["ms_per_token"] == pytest.approx(row["difference_s"] * 1e3) and row["ms_per_token"] > 0
            assert row["tokens_per_s"] == pytest.approx(row["B"] / row["difference_s"])
        else:
            assert row["difference_s"] <= 0 and "ms_per_token" not in row and "speedup" not in row
            assert any(n.startswith(f"decode {row['case']} B={row['B']}: N=4") for n in result.get("notes", []))
    one, tensor = result["tables"]["decode"][:2]
    assert tensor["mesh_shape"] == "1x1x2"
    if one["status"] == tensor["status"] == "ok":
        assert tensor["speedup"] == pytest.approx(one["ms_per_token"] / tensor["ms_per_token"])


def test_cases_take_no_micro_batches():
    import argparse

    from benchmarks.scaling import parse_remat_case
    from xlstm_jax.models.xlstm_parallel.runtime import Remat

    assert parse_remat_case("8:dots") == (8, Remat.DOTS)
    for text in ("8:dots:2", "8:dots:1", "8"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_remat_case(text)
