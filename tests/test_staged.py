"""search.staged: phases of one Tune experiment run one after the other, each trial told to the phase
that suggested it; a phase begins only once the one before it has no trial left."""

from __future__ import annotations

from typing import Any

import pytest

from search.staged import FINISHED, Phase, StagedSearch


class Batches(Phase):
    """Hands out `count` configs, at most `concurrency` running at once; logs what happens to it."""

    def __init__(self, name: str, count: int, log: list[str], concurrency: int = 2) -> None:
        self.name, self.count, self.log, self.concurrency = name, count, log, concurrency
        self.live: set[str] = set()
        self.told: list[str] = []

    def begin(self) -> None:
        self.log.append(f"begin {self.name}")

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.count == 0:
            return FINISHED
        if len(self.live) >= self.concurrency:
            return None
        self.count -= 1
        self.live.add(trial_id)
        return {"phase": self.name}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self.live.discard(trial_id)
        self.told.append(trial_id)

    def end(self) -> None:
        self.log.append(f"end {self.name}")


def test_phases_run_in_order_and_wait_for_their_last_trial() -> None:
    log: list[str] = []
    first, second = Batches("first", 3, log), Batches("second", 1, log)
    staged = StagedSearch([first, Batches("empty", 0, log), second])
    assert staged.suggest("a") == {"phase": "first"}
    assert staged.suggest("b") == {"phase": "first"}
    assert staged.suggest("c") is None  # two running: the phase's own concurrency
    staged.on_trial_complete("a")
    assert staged.suggest("c") == {"phase": "first"}
    staged.on_trial_complete("b")
    assert staged.suggest("d") is None  # the first phase has handed out all, but "c" still runs
    assert log == ["begin first"]
    staged.on_trial_complete("c")
    assert staged.suggest("d") == {"phase": "second"}
    assert log == ["begin first", "end first", "begin empty", "end empty", "begin second"]
    assert staged.suggest("e") is None
    staged.on_trial_complete("d")
    assert staged.suggest("e") == FINISHED
    assert log[-1] == "end second"
    assert first.told == ["a", "b", "c"] and second.told == ["d"]  # each trial told to its own phase
    assert set(staged.times) == {"first", "empty", "second"}
    assert all(began <= ended for began, ended in staged.times.values())
    assert staged.times["first"][1] <= staged.times["second"][0]


def test_results_reach_the_phase_of_the_trial() -> None:
    seen: list[tuple[str, str]] = []

    class Watching(Batches):
        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            seen.append((self.name, trial_id))

    log: list[str] = []
    staged = StagedSearch([Watching("first", 1, log), Watching("second", 1, log)])
    staged.suggest("a")
    staged.on_trial_result("a", {"x": 1})
    staged.on_trial_complete("a")
    staged.suggest("b")
    staged.on_trial_result("b", {"x": 2})
    staged.on_trial_result("unknown", {"x": 3})  # not suggested here: ignored
    assert seen == [("first", "a"), ("second", "b")]


def test_an_error_in_a_phase_ends_the_suggestions_and_is_kept() -> None:
    class Failing(Phase):
        name = "failing"

        def begin(self) -> None:
            raise RuntimeError("the study is gone")

    log: list[str] = []
    staged = StagedSearch([Batches("first", 1, log), Failing(), Batches("never", 1, log)])
    assert staged.suggest("a") == {"phase": "first"}
    staged.on_trial_complete("a")
    assert staged.suggest("b") == FINISHED
    assert staged.suggest("c") == FINISHED
    assert isinstance(staged.error, RuntimeError)
    assert "begin never" not in log


def test_finished_matches_ray_tune() -> None:
    pytest.importorskip("ray")
    from ray.tune.search import Searcher

    assert Searcher.FINISHED == FINISHED
