"""benchmarks/launches.py: the count of a compiled program's launching operations, and a CPU smoke run."""

from __future__ import annotations

import json

import pytest

from benchmarks import launches
from benchmarks.generate import PRESETS

# An entry computation as XLA prints it for a GPU (lines shortened from an H200 compile of the chunk program):
# two plain fusions (one of them tuple-shaped), an XLA Triton fusion, a Triton GEMM fusion, a cuBLAS call, a
# Mosaic GPU kernel, a Pallas Triton kernel and a copy launch work; the parameters, bitcast, constant,
# get-tuple-element and the root tuple do not.
HLO = "\n".join(
    [
        "HloModule jit_chunk, is_scheduled=true",
        "",
        "%fused_select (p: bf16[64]) -> bf16[64] {",
        "  %p = bf16[64]{0} parameter(0)",
        "  ROOT %n = bf16[64]{0} negate(%p)",
        "}",
        "",
        "ENTRY %main.541 (ids.1: s32[1,64], emb.1: bf16[99,64], w.1: bf16[64,64]) -> (bf16[1,64], f32[8]) {",
        "  %ids.1 = s32[1,64]{1,0} parameter(0), sharding={replicated}",
        "  %emb.1 = bf16[99,64]{1,0} parameter(1)",
        "  %w.1 = bf16[64,64]{1,0} parameter(2)",
        "  %loop_select_fusion = bf16[64,1,64]{2,1,0} fusion(%emb.1, %ids.1), kind=kLoop, calls=%fused_select",
        "  %fusion.3117 = bf16[1,64,64]{2,1,0} fusion(%loop_select_fusion), kind=kCustom, calls=%c.1, "
        'backend_config={"fusion_backend_config":{"kind":"__triton"}}',
        "  %bitcast.1 = bf16[64,64]{1,0} bitcast(%fusion.3117)",
        "  %gemm_fusion_dot.162 = f32[2,64,64]{2,1,0} fusion(%bitcast.1, %w.1), kind=kCustom, calls=%g.1, "
        'backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}',
        "  %custom-call.7 = (bf16[64,64]{1,0}, s8[4194304]{0}) custom-call(%bitcast.1, %w.1), "
        'custom_call_target="__cublas$gemm"',
        "  %constant_469_0 = f32[2]{0} constant({-inf, inf})",
        "  %loop_add_select_fusion = (f32[8]{0}, f32[8,4]{1,0}) fusion(%gemm_fusion_dot.162, %constant_469_0), "
        "kind=kLoop, calls=%fused_select",
        "  %get-tuple-element.3135 = f32[8]{0} get-tuple-element(%loop_add_select_fusion), index=0",
        "  %mpmd_map.96 = (bf16[8,64,512]{2,1,0}, f32[8,256,512]{2,1,0}) custom-call(%bitcast.1), "
        'custom_call_target="mosaic_gpu_v2"',
        '  %triton_call.2 = bf16[64,64]{1,0} custom-call(%bitcast.1), custom_call_target="__gpu$xla.gpu.triton"',
        "  %copy.5 = bf16[1,64]{1,0} copy(%loop_select_fusion)",
        "  ROOT %tuple.9 = (bf16[1,64]{1,0}, f32[8]{0}) tuple(%copy.5, %get-tuple-element.3135)",
        "}",
        "",
    ]
)


def entry(hlo: str) -> list[tuple[str, str]]:
    return [(name, kind) for name, kind, _ in launches.operations(launches.computations(hlo)["ENTRY"])]


def test_entry_operations_name_and_kind_each_launch():
    assert entry(HLO) == [
        ("loop_select_fusion", "fusion"),
        ("fusion.3117", "fusion"),
        ("gemm_fusion_dot.162", "gemm"),
        ("custom-call.7", "gemm"),
        ("loop_add_select_fusion", "fusion"),
        ("mpmd_map.96", "pallas"),
        ("triton_call.2", "pallas"),
        ("copy.5", "other"),
    ]
    assert launches.count_kernels(HLO) == {"kernels": 8, "fusion": 3, "gemm": 2, "pallas": 2, "other": 1, "loops": 0}


# A loop of 4 iterations whose body launches a fusion and a copy, and whose body holds a loop of 3 iterations of
# one fusion; the condition computations launch nothing that is counted.
LOOPS = "\n".join(
    [
        "HloModule jit_loops, is_scheduled=true",
        "",
        "%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
        "  %p = (s32[], f32[8]{0}) parameter(0)",
        "  %x = f32[8]{0} get-tuple-element(%p), index=1",
        "  %f = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_select",
        "  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %f)",
        "}",
        "",
        "%outer_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
        "  %p = (s32[], f32[8]{0}) parameter(0)",
        "  %x = f32[8]{0} get-tuple-element(%p), index=1",
        "  %g = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_select",
        "  %c = f32[8]{0} copy(%g)",
        "  %w = (s32[], f32[8]{0}) while(%p), condition=%cond, body=%inner_body, "
        'backend_config={"known_trip_count":{"n":"3"}}',
        "  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %c)",
        "}",
        "",
        "ENTRY %main (x: f32[8]) -> f32[8] {",
        "  %x = f32[8]{0} parameter(0)",
        "  %e = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_select",
        "  %w.8 = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%outer_body, "
        'backend_config={"known_trip_count":{"n":"4"}}',
        "  ROOT %r = f32[8]{0} get-tuple-element(%w.8), index=1",
        "}",
        "",
    ]
)


def test_count_kernels_runs_each_loop_body_its_trip_count():
    # entry 1 fusion; 4 x (1 fusion + 1 copy + 3 x 1 fusion) = 16 fusions and 4 copies; 4 + 12 iterations
    assert launches.count_kernels(LOOPS) == {
        "kernels": 21,
        "fusion": 17,
        "gemm": 0,
        "pallas": 0,
        "other": 4,
        "loops": 16,
    }
    with pytest.raises(ValueError, match="unknown trip count"):
        launches.count_kernels(LOOPS.replace('backend_config={"known_trip_count":{"n":"3"}}', ""))


def test_entry_operations_refuses_text_without_an_entry():
    with pytest.raises(ValueError, match="no ENTRY computation"):
        launches.computations(HLO.replace("ENTRY ", ""))


def test_cpu_smoke_run(tmp_path):
    """The tiny model's chunk programs compiled for the CPU: a row per length and scores setting whose kinds add
    up to its kernels (on a CPU the kernel backend runs the XLA form: both settings compile the same program)."""
    path = tmp_path / "launches.json"
    argv = ["--device", "cpu", "--preset", "tiny", "--tokens", "5", "16", "--cells", "2x70", "--json", str(path)]
    launches.main(argv)
    tables = json.loads(path.read_text())["tables"]
    rows = tables["chunks"]
    assert [(r["tokens"], r["scores"]) for r in rows] == [
        (t, s) for t in (5, 16) for s in ("auto", "in_kernel", "precomputed", "kernel")
    ]
    layers = PRESETS["tiny"]().num_blocks
    for row in rows:
        assert row["kernels"] == sum(row[kind] for kind in launches.KINDS) > layers
        assert row["per_layer"] == pytest.approx(row["kernels"] / layers)
    assert len({r["kernels"] for r in rows if r["tokens"] == 16}) == 1
    cells = tables["cell"]
    assert [(r["B"], r["S"], r["pass"]) for r in cells] == [(2, 70, "fwd"), (2, 70, "fwd+bwd")]
    assert all(r["kernels"] == sum(r[kind] for kind in launches.KINDS) > 0 for r in cells)
    assert cells[1]["kernels"] > cells[0]["kernels"]  # the backward launches more
