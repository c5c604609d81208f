"""Local moves around the front: an Optuna sampler that wraps another one.

A share of the trials is a small move from a point of the current Pareto front (the presets
told to the study included): a parent drawn from the front, then either a move along the
cost axis alone (the space's `axis` parameter, the budget share: the same schedule shape at a
little more or less GMACs, filling the gaps between front points) or one to three of its
parameters changed (a float by a Gaussian step of 15 % of its range, an integer by one or two, a
categorical to another choice), every other parameter copied. With a `key` (what the
parameters run, e.g. the schedule's token counts and plans), a move that would run what an
earlier trial ran is drawn again: most of a per-layer space's parameters are idle in any one
schedule, and a move of an idle one only repeats its parent. The rest of the trials come from
the wrapped sampler (NSGA-II, TPE, ...), which also sees every trial. A front of strong presets
is where a better schedule is most likely to be found, and a population-based sampler reaches
it only slowly in a 60-trial run.

Presets told to the study (user attribute ``preset``) are also targets: while fewer than
``challenge_until`` searched trials dominate a preset, a share of the local moves is a challenge,
the shape of the nearest costlier searched front point run at the preset's cost (the preset's own
``axis`` value, so the fit lands at no more GMACs). A costlier searched shape that is more
accurate usually stays more accurate a little cheaper, which is how a preset gets dominated; one
searched win on the screening images can vanish on other images, so a preset stays a target
until several searched trials dominate it. A target on the front that no costlier searched front
point is left to challenge (a preset as accurate as the unreduced model, or the first trials,
before any searched point) is challenged once by its own shape at ``challenge_shave`` less of
its axis value.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from search.pareto import dominated_count, non_dominated

__all__ = ["LocalMoveSampler", "PicklableNSGAIISampler", "ScheduleKey"]

_PARENT = "local:parent"  # system attrs of a local trial: its parent's number, the moved parameters, all values
_MOVED = "local:moved"
_PARAMS = "local:params"
_TARGET = "local:target"  # a challenge's preset (trial number)


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II that survives pickling. Ray Tune pickles the searcher, and with it the sampler, when
    it builds a Tuner; Optuna 5.1's genetic samplers hold a threading.Lock, which cannot be pickled.
    The lock guards only this process's population cache, so a copy gets a new one."""

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if not isinstance(v, _LOCKS)}
        state[_DROPPED] = {k: _LOCKS.index(type(v)) for k, v in self.__dict__.items() if isinstance(v, _LOCKS)}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        dropped = state.pop(_DROPPED, {})
        self.__dict__.update(state)
        for name, kind in dropped.items():
            setattr(self, name, (threading.Lock, threading.RLock)[kind]())


_LOCKS = (type(threading.Lock()), type(threading.RLock()))  # by kind: 0 Lock, 1 RLock
_DROPPED = "_locks_dropped_by_pickle"


