"""Do a run's verdicts hold on many new images? Each preset against the searched schedule its verdict names.

    python bench/holdout.py runs/s35-fl-seed2 [more runs] [--presets tome:6,-1 tome:8] [--seeds 100-109]

A verdict is decided on 2,000 confirmation images, where two schedules within a few tenths of a
point of each other split the images by chance. For every preset of each run (or those named by
`--presets`), this takes a searched schedule as the closing table does
(`search.report.preset_verdicts`): the most accurate of the confirmed searched schedules that
dominate it on confirmed accuracy, or, for a preset not beaten, the most accurate at no more
GMACs; among equally accurate ones the cheapest (the closing table takes the first by trial
number for a preset not beaten, so the two may name different trials of equal accuracy). Both are scored on
the embedded default's held-out images of `--seeds` (2,000 a seed; seeds 100-109 by default,
disjoint from every run's screening and confirmation seeds below 100), and the row says on how
many images only the preset is right, on how many only the searched schedule, and the exact
McNemar p-value of that split. Embedded default only (the runs' model must be it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reducers import apply_schedule, remove_schedule  # noqa: E402
from search.data import embedded_set  # noqa: E402
from search.evaluate import predict  # noqa: E402
from search.models import load_model  # noqa: E402
from search.paired import mcnemar_p  # noqa: E402
from search.report import COST_TIE  # noqa: E402
from spaces import Schedule  # noqa: E402


def parse_seeds(text: str) -> range:
    """'a-b' (0 <= a <= b) -> the held-out seeds a..b; ValueError naming the problem otherwise."""
    try:
        first, last = (int(x) for x in text.split("-"))
    except ValueError:
        first, last = -1, -1
    if not 0 <= first <= last:
        raise ValueError(f"--seeds must be a range a-b with 0 <= a <= b, got {text!r}")
    return range(first, last + 1)


class HeldOut:
    """The embedded default's held-out images of `seeds` (2,000 a seed), and which of them a
    schedule gets right (computed once per schedule)."""

    def __init__(self, seeds: range) -> None:
        torch.set_num_threads(1)
        self.model = load_model(None)
        self.sets = [embedded_set(2000, seed=s) for s in seeds]
        self.labels = torch.cat([d.labels for d in self.sets])
        self._known: dict[str, torch.Tensor] = {}

    def right(self, schedule: Schedule) -> torch.Tensor:
        """Per image, whether `schedule` on the model predicts its label."""
        key = schedule.to_json()
        if key not in self._known:
            apply_schedule(self.model, schedule)
            with torch.inference_mode():
                predicted = torch.cat([predict(self.model, d, batch_size=256).argmax(-1) for d in self.sets])
            remove_schedule(self.model)
            self._known[key] = predicted == self.labels
        return self._known[key]


def confirmed(run: Path) -> tuple[list[dict], list[dict]]:
    """(presets, searched): the run's confirmed feasible records (the last record of each)."""
    latest: dict[tuple, dict] = {}
    for line in (run / "trials.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("fidelity") == "confirm" and r.get("feasible") and r.get("schedule") and r.get("accuracy") is not None:
            latest[(r.get("preset"), r.get("trial"))] = r
    records = list(latest.values())
    return [r for r in records if r.get("preset")], [r for r in records if not r.get("preset")]


def named_rival(preset: dict, searched: list[dict]) -> tuple[dict | None, str]:
    """The searched record the closing table names for `preset`, and whether it dominates it."""
    cost, acc = preset["gmacs"], preset["accuracy"]
    no_more = [r for r in searched if r["gmacs"] <= cost * (1 + COST_TIE)]
    beaters = [r for r in no_more if r["accuracy"] >= acc and (r["accuracy"] > acc or r["gmacs"] < cost * (1 - COST_TIE))]
    pool, verdict = (beaters, "dominated") if beaters else (no_more, "not beaten")
    if not pool:
        return None, verdict
    return max(pool, key=lambda r: (r["accuracy"], -r["gmacs"])), verdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--presets", nargs="*", default=None, help="only these presets (default: every one)")
    ap.add_argument("--seeds", default="100-109", help="held-out seeds, a range a-b (2,000 images each)")
    args = ap.parse_args()
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    held_out = HeldOut(seeds)

    print(f"{'run':<24} {'preset':<12} {'verdict':<11} {'trial':>5} {'GMACs x':>7} {'confirmed':>17} "
          f"{'held-out':>17} {'only preset':>11} {'only trial':>10} {'p':>8}")
    for run in args.runs:
        presets, searched = confirmed(run)
        for p in sorted(presets, key=lambda r: -r["gmacs"]):
            if args.presets and p["preset"] not in args.presets:
                continue
            rival, verdict = named_rival(p, searched)
            if rival is None:
                print(f"{run.name:<24} {p['preset']:<12} {verdict:<11} (no searched schedule at no more GMACs)")
                continue
            a, b = held_out.right(Schedule.from_dict(p["schedule"])), held_out.right(Schedule.from_dict(rival["schedule"]))
            only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
            print(f"{run.name:<24} {p['preset']:<12} {verdict:<11} {rival['trial']:>5} {rival['gmacs'] / p['gmacs']:>7.3f} "
                  f"{p['accuracy']:>8.4f}/{rival['accuracy']:.4f} {a.float().mean():>8.4f}/{b.float().mean():.4f} "
                  f"{only_a:>11} {only_b:>10} {mcnemar_p(only_a, only_b):>8.2g}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
