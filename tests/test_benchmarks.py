"""The benchmark scripts: public API only, and the shared harness's timings, floors and JSON."""

from __future__ import annotations

import ast
import datetime
import importlib
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import pytest

from benchmarks import forms, harness

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _import_problems(path: Path) -> list[str]:
    """Imports of ``tests``, and of private or undocumented ``xlstm_jax`` names, anywhere in a script."""
    tree = ast.parse(path.read_text(), filename=str(path))
    problems, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [(alias.name, alias.asname) for alias in node.names]
            names: list[str] = []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules, names = [(node.module, None)], [alias.name for alias in node.names]
        else:
            continue
        for module, asname in modules:
            root = module.split(".")[0]
            if root == "tests":
                problems.append(f"line {node.lineno}: imports {module}")
            if root != "xlstm_jax":
                continue
            aliases.add(asname or root)
            if any(_private(part) for part in module.split(".")):
                problems.append(f"line {node.lineno}: imports the private module {module}")
            if not names:
                continue
            imported = importlib.import_module(module)
            public = getattr(imported, "__all__", None)
            for name in names:
                package = hasattr(imported, "__path__")
                submodule = package and importlib.util.find_spec(f"{module}.{name}") is not None
                if _private(name) or (public is not None and name not in public and not submodule):
                    problems.append(f"line {node.lineno}: imports {name} from {module}, not in its __all__")
    for node in ast.walk(tree):  # xlstm_jax.<...>._name through a module alias
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                problems.append(f"line {node.lineno}: uses the private name {node.attr}")
    return problems


def test_scripts_are_found():
    expected = {"harness.py", "forms.py", "kernels.py", "step_trace.py", "generate.py", "anchors.py"}
    assert {p.name for p in SCRIPTS} >= expected


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_imports_public_api_only(path):
    assert _import_problems(path) == []


def test_import_check_catches_what_it_forbids(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import tests.numerics\n"
        "from tests.numerics import TOL\n"
        "import xlstm_jax.mlstm.recurrent as rec\n"
        "from xlstm_jax.generation import _prefill, generate\n"
        "from xlstm_jax.mlstm import log_forget_gate\n"
        "def f():\n"
        "    from xlstm_jax.kernels.recurrent_step_mosaic import load_ref\n"
        "    return rec._checkpointed_scan\n"
    )
    problems = _import_problems(bad)
    assert len(problems) == 6, problems
    for needle in ("tests.numerics", "_prefill", "log_forget_gate", "load_ref", "_checkpointed_scan"):
        assert any(needle in p for p in problems), (needle, problems)


def test_harness_writes_the_run_as_strict_json(tmp_path):
    path = tmp_path / "out" / "run.json"
    argv = ["--S", "16", "--json", str(path)]
    report = harness.Report("tiny", "benchmarks/tiny.py", {"S": 16}, path, argv)
    report.set("ceilings", {"copy_bytes_per_s": 1e9})
    x = jax.random.normal(jax.random.key(0), (64, 64), jnp.float32)
    timing = harness.time_jitted(jax.jit(lambda x: x @ x), x, repeats=3, calls=2)
    looped = harness.time_loop(lambda c: c * 0.5 + 1.0, jnp.ones((8,)), 5, repeats=2)
    report.table("t", [harness.Column("name", "name"), harness.Column("us", "median_s", ".1f", 1e6)])
    report.add("t", {"name": "matmul", **timing.as_row(), "nan": float("nan")})
    report.add("t", {"name": "loop", **looped.as_row()})

    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    env = data["environment"]
    assert data["benchmark"] == "tiny" and data["settings"] == {"S": 16}
    assert data["ceilings"] == {"copy_bytes_per_s": 1e9}
    assert datetime.datetime.fromisoformat(env["date"]).tzinfo is not None
    assert env["platform"] == jax.default_backend() and env["device"] == jax.devices()[0].device_kind
    assert env["jax"] == jax.__version__ and env["jaxlib"] == jaxlib.__version__
    assert env["command"] == "PYTHONPATH=. python3 benchmarks/tiny.py --S 16 --json " + str(path)
    assert env["argv"] == argv
    assert env["host"]["cpus"] == os.cpu_count() and env["host"]["python_loop_ms"] > 0
    assert env["host"]["cpu"] is None or isinstance(env["host"]["cpu"], str)
    matmul, loop = data["tables"]["t"]
    assert matmul["nan"] is None
    assert matmul["repeats"] == 3 and matmul["units"] == 2 and len(matmul["samples_s"]) == 3
    assert matmul["min_s"] <= matmul["median_s"] <= matmul["max_s"] and matmul["min_s"] > 0
    assert math.isclose(matmul["spread"], (matmul["max_s"] - matmul["min_s"]) / matmul["median_s"])
    assert matmul["compile_s"] > 0 and matmul["warmup_s"] > 0
    assert loop["units"] == 5 and loop["repeats"] == 2 and loop["compile_s"] > 0


