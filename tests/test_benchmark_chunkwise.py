"""benchmarks/chunkwise.py in its CPU smoke mode: the kernel interpreted, TFLA rows read back, the tiny prefill."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest

from benchmarks import chunkwise
from benchmarks.forms import RMS_BOUND, floor_counts
from benchmarks.harness import NOMINAL_H200


def _anchors_json(path, NH, median_s):
    """A file in anchors.py's format (settings, table ``forms``) with one TFLA row at B=1, S=128, fwd."""
    row = {"form": "tfla L=128", "S": 128, "mode": "fwd", "L": 128, "median_s": median_s, "spread": 0.1}
    data = {"settings": {"B": 1, "NH": NH, "DHQK": 64, "DHV": 64}, "anchors": {"torch": "x"},
            "tables": {"forms": [row], "checks": []}}  # fmt: skip
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run (fwd only, nominal ceilings) with a TFLA file that matches and one that does not."""
    tmp = tmp_path_factory.mktemp("chunkwise")
    good, other = _anchors_json(tmp / "good.json", 1, 2.5e-3), _anchors_json(tmp / "other.json", 4, 1.0)
    argv = ["--smoke", "--modes", "fwd", "--ceilings", "nominal", "--tfla-json", str(good), str(other)]
    chunkwise.main([*argv, "--json", str(tmp / "out.json")])
    return json.loads((tmp / "out.json").read_text())


def test_smoke_rows_rates_and_ratios(smoke):
    rows = smoke["tables"]["chunkwise"]
    assert [(r["form"], r["kind"]) for r in rows] == [("tfla L=128", "tfla"), ("xla L=32", "xla"),
                                                      ("mosaic bdhv=32", "mosaic")]  # fmt: skip
    tfla, xla, kernel = rows
    assert all((r["B"], r["S"], r["mode"]) == (1, 128, "fwd") for r in rows)
    for row in rows:
        flops, nbytes = floor_counts(1, 1, 128, 64, 64, row["L"], 2, "fwd")
        assert (row["flops"], row["bytes"]) == (flops, nbytes) and row["median_s"] > 0
        assert row["matmul_fraction"] == pytest.approx(flops / row["median_s"] / NOMINAL_H200.matmul_flops_per_s)
        assert row["tokens_per_s"] == pytest.approx(128 / row["median_s"])
    assert kernel["L"] == 64 and xla["L"] == 32 and tfla["median_s"] == 2.5e-3
    assert kernel["t_over_tfla"] == pytest.approx(kernel["median_s"] / 2.5e-3)
    assert kernel["t_over_xla"] == pytest.approx(kernel["median_s"] / xla["median_s"])
    assert xla["compile_s"] > 0 and kernel["compile_s"] > 0 and kernel["repeats"] == 2


def test_fwdbwd_rows_check_the_gradients(tmp_path):
    """fwdbwd with both backwards, the Mosaic one with one and two warpgroups: one row each, each checked against
    the XLA form's gradients (relative RMS, largest element, and two calls compared element by element)."""
    argv = ["--smoke", "--modes", "fwdbwd", "--ceilings", "nominal", "--tfla", "skip", "--prefill-tokens"]
    chunkwise.main([*argv, "--backward-consumers", "1", "2", "--json", str(tmp_path / "out.json")])
    rows = json.loads((tmp_path / "out.json").read_text())["tables"]["chunkwise"]
    assert [r["form"] for r in rows] == [
        "xla L=32",
        "mosaic bdhv=32 bw=xla",
        "mosaic bdhv=32 bw=mosaic bwg=1",
        "mosaic bdhv=32 bw=mosaic bwg=2",
    ]
    assert [r.get("backward_consumers") for r in rows] == [None, 1, 1, 2]
    for row in rows[1:]:
        assert 0 < row["rel_err"] <= row["bound"] and 0 < row["max_err"] <= row["max_bound"] == chunkwise.GRAD_MAX_BOUND
        assert row["nondeterministic"] == 0 and row["ok"] is True


def test_scan_block_variants_are_labelled_and_passed_on():
    """``--scan-block-dhv 32 64`` makes one ``bw=mosaic`` variant per scan block (``sbd=`` in the label, the value
    passed as ``backward_scan_block_dhv``); ``bw=xla`` variants have none."""
    variants, skipped = chunkwise.kernel_variants(
        chunkwise.parse(["--block-dhv", "32", "--consumers", "2", "--scan-block-dhv", "32", "64"])
    )
    assert skipped == []
    assert {name: v["backward_scan_block_dhv"] for name, v in variants.items()} == {
        "mosaic bdhv=32 wg=2 bw=xla": None,
        "mosaic bdhv=32 wg=2 bw=mosaic sbd=32": 32,
        "mosaic bdhv=32 wg=2 bw=mosaic sbd=64": 64,
    }


