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
