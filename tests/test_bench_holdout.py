"""The benches' bad input: one `error:` line and exit code 2 before anything loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.holdout import parse_seeds

ROOT = Path(__file__).resolve().parents[1]


def test_parse_seeds_reads_a_range_and_names_what_is_wrong() -> None:
    assert parse_seeds("100-104") == range(100, 105)
    assert parse_seeds("7-7") == range(7, 8)
    for bad in ("5-3", "x", "1-2-3", "-1-4", "100"):
        with pytest.raises(ValueError, match="--seeds must be a range a-b"):
            parse_seeds(bad)


@pytest.mark.parametrize("argv", [["bench/holdout.py", "runs/none", "--seeds", "5-3"],
                                  ["bench/front_loaded.py", "--seeds", "x"]])
def test_a_bad_seed_range_is_one_error_line_and_exit_2(argv: list[str], tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith("error: --seeds")
    assert list(tmp_path.iterdir()) == []


def test_tune_start_refuses_no_stages_in_one_error_line_before_ray_starts(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench/tune_start.py"), "--stages", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "error: --stages must be at least 1, got 0" and list(tmp_path.iterdir()) == []
