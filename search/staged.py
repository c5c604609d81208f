"""The presets, the searched trials and the confirmation as phases of one Ray Tune experiment.

Every Tune experiment starts actors of its own, and each imports torch and timm and loads the
model, the images and the unreduced logits before its first trial: on the default command 6.7 and
7.6 s passed between one stage's last trial and the next stage's first (runs/s39-head, commit
be983c0), then 2-3 s of loading. As phases of one experiment the stages share their actors
(``reuse_actors``; search.idle_actors keeps an idle one for the next phase). A phase begins, in the
driver, once the phase before it has no trial left, as a stage began after the one before it:
what each phase runs depends on what the ones before it recorded.

    run_phases(cfg, run, [presets, searched, confirm], "search") -> {phase: (began, ended)}
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from search.config import SearchConfig
from search.idle_actors import keep_idle_actors

FINISHED = "FINISHED"  # Ray Tune's Searcher.FINISHED: no suggestion left (Ray is imported only when it runs)


class Phase:
    """One stage as a phase: ``begin`` prepares it in the driver (and may set ``callback``, which
    records its trials: Tune callback methods ``on_trial_start``, ``on_trial_result``,
    ``on_trial_error``), ``suggest`` hands out its trials' configs (None: not now; FINISHED: none
    left), ``end`` runs once its last trial has finished."""

    name = "phase"
    callback: Any = None

    def begin(self) -> None:
        pass

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        return FINISHED

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        pass

    def end(self) -> None:
        pass


class StagedSearch:
    """Phases run one after the other, as Tune's searcher (`_as_searcher`): each trial belongs to the
    phase that suggested it, which is told its results. An exception in a phase's driver-side work
    ends the suggestions (the running trials finish) and is raised again by `run_phases`."""

    def __init__(self, phases: Sequence[Phase]) -> None:
        self.phases = list(phases)
        self.current, self.began = 0, False
        self.owner: dict[str, Phase] = {}  # trial id -> the phase that suggested it
        self.live: dict[str, Phase] = {}  # suggested, not complete
        self.times: dict[str, tuple[float, float]] = {}  # phase -> (began, ended), perf_counter seconds
        self.error: BaseException | None = None

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.error is not None:
            return FINISHED
        try:
            return self._suggest(trial_id)
        except Exception as err:  # noqa: BLE001 - raised again once the experiment has ended
            self.error = err
            return FINISHED

    def _suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        while self.current < len(self.phases):
            phase = self.phases[self.current]
            if not self.began:
                self.times[phase.name] = (time.perf_counter(), 0.0)
                phase.begin()
                self.began = True
            config = phase.suggest(trial_id)
            if config is None:
                return None
            if config != FINISHED:
                self.owner[trial_id] = self.live[trial_id] = phase
                return config
            if any(p is phase for p in self.live.values()):
                return None  # its last trials still run
            phase.end()
            self.times[phase.name] = (self.times[phase.name][0], time.perf_counter())
            self.current, self.began = self.current + 1, False
        return FINISHED

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self.owner:
            self.owner[trial_id].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self.live.pop(trial_id, None)
        if trial_id in self.owner:
            self.owner[trial_id].on_trial_complete(trial_id, result=result, error=error)


def _as_searcher(staged: StagedSearch):  # type: ignore[no-untyped-def]
    """`staged` as a Ray Tune Searcher."""
    from ray.tune.search import Searcher

    assert Searcher.FINISHED == FINISHED

    class Staged(Searcher):
        def suggest(self, trial_id: str):  # type: ignore[no-untyped-def]
            return staged.suggest(trial_id)

        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            staged.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
            staged.on_trial_complete(trial_id, result=result, error=error)

        def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
            """Nothing to save: `--resume` reads trials.jsonl and the Optuna study, never Tune's state."""

    return Staged()


def _as_callback(staged: StagedSearch):  # type: ignore[no-untyped-def]
    """A Ray Tune callback handing each trial event to the callback of the trial's phase."""
    from ray import tune

    def forward(event: str, trial, *args, **info) -> None:  # type: ignore[no-untyped-def]
        phase = staged.owner.get(trial.trial_id)
        handler = getattr(phase.callback, event, None) if phase is not None else None
        if handler is not None:
            handler(*args[:2], trial, *args[2:], **info)

    class PhaseCallbacks(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            forward("on_trial_start", trial, iteration, trials, **info)

        def on_trial_result(self, iteration, trials, trial, result, **info):  # type: ignore[no-untyped-def]
            forward("on_trial_result", trial, iteration, trials, result, **info)

        def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            forward("on_trial_error", trial, iteration, trials, **info)

    return PhaseCallbacks()


@contextlib.contextmanager
def _pending_trials(count: int) -> Iterator[None]:
    """Let Tune keep `count` trials pending, as it does for a ConcurrencyLimiter: for a searcher of its
    own it keeps one, so the second worker would start only once the first runs (6.6 s later on the
    default command). A value the user set stays."""
    key = "TUNE_MAX_PENDING_TRIALS_PG"
    if key in os.environ:
        yield
        return
    os.environ[key] = str(max(1, count))
    try:
        yield
    finally:
        os.environ.pop(key, None)


def run_phases(cfg: SearchConfig, run: dict[str, Any], phases: Sequence[Phase], name: str,
               trainable=None) -> dict[str, tuple[float, float]]:  # type: ignore[no-untyped-def]
    """Run `phases` one after the other as one Tune experiment (<out>/ray/<name>-<segment>), in
    reused actors with the search's resources per trial; ``trainable`` (default
    search.worker.stage_trainable) runs every trial. Returns each phase's (began, ended) times."""
    from ray import tune

    if trainable is None:
        from search.worker import stage_trainable as trainable

    staged = StagedSearch(phases)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, setup=cfg.setup),
                            {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}),
        tune_config=tune.TuneConfig(search_alg=_as_searcher(staged), num_samples=-1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str((cfg.out / "ray").resolve()),
                                  name=f"{name}-{len(run.get('resumed', [])) + 1}",
                                  failure_config=tune.FailureConfig(max_failures=cfg.retries),
                                  verbose=0, callbacks=[_as_callback(staged)]),
    )
    with keep_idle_actors(), _pending_trials(cfg.concurrency):
        tuner.fit()
    if staged.error is not None:
        raise staged.error
    return staged.times
