"""Compute budgets: parse `--budget`, and make a schedule meet one by construction."""

from __future__ import annotations

import re
from dataclasses import replace

from spaces.cost import gmacs
from spaces.schedule import LayerPlan, Schedule

_BUDGET = re.compile(r"^\s*(?P<value>[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>gmacs?|%|x)\s*$", re.IGNORECASE)
MIN_KEEP = 0.02  # the smallest keep ratio rescaling goes down to
MAX_GAMMA = 64.0


def parse_budget(text: str, baseline_gmacs: float) -> float:
    """'3.0GMACs', '3.0 GMACs', '65%' (of the unreduced model) or '0.65x' -> GMACs."""
    match = _BUDGET.match(str(text))
    if not match:
        raise ValueError(f"malformed budget {text!r}; use e.g. 3.0GMACs, 65% or 0.65x")
    value, unit = float(match["value"]), match["unit"].lower()
    if value <= 0:
        raise ValueError(f"budget must be positive, got {text!r}")
    if unit == "%":
        value = value / 100.0 * baseline_gmacs
    elif unit == "x":
        value = value * baseline_gmacs
    return value


def _scaled(plan: LayerPlan, gamma: float) -> LayerPlan:
    """gamma > 1 removes more tokens, gamma < 1 fewer: keep -> keep ** gamma, r -> r * gamma."""
    if plan.method == "none":
        return plan
    if plan.r is not None:
        return replace(plan, r=int(round(plan.r * gamma)))
    if plan.kept is not None:
        return plan  # absolute counts (DiffRate's published schedules) are not rescaled
    if plan.method == "diffrate":
        return replace(plan, keep=_power(plan.keep, gamma), merge_keep=_power(plan.merge_keep, gamma))
    return replace(plan, keep=_power(plan.keep, gamma))


def _power(keep: float, gamma: float) -> float:
    return min(1.0, max(MIN_KEEP, keep**gamma))


def rescale(schedule: Schedule, gamma: float) -> Schedule:
    return replace(schedule, layers=tuple(_scaled(p, gamma) for p in schedule.layers))


def most_reduced(schedule: Schedule) -> Schedule:
    """The schedule's shape rescaled as far as it goes (the fewest GMACs `fit_target` can reach)."""
    return rescale(schedule, MAX_GAMMA)


def fit_target(schedule: Schedule, target_gmacs: float, *, tolerance: float = 0.01, iterations: int = 40) -> Schedule:
    """Rescale the keep ratios so GMACs come as close to `target_gmacs` as possible without exceeding it.

    The schedule's shape (which methods where, relative keep ratios) is kept; only the amount
    changes. Deterministic (bisection on gamma), so a trial's parameters always give the same
    schedule. A schedule already within `tolerance` below the target is returned unchanged; one
    that cannot get down to the target comes back as reduced as it gets (callers record the
    constraint), one that cannot get up to it as unreduced as it gets.
    """
    now = gmacs(schedule)
    if target_gmacs * (1 - tolerance) <= now <= target_gmacs:
        return schedule
    lo, hi = 1.0 / MAX_GAMMA, MAX_GAMMA  # gmacs falls as gamma grows
    smallest = most_reduced(schedule)
    if gmacs(smallest) > target_gmacs:
        return smallest
    if gmacs(rescale(schedule, lo)) <= target_gmacs:
        return rescale(schedule, lo)
    for _ in range(iterations):
        mid = (lo * hi) ** 0.5
        if gmacs(rescale(schedule, mid)) <= target_gmacs:
            hi = mid
        else:
            lo = mid
    return rescale(schedule, hi)