def test_cluster_variants_resolve_auto_to_the_librarys_pick():
    """``--cluster`` defaults to ``auto``: each variant runs ``auto_cluster``'s pick for its tiling (2 where it
    divides a head's column programs, 1 in the interpreter), named in the row; explicit values are labelled
    ``cl=`` and passed on, and a cluster that does not divide the programs is a note, not a row."""
    base = ["--DHQK", "256", "--DHV", "512", "--consumers", "1", "--backward", "mosaic"]
    variants, skipped = chunkwise.kernel_variants(chunkwise.parse([*base, "--block-dhv", "32", "64"]))
    assert skipped == []
    assert {n: v["cluster"] for n, v in variants.items()} == {
        "mosaic bdhv=32 bw=mosaic": 2,
        "mosaic bdhv=64 bw=mosaic": 2,
    }
    interpreted = chunkwise.kernel_variants(chunkwise.parse([*base, "--block-dhv", "64", "--interpret"]))[0]
    assert [v["cluster"] for v in interpreted.values()] == [1]
    argv = ["--DHQK", "64", "--DHV", "128", "--block-dhv", "64", "--consumers", "1", "--backward", "xla"]
    argv += ["--cluster", "1", "4", "auto"]
    variants, skipped = chunkwise.kernel_variants(chunkwise.parse(argv))
    assert [(n, v["cluster"]) for n, v in variants.items()] == [("mosaic bdhv=64 cl=1", 1), ("mosaic bdhv=64 cl=2", 2)]
    assert len(skipped) == 1 and "cl=4" in skipped[0] and "cluster=4 must divide the 2 programs" in skipped[0]


def test_split_rows_name_the_split_they_ran(tmp_path):
    """``--split 1 2 3 auto``: one row per split, labelled ``sp=``, each checked against the XLA form, with the
    split the call ran in the row (``auto``: ``auto_split``'s pick, 1 at this shape); a split that does not divide
    the shape's chunks is a note, not a row."""
    argv = ["--smoke", "--modes", "fwd", "--ceilings", "nominal", "--tfla", "skip", "--prefill-tokens"]
    argv += ["--shapes", "1x256", "--split", "1", "2", "3", "auto", "--json", str(tmp_path / "out.json")]
    chunkwise.main(argv)
    data = json.loads((tmp_path / "out.json").read_text())
    rows = data["tables"]["chunkwise"]
    assert [(r["form"], r.get("split")) for r in rows] == [
        ("xla L=32", None),
        ("mosaic bdhv=32 sp=1", 1),
        ("mosaic bdhv=32 sp=2", 2),
        ("mosaic bdhv=32 sp=auto", 1),
    ]
    assert all(0 < r["rel_err"] <= r["bound"] and r["ok"] is True for r in rows[1:])
    (note,) = [n for n in data["notes"] if "sp=3" in n]
    assert "left out, split=3 must be None or a positive integer dividing the sequence's 4 chunks" in note


def test_scores_variants_are_rows_of_their_own(tmp_path):
    """``--scores in_kernel precomputed``: one fwd row per variant, labelled ``sc=``, each checked against the XLA
    form; a variant that does not fit in shared memory at the head shape is a note, not a row."""
    argv = ["--smoke", "--modes", "fwd", "--ceilings", "nominal", "--tfla", "skip", "--prefill-tokens"]
    chunkwise.main([*argv, "--scores", "in_kernel", "precomputed", "--json", str(tmp_path / "out.json")])
    rows = json.loads((tmp_path / "out.json").read_text())["tables"]["chunkwise"]
    assert [(r["form"], r.get("scores")) for r in rows] == [
        ("xla L=32", None),
        ("mosaic bdhv=32 sc=in_kernel", "in_kernel"),
        ("mosaic bdhv=32 sc=precomputed", "precomputed"),
    ]
    assert all(0 < r["rel_err"] <= r["bound"] and r["ok"] is True for r in rows[1:])
    args = chunkwise.parse(["--DHQK", "256", "--DHV", "512", "--block-dhv", "64", "--consumers", "2",
                            "--scores", "precomputed"])  # fmt: skip
    variants, skipped = chunkwise.kernel_variants(args)
    assert variants == {} and len(skipped) == 2  # bw=xla and bw=mosaic
    assert all("bdhv=64 wg=2 sc=precomputed" in note and "KiB of shared memory" in note for note in skipped)


def test_smoke_checks_the_kernel_against_the_xla_form(smoke):
    kernel = smoke["tables"]["chunkwise"][-1]
    assert kernel["bound"] == RMS_BOUND["bfloat16"] and kernel["check_stride"] == 1
    assert 0 < kernel["rel_err"] <= kernel["bound"] and kernel["ok"] is True


def test_smoke_reads_only_matching_tfla_files_and_times_the_prefill(smoke):
    assert smoke["tfla"]["rows"] == 1 and smoke["tfla"]["status"] == "read from 2 file(s)"
    assert [run["B"] for run in smoke["tfla"]["runs"]] == [1]
    (ignored,) = smoke["tfla"]["ignored"]
    assert "other.json" in ignored and "(4, 64, 64)" in ignored
    (row,) = smoke["tables"]["prefill"]
    assert (row["backend"], row["B"], row["S"]) == ("chunkwise chunk_size=256", 1, 64)
    assert row["tokens_per_s"] == pytest.approx(64 / row["median_s"]) and row["flops"] > 0
    assert smoke["model"]["preset"] == "tiny" and smoke["ceilings"]["source"] == "nominal"