def test_time_jitted_feeds_each_result_back_when_carrying():
    seen = []

    def step(c, x):
        seen.append(int(c))
        return (c + x,)

    timing = harness.time_jitted(step, jnp.int32(0), jnp.int32(1), repeats=2, warmup=1, calls=3, carry=True)
    assert seen == list(range(7))  # 1 warm-up call, then 2 samples of 3 calls, each from the last result
    assert timing.compile_s is None and timing.units == 3


def test_time_jitted_enters_the_monitor_around_the_timed_samples_only():
    calls, inside = [], []

    class Monitor:
        def __enter__(self):
            inside.append(len(calls))

        def __exit__(self, *exc):
            inside.append(len(calls))

    harness.time_jitted(lambda: calls.append(1), repeats=3, warmup=2, calls=2, monitor=Monitor())
    assert inside == [2, 8]  # entered after the 2 warm-up calls, left after 3 samples of 2 calls


def test_gpu_sample_stats_skips_what_does_not_parse():
    lines = ["1980, 512.25, 61", "[N/A], 400.00, 60", "", "1755, 699.50, 66", "1830, 650.00, 64", "garbage"]
    stats = harness.gpu_sample_stats(lines)
    assert stats == {
        "gpu_samples": 3,
        "gpu_sm_mhz_median": 1830.0,
        "gpu_sm_mhz_min": 1755.0,
        "gpu_sm_mhz_max": 1980.0,
        "gpu_power_w_median": 650.0,
        "gpu_power_w_max": 699.5,
        "gpu_temp_c_max": 66.0,
    }
    assert harness.gpu_sample_stats(["[N/A], [N/A], [N/A]"]) == {}


def test_gpu_monitor_reads_a_sampling_process_until_the_block_ends(tmp_path, monkeypatch):
    """GpuMonitor starts nvidia-smi, stops it when the block ends and keeps what it printed. An executable of that
    name on PATH stands in for the tool here (it prints samples until terminated), as no GPU is on a CI machine."""
    tool = tmp_path / "nvidia-smi"
    tool.write_text('#!/bin/sh\necho "$@" > "$0.args"\nwhile true; do echo "1500, 650.5, 70"; sleep 0.01; done\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with harness.GpuMonitor(interval_ms=10, gpu=1) as monitor:
        time.sleep(0.3)
    assert monitor.stats["gpu_samples"] >= 2 and monitor.stats["gpu_sm_mhz_median"] == 1500.0
    assert monitor.stats["gpu_power_w_max"] == 650.5 and monitor.stats["gpu_temp_c_max"] == 70.0
    args = (tmp_path / "nvidia-smi.args").read_text().split()
    query = f"--query-gpu={harness.GpuMonitor.QUERY}"
    assert args == ["--id=1", query, "--format=csv,noheader,nounits", "--loop-ms=10"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi at all: nothing sampled, nothing fails
    with harness.GpuMonitor() as monitor:
        pass
    assert monitor.stats == {}


def test_time_loop_runs_the_body_in_one_loop():
    timing = harness.time_loop(lambda c: (c[0] + 1, c[1] * 2.0), (jnp.int32(0), jnp.float32(1.0)), 7, repeats=1)
    assert timing.units == 7 and timing.median_s > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"repeats": 0}, "repeats"),
        ({"calls": 1.5}, "calls"),
        ({"warmup": -1}, "warmup"),
        ({"iterations": True}, "iterations"),
    ],
)
def test_time_jitted_rejects_bad_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        harness.time_jitted(jax.jit(lambda x: x), jnp.ones(2), **kwargs)


def test_hardware_floor():
    by_bytes = harness.hardware_floor(bytes_moved=4e9, flops=1e12, bandwidth=2e12, flop_rate=1e15)
    assert by_bytes.seconds == 2e-3 and by_bytes.bound == "bytes"
    by_flops = harness.hardware_floor(bytes_moved=4e9, flops=1e13, bandwidth=2e12, flop_rate=1e15)
    assert by_flops.seconds == 1e-2 and by_flops.bound == "flops"
    assert by_flops.fraction(4e-2) == 0.25 and math.isnan(by_flops.fraction(0.0))
    with pytest.raises(ValueError, match="flops=1.0 needs a positive rate"):
        harness.hardware_floor(flops=1.0, bandwidth=1.0)
    with pytest.raises(ValueError, match="bytes_moved must be >= 0"):
        harness.hardware_floor(bytes_moved=-1.0, bandwidth=1.0)


