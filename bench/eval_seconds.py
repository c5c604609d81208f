"""Where two runs of the same trials spent their evaluation time, on a noisy machine.

    python bench/eval_seconds.py runs/<before> runs/<after>

Two runs of the default command on different commits evaluate the same schedules when the change
leaves the results alone (the search is deterministic), but a shared machine's speed drifts by
tens of percent between runs, so their wall times alone cannot tell a saving from the noise. This
pairs the records of the two trial logs that evaluated the same schedule on the same images
(trial or preset, fidelity, summary) and sums each side's `eval_seconds` by fidelity and by
whether the schedule reduces from block 0 (those run every block from the images whatever the
prefix cache does: their ratio is the machine's drift between the runs) or later (those can start
from the tokens the prefix cache holds). A schedule that reused another's result (0 s) is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spaces import Schedule  # noqa: E402

Key = tuple[Any, Any, Any, str]


def evaluations(run: Path) -> dict[Key, dict[str, Any]]:
    """The latest record of every evaluated schedule in `run`'s trial log, by what it evaluated."""
    found: dict[Key, dict[str, Any]] = {}
    for line in (run / "trials.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("eval_seconds") is not None and record.get("schedule"):
            found[(record.get("trial"), record.get("preset"), record.get("fidelity"), record["summary"])] = record
    return found


def compare(before: Path, after: Path) -> list[dict[str, Any]]:
    """One row per (fidelity, from block 0 or later): schedules, seconds before and after, ratio."""
    a, b = evaluations(before), evaluations(after)
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for key, record in a.items():
        if key not in b or record["eval_seconds"] <= 0.05 or b[key]["eval_seconds"] <= 0.05:
            continue
        first = Schedule.from_dict(record["schedule"]).first_reducing_block()
        row = sums[(str(key[2]), "block 0" if first == 0 else "later")]
        row[0] += record["eval_seconds"]
        row[1] += b[key]["eval_seconds"]
        row[2] += 1
    return [{"fidelity": f, "reduces from": start, "schedules": int(n), "before_s": round(x, 1), "after_s": round(y, 1),
             "ratio": round(y / x, 3)} for (f, start), (x, y, n) in sorted(sums.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    rows = compare(args.before, args.after)
    print(f"{'fidelity':10} {'reduces from':13} {'schedules':>9} {'before s':>9} {'after s':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['fidelity']:10} {r['reduces from']:13} {r['schedules']:9d} {r['before_s']:9.1f} {r['after_s']:9.1f} "
              f"{r['ratio']:6.3f}")
    total = [sum(r[k] for r in rows) for k in ("before_s", "after_s")]
    print(f"{'all':24} {sum(r['schedules'] for r in rows):9d} {total[0]:9.1f} {total[1]:9.1f}")


if __name__ == "__main__":
    main()
