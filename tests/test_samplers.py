"""LocalMoveSampler: local trials are small moves from a point of the current front."""

from __future__ import annotations

import numpy as np
import optuna

from search.pareto import non_dominated
from search.run_dir import sampler


def _objective(trial: optuna.Trial) -> tuple[float, float]:
    x, y = trial.suggest_float("x", 0.0, 1.0), trial.suggest_int("n", 0, 10)
    c = trial.suggest_categorical("c", ["a", "b", "c"])
    return x + 0.1 * y + (0.3 if c == "a" else 0.0), x + 0.05 * y


def test_local_trials_move_one_to_three_parameters_of_a_front_point() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler("local-random", 3))
    study.enqueue_trial({"x": 0.5, "n": 2, "c": "a"})  # a "preset": enqueued trials are never moved
    study.optimize(_objective, n_trials=60)
    trials = study.trials
    assert "local:parent" not in trials[0].system_attrs
    local = [t for t in trials if "local:parent" in t.system_attrs]
    assert 15 <= len(local) <= 45  # about half
    for t in local:
        parent = trials[t.system_attrs["local:parent"]]
        assert parent.number < t.number
        earlier = [p for p in trials[: t.number] if p.state == optuna.trial.TrialState.COMPLETE]
        front = non_dominated(np.array([p.values for p in earlier]), ["max", "min"])
        assert front[[p.number for p in earlier].index(parent.number)]  # the parent was on the front then
        moved = set(t.system_attrs["local:moved"])
        assert 1 <= len(moved) <= 3
        assert all(t.params[k] == parent.params[k] for k in t.params if k not in moved)


def test_local_sampler_is_seeded() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = []
    for _ in range(2):
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler("local-nsga2", 5))
        study.optimize(_objective, n_trials=30)
        runs.append([t.params for t in study.trials])
    assert runs[0] == runs[1]


def test_local_moves_never_repeat_what_ran_and_move_along_the_axis() -> None:
    """With a key (here: c is idle unless n > 5, x counts to one decimal), no local trial runs what an
    earlier trial ran; 40 % of the draws move the axis parameter alone, by a small step."""
    from search.samplers import LocalMoveSampler

    def key(params: dict) -> tuple:
        return round(params["x"], 1), params["n"], params["c"] if params["n"] > 5 else None

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    local = LocalMoveSampler(optuna.samplers.RandomSampler(seed=1), seed=1, key=key, axis="x")
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=local)
    study.optimize(_objective, n_trials=80)
    seen = set()
    moved_axis = 0
    for t in study.trials:
        if "local:parent" in t.system_attrs:
            assert key(t.params) not in seen
            if t.system_attrs["local:moved"] == ["x"]:
                moved_axis += 1
                assert abs(t.params["x"] - study.trials[t.system_attrs["local:parent"]].params["x"]) < 0.3
        seen.add(key(t.params))
    local_trials = sum("local:parent" in t.system_attrs for t in study.trials)
    # 40 % of the draws move the axis alone, but a small axis step often lands on a schedule that
    # already ran and is drawn again, so fewer of the trials do (0.14-0.32 over seeds 0-7)
    assert local_trials >= 20 and 0.1 <= moved_axis / local_trials <= 0.6
    parent = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    draws = [local._draw(parent)[0] for _ in range(2000)]  # 0.4, plus one name of three drawn alone: 0.6 / 9
    assert 0.42 <= sum(moved == ["x"] for moved in draws) / len(draws) <= 0.51


def test_schedule_key_sees_through_idle_parameters() -> None:
    """Two per-layer trials that differ only in a block's parameter its method does not use run the same."""
    from search.models import DEFAULT_MODEL, model_spec
    from search.samplers import ScheduleKey
    from spaces import Schedule, gmacs
    from spaces.search_space import SearchSpace

    spec = model_spec(DEFAULT_MODEL)
    space = SearchSpace("per-layer", spec, budget_gmacs=0.65 * gmacs(Schedule.empty(spec)))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    space(trial)
    params = dict(trial.params)
    params["layers.first"] = 0
    for i in range(spec.depth):
        params[f"layer{i:02d}.method"] = "merge"
    changed = {**params, "layer03.alpha": 1.0 - params["layer03.alpha"]}  # condense's, idle under merge
    key = ScheduleKey(space)
    assert key(params) == key(changed)
    assert key(params) != key({**params, "budget.fraction": params["budget.fraction"] * 0.8})


