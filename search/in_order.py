"""--deterministic: a searcher that repeats itself for a given seed, whatever order Ray finishes in.

Ray Tune finishes trials in an order that depends on timing, and a sampler told each result as
it arrives suggests differently from one run to the next. ``InOrderLimiter`` tells the wrapped
searcher the results strictly in suggestion order and, before it asks for suggestion k, exactly
those of suggestions 0 .. k - lag: what the sampler has seen at every suggestion is then fixed by
the seed. ``on_tell`` follows the same order (the driver's early-stopping bar). With a lag of twice
the concurrency the oldest of those trials has almost always finished when a worker frees, so
workers rarely wait; when it has not, the suggestion is asked for again at Tune's next step.
(Ray's own ``ConcurrencyLimiter(batch=True)`` is deterministic too, but a worker that finishes
first in a batch finds no pending trial, Tune stops its actor, and the trials ran one at a time.)

It is a ConcurrencyLimiter, so Tune keeps up to ``max_concurrent`` trials pending as it does for one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.tune.search import ConcurrencyLimiter, Searcher


class InOrderLimiter(ConcurrencyLimiter):
    """At most ``max_concurrent`` trials at once; suggestion k sees the results of suggestions
    0 .. k - ``lag`` only, told in suggestion order. ``total``: how many suggestions Tune will ask
    for (once all are made, every result is told as soon as the ones before it are)."""

    def __init__(self, searcher: Searcher, max_concurrent: int, *, lag: int, total: int,
                 on_tell: Callable[[str], Any] | None = None) -> None:
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.lag, self.total, self.on_tell = lag, total, on_tell
        self.order: list[str] = []  # trial ids, in suggestion order
        self.results: dict[str, tuple[dict | None, bool]] = {}  # finished, not told yet
        self.told = 0  # suggestions 0 .. told - 1 are told

    def suggest(self, trial_id: str) -> dict | None:
        if len(self.live_trials) >= self.max_concurrent or not self._tell_through(len(self.order) - self.lag):
            return None
        config = self.searcher.suggest(trial_id)
        if config not in (None, Searcher.FINISHED):
            self.order.append(trial_id)
            self.live_trials.add(trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.live_trials:
            return
        self.live_trials.remove(trial_id)
        self.results[trial_id] = (result, error)
        if len(self.order) >= self.total:  # no suggestion left to shield from it
            self._tell_through(len(self.order) - 1)

    def _tell_through(self, last: int) -> bool:
        """Tell suggestions up to index `last` in order; False when one of them has not finished."""
        while self.told <= last:
            trial_id = self.order[self.told]
            if trial_id not in self.results:
                return False
            result, error = self.results.pop(trial_id)
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            if self.on_tell is not None:
                self.on_tell(trial_id)
            self.told += 1
        return True
