"""benchmarks/norms.py in its CPU smoke mode: each call timed by XLA and both kernels (interpreted), checked."""

from __future__ import annotations

import json

import jax
import pytest

from benchmarks import norms
from benchmarks.harness import NOMINAL_H200
from xlstm_jax.kernels.mosaic import mosaic_interpret_params

MOSAIC = mosaic_interpret_params() is not None
VARIANTS = ("xla", "triton", "mosaic") if MOSAIC else ("xla", "triton")
M = 3


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("norms") / "norms.json"
    norms.main(["--smoke", "--ceilings", "nominal", "--json", str(path)])
    return json.loads(path.read_text())


def _expected_bytes(op: str, shapes: dict) -> int:
    """The floor's bytes, counted here from the shapes the run recorded (the module docstring's table)."""
    D, NH, DHQK, DHV, G = shapes["D"], shapes["NH"], shapes["DHQK"], shapes["DHV"], shapes["G"]
    b = bw = 2  # bfloat16 activations and weights
    if op == "mlstm_norm":
        return 3 * M * D * b + D * bw + (D * G + G) * bw + M * G * 4
    if op == "ffn_norm":
        return 5 * M * D * b + D * bw
    BH, P = M * NH, 2  # the Triton step splits DHQK=128 in two below the Mosaic step's threshold
    return BH * P * (DHV + 1) * 4 + 2 * BH * 4 + 2 * BH * DHQK * 4 + 2 * M * NH * DHV * b + NH * DHV * bw


def test_smoke_rows_times_and_floors(smoke):
    rows = smoke["tables"]["norms"]
    assert [(r["op"], r["M"], r["variant"]) for r in rows] == [(op, M, v) for op in norms.OPS for v in VARIANTS]
    shapes = smoke["shapes"]
    assert (shapes["D"], shapes["NH"], shapes["DHQK"], shapes["DHV"], shapes["G"]) == (256, 2, 128, 128, 4)
    for row in rows:
        assert row["median_s"] > 0 and row["compile_s"] > 0 and row["units"] == 2 and row["repeats"] == 1
        assert row["bytes"] == _expected_bytes(row["op"], shapes)
        assert row["floor_s"] == pytest.approx(row["bytes"] / NOMINAL_H200.copy_bytes_per_s)
        assert row["x_floor"] == pytest.approx(row["median_s"] / row["floor_s"])
    head = [r for r in rows if r["op"] == "head_readout"]
    assert all((r["h_form"], r["P"]) == ("partial", 2) for r in head)
    for op in norms.OPS:
        t = {r["variant"]: r["median_s"] for r in rows if r["op"] == op}
        by = {r["variant"]: r for r in rows if r["op"] == op}
        assert all(by[v]["xla_over_this"] == pytest.approx(t["xla"] / t[v]) for v in VARIANTS)
        if MOSAIC:
            assert by["mosaic"]["mosaic_over_triton"] == pytest.approx(t["mosaic"] / t["triton"])
    if not MOSAIC:
        assert any("mosaic: skipped" in note for note in smoke["notes"])


def test_smoke_checks_every_kernel_against_xla(smoke):
    outputs = {"mlstm_norm": ("y", "g"), "ffn_norm": ("s", "y"), "head_readout": ("y", "nm")}
    for row in smoke["tables"]["norms"]:
        if row["variant"] == "xla":
            assert "ok" not in row  # the reference itself
            continue
        names = outputs[row["op"]]
        assert set(row["bounds"]) == set(names) and row["ok"] is True
        for name in names:
            assert row["bounds"][name] == norms.BOUNDS[name]["bfloat16"]
            assert 0 <= row[f"err_{name}"] <= row["bounds"][name]
        if row["op"] == "head_readout":
            assert row["err_nm"] == 0.0  # n', m' copied into the stacks exactly


def test_head_input_forms():
    shapes = norms.Shapes.from_config(norms.model_config(False))  # xLSTM-7B: DHQK=256 in 4 splits on the step
    assert [norms.head_partial_splits(M, shapes, "model") for M in (1, 16, 31, 32, 128, 8192)] == [4, 4, 4, 0, 0, 0]
    assert norms.head_partial_splits(128, shapes, "partial") == 4 and norms.head_partial_splits(1, shapes, "h") == 0


def test_head_readout_from_h_matches_xla():
    """The read-out's other input form (h from the Mosaic step), Triton kernel against XLA."""
    shapes = norms.Shapes.from_config(norms.model_config(True))
    case = norms.make_case("head_readout", 1, shapes, "bfloat16", "h", seed=0)
    assert case.facts == {"h_form": "h", "P": None} and case.inputs[0].shape == (2, 128)
    ref, out = (jax.jit(norms.call_fn(case, v, shapes, True))(*case.inputs) for v in ("xla", "triton"))
    row = norms.errors(case, ref, out, "bfloat16")
    assert row["ok"] is True and row["err_nm"] == 0.0 and row["bounds"]["y"] == norms.BOUNDS["y"]["bfloat16"]


@pytest.mark.parametrize("argv", [["--rows", "0"], ["--loop", "0"], ["--ops", "nope"], ["--dtype", "int8"]])
def test_bad_options_are_refused(argv):
    with pytest.raises(SystemExit):
        norms.parse(argv)
