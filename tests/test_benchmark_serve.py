"""benchmarks/serve.py end to end with --tiny on the CPU: every table present, with consistent values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import serve
from xlstm_jax.serving.engine import stable_scratch_supported

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "serve.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "benchmarks/serve.py", "--tiny", "--prefill-rows", "4", "1", "--json", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(path.read_text())


def _requests():
    t = serve.TINY
    return serve.draw_requests(t["requests"], t["prompt_len"], t["output_len"], 99, 0)  # the tiny vocabulary


def test_every_table_is_written(tiny_run):
    assert set(tiny_run["tables"]) == {"step", "saturated", "prefix", "chunks", "static", "rates"}
    assert tiny_run["settings"]["tiny"] and tiny_run["model"]["preset"] == "tiny"
    targets = {"saturated_of_step", "saturated_of_engine_step", "saturated_of_static", "prefix_ttft_speedup", "wanted"}
    assert set(tiny_run["targets"]) == targets
    # each program compiled once: the two engines share theirs, generate's step timing and static batches share
    assert tiny_run["engine_compilations"] == {
        "decode_step": 1,
        "load_chunk": 4,  # a request alone in 16 or 32 tokens; 2 and 4 requests (--prefill-rows) in 32
        "prefill_chunk": 4,  # 32 tokens in 1, 2 and 4 rows; 16 in 1 (short_chunk_command_buffers)
        "prefill_short_chunk": 1,  # a request alone in 16
        "prefill_chunk_stable": 4 if stable_scratch_supported() else 0,  # the same four, where XLA has the mode
        "split_chunk": 3,  # 1, 2 and 4 rows
        "first_token": 1,
        "insert": 1,
        "extract": 1,
    }
    assert tiny_run["generate_compilations"] == {"prefill": 1, "decode_loop": 1}
    phases = tiny_run["phases"]
    parts = ["params", "engine_warmup", "engine_step", "saturated", "prefix", "generate_step", "static", "rates"]
    assert set(phases) == {*parts, "elapsed"} and all(phases[p] >= 0 for p in parts)
    assert sum(phases[p] for p in parts) == pytest.approx(phases["elapsed"], rel=0.05)
    assert "notes" not in tiny_run  # no rate was skipped


def test_step_rows(tiny_run):
    rows = tiny_run["tables"]["step"]
    slots = serve.TINY["slots"]
    assert [r["program"] for r in rows] == ["engine", "engine+sync", "generate"]
    for r in rows:
        assert r["batch"] == slots and r["ms_per_step"] > 0
        assert r["tokens_per_s"] == pytest.approx(slots / (r["ms_per_step"] / 1e3))
    assert rows[0]["steps"] == rows[1]["steps"] == serve.TINY["engine_steps"]
    assert rows[2]["tokens"] == [129, 256]  # N/2 + 1 and N, N the token buffer of the longest output


def test_saturated_and_static(tiny_run):
    t = serve.TINY
    (sat,) = tiny_run["tables"]["saturated"]
    assert sat["requests"] == t["slots"] and sat["output_tokens"] == t["slots"] * 2 * t["output_len"][1]
    assert sat["full_tokens_per_s"] > 0 and 1 <= sat["mean_batch"] <= t["slots"]
    engine, _, generate = tiny_run["tables"]["step"]
    assert sat["of_engine_step"] == pytest.approx(sat["full_tokens_per_s"] / engine["tokens_per_s"])
    (static,) = tiny_run["tables"]["static"]
    requests = _requests()
    assert static["output_tokens"] == sum(o for _, o in requests)
    assert static["batches"] == -(-len(requests) // t["slots"]) and static["seconds"] > 0
    assert static["tokens_per_s"] == pytest.approx(static["output_tokens"] / static["seconds"])
    targets = tiny_run["targets"]
    assert targets["saturated_of_engine_step"] == sat["of_engine_step"]
    assert targets["saturated_of_step"] == pytest.approx(sat["full_tokens_per_s"] / generate["tokens_per_s"])
    assert targets["saturated_of_static"] == pytest.approx(sat["full_tokens_per_s"] / static["tokens_per_s"])


def test_rates_rows(tiny_run):
    rows = tiny_run["tables"]["rates"]
    t = serve.TINY
    assert [(r["rate"], r["prefill_rows"]) for r in rows] == [(50.0, 4), ("inf", 4), (50.0, 1), ("inf", 1)]
    assert [r["output_tokens"] for r in rows] == [sum(o for _, o in _requests())] * 4  # each produced its length
    step = tiny_run["tables"]["step"][2]["tokens_per_s"]
    static = tiny_run["tables"]["static"][0]["tokens_per_s"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["span_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert 0 <= r["itl_p50_s"] <= r["itl_p99_s"]
        assert 1 <= r["mean_batch"] <= t["slots"] and r["decode_steps"] > 0
        assert r["of_step"] == pytest.approx(r["tokens_per_s"] / step)
        assert r["of_static"] == pytest.approx(r["tokens_per_s"] / static)


def test_prefix_cache_rows(tiny_run):
    rows = tiny_run["tables"]["prefix"]
    labels = ["off", "on"]
    if stable_scratch_supported():
        labels += ["off, stable scratch", "on, stable scratch"]
    labels += ["on, 32", "on, switch 5 ms", "on, short chunks as command buffers"]
    assert [r["cache"] for r in rows] == labels
    t = serve.TINY
    lo, hi = t["suffix_len"]
    assert {r["requests"] for r in rows} == {t["prefix_requests"]}
    offs = {}
    for r in rows:
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert 0 < r["engine_ttft_mean_s"] <= r["ttft_p99_s"]  # the engine's own clock: submit to the token sent
        stable = "stable scratch" in r["cache"]
        if r["cache"].startswith("off"):
            offs[stable] = r  # the uncached row the cached rows of the same build are set against
            assert (
                r["hits"] == 0 and t["system_tokens"] + lo <= r["prefill_tokens_per_request"] <= t["system_tokens"] + hi
            )
            continue
        assert r["hits"] >= t["prefix_requests"] and r["system_prefilled"] == t["system_tokens"]
        assert lo <= r["prefill_tokens_per_request"] <= hi  # only the suffix after the cached system prompt
        assert r["speedup"] == pytest.approx(offs[stable]["ttft_p50_s"] / r["ttft_p50_s"])
    assert tiny_run["targets"]["prefix_ttft_speedup"] == rows[1]["speedup"]
    chunks = tiny_run["tables"]["chunks"]
    assert [c["tokens"] for c in chunks] == [16, 32] and all(c["ms"] > 0 and c["spread"] >= 0 for c in chunks)
    for c in chunks:  # no GPU stream in a CPU's trace: the device columns are empty
        assert (c["kernel_ms"], c["kernels"], c["busy"]) == (None, None, None)
        assert 0 < c["program_ms"] < c["ms"] * 10


def test_parts_run_alone():
    before = sys.getswitchinterval()
    data = serve.main(["--tiny", "--parts", "prefix", "--prefix-requests", "1", "--switch-interval-ms", "2"])
    assert sys.getswitchinterval() == before  # the run's interval is undone
    assert data["settings"]["switch_interval_ms"] == 2
    assert set(data["tables"]) == {"prefix", "chunks"}
    assert set(data["phases"]) == {"params", "engine_warmup", "prefix", "elapsed"}
    with pytest.raises(SystemExit):  # the rates' estimate and ratios need the saturated row, generate and static
        serve.main(["--tiny", "--parts", "rates"])


def test_stable_scratch_build_runs_its_two_prefix_rows():
    argv = ["--tiny", "--parts", "prefix", "--prefix-requests", "1", "--stable-scratch"]
    if not stable_scratch_supported():  # refused by the parser, naming the flag, before any compilation
        with pytest.raises(SystemExit):
            serve.main(argv)
        return
    rows = serve.main(argv)["tables"]["prefix"]
    assert [r["cache"] for r in rows] == ["off, stable scratch", "on, stable scratch"]
    assert rows[1]["speedup"] == pytest.approx(rows[0]["ttft_p50_s"] / rows[1]["ttft_p50_s"])


def test_spent_budget_skips_the_rates_with_notes():
    data = serve.main(["--tiny", "--budget-s", "0.001", "--rates", "50", "inf", "--prefix-requests", "1"])
    assert data["tables"]["rates"] == []
    assert [n.split(":")[0] for n in data["notes"]] == ["rates 50.0, prefill rows 4", "rates inf, prefill rows 4"]
    assert all("--budget-s" in n for n in data["notes"])
    prefix_rows = 7 if stable_scratch_supported() else 5
    assert data["tables"]["saturated"] and data["tables"]["static"] and len(data["tables"]["prefix"]) == prefix_rows
    assert data["targets"]["saturated_of_static"] is not None


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--prompt-len", "9", "3"], "--prompt-len"),
        (["--suffix-len", "0", "3"], "--suffix-len"),
        (["--slots", "0"], "--slots"),
        (["--prefill-rows", "4", "0"], "--prefill-rows"),
        (["--engine-steps", "0"], "--engine-steps"),
        (["--rates", "4", "-1"], "--rates"),
        (["--budget-s", "0"], "--budget-s"),
    ],
)
def test_bad_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        serve.main(["--tiny", *argv])
