"""The front of the screened trials kept up to date one trial at a time, for the driver's progress
bar and early-stopping bar: a new point costs work in the size of the front, not of the study.

A record enters the pool when it is a screening record (``fidelity`` "screen"), COMPLETE, feasible
and finite on every objective, as in ``report.front_records``. A point dominated by the front
never enters it, and since dominance is transitive it would never have been on the front of all
records: the running front is the front of every record added so far.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from search.pareto import Objective, hypervolume, non_dominated

__all__ = ["RunningFront"]


class RunningFront:
    """Non-dominated objective vectors of the pool so far, with their hypervolume against a fixed
    ``reference`` (computed when the front changes)."""

    def __init__(self, objectives: Sequence[Objective], reference: Sequence[float] | None = None) -> None:
        self.names = [o.name for o in objectives]
        self.directions = [o.direction for o in objectives]
        self.reference = None if reference is None else list(reference)
        self._sign = np.array([-1.0 if d == "max" else 1.0 for d in self.directions])  # as minimisation
        self.points = np.empty((0, len(self.names)))  # [f, m] in the objectives' own directions
        self.hypervolume = 0.0

    def accepts(self, record: dict[str, Any]) -> bool:
        values = [record.get(n) for n in self.names]
        return (record.get("fidelity", "screen") == "screen" and record.get("state") == "COMPLETE"
                and bool(record.get("feasible"))
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values))

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        """Add many records at once (the trial log of a resumed run): one non-dominated sort."""
        pool = [[r[n] for n in self.names] for r in records if self.accepts(r)]
        if not pool:
            return
        points = np.vstack([self.points, np.array(pool, dtype=float)])
        self._set(points[non_dominated(points, self.directions)])

    def add(self, record: dict[str, Any]) -> bool:
        """Add one record; returns whether the front changed."""
        if not self.accepts(record):
            return False
        p = np.array([record[n] for n in self.names], dtype=float)
        mine, theirs = p * self._sign, self.points * self._sign
        if ((theirs <= mine).all(axis=1) & (theirs < mine).any(axis=1)).any():
            return False  # dominated by the front
        beaten = (mine <= theirs).all(axis=1) & (mine < theirs).any(axis=1)
        self._set(np.vstack([self.points[~beaten], p]))
        return True

    def _set(self, points: np.ndarray) -> None:
        self.points = points
        if self.reference is not None:
            self.hypervolume = hypervolume(points, self.directions, self.reference) if len(points) else 0.0

    def __len__(self) -> int:
        return len(self.points)

    def best_at_most(self, objective: str, at_most: float, cost: str = "gmacs") -> float | None:
        """The best ``objective`` on the front at ``cost`` <= ``at_most`` (1e-12 slack); None when none
        is. That is the best of the whole pool there: a pool point is on the front or dominated by a
        front point at no more cost and no worse objective."""
        i, c = self.names.index(objective), self.names.index(cost)
        values = self.points[self.points[:, c] <= at_most + 1e-12, i]
        if not len(values):
            return None
        return float(values.max() if self.directions[i] == "max" else values.min())