class LocalMoveSampler(BaseSampler):
    """``share`` of the trials move locally from the front; the others are ``base``'s.

    ``axis`` names the parameter a cost-axis move changes (``axis_share`` of the local moves, by
    a Gaussian step of ``axis_step`` of its range); ``key(params)`` says what a trial runs, so no
    local move repeats one (up to ``attempts`` draws). While a preset is dominated by fewer than
    ``challenge_until`` searched trials, ``challenge_share`` of the local moves challenge one."""

    def __init__(self, base: BaseSampler, *, share: float = 0.5, seed: int | None = None,
                 key: Callable[[dict[str, Any]], Hashable] | None = None, axis: str | None = None,
                 axis_share: float = 0.4, axis_step: float = 0.05, attempts: int = 20,
                 challenge_share: float = 0.5, challenge_until: int = 2, challenge_shave: float = 0.01) -> None:
        self.base = base
        self.share = share
        self.key, self.axis, self.axis_share, self.axis_step, self.attempts = key, axis, axis_share, axis_step, attempts
        self.challenge_share, self.challenge_until, self.challenge_shave = challenge_share, challenge_until, challenge_shave
        self._good: list[FrozenTrial] = []  # every feasible COMPLETE trial _front has seen, presets included
        self._rng = random.Random(seed)
        self._keys: dict[int, Hashable] = {}  # trial number -> key of its parameters
        self._moves: dict[int, dict[str, Any] | None] = {}  # trial id -> its local move (None: the base's)
        self._seen_keys: set[Hashable] = set()  # the values of _keys
        self._looked_at: set[int] = set()  # numbers of the COMPLETE trials _front has seen
        self._front_trials: list[FrozenTrial] = []

    # --- which trials move locally ------------------------------------------------------------
    def _front(self, study: Study) -> list[FrozenTrial]:
        """The feasible non-dominated COMPLETE trials, by number. Kept across calls: only trials
        completed since the last call are sorted against the front (the front of all of them, by
        transitivity of dominance), so a call costs the size of the front, not of the study."""
        new = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if t.number not in self._looked_at]
        self._looked_at.update(t.number for t in new)
        good = [t for t in new if t.values is not None and all(math.isfinite(v) for v in t.values)
                and all(v <= 0 for k, v in t.system_attrs.items() if k.startswith("constraints:"))]
        self._good.extend(good)
        if good:
            pool = [*self._front_trials, *good]
            mask = non_dominated(np.array([t.values for t in pool]), _directions(study))
            self._front_trials = sorted((t for t, keep in zip(pool, mask, strict=True) if keep), key=lambda t: t.number)
        return list(self._front_trials)

    def _targets(self, study: Study) -> list[FrozenTrial]:
        """The presets (after a `_front` call), by number, that fewer than `challenge_until` searched
        trials dominate."""
        if self.axis is None:
            return []
        presets = sorted((t for t in self._good if t.user_attrs.get("preset") and self.axis in t.params),
                         key=lambda t: t.number)
        searched = [t for t in self._good if not t.user_attrs.get("preset")]
        if not presets or not searched:
            return presets
        counts = dominated_count(np.array([t.values for t in presets]), np.array([t.values for t in searched]),
                                 _directions(study))
        return [t for t, n in zip(presets, counts, strict=True) if n < self.challenge_until]

    def _challenge(self, front: list[FrozenTrial], targets: list[FrozenTrial],
                   seen: set[Hashable]) -> tuple[FrozenTrial, FrozenTrial, dict[str, Any]] | None:
        """A target preset and the cheapest searched front point costlier than it whose shape, at
        the preset's cost, has not run yet: (target, parent, parameters). When every such shape has
        run, a target on the front is its own parent, at ``challenge_shave`` less of its axis value
        (once: the key then repeats). None when neither is left."""
        assert self.axis is not None
        target = self._rng.choice(targets)
        cost = target.params[self.axis]
        searched = sorted((t for t in front if not t.user_attrs.get("preset") and self.axis in t.params
                           and t.params[self.axis] > cost),
                          key=lambda t: (t.params[self.axis], t.number))  # costlier only, the nearest first
        for parent in searched[: self.attempts]:
            params = {**parent.params, self.axis: cost}
            if self._is_new(params, seen):
                return target, parent, params
        if any(t.number == target.number for t in front):  # none left: its own shape, a little cheaper
            shaved = max(cost * (1.0 - self.challenge_shave), target.distributions[self.axis].low)
            params = {**target.params, self.axis: shaved}
            if shaved < cost and self._is_new(params, seen):
                return target, target, params
        return None

    def _seen(self, study: Study) -> set[Hashable]:
        """Keys of every trial that ran or runs (cached by trial number; the set grows with them)."""
        assert self.key is not None
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.number not in self._keys and t.params:
                try:
                    self._keys[t.number] = self.key(t.params)
                except Exception:  # noqa: BLE001 - a trial whose parameters do not build: nothing to repeat
                    self._keys[t.number] = None
                self._seen_keys.add(self._keys[t.number])
        return self._seen_keys

    def _draw(self, parent: FrozenTrial) -> tuple[list[str], dict[str, Any]]:
        names = sorted(parent.params)
        if self.axis in parent.params and self._rng.random() < self.axis_share:
            moved = [self.axis]
        else:
            moved = self._rng.sample(names, k=min(len(names), self._rng.randint(1, 3)))
        params = dict(parent.params)
        for name in moved:
            step = self.axis_step if name == self.axis else 0.15
            params[name] = self._move(params[name], parent.distributions[name], step)
        return moved, params

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)
        self._moves[trial._trial_id] = None
        if trial.system_attrs.get("fixed_params"):
            return  # an enqueued trial
        u = self._rng.random()  # [0, 1 - share): the base's turn; the top challenge_share of the rest: a challenge
        if u < 1.0 - self.share:
            return
        front = self._front(study)
        if not front:
            return
        seen = self._seen(study) if self.key is not None else set()
        if u >= 1.0 - self.share * self.challenge_share:
            targets = self._targets(study)
            challenge = self._challenge(front, targets, seen) if targets else None
            if challenge is not None:
                target, parent, params = challenge
                study._storage.set_trial_system_attr(trial._trial_id, _TARGET, target.number)
                self._set_move(study, trial, parent, [self.axis], params)
                return
        for _ in range(self.attempts):
            parent = self._rng.choice(front)
            moved, params = self._draw(parent)
            if self._is_new(params, seen):
                break
        else:
            return  # every draw repeated a trial: the base sampler's turn
        self._set_move(study, trial, parent, moved, params)

    def _set_move(self, study: Study, trial: FrozenTrial, parent: FrozenTrial, moved: list[str],
                  params: dict[str, Any]) -> None:
        study._storage.set_trial_system_attr(trial._trial_id, _PARENT, parent.number)
        study._storage.set_trial_system_attr(trial._trial_id, _MOVED, moved)
        study._storage.set_trial_system_attr(trial._trial_id, _PARAMS, params)
        self._moves[trial._trial_id] = params

    def _is_new(self, params: dict[str, Any], seen: set[Hashable]) -> bool:
        """Whether `params` run something no trial ran (always, without a key)."""
        return self.key is None or self._key_of(params) not in seen

    def _key_of(self, params: dict[str, Any]) -> Hashable:
        assert self.key is not None
        try:
            return self.key(params)
        except Exception:  # noqa: BLE001 - parameters that do not build are never a repeat
            return object()

    def _local(self, study: Study, trial: FrozenTrial) -> dict[str, Any] | None:
        if trial._trial_id in self._moves:  # decided in before_trial, in this process: no storage read
            return self._moves[trial._trial_id]
        return study._storage.get_trial(trial._trial_id).system_attrs.get(_PARAMS)

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
            value = local.get(param_name)
            if value is not None and param_distribution._contains(param_distribution.to_internal_repr(value)):
                return value
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def _move(self, value: Any, dist: BaseDistribution, step: float = 0.15) -> Any:
        if isinstance(dist, CategoricalDistribution):
            others = [c for c in dist.choices if c != value]
            return self._rng.choice(others) if others else value
        if isinstance(dist, IntDistribution):
            delta = self._rng.choice([-2, -1, 1, 2]) * dist.step
            return int(min(dist.high, max(dist.low, value + delta)))
        if isinstance(dist, FloatDistribution):
            return float(min(dist.high, max(dist.low, value + self._rng.gauss(0.0, step * (dist.high - dist.low)))))
        return value

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._moves.pop(trial._trial_id, None)
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


def _directions(study: Study) -> list[str]:
    return ["max" if d == optuna.study.StudyDirection.MAXIMIZE else "min" for d in study.directions]


class ScheduleKey:
    """What a trial's parameters run in `space` (``spaces.presets.effective_key`` of its schedule);
    picklable, as Ray Tune saves its searcher. Keys are remembered by parameters, and the driver
    tells it the schedule each suggestion built (``remember``), so no schedule is built twice."""

    def __init__(self, space) -> None:  # type: ignore[no-untyped-def]
        self.space = space
        self._known: dict[tuple, Hashable] = {}

    @staticmethod
    def _id(params: dict[str, Any]) -> tuple:
        return tuple(sorted((k, v) for k, v in params.items() if not k.startswith("__")))

    def remember(self, params: dict[str, Any], schedule) -> None:  # type: ignore[no-untyped-def]
        """`params` built `schedule` (in the space this key is for)."""
        from spaces.presets import effective_key

        self._known[self._id(params)] = effective_key(schedule)

    def __call__(self, params: dict[str, Any]) -> Hashable:
        ident = self._id(params)
        if ident not in self._known:
            self.remember(params, self.space(optuna.trial.FixedTrial(params)))
        return self._known[ident]
