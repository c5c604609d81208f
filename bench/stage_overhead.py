"""How much of each stage of a search is not evaluation: stage seconds against evaluation seconds.

    python bench/stage_overhead.py runs/A [runs/B ...]

For every run directory: the seconds of each stage of the search (run.json's ``timing_s``), the
evaluation seconds its trials report (trials.jsonl's ``eval_seconds``, summed over the trials of the
stage: presets, searched trials, confirmation), and what the stage took beyond its evaluations
spread over the run's ``--concurrency`` workers (stage seconds - evaluation seconds / concurrency):
starting workers, loading the model, the images and the unreduced logits, waiting between stages
and for the slowest worker. Evaluation seconds depend on how fast the machine runs at the time; this
difference much less. How fast the machine ran is the unreduced model's throughput in the run's
re-timing (the median of the re-timed records' ``baseline_images_per_s``: the same model, batch and
thread count in every run of one command), when the run re-timed its schedules.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STAGES = ("presets", "tune", "confirm")


def stage_of(record: dict[str, Any]) -> str:
    """The stage a trial-log record belongs to."""
    if record.get("fidelity") == "confirm":
        return "confirm"
    return "presets" if record.get("preset") else "tune"


def overhead(run: Path) -> dict[str, Any]:
    """Stage seconds, evaluation seconds and the difference, per stage and in all, for one run."""
    settings = json.loads((run / "run.json").read_text())
    timing = settings.get("timing_s") or []
    if not timing:
        raise ValueError(f"{run}/run.json has no timing_s: the run did not finish")
    latest: dict[str, dict[str, Any]] = {}
    for line in (run / "trials.jsonl").read_text().splitlines():
        record = json.loads(line)
        latest[record["ray_trial"]] = record
    evaluation = dict.fromkeys(STAGES, 0.0)
    for record in latest.values():
        if record.get("fidelity") in ("screen", "stopped", "confirm"):
            evaluation[stage_of(record)] += record.get("eval_seconds") or 0.0
    workers = settings.get("concurrency") or 1
    stages = {s: sum(t.get(s, 0.0) for t in timing) for s in STAGES}
    rows = {s: {"stage_s": stages[s], "eval_s": evaluation[s], "beyond_s": stages[s] - evaluation[s] / workers}
            for s in STAGES}
    rows["all"] = {k: sum(rows[s][k] for s in STAGES) for k in ("stage_s", "eval_s", "beyond_s")}
    return {"run": str(run), "workers": workers, "stages": rows,
            "ray_s": sum(t.get("ray_init_and_setup", 0.0) for t in timing),
            "retime_s": sum(t.get("retime", 0.0) for t in timing),
            "unreduced_images_per_s": machine_speed(latest.values())}


def machine_speed(records: Iterable[dict[str, Any]]) -> float | None:
    """The unreduced model's images/s in the run's re-timing (median over the re-timed records), or
    None when nothing was re-timed."""
    found = [r["baseline_images_per_s"] for r in records if r.get("baseline_images_per_s")]
    return statistics.median(found) if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    missing = [str(r) for r in args.runs if not (r / "run.json").is_file() or not (r / "trials.jsonl").is_file()]
    if missing:
        print(f"error: not a finished run directory (no run.json or trials.jsonl): {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        results = [overhead(r) for r in args.runs]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'run':28} {'stage':8} {'stage s':>8} {'eval core-s':>12} {'beyond eval s':>14}")
    for result in results:
        for stage, row in result["stages"].items():
            print(f"{result['run'][-28:]:28} {stage:8} {row['stage_s']:8.1f} {row['eval_s']:12.1f} {row['beyond_s']:14.1f}")
        speed = result["unreduced_images_per_s"]
        machine = f", unreduced {speed:.1f} images/s in the re-timing" if speed else ""
        print(f"{'':28} {'ray':8} {result['ray_s']:8.1f}   re-timing {result['retime_s']:.1f} s, {result['workers']} workers"
              f"{machine}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
