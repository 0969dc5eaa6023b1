"""The decode/prefill benchmark (``benchmarks/generate.py``) runs end to end on the tiny config (CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "generate.py"


def _module():
    spec = importlib.util.spec_from_file_location("benchmark_generate", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_every_case(tmp_path):
    bench = _module()
    cases = "recurrent:unrolled:default:1,recurrent:scan:graphs:2,recurrent+unfused:unrolled:default:1"
    assert bench.main(["--smoke", "--out", str(tmp_path), "--prefill", "16", "--cases", cases, "--hlo", "0"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["case"] for row in results["decode"]] == [
        ["recurrent", "unrolled", "default", 1],
        ["recurrent", "scan", "graphs", 2],
        ["recurrent+unfused", "unrolled", "default", 1],
    ]
    for row in results["decode"]:
        assert row["ms_per_token"] > 0 and row["hlo"]["while_loops"] >= 1 and row["hlo"]["fusions"] > 0
    assert [row["S"] for row in results["prefill"]] == [16] and results["prefill"][0]["tokens_per_s"] > 0
    assert (tmp_path / "hlo_0_recurrent_unrolled_default_1.txt").read_text().startswith("HloModule")


def test_bad_case_is_refused():
    with pytest.raises(ValueError, match="bad case 'recurrent:unrolled:nographs:1'"):
        _module().main(["--smoke", "--prefill", "", "--cases", "recurrent:unrolled:nographs:1"])
