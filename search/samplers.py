"""Local moves around the front: an Optuna sampler that wraps another one.

A share of the trials is a small move from a point of the current Pareto front (the presets
told to the study included): a parent drawn from the front, one to three of its parameters
changed (a float by a Gaussian step of 15 % of its range, an integer by one or two, a
categorical to another choice), every other parameter copied. The rest of the trials come from
the wrapped sampler (NSGA-II, TPE, ...), which also sees every trial. A front of strong presets
is where a better schedule is most likely to be found (one block's method changed, the budget
share moved), and a population-based sampler reaches it only slowly in a 60-trial run.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from search.pareto import non_dominated

__all__ = ["LocalMoveSampler"]

_PARENT = "local:parent"  # system attrs of a local trial: its parent's number and the moved parameters
_MOVED = "local:moved"


class LocalMoveSampler(BaseSampler):
    """``share`` of the trials move locally from the front; the others are ``base``'s."""

    def __init__(self, base: BaseSampler, *, share: float = 0.5, seed: int | None = None) -> None:
        self.base = base
        self.share = share
        self._rng = random.Random(seed)

    # --- which trials move locally ------------------------------------------------------------
    def _front(self, study: Study) -> list[FrozenTrial]:
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values is not None and all(math.isfinite(v) for v in t.values)
                and all(v <= 0 for k, v in t.system_attrs.items() if k.startswith("constraints:"))]
        if not done:
            return []
        directions = ["max" if d == optuna.study.StudyDirection.MAXIMIZE else "min" for d in study.directions]
        mask = non_dominated(np.array([t.values for t in done]), directions)
        return [t for t, keep in zip(done, mask, strict=True) if keep]

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)
        if trial.system_attrs.get("fixed_params") or self._rng.random() >= self.share:
            return  # an enqueued trial, or the base sampler's turn
        front = self._front(study)
        if not front:
            return
        parent = self._rng.choice(front)
        names = sorted(parent.params)
        moved = self._rng.sample(names, k=min(len(names), self._rng.randint(1, 3)))
        study._storage.set_trial_system_attr(trial._trial_id, _PARENT, parent.number)
        study._storage.set_trial_system_attr(trial._trial_id, _MOVED, moved)

    def _local(self, study: Study, trial: FrozenTrial) -> tuple[FrozenTrial, list[str]] | None:
        number = study._storage.get_trial(trial._trial_id).system_attrs.get(_PARENT)
        if number is None:
            return None
        moved = study._storage.get_trial(trial._trial_id).system_attrs.get(_MOVED, [])
        return study.get_trials(deepcopy=False)[number], moved

    # --- the sampler interface ----------------------------------------------------------------
    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self._local(study, trial) is not None:
            return {}  # every parameter comes from sample_independent
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        local = self._local(study, trial)
        if local is not None:
            parent, moved = local
            value = parent.params.get(param_name)
            if value is not None and param_distribution._contains(param_distribution.to_internal_repr(value)):
                return self._move(value, param_distribution) if param_name in moved else value
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def _move(self, value: Any, dist: BaseDistribution) -> Any:
        if isinstance(dist, CategoricalDistribution):
            others = [c for c in dist.choices if c != value]
            return self._rng.choice(others) if others else value
        if isinstance(dist, IntDistribution):
            step = self._rng.choice([-2, -1, 1, 2]) * dist.step
            return int(min(dist.high, max(dist.low, value + step)))
        if isinstance(dist, FloatDistribution):
            return float(min(dist.high, max(dist.low, value + self._rng.gauss(0.0, 0.15 * (dist.high - dist.low)))))
        return value

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
