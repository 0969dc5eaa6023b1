"""benchmarks/serve.py end to end with --tiny on the CPU: every table present, with consistent values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import serve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "serve.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "benchmarks/serve.py", "--tiny", "--json", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(path.read_text())


def test_every_table_is_written(tiny_run):
    assert set(tiny_run["tables"]) == {"step", "static", "rates", "prefix"}
    assert tiny_run["settings"]["tiny"] and tiny_run["model"]["preset"] == "tiny"
    assert set(tiny_run["targets"]) == {"saturated_of_step", "saturated_of_static", "prefix_ttft_speedup", "wanted"}
    assert tiny_run["engine_compilations"] == {"decode_step": 1, "prefill_chunk": 1, "insert": 1, "extract": 1}


def test_step_and_static_rates(tiny_run):
    (step,) = tiny_run["tables"]["step"]
    slots = serve.TINY["slots"]
    assert step["batch"] == slots and step["ms_per_step"] > 0
    assert step["tokens_per_s"] == pytest.approx(slots / (step["ms_per_step"] / 1e3))
    (static,) = tiny_run["tables"]["static"]
    requests = serve.draw_requests(serve.TINY["requests"], serve.TINY["prompt_len"], serve.TINY["output_len"], 99, 0)
    assert static["output_tokens"] == sum(o for _, o in requests)
    assert static["batches"] == -(-len(requests) // slots) and static["seconds"] > 0
    assert static["tokens_per_s"] == pytest.approx(static["output_tokens"] / static["seconds"])
    assert static["of_step"] == pytest.approx(static["tokens_per_s"] / step["tokens_per_s"])


def test_rates_rows(tiny_run):
    rows = tiny_run["tables"]["rates"]
    t = serve.TINY
    assert [r["rate"] for r in rows] == [50.0, "inf", "saturated"]
    requests = serve.draw_requests(t["requests"], t["prompt_len"], t["output_len"], 99, 0)
    expected = [sum(o for _, o in requests)] * 2 + [t["slots"] * 2 * t["output_len"][1]]
    assert [r["output_tokens"] for r in rows] == expected  # every request produced exactly its length
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["span_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert 0 <= r["itl_p50_s"] <= r["itl_p99_s"]
        assert 1 <= r["mean_batch"] <= t["slots"] and r["decode_steps"] > 0
    saturated = rows[-1]
    assert saturated["full_tokens_per_s"] > 0 and saturated["of_step"] > 0 and saturated["of_static"] > 0
    static = tiny_run["tables"]["static"][0]["tokens_per_s"]
    assert saturated["of_static"] == pytest.approx(saturated["full_tokens_per_s"] / static)


def test_prefix_cache_rows(tiny_run):
    off, on = tiny_run["tables"]["prefix"]
    t = serve.TINY
    assert (off["cache"], on["cache"]) == ("off", "on")
    assert off["requests"] == on["requests"] == t["prefix_requests"]
    assert off["hits"] == 0 and on["hits"] >= t["prefix_requests"]
    assert on["system_prefilled"] == t["system_tokens"]
    lo, hi = t["suffix_len"]
    assert t["system_tokens"] + lo <= off["prefill_tokens_per_request"] <= t["system_tokens"] + hi
    assert lo <= on["prefill_tokens_per_request"] <= hi  # only the suffix after the cached system prompt
    for r in (off, on):
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
    assert on["speedup"] == pytest.approx(off["ttft_p50_s"] / on["ttft_p50_s"])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--prompt-len", "9", "3"], "--prompt-len"),
        (["--suffix-len", "0", "3"], "--suffix-len"),
        (["--slots", "0"], "--slots"),
        (["--rates", "4", "-1"], "--rates"),
    ],
)
def test_bad_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        serve.main(["--tiny", *argv])
