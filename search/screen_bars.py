"""The presets' screening results shared between workers while the presets stage runs, so that a
preset can stop early against what the others measured (the searched trials get their bar from
the driver instead, with each suggestion).

One JSON line per preset screened on all its images, ``{"gmacs": g, "accuracy": a}``, appended
under an exclusive lock to a file in the run's cache. A worker that cannot see the file (a node
without the run directory) reads no bar and screens every image: slower, never wrong.
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Iterable
from pathlib import Path

SLACK = 1e-12  # GMACs that differ by rounding only count as equal
FILE = "preset-bars.jsonl"


def path_in(cache_dir: str | Path) -> Path:
    """The file under a run's cache directory."""
    return Path(cache_dir) / FILE


def add(path: str | Path, gmacs: float, accuracy: float) -> None:
    """Record one full screening (nothing for a non-finite accuracy)."""
    if not (math.isfinite(gmacs) and math.isfinite(accuracy)):
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.write(json.dumps({"gmacs": gmacs, "accuracy": accuracy}) + "\n")
            handle.flush()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def seed(path: str | Path, points: Iterable[tuple[float, float]]) -> None:
    """Start the file afresh from results already recorded (a resumed run's presets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"gmacs": g, "accuracy": a}) + "\n" for g, a in points
                           if math.isfinite(g) and math.isfinite(a)))
    tmp.replace(path)


def best_at_most(path: str | Path, gmacs: float) -> float | None:
    """The best accuracy recorded at no more than `gmacs`; None when there is none (or no file).
    A line cut short by a concurrent write is skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    points = []
    for line in lines:
        try:
            point = json.loads(line)
        except json.JSONDecodeError:
            continue
        points.append((point["gmacs"], point["accuracy"]))
    return best_of(points, gmacs)


def best_of(points: Iterable[tuple[float, float]], gmacs: float) -> float | None:
    """The best accuracy among (gmacs, accuracy) points at no more than `gmacs`; None when there is none."""
    fitting = [float(a) for g, a in points if g <= gmacs + SLACK]
    return max(fitting) if fitting else None
