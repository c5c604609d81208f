"""Non-dominated sorting and hypervolume over objective vectors with mixed directions.

Pure numpy functions. Points are arrays ``[n, m]``; ``directions[k]`` is ``"max"`` or
``"min"`` for column ``k``. Internally everything is turned into minimisation by negating
the maximised columns (and the reference point alike), which is what Optuna's private
hypervolume code expects (PITFALLS.md item 18). The reference point is fixed up front by
``reference_point`` so hypervolume curves of different runs can be compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "OBJECTIVES",
    "Objective",
    "hv_contributions",
    "hypervolume",
    "hypervolume_history",
    "non_dominated",
    "nondominated_ranks",
    "reference_point",
]

_CHUNK = 256  # rows per broadcast block: keeps non_dominated at O(chunk * n * m) memory


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "max" or "min"

    def __post_init__(self) -> None:
        if self.direction not in ("max", "min"):
            raise ValueError(
                f"Objective {self.name!r}: direction must be 'max' or 'min', got {self.direction!r}"
            )


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("accuracy", "max"),
        Objective("agreement", "max"),
        Objective("gmacs", "min"),
        Objective("speedup", "max"),
        Objective("images_per_s", "max"),
        Objective("predicted_speedup", "max"),  # from the run's latency profile (search/latency.py)
    )
}


def _as_min(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Float copy of ``points`` [n, m] with maximised columns negated."""
    pts = np.asarray(points, dtype=float)
    if pts.ndim == 1 and pts.size == 0:
        pts = pts.reshape(0, len(directions))
    if pts.ndim != 2 or pts.shape[1] != len(directions):
        raise ValueError(
            f"points must be [n, {len(directions)}] for directions {list(directions)}, got {pts.shape}"
        )
    bad = [d for d in directions if d not in ("max", "min")]
    if bad:
        raise ValueError(f"directions must be 'max' or 'min', got {bad}")
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    return pts * sign


def _dominated_min(losses: np.ndarray) -> np.ndarray:
    """Bool [n]: row i is dominated by some row j (<= everywhere, < somewhere). Minimisation."""
    n = len(losses)
    out = np.zeros(n, dtype=bool)
    for start in range(0, n, _CHUNK):
        block = losses[start : start + _CHUNK, None, :]  # (b, 1, m): candidates i
        le = (losses[None, :, :] <= block).all(axis=2)  # (b, n): j weakly better than i
        lt = (losses[None, :, :] < block).any(axis=2)  # (b, n): j strictly better somewhere
        out[start : start + _CHUNK] = (le & lt).any(axis=1)
    return out


