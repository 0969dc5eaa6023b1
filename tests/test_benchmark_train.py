"""benchmarks/train.py end to end on a tiny model on the CPU, and its PyTorch anchor's command line."""

from __future__ import annotations

import argparse
import importlib.util
import json

import jax
import pytest

from benchmarks import train
from benchmarks.harness import NOMINAL_H200
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.training.flops import flops_per_token


def test_train_smoke(tmp_path):
    """One case of the real training step (remat 'dots'): timed, its MFU from the model's FLOPs per token."""
    path = tmp_path / "train.json"
    argv = ["--tiny", "--blocks", "1", "--S", "32", "--cases", "2:dots:2", "--torch", "skip", "--ceilings", "nominal"]
    train.main([*argv, "--repeats", "2", "--warmup", "1", "--trace", "--json", str(path)])
    data = json.loads(path.read_text())
    config = xLSTMLMConfig.tiny(num_blocks=1, dtype="bfloat16", param_dtype="float32")
    fpt = flops_per_token(config, 32, chunk_size=16)
    assert data["model"]["flops_per_token"] == fpt and data["model"]["num_params"] == config.num_params()
    assert data["torch_anchor_status"] == "skipped (--torch skip)" and data["tables"]["torch"] == []
    (row,) = data["tables"]["train"]
    assert (row["B"], row["remat"], row["accum"], row["status"], row["S"]) == (2, "dots", 2, "ok", 32)
    assert row["repeats"] == 2 and row["compile_s"] > 0 and row["median_s"] > 0
    assert row["tokens_per_s"] == pytest.approx(2 * 32 / row["median_s"], rel=1e-12)
    assert row["mfu_jax"] == pytest.approx(row["tokens_per_s"] * fpt / NOMINAL_H200.matmul_flops_per_s, rel=1e-12)
    assert row["mfu"] is None and row["x_eager"] is None and row["x_compiled"] is None  # no anchor
    assert not any(k.startswith("trace_") for k in row)  # --trace: no GPU stream to read on a CPU
    (summary,) = data["tables"]["summary"]
    assert (summary["B"], summary["remat"], summary["targets_met"]) == (2, "dots", None)
    assert summary["met"]["mfu"] is None and summary["met"]["x_compiled"] is None


def test_each_queue_is_a_row_with_the_ratios_of_the_anchors_row_of_the_same_queue(tmp_path, monkeypatch):
    """--queue 1 2: one compilation, a row per value, each compared with the anchor's row of its queue; the
    summary takes the fastest row."""
    anchor = {
        "matmul_flops_per_s": 1e15,
        "tables": {
            "train": [
                {"mode": "compiled", "queue": 1, "status": "ok", "tokens_per_s": 1.0},
                {"mode": "compiled", "queue": 2, "status": "ok", "tokens_per_s": 2.0},
                {"mode": "eager", "queue": 1, "status": "ok", "tokens_per_s": 4.0},
            ],
            "matmul": [],
        },
    }
    torch_json = tmp_path / "torch.json"
    torch_json.write_text(json.dumps(anchor))
    compiles = []
    real_compile = jax.stages.Lowered.compile
    monkeypatch.setattr(
        jax.stages.Lowered, "compile", lambda self, *a, **k: compiles.append(1) or real_compile(self, *a, **k)
    )
    path = tmp_path / "train.json"
    argv = ["--tiny", "--blocks", "1", "--S", "32", "--cases", "2:none", "--torch-json", str(torch_json)]
    train.main(
        [*argv, "--ceilings", "nominal", "--repeats", "2", "--warmup", "1", "--queue", "1", "2", "--json", str(path)]
    )
    data = json.loads(path.read_text())
    rows = data["tables"]["train"]
    assert [(r["queue"], r["status"], r["units"]) for r in rows] == [(1, "ok", 1), (2, "ok", 2)]
    assert len(compiles) == 1 and rows[0]["compile_s"] == rows[1]["compile_s"] > 0
    for row in rows:
        assert row["x_compiled"] == pytest.approx(row["tokens_per_s"] / row["queue"], rel=1e-12)
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * row["flops_per_token"] / 1e15, rel=1e-12)
    assert rows[0]["x_eager"] == pytest.approx(rows[0]["tokens_per_s"] / 4.0) and rows[1]["x_eager"] is None
    (summary,) = data["tables"]["summary"]
    assert summary["queue"] == max(rows, key=lambda r: r["tokens_per_s"])["queue"]


def test_cases_parse_with_and_without_micro_batches():
    assert train.parse_case("16:dots") == (16, train.Remat.DOTS, 1)
    assert train.parse_case("16:none:2") == (16, train.Remat.NONE, 2)


@pytest.mark.parametrize(
    "text", ["8", "8:", "0:none", "x:none", "8:some", "-1:full", "8:none:3", "8:none:0", "8:none:2:1"]
)
def test_bad_cases_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="B:remat"):
        train.parse_case(text)
    with pytest.raises(SystemExit):
        train.main(["--tiny", "--torch", "skip", "--cases", text])


def test_anchor_rates_take_each_modes_fastest_successful_row():
    rows = [
        {"mode": "eager", "status": "ok", "tokens_per_s": 30e3},
        {"mode": "eager", "status": "OOM"},
        {"mode": "eager", "status": "ok", "tokens_per_s": 35e3},
        {"mode": "compiled", "status": "error"},
    ]
    rows.append({"mode": "eager", "queue": 3, "status": "ok", "tokens_per_s": 37e3})
    rate, best = train.anchor_rates({"matmul_flops_per_s": 7.8e14, "tables": {"train": rows}})
    assert rate == 7.8e14 and best == {("eager", 1): 35e3, ("eager", 3): 37e3}  # rows without queue: 1
    assert train.anchor_rates(None) == (None, {})
    fields = train.rates(50e3, 8e9, 8e14, 4e14)
    assert fields == {"mfu": pytest.approx(0.5), "mfu_jax": pytest.approx(1.0)}


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed: the anchor would run")
def test_anchor_without_torch_exits_with_status_2(capsys):
    train_torch = pytest.importorskip("benchmarks.train_torch")
    with pytest.raises(SystemExit) as exit_info:
        train_torch.main(["--tiny"])
    assert exit_info.value.code == 2 and "needs torch" in capsys.readouterr().err
