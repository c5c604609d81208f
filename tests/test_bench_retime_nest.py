"""bench/retime_nest.py: the re-timing's cost and noise for each nest of schedules between baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.retime_nest import abba, main, spread, summarize


def test_passes_alternate_the_nests_in_abba_order() -> None:
    assert abba([1, 2, 3], 4) == [1, 2, 3, 3, 2, 1, 1, 2, 3, 3, 2, 1]


def test_spread_and_differences_by_hand() -> None:
    assert spread([1.0, 2.0, 3.0]) == pytest.approx(1.0)  # (3 - 1) / 2
    speedups = {1: [[2.0, 4.0], [2.0, 4.4]], 2: [[2.2, 4.4], [1.8, 4.8]]}  # per nest: passes x schedules
    rows = summarize(speedups, {1: [3.0, 5.0], 2: [2.0, 2.0]})
    assert [r["nest"] for r in rows] == [1, 2]
    assert rows[0]["seconds_per_pass"] == 4.0 and rows[1]["seconds_per_pass"] == 2.0
    assert rows[0]["median_spread"] == pytest.approx((0.0 + 0.4 / 4.2) / 2)
    assert rows[1]["median_spread"] == pytest.approx((0.4 / 2.0 + 0.4 / 4.6) / 2)
    assert rows[0]["median_diff"] == 0.0 and rows[0]["max_diff"] == 0.0
    # means: nest 1 2.0 and 4.2, nest 2 2.0 and 4.6
    assert rows[1]["max_diff"] == pytest.approx(4.6 / 4.2 - 1) and rows[1]["median_diff"] == pytest.approx((4.6 / 4.2 - 1) / 2)
    assert rows[0]["median_ratio"] == 1.0 and rows[1]["median_ratio"] == pytest.approx((1.0 + 4.6 / 4.2) / 2)


@pytest.mark.parametrize(("args", "needle"), [
    (["--nests", "0,2"], "--nests"), (["--nests", "a"], "--nests"), (["--passes", "1"], "--passes"),
    (["--batch", "0"], "--batch"), (["--threads", "0"], "--threads"), (["--most", "0"], "--most"),
    (["--run", "/nonexistent/run"], "no trials.jsonl"),
])
def test_bad_input_is_one_error_line_and_exit_2(args: list[str], needle: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    run.mkdir()
    (run / "trials.jsonl").write_text(json.dumps({"ray_trial": "t", "accuracy": 0.9}) + "\n")
    argv = ["--run", str(run), *args] if "--run" not in args else args
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


def test_a_run_without_re_timed_schedules_is_bad_input(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    run.mkdir()
    (run / "trials.jsonl").write_text(json.dumps({"ray_trial": "t", "accuracy": 0.9}) + "\n")
    assert main(["--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no re-timed schedule" in err and len(err.splitlines()) == 1
