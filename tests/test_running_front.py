"""The driver's running front (search/running_front.py) is the front of every record so far: the
same points and hypervolume as report.front_records and pareto.hypervolume over all of them, and
the same early-stopping bar as the best accuracy at no more GMACs over all of them."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from search import pareto, report
from search.running_front import RunningFront
from search.tune_stage import stop_bar

ACC_GMACS = [pareto.OBJECTIVES["accuracy"], pareto.OBJECTIVES["gmacs"]]


def _records(seed: int, count: int, extra: bool) -> list[dict]:
    """Trial records as the recorder writes them: failures, stopped and infeasible ones, NaN,
    ties and exact duplicates among them."""
    rng = random.Random(seed)
    out: list[dict] = []
    for i in range(count):
        if out and rng.random() < 0.05:
            out.append(dict(rng.choice(out)))  # the same point again
            continue
        g = round(rng.uniform(0.02, 0.08), 3)
        r = {"trial": i, "state": rng.choice(["COMPLETE"] * 8 + ["FAIL"]), "feasible": rng.random() > 0.1,
             "fidelity": rng.choice(["screen"] * 6 + ["stopped", "confirm"]), "gmacs": g,
             "accuracy": round(0.5 + 5 * g + rng.uniform(-0.1, 0.1), 2) if rng.random() > 0.05 else math.nan}
        if extra:
            r["speedup"] = round(rng.uniform(1.0, 3.0), 1)
        out.append(r)
    return out


@pytest.mark.parametrize(("seed", "extra"), [(0, False), (1, False), (2, True), (3, True)])
def test_running_front_matches_the_front_of_all_records(seed: int, extra: bool) -> None:
    objectives = ACC_GMACS + ([pareto.OBJECTIVES["speedup"]] if extra else [])
    directions = [o.direction for o in objectives]
    reference = pareto.reference_point(objectives, baseline_gmacs=0.1)
    records = _records(seed, 300, extra)
    running, bar = RunningFront(objectives, reference), RunningFront(ACC_GMACS)
    running.extend(records[:40])  # the trial log of a resumed run, then one trial at a time
    bar.extend(records[:40])
    for n in range(40, len(records) + 1):
        screened = [r for r in records[:n] if r.get("fidelity") == "screen"]
        front = report.front_records(screened, objectives)
        want = sorted(tuple(r[o.name] for o in objectives) for r in front)
        assert sorted(map(tuple, running.points.tolist())) == want, n
        points = np.array(want).reshape(-1, len(objectives))
        assert running.hypervolume == pytest.approx(pareto.hypervolume(points, directions, reference) if want else 0.0)
        for at in (0.01, 0.03, 0.05, 0.07, 0.09):
            assert bar.best_at_most("accuracy", at) == stop_bar(records[:n], at)
            brute = [r["accuracy"] for r in screened if r["state"] == "COMPLETE" and r["feasible"]
                     and math.isfinite(r["accuracy"]) and r["gmacs"] <= at + 1e-12]
            assert bar.best_at_most("accuracy", at) == max(brute, default=None)
        if n < len(records):
            running.add(records[n])
            bar.add(records[n])


def test_add_says_whether_the_front_changed() -> None:
    front = RunningFront(ACC_GMACS, [0.0, 1.0])
    base = {"state": "COMPLETE", "feasible": True, "fidelity": "screen"}
    assert front.add({**base, "accuracy": 0.8, "gmacs": 0.5})
    assert not front.add({**base, "accuracy": 0.7, "gmacs": 0.6})  # dominated
    assert not front.add({**base, "accuracy": 0.9, "gmacs": 0.1, "fidelity": "stopped"})
    assert front.add({**base, "accuracy": 0.9, "gmacs": 0.4})  # dominates the first
    assert front.points.tolist() == [[0.9, 0.4]] and front.hypervolume == pytest.approx(0.9 * 0.6)
