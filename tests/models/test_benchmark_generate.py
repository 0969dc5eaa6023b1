"""The decode/prefill benchmark (``benchmarks/generate.py``) runs end to end on the tiny preset (CPU)."""

from __future__ import annotations

import json
import time

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
    noise = []  # on a loaded host one token's time can drown in noise: such a row gives no time, and a note
    for row in decode:
        assert row["tokens"] == [3, 4] and row["short_median_s"] > 0 and row["long_median_s"] > 0
        assert row["first_call_s"] > 0 and 0 < row["floor_ms"] < row["floor_with_states_ms"]
        if row["ms_per_token"] is None:
            assert row["difference_s"] <= 0 and row["floor_fraction"] is None and row["attempts"] == 3
            noise.append(f"decode {row['case']}: N=4 tokens took no longer than N/2+1 in 3 attempts")
        else:
            assert row["ms_per_token"] == pytest.approx(row["difference_s"] * 1e3) and row["ms_per_token"] > 0
            assert row["floor_fraction"] == pytest.approx(row["floor_ms"] / row["ms_per_token"])
    assert decode[2]["state_bytes"] == 2 * decode[0]["state_bytes"]  # B=2 against B=1
    (prefill,) = data["tables"]["prefill"]
    assert prefill["S"] == 16 and prefill["tokens_per_s"] > 0 and prefill["flops"] > 0
    assert [note[: len(n)] for note, n in zip(data.get("notes", []), noise, strict=True)] == noise  # nothing else


def test_decode_per_token_gives_no_time_for_noise():
    """The time per token is the difference of the two lengths' medians over their difference in tokens; where
    the longer run is never slower it is noise, not a time: None after the attempts, the difference kept."""
    per_token, facts = generate.decode_per_token(lambda n: time.sleep(5e-3 * n), 16, 3, False)
    assert facts["tokens"] == [9, 16] and facts["attempts"] == 1
    assert per_token == facts["difference_s"] and 3.5e-3 < per_token < 8e-3  # 5 ms, sleeps' jitter aside
    per_token, facts = generate.decode_per_token(lambda n: time.sleep(0.2 / n), 16, 3, False)
    assert per_token is None and facts["attempts"] == 3 and facts["difference_s"] < 0
    assert generate.noise_note("decode x", facts).startswith("decode x: N=16 tokens took no longer than N/2+1 in 3")


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