def test_schedule_key_builds_each_schedule_once() -> None:
    """The driver tells the key what each suggestion built; asking again builds nothing, and the key
    is the one a fresh build gives."""
    from search.models import DEFAULT_MODEL, model_spec
    from search.samplers import ScheduleKey
    from spaces import Schedule, gmacs
    from spaces.search_space import SearchSpace

    spec = model_spec(DEFAULT_MODEL)
    space = SearchSpace("per-layer", spec, budget_gmacs=0.65 * gmacs(Schedule.empty(spec)))
    built = []

    def counting(trial):  # type: ignore[no-untyped-def]
        built.append(1)
        return space(trial)

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    schedule = space(trial)
    key = ScheduleKey(counting)
    key.remember({**trial.params, "__stop_below": 0.5}, schedule)  # driver-only keys are ignored
    assert key(dict(trial.params)) == ScheduleKey(space)(dict(trial.params)) and built == []
    other = {**trial.params, "budget.fraction": trial.params["budget.fraction"] * 0.9}
    assert key(other) == key(other) and built == [1]  # a new point: built once, then remembered


def test_kept_front_and_seen_keys_draw_what_recomputing_them_draws() -> None:
    """_front and _seen kept across calls give the same draws, trial for trial, as recomputing both
    over every trial at each call (as before they were kept), with infeasible trials among them."""
    import math

    from optuna.trial import TrialState

    from search.samplers import LocalMoveSampler

    class Recomputing(LocalMoveSampler):
        def _front(self, study):  # type: ignore[no-untyped-def]
            done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if all(math.isfinite(v) for v in t.values)
                    and all(v <= 0 for k, v in t.system_attrs.items() if k.startswith("constraints:"))]
            if not done:
                return []
            mask = non_dominated(np.array([t.values for t in done]), ["max", "min"])
            return [t for t, keep in zip(done, mask, strict=True) if keep]

        def _seen(self, study):  # type: ignore[no-untyped-def]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
                if t.number not in self._keys and t.params:
                    self._keys[t.number] = self.key(t.params)
            return set(self._keys.values())

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        values = _objective(trial)
        trial.set_constraint("budget", values[1] - 0.9)
        return values

    def key(params: dict) -> tuple:
        return round(params["x"], 1), params["n"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = []
    for cls in (LocalMoveSampler, Recomputing):
        local = cls(optuna.samplers.NSGAIISampler(seed=2, population_size=10), seed=2, key=key, axis="x")
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=local)
        study.optimize(objective, n_trials=80)
        runs.append([(t.params, t.system_attrs.get("local:parent")) for t in study.trials])
    assert runs[0] == runs[1]
    assert sum(parent is not None for _, parent in runs[0]) >= 20


