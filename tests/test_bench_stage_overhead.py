"""bench/stage_overhead.py: each stage's seconds against the evaluation seconds of its trials."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.stage_overhead import overhead

ROOT = Path(__file__).resolve().parents[1]


def _run(path: Path, timing: list[dict] | None) -> Path:
    path.mkdir()
    (path / "run.json").write_text(json.dumps({"concurrency": 2, "timing_s": timing}))
    records = [{"ray_trial": "p-0", "preset": "tome:8", "fidelity": "screen", "eval_seconds": 1.0},
               {"ray_trial": "p-0", "preset": "tome:8", "fidelity": "screen", "eval_seconds": 4.0, "trial": 0},  # told: replaces
               {"ray_trial": "p-1", "preset": "evit:0.5", "fidelity": "stopped", "eval_seconds": 2.0},
               {"ray_trial": "t1", "preset": None, "fidelity": "screen", "eval_seconds": 6.0},
               {"ray_trial": "t2", "preset": None, "fidelity": "stopped", "eval_seconds": 1.0},
               {"ray_trial": "t3", "preset": None, "fidelity": "finetune", "eval_seconds": 50.0},  # not a stage's
               {"ray_trial": "c-0", "preset": "tome:8", "fidelity": "confirm", "eval_seconds": 8.0}]
    if timing and timing[0].get("retime"):  # re-timed: each record again, with the unreduced model's speed then
        records += [{**records[1], "baseline_images_per_s": 150.0}, {**records[3], "baseline_images_per_s": 170.0},
                    {**records[6], "baseline_images_per_s": 160.0}]
    (path / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_stage_seconds_beyond_the_evaluations_spread_over_the_workers(tmp_path: Path) -> None:
    run = _run(tmp_path / "a", [{"ray_init_and_setup": 4.0, "presets": 10.0, "tune": 9.0, "confirm": 5.0, "retime": 3.0}])
    result = overhead(run)
    rows = result["stages"]
    assert rows["presets"]["eval_s"] == 6.0 and rows["presets"]["beyond_s"] == 7.0
    assert rows["tune"]["eval_s"] == 7.0 and rows["tune"]["beyond_s"] == 5.5
    assert rows["confirm"]["eval_s"] == 8.0 and rows["confirm"]["beyond_s"] == 1.0
    assert rows["all"]["beyond_s"] == 13.5 and result["ray_s"] == 4.0 and result["retime_s"] == 3.0
    assert result["unreduced_images_per_s"] == 160.0  # the median of the three re-timed records


def test_a_run_without_re_timing_has_no_machine_speed(tmp_path: Path) -> None:
    run = _run(tmp_path / "a", [{"ray_init_and_setup": 4.0, "presets": 10.0, "tune": 9.0, "confirm": 5.0}])
    assert overhead(run)["unreduced_images_per_s"] is None
    proc = subprocess.run([sys.executable, "bench/stage_overhead.py", str(run)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "images/s" not in proc.stdout


@pytest.mark.parametrize("case", ["no run", "unfinished"])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path: Path, case: str) -> None:
    run = tmp_path / "missing" if case == "no run" else _run(tmp_path / "a", None)
    proc = subprocess.run([sys.executable, "bench/stage_overhead.py", str(run)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
