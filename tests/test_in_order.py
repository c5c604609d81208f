"""InOrderLimiter (--deterministic): results are told in suggestion order, and suggestion k only
after those of suggestions 0 .. k - lag, whatever order the trials finish in."""

from __future__ import annotations

from ray.tune.search import Searcher

from search.in_order import InOrderLimiter


class _Recording(Searcher):
    """Suggests {"k": k, "seen": what it was told so far}; records what it is told, in order."""

    def __init__(self) -> None:
        super().__init__(metric="a", mode="max")
        self.told: list[str] = []
        self.count = 0

    def suggest(self, trial_id: str) -> dict:
        self.count += 1
        return {"k": self.count - 1, "seen": list(self.told)}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.told.append(trial_id)


def test_results_are_told_in_suggestion_order_and_only_those_lag_behind() -> None:
    inner, bar = _Recording(), []
    limiter = InOrderLimiter(inner, 2, lag=3, total=6, on_tell=bar.append)
    assert limiter.suggest("t0")["seen"] == [] and limiter.suggest("t1")["seen"] == []
    assert limiter.suggest("t2") is None  # two running
    limiter.on_trial_complete("t1", {"a": 1})  # finishes first
    assert limiter.suggest("t2")["seen"] == []  # suggestion 2 needs nothing told (2 - lag < 0)
    limiter.on_trial_complete("t2", {"a": 2})
    assert limiter.suggest("t3") is None  # suggestion 3 needs t0's result, which is not in
    limiter.on_trial_complete("t0", {"a": 0})
    assert limiter.suggest("t3")["seen"] == ["t0"]  # t1 and t2 finished, but only t0 is told
    assert limiter.suggest("t4")["seen"] == ["t0", "t1"]
    limiter.on_trial_complete("t4", {"a": 4})
    limiter.on_trial_complete("t3", {"a": 3})
    assert limiter.suggest("t5")["seen"] == ["t0", "t1", "t2"]
    assert inner.told == ["t0", "t1", "t2"] and bar == inner.told
    limiter.on_trial_complete("t5", {"a": 5})  # the last suggestion made: everything is told, in order
    assert inner.told == ["t0", "t1", "t2", "t3", "t4", "t5"] and bar == inner.told


def test_tune_keeps_idle_actors_while_keep_idle_actors_is_open() -> None:
    from ray.tune.execution import tune_controller

    from search.idle_actors import keep_idle_actors

    original = tune_controller._ObjectCache

    def two_idle(cache_class: type) -> tuple[list[str], list[str]]:
        cache = cache_class(may_keep_one=True)  # as Tune's controller makes it
        cached = [actor for actor in ("a", "b") if cache.cache_object("1 CPU", actor)]  # two workers idle at once
        return cached, list(cache.flush_cached_objects()), list(cache.flush_cached_objects(force_all=True))

    assert two_idle(original) == (["a"], [], ["a"])  # Tune's own policy: "b" is stopped at once
    with keep_idle_actors() as kept:
        assert kept and tune_controller._ObjectCache is not original
        assert two_idle(tune_controller._ObjectCache) == (["a", "b"], [], ["a", "b"])  # both kept until the end
    assert tune_controller._ObjectCache is original