def non_dominated(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Bool mask [n] of the points no other point dominates. Equal points are all kept."""
    return ~_dominated_min(_as_min(points, directions))


def dominated_count(points: np.ndarray, by: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Int [n]: how many rows of ``by`` [k, m] dominate each row of ``points`` [n, m]."""
    p, q = _as_min(points, directions), _as_min(by, directions)
    return ((q[None] <= p[:, None]).all(-1) & (q[None] < p[:, None]).any(-1)).sum(1)


def nondominated_ranks(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Front index per point: 0 for the non-dominated front, 1 for the next, ..."""
    losses = _as_min(points, directions)
    ranks = np.full(len(losses), -1, dtype=int)
    remaining = np.arange(len(losses))
    rank = 0
    while remaining.size:
        front = ~_dominated_min(losses[remaining])
        ranks[remaining[front]] = rank
        remaining = remaining[~front]
        rank += 1
    return ranks


def _hypervolume_2d(losses: np.ndarray, ref: np.ndarray) -> float:
    """Exact 2-D hypervolume by a sweep; minimisation, points already inside the reference box."""
    order = np.lexsort((losses[:, 1], losses[:, 0]))  # by x, then y
    area, best_y = 0.0, float(ref[1])
    for x, y in losses[order]:
        if y < best_y:
            area += (float(ref[0]) - x) * (best_y - y)
            best_y = y
    return area


def _inside(losses: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return losses[(losses < ref).all(axis=1)]  # NaN rows fail the comparison and drop out


def _hv_min(losses: np.ndarray, ref: np.ndarray, *, exact_2d: bool = False) -> float:
    losses = _inside(losses, ref)
    if len(losses) == 0:
        return 0.0
    if exact_2d and losses.shape[1] == 2:
        return _hypervolume_2d(losses, ref)
    from optuna._hypervolume import compute_hypervolume  # private API, PITFALLS.md item 18

    return float(compute_hypervolume(losses, ref))


def _reference(reference: Sequence[float], directions: Sequence[str]) -> np.ndarray:
    ref = np.asarray(reference, dtype=float)
    if ref.shape != (len(directions),) or not np.isfinite(ref).all():
        raise ValueError(f"reference must be {len(directions)} finite numbers, got {list(reference)}")
    return ref * np.array([-1.0 if d == "max" else 1.0 for d in directions])


def hypervolume(
    points: np.ndarray, directions: Sequence[str], reference: Sequence[float], *, exact_2d: bool = False
) -> float:
    """Volume dominated by ``points`` and bounded by ``reference`` (given in the points' own units).

    Points not strictly better than the reference in every objective are dropped; no point
    left gives 0.0. ``exact_2d=True`` uses the local 2-D sweep instead of Optuna.
    """
    return _hv_min(_as_min(points, directions), _reference(reference, directions), exact_2d=exact_2d)


def hypervolume_history(
    points_in_trial_order: np.ndarray,
    feasible_mask: Sequence[bool],
    directions: Sequence[str],
    reference: Sequence[float],
) -> list[float]:
    """Hypervolume of the feasible points seen so far, after each trial (one value per row)."""
    losses = _as_min(points_in_trial_order, directions)
    ref = _reference(reference, directions)
    feasible = np.asarray(feasible_mask, dtype=bool)
    if feasible.shape != (len(losses),):
        raise ValueError(f"feasible_mask has shape {feasible.shape}, expected ({len(losses)},)")
    front = np.empty((0, losses.shape[1]))
    history, current = [], 0.0
    for loss, ok in zip(losses, feasible, strict=True):
        # A point weakly dominated by the current front (or outside the box) adds no volume.
        if ok and (loss < ref).all() and not (front <= loss).all(axis=1).any():
            front = np.vstack([front[~(loss <= front).all(axis=1)], loss])
            current = _hv_min(front, ref)
        history.append(current)
    return history


def hv_contributions(points: np.ndarray, directions: Sequence[str], reference: Sequence[float]) -> np.ndarray:
    """Exclusive contribution per point: HV(all) - HV(all without it). Dominated/duplicate points get 0."""
    losses = _as_min(points, directions)
    ref = _reference(reference, directions)
    out = np.zeros(len(losses))
    total = _hv_min(losses, ref)
    candidates = np.flatnonzero(~_dominated_min(losses) & (losses < ref).all(axis=1))
    for i in candidates:
        out[i] = total - _hv_min(np.delete(losses, i, axis=0), ref)
    return np.maximum(out, 0.0)  # clip float round-off


_REFERENCE_VALUES = {"accuracy": 0.0, "agreement": 0.0, "speedup": 0.0, "images_per_s": 0.0, "predicted_speedup": 0.0}


def reference_point(objectives: Sequence[Objective], *, baseline_gmacs: float) -> list[float]:
    """Fixed reference point: 0 for accuracy-like and speed objectives, 1.05x the unreduced GMACs."""
    if not baseline_gmacs > 0:
        raise ValueError(f"baseline_gmacs must be > 0, got {baseline_gmacs}")
    ref = []
    for obj in objectives:
        if obj.name == "gmacs":
            ref.append(1.05 * float(baseline_gmacs))
        elif obj.name in _REFERENCE_VALUES:
            ref.append(_REFERENCE_VALUES[obj.name])
        else:
            raise ValueError(f"no fixed reference for objective {obj.name!r}; known: {sorted(OBJECTIVES)}")
    return ref


def promotion_order(points: np.ndarray, directions: Sequence[str], reference: Sequence[float]) -> np.ndarray:
    """Indices of ``points``, most promising first: by non-dominated rank, then, within a rank,
    by exclusive hypervolume contribution among that rank's points (largest first)."""
    ranks = nondominated_ranks(points, directions)
    score = np.zeros(len(points))
    for rank in np.unique(ranks):
        members = np.flatnonzero(ranks == rank)
        score[members] = hv_contributions(points[members], directions, reference)
    return np.lexsort((np.arange(len(points)), -score, ranks))