def test_fwdbwd_takes_its_cotangent_as_an_argument():
    """forms.jitted's fwdbwd program gets ``ct`` as its sixth argument, not as an array it closes over: XLA compiles
    a closed-over array into the program as a constant (a gigabyte at the benchmarks' shapes, and a minute of
    compilation). The gradients are those of ``sum(h * ct)``."""
    args = forms.make_args(1, 2, 12, 8, 8, jnp.float32)
    ((form, _),) = forms.forms([8], ["parallel"]).values()
    fn, call_args = forms.jitted(form, "fwdbwd", args)
    assert len(call_args) == 6 and call_args[5].shape == args[2].shape
    (inner,) = (e.params["jaxpr"] for e in jax.make_jaxpr(fn)(*call_args).jaxpr.eqns if "jaxpr" in e.params)
    assert not inner.consts
    expected = jax.jit(jax.grad(lambda *a: jnp.sum(form(*a) * call_args[5]), argnums=(0, 1, 2, 3, 4)))(*args)
    for got, want in zip(fn(*call_args), expected, strict=True):  # the same program: the same numbers
        assert jnp.array_equal(got, want)
    fwd, fwd_args = forms.jitted(form, "fwd", args)
    assert fwd_args == tuple(args) and jnp.array_equal(fwd(*fwd_args), jax.jit(form)(*args))


def test_forms_smoke(tmp_path):
    """forms.py end to end at a tiny shape: every form timed, and each fwd h within its bound of the scan."""
    path = tmp_path / "forms.json"
    args = ["--B", "1", "--NH", "1", "--S", "16", "--DHQK", "16", "--DHV", "16", "--chunk-sizes", "8"]
    forms.main([*args, "--repeats", "1", "--json", str(path)])
    rows = json.loads(path.read_text())["tables"]["forms"]
    assert [(r["form"], r["mode"]) for r in rows] == [
        (form, mode) for mode in ("fwd", "fwdbwd") for form in ("chunkwise L=8", "parallel", "recurrent")
    ]
    assert all(r["median_s"] > 0 and r["floor_s"] > 0 and r["flops"] > 0 for r in rows)
    assert all(r["ok"] and r["rel_err"] <= forms.RMS_BOUND["float32"] for r in rows if r["mode"] == "fwd")


def test_kernels_smoke(tmp_path):
    """kernels.py at tiny shapes, the kernels in interpret mode: each checked against the XLA form."""
    path = tmp_path / "kernels.json"
    kernels = importlib.import_module("benchmarks.kernels")
    argv = ["--batch", "1", "--step-shape", "1", "16", "16", "--queued", "2", "--loop", "2", "--repeats", "1"]
    argv += ["--variants", "xla", "default", "xla-chunkwise", "--seq-shapes", "1,1,16,16,16", "--calls", "1"]
    kernels.main([*argv, "--json", str(path)])
    data = json.loads(path.read_text())
    step = data["tables"]["step"]
    assert [(r["variant"], r["mode"]) for r in step] == [(v, m) for v in ("xla", "default") for m in ("queued", "loop")]
    assert all(r["ok"] and r["err_h"] <= kernels.BOUNDS["step h"] for r in step if r["variant"] == "default")
    assert all(r["bytes"] == 2 * 16 * 17 * 4 + 8 for r in step)  # c, n, m read and written once, float32
    seq = data["tables"]["sequence"]
    assert [r["variant"] for r in seq] == ["xla-scan", "xla-chunkwise", "default"]
    assert all(r["ok"] and r["err"] <= kernels.BOUNDS["sequence h"] for r in seq[1:])


def test_step_trace_smoke(tmp_path):
    path = tmp_path / "step_trace.json"
    step_trace = importlib.import_module("benchmarks.step_trace")
    argv = ["--batch", "1", "--step-shape", "1", "16", "16", "--steps", "2", "--repeats", "1"]
    step_trace.main([*argv, "--variants", "default", "xla_copy", "pallas_copy_64x64_w4", "--json", str(path)])
    rows = json.loads(path.read_text())["tables"]["step_trace"]
    assert [r["variant"] for r in rows] == ["default", "xla_copy", "pallas_copy_64x64_w4"]
    assert rows[0]["ok"] and all(r["units"] == 2 and r["median_s"] > 0 for r in rows)
