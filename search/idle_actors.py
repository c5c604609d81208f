"""Keep Ray Tune's idle trial actors for the next trial instead of stopping them.

With ``reuse_actors=True``, Ray Tune (2.60) caches the actor of a finished trial for the next one,
but it stops a finished trial's actor at once, or at the end of the control step, unless a trial is
waiting for one; it keeps at most one idle actor in all. When two workers are idle at once with no
trial ready (a worker that finished fast trials while the other runs an older one that
`--deterministic`'s in-order limiter waits for, search.in_order, or trials that reuse a known
result, search.output_memo), one actor is stopped. A new one is asked for with the next trial, but
it takes longer to start (a process, torch, the model and the data) than the surviving worker
takes to finish its trial, and Tune then gives the trial to that worker and drops the new actor:
the search goes on with one worker for good (measured: 59 of 60 trials on one process).

`keep_idle_actors` makes Tune keep them until the experiment ends: the search's trials all ask for
the same resources, so a kept actor always serves a later trial.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from typing import Any


def _keeping_class(base: type) -> type:
    class KeepIdleCache(base):  # type: ignore[valid-type, misc]
        """Tune's actor cache: every finished trial's actor is cached, and flushed only at the end
        (``force_all``)."""

        def cache_object(self, key: Any, obj: Any) -> bool:
            room = self.num_cached_objects + 1  # as if that many more trials were waiting for one
            self.increase_max(key, by=room)
            try:
                return super().cache_object(key, obj)
            finally:
                self.decrease_max(key, by=room)

        def flush_cached_objects(self, force_all: bool = False) -> Generator[Any, None, None]:
            if force_all:
                yield from super().flush_cached_objects(force_all=True)

    return KeepIdleCache


@contextlib.contextmanager
def keep_idle_actors() -> Iterator[bool]:
    """While open, Tune experiments created here keep their idle actors (yields whether it could:
    False on a Ray whose controller has no such cache, where Tune's own policy applies)."""
    try:
        from ray.tune.execution import tune_controller
    except ImportError:  # pragma: no cover - another Ray layout
        yield False
        return
    original = getattr(tune_controller, "_ObjectCache", None)
    if original is None or not hasattr(original, "flush_cached_objects"):  # pragma: no cover
        yield False
        return
    tune_controller._ObjectCache = _keeping_class(original)
    try:
        yield True
    finally:
        tune_controller._ObjectCache = original