def test_prefill_rows_per_blocks_layout(tmp_path):
    """``--prefill-blocks scan unrolled``: a prefill row per layout and backend, the unrolled ones labelled so."""
    argv = ["--smoke", "--modes", "fwd", "--ceilings", "nominal", "--tfla", "skip"]
    argv += ["--budget-s", "600", "--prefill-reserve-s", "600"]  # the whole budget kept for the prefill: no kernel rows
    argv += ["--prefill-blocks", "scan", "unrolled", "--json", str(tmp_path / "out.json")]
    chunkwise.main(argv)
    rows = json.loads((tmp_path / "out.json").read_text())["tables"]["prefill"]
    assert [row["backend"] for row in rows] == ["chunkwise chunk_size=256", "chunkwise chunk_size=256 unrolled"]
    assert all(row["tokens_per_s"] > 0 for row in rows)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed: TFLA would run")
def test_tfla_is_skipped_without_torch(tmp_path):
    args = chunkwise.parse(["--smoke"])
    status, paths = chunkwise.run_tfla(args, tmp_path, 10.0)
    assert status.startswith("skipped: torch") and paths == []
    (argv,) = chunkwise.tfla_argv(args, tmp_path)  # what the subprocess would get: one run for B=1
    assert argv[:4] == ["--part", "seq", "--B", "1"] and argv[argv.index("--S") + 1] == "128"


@pytest.mark.parametrize(
    ("option", "value"),
    [("--shapes", "8"), ("--shapes", "0x128"), ("--block-dhv", "16"), ("--cluster", "3"), ("--split", "0"),
     ("--prefill-backends", "nope"), ("--prefill-backends", "chunkwise:chunk_size"),
     ("--prefill-backends", "chunkwise:bogus=1")],
)  # fmt: skip
def test_bad_options_are_refused(option, value):
    with pytest.raises(SystemExit):
        chunkwise.parse([option, value])


def test_option_parsers():
    assert chunkwise.shape("4x16384") == (4, 16384)
    assert chunkwise.prefill_backend("chunkwise:chunk_size=64") == ("chunkwise", (("chunk_size", 64),))
    with pytest.raises(argparse.ArgumentTypeError, match="BxS"):
        chunkwise.shape("4x")


def test_a_backward_that_would_be_the_xla_forms_is_not_a_mosaic_row():
    """A ``bw=mosaic`` variant whose gradient the Mosaic backward cannot take (DHQK=512: dq's accumulator would
    not fit the registers) is a note, not a row timing the XLA form's backward under the Mosaic label."""
    argv = ["--DHQK", "512", "--DHV", "512", "--depth", "1", "--block-dhv", "32", "--consumers", "1"]
    variants, skipped = chunkwise.kernel_variants(chunkwise.parse([*argv, "--backward", "xla", "mosaic"]))
    assert list(variants) == ["mosaic bdhv=32 d=1 bw=xla"]
    assert len(skipped) == 1 and "bw=mosaic" in skipped[0] and "DHQK=512" in skipped[0]
    fwd_only = chunkwise.parse([*argv, "--modes", "fwd", "--backward", "mosaic"])
    assert list(chunkwise.kernel_variants(fwd_only)[0]) == ["mosaic bdhv=32 d=1 bw=mosaic"]  # its forward runs


def test_trace_splits_the_mosaic_kernels_from_the_rest(tmp_path, capsys):
    """``--trace``: a row traced on a GPU gets the Mosaic kernels' summed time apart from the others' and keeps its
    costliest kernels; on a CPU (no GPU stream in the trace) the rows carry no trace fields."""
    top = [(900.0, 1.0, "mlstm_chunkwise_mosaic"), (300.0, 2.0, "fusion_3")]
    top += [(50.0, 1.0, "mlstm_state_scan_mosaic_reverse")]
    top += [(1.0, 1.0, f"fusion_{j}") for j in range(20)]
    row = {"trace_top": top, "trace_kernel_us": sum(us for us, _, _ in top)}
    chunkwise.split_trace(row)
    assert row["trace_mosaic_us"] == 950.0
    assert row["trace_top"] == top[: chunkwise.TRACE_PRINTED]
    chunkwise.print_trace(row)
    assert "0.900 ms" in capsys.readouterr().out
    argv = ["--smoke", "--modes", "fwd", "--ceilings", "nominal", "--tfla", "skip", "--prefill-tokens", "--trace"]
    chunkwise.main([*argv, "--json", str(tmp_path / "out.json")])
    rows = json.loads((tmp_path / "out.json").read_text())["tables"]["chunkwise"]
    assert len(rows) == 2 and all(r["median_s"] > 0 and "trace_mosaic_us" not in r for r in rows)
