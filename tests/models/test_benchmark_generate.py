"""The decode/prefill benchmark (``benchmarks/generate.py``) runs end to end on the tiny preset (CPU)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import generate


def test_tiny_run_writes_every_case(tmp_path):
    path = tmp_path / "generate.json"
    cases = ["auto:unrolled:auto:1", "recurrent:scan:auto:2"]
    argv = ["--preset", "tiny", "--tokens", "4", "--prefill", "16", "--repeats", "1", "--stream", "--json", str(path)]
    generate.main([*argv, "--cases", *cases])
    data = json.loads(path.read_text())
    assert data["model"]["preset"] == "tiny" and data["ceilings"]["source"] == "measured"
    decode = data["tables"]["decode"]
    assert [(row["case"], row["loop"]) for row in decode] == [
        ("auto:unrolled:auto:1", "generate"),
        ("auto:unrolled:auto:1 stream", "stream"),
        ("recurrent:scan:auto:2", "generate"),
        ("recurrent:scan:auto:2 stream", "stream"),
    ]
    for row in decode:
        assert row["tokens"] == [3, 4] and math.isfinite(row["ms_per_token"])
        assert row["short_median_s"] > 0 and row["long_median_s"] > 0
        assert row["first_call_s"] > 0 and 0 < row["floor_ms"] < row["floor_with_states_ms"]
    assert decode[2]["state_bytes"] == 2 * decode[0]["state_bytes"]  # B=2 against B=1
    (prefill,) = data["tables"]["prefill"]
    assert prefill["S"] == 16 and prefill["tokens_per_s"] > 0 and prefill["flops"] > 0
    assert "notes" not in data  # nothing failed or was skipped


@pytest.mark.parametrize(
    "case, message",
    [
        ("recurrent:unrolled:nographs:1", "bad case 'recurrent:unrolled:nographs:1'"),
        ("auto:scan:on:1", "decode_fusion='on' needs unrolled blocks"),
        ("auto:unrolled:auto:0", "B a positive integer"),
    ],
)
def test_bad_case_is_refused(case, message, capsys):
    with pytest.raises(SystemExit) as exc:
        generate.main(["--preset", "tiny", "--prefill", "--cases", case])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