def test_every_sampler_survives_the_pickling_ray_tune_does_and_samples_the_same_after() -> None:
    """Ray Tune pickles the searcher, sampler included, when it builds a Tuner (Optuna 5.1's NSGA-II
    holds a threading.Lock: the default command crashed there). A copy must also sample what the
    original samples."""
    import pickle

    from ray.tune.search.optuna import OptunaSearch

    from search.run_dir import SAMPLERS

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in SAMPLERS:
        searcher = OptunaSearch(space={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
                                metric=["a", "b"], mode=["max", "min"], sampler=sampler(name, 5))
        pickle.dumps(searcher)  # what tune.Tuner does with it
        original = sampler(name, 5)
        copy = pickle.loads(pickle.dumps(original))
        runs = []
        for s in (original, copy):
            study = optuna.create_study(directions=["maximize", "minimize"], sampler=s)
            study.optimize(_objective, n_trials=25)
            runs.append([t.params for t in study.trials])
        assert runs[0] == runs[1], name


def _front_numbers(trials: list, before: int) -> set[int]:
    """Numbers of the COMPLETE trials on the front of those finished before trial `before`."""
    done = [t for t in trials[:before] if t.state == optuna.trial.TrialState.COMPLETE]
    mask = non_dominated(np.array([t.values for t in done]), ["max", "min"])
    return {t.number for t, keep in zip(done, mask, strict=True) if keep}


def _dominators(trials: list, preset, before: int) -> int:
    """Searched trials finished before `before` that dominate `preset` (accuracy up, cost down)."""
    a, c = preset.values
    return sum(1 for t in trials[:before] if t.state == optuna.trial.TrialState.COMPLETE
               and not t.user_attrs.get("preset") and t.values[0] >= a and t.values[1] <= c
               and tuple(t.values) != (a, c))


def _cost_axis_objective(trial: optuna.Trial) -> tuple[float, float]:
    """x is the cost, as the budget share is in the search spaces; n and c are the shape."""
    x, n = trial.suggest_float("x", 0.0, 1.0), trial.suggest_int("n", 0, 10)
    c = trial.suggest_categorical("c", ["a", "b", "c"])
    return x * (0.5 + 0.05 * n + (0.2 if c == "a" else 0.0)), x


def test_a_challenge_runs_the_nearest_costlier_searched_front_shape_at_a_preset_cost_until_two_trials_beat_it() -> None:
    """Every challenge copies the cheapest searched front point costlier than the preset (in the
    axis parameter) and takes the preset's axis value; a preset that two searched trials dominate
    is no longer challenged."""
    from search.samplers import LocalMoveSampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    local = LocalMoveSampler(optuna.samplers.RandomSampler(seed=4), seed=4, axis="x", challenge_share=0.6)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=local)
    study.enqueue_trial({"x": 0.3, "n": 0, "c": "b"}, user_attrs={"preset": "p"})  # accuracy 0.15 at cost 0.3
    study.optimize(_cost_axis_objective, n_trials=60)
    trials = study.trials
    preset = trials[0]
    challenges = [t for t in trials if "local:target" in t.system_attrs]
    assert challenges
    for t in challenges:
        assert t.system_attrs["local:target"] == 0 and t.params["x"] == preset.params["x"]
        assert _dominators(trials, preset, t.number) < 2
        parent = trials[t.system_attrs["local:parent"]]
        assert all(t.params[k] == parent.params[k] for k in t.params if k != "x")
        costlier = [n for n in _front_numbers(trials, t.number) if n != 0 and trials[n].params["x"] > 0.3]
        assert parent.number in costlier
        assert all(trials[n].params["x"] >= parent.params["x"] for n in costlier)
    beaten_at = next(n for n in range(len(trials)) if _dominators(trials, preset, n) >= 2)
    assert beaten_at < len(trials) - 10  # the test sees challenges stop, not just run out of trials


def test_a_preset_with_no_costlier_searched_shape_left_is_challenged_once_by_its_own_shape_a_little_cheaper() -> None:
    """A preset on the front with nothing costlier to borrow a shape from (here: the most accurate
    point there is, at the top of the axis) runs its own parameters at 1 % less of its axis value,
    once (the key then repeats); a shave never happens while a costlier searched shape has not run."""
    from search.samplers import LocalMoveSampler

    def key(params: dict) -> tuple:
        return round(params["x"], 6), params["n"], params["c"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    local = LocalMoveSampler(optuna.samplers.RandomSampler(seed=5), seed=5, key=key, axis="x", challenge_share=0.6)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=local)
    study.enqueue_trial({"x": 1.0, "n": 10, "c": "a"}, user_attrs={"preset": "top"})  # 1.2 at cost 1: on every front
    study.enqueue_trial({"x": 0.3, "n": 0, "c": "b"}, user_attrs={"preset": "low"})
    study.optimize(_cost_axis_objective, n_trials=60)
    trials = study.trials
    shaves = [t for t in trials if "local:target" in t.system_attrs
              and t.system_attrs["local:parent"] == t.system_attrs["local:target"]]
    assert [(t.system_attrs["local:target"], t.params) for t in shaves] == [(0, {"x": 0.99, "n": 10, "c": "a"})]
    for t in shaves:
        target = trials[t.system_attrs["local:target"]]
        assert target.number in _front_numbers(trials, t.number)
        ran = {key(u.params) for u in trials[: t.number]}
        costlier = [trials[n] for n in _front_numbers(trials, t.number)
                    if not trials[n].user_attrs.get("preset") and trials[n].params["x"] > target.params["x"]]
        assert all(key({**u.params, "x": target.params["x"]}) in ran for u in costlier)
