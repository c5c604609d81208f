"""The searched trials: Optuna (through Ray Tune's OptunaSearch) proposes schedules, Ray Tune runs
them in reused actors, and a Tune callback appends each result to trials.jsonl and keeps the
early-stopping bar of the next suggestions up to date."""

from __future__ import annotations

import json
import sys
from typing import Any

from search import pareto, run_dir
from search.config import SearchConfig
from search.outcome import STOPPED, finite, latest_records
from search.running_front import RunningFront
from search.staged import FINISHED, Phase, run_phases
from search.worker import FAULT_KEY, STOP_KEY, schedule_from_params
from spaces import Schedule, gmacs
from spaces.presets import effective_key
from spaces.search_space import trim_keys, trimmed_tails


def stop_bar(records: list[dict[str, Any]], at_gmacs: float) -> float | None:
    """The accuracy a new trial of `at_gmacs` must be able to reach to enter the front: the best
    screening accuracy measured so far (presets included) at no more GMACs; None when there is none."""
    bar = RunningFront([pareto.OBJECTIVES["accuracy"], pareto.OBJECTIVES["gmacs"]])
    bar.extend(records)
    return bar.best_at_most("accuracy", at_gmacs)


class _Suggested:
    """The space as OptunaSearch calls it (suggest, return nothing), keeping the schedule it built,
    so the driver prices and keys a suggestion without building it again. Picklable (Tune saves
    the searcher)."""

    def __init__(self, space) -> None:  # type: ignore[no-untyped-def]
        self.space = space
        self.last: Schedule | None = None

    def __call__(self, trial) -> None:  # type: ignore[no-untyped-def]
        self.last = self.space(trial)


def _told_presets(study) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The parameters of the presets told to the study, in the order they were told."""
    from optuna.trial import TrialState

    told = sorted((t for t in study.get_trials(deepcopy=False)
                   if t.user_attrs.get("preset") and t.params and t.state == TrialState.COMPLETE), key=lambda t: t.number)
    return [t.params for t in told]


def preset_trims(cfg: SearchConfig, study) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The trimmed tails (spaces.search_space.trimmed_tail: the preset's own schedule, its last
    block's patch tokens pruned after attention: the same predictions at fewer GMACs) of the presets
    told to the study, in the order they were told; those without one are left out."""
    return trimmed_tails(_told_presets(study), cfg.setup.space)


def starting_points(cfg: SearchConfig, study) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The local sampler's first searched trials, at most a fifth of --trials; none for other
    samplers, nor once the study holds a searched trial in any state (a resumed run's enqueued ones
    are still there). With presets: their trimmed tails (`preset_trims`), then front-loaded shapes
    (spaces.search_space.front_loaded_starts). With nothing to start
    from (--no-presets): each method alone at the top and the bottom of the budget range
    (spaces.search_space.uniform_starts)."""
    from spaces.search_space import front_loaded_starts, uniform_starts

    if any("preset" not in t.user_attrs for t in study.get_trials(deepcopy=False)) \
            or not cfg.sampler.startswith("local-"):
        return []
    space = cfg.setup.space
    starts = [*preset_trims(cfg, study), *front_loaded_starts(space)] if cfg.presets else uniform_starts(space)
    return starts[: cfg.trials // 5]


def _searcher(cfg: SearchConfig, storage, bar: RunningFront, starts: list[dict[str, Any]] = (),  # type: ignore[no-untyped-def,assignment]
              *, total: int = 0, records: dict[str, dict[str, Any]] | None = None, unstopped: frozenset = frozenset()):
    """Ray's OptunaSearch on the run's study, `starts` enqueued first; each suggestion carries the
    early-stopping bar read from `bar`, the front of accuracy against GMACs (kept up to date by the
    trial recorder; with --deterministic, in suggestion order from `records`, the recorder's
    records by Ray trial id, as the searcher is told them), except a schedule whose effective key is
    in `unstopped` (the presets' trims: confirmed whatever they score, and a stopped trial never
    enters the front). `total`: the suggestions to come."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    objectives = [pareto.OBJECTIVES[o] for o in cfg.setup.objectives]
    faults = dict(cfg.fault_trials)
    space = _Suggested(cfg.setup.space)
    sampler = run_dir.sampler(cfg.sampler, run_dir.segment_seed(cfg.seed, cfg.out), cfg.setup.space)
    key = getattr(sampler, "key", None)  # the local sampler's schedule key: told what each suggestion runs

    class _Searcher(OptunaSearch):
        """OptunaSearch that can mark chosen suggestions as faulty (test hook)."""

        suggested = 0

        def suggest(self, trial_id: str):  # type: ignore[no-untyped-def]
            space.last = None
            config = super().suggest(trial_id)
            built = space.last if isinstance(config, dict) else None
            if built is None and isinstance(config, dict):  # not built by this call (never expected)
                built = schedule_from_params(cfg.setup.space, config)
            if built is not None and key is not None:
                key.remember(config, built)
            if isinstance(config, dict) and self.suggested in faults:
                config = {**config, FAULT_KEY: faults[self.suggested]}
            if built is not None and cfg.setup.stop_chunk and "accuracy" in cfg.setup.objectives \
                    and effective_key(built) not in unstopped:
                below = bar.best_at_most("accuracy", gmacs(built))
                if below is not None:
                    config = {**config, STOP_KEY: below}
            if isinstance(config, dict):
                self.suggested += 1
            return config

    searcher = _Searcher(
        space=space, metric=[o.name for o in objectives], mode=[o.direction for o in objectives],
        sampler=sampler, storage=storage, study_name=run_dir.study_name(cfg.out),
        points_to_evaluate=list(starts) or None,
    )
    if cfg.deterministic:
        from search.in_order import InOrderLimiter

        def tell_bar(trial_id: str) -> None:
            if records is not None and trial_id in records:
                bar.add(records[trial_id])

        return searcher, InOrderLimiter(searcher, cfg.concurrency, lag=2 * cfg.concurrency, total=total,
                                        on_tell=tell_bar)
    return searcher, ConcurrencyLimiter(searcher, max_concurrent=cfg.concurrency)


def _optuna_number(searcher, trial_id: str) -> int | None:  # type: ignore[no-untyped-def]
    ot = getattr(searcher, "_ot_trials", {}).get(trial_id)
    return getattr(ot, "number", None)


# Shown by optuna-dashboard beside each trial's params and objective values.
DASHBOARD_ATTRS = ("preset", "summary", "top1", "agreement", "gmacs", "eval_seconds")


def _label_optuna_trial(searcher, trial_id: str, record: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """Copy the record's preset name, schedule summary and scores into the Optuna trial's user attrs."""
    ot = getattr(searcher, "_ot_trials", {}).get(trial_id)
    if ot is None:
        return
    for key in DASHBOARD_ATTRS:
        if record.get(key) is not None:
            ot.set_user_attr(key, record[key])


class _Nodes:
    """The Ray node a Tune trial's actor runs on (its node id), from the cluster's actor table; one
    lookup per actor (actors are reused), remembered per trial for when its actor is gone (a trial
    whose node stopped). None when Ray does not say."""

    def __init__(self) -> None:
        self._by_actor: dict[str, str | None] = {}  # actor id -> node id
        self._by_trial: dict[str, str] = {}  # Tune trial id -> node id

    def __call__(self, trial) -> str | None:  # type: ignore[no-untyped-def]
        actor = getattr(getattr(trial, "temporary_state", None), "ray_actor", None)
        if actor is None:
            return self._by_trial.get(trial.trial_id)
        actor_id = actor._actor_id.hex()
        if not self._by_actor.get(actor_id):  # not yet placed when last asked: ask again
            try:
                from ray._private import state

                self._by_actor[actor_id] = state.actors(actor_id=actor_id)["Address"]["NodeID"] or None
            except Exception:  # noqa: BLE001 - where a trial ran is worth a column, not a failed search
                return self._by_trial.get(trial.trial_id)
        node = self._by_actor[actor_id]
        if node:
            self._by_trial[trial.trial_id] = node
        return node or self._by_trial.get(trial.trial_id)


def _callback(cfg: SearchConfig, searcher, progress, fronts: list[RunningFront],  # type: ignore[no-untyped-def]
              records: dict[str, dict[str, Any]] | None = None):
    """The Tune callback that records each finished trial: its line in trials.jsonl, its labels in
    the Optuna trial, the running `fronts` (the progress bar's, the stop bar's), `records` (each
    record by Ray trial id) and the progress bar."""
    from ray import tune

    shown = fronts[0]
    node_of = _Nodes()

    class Recorder(tune.Callback):
        """Appends each finished trial to trials.jsonl and advances the progress bar."""

        def on_trial_start(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            node_of(trial)  # while its actor is alive and known

        def _record(self, trial, state: str, result: dict[str, Any] | None) -> None:  # type: ignore[no-untyped-def]
            params = {k: v for k, v in trial.config.items() if not k.startswith("__")}
            record = {"trial": _optuna_number(searcher, trial.trial_id), "ray_trial": trial.trial_id, "state": state,
                      "preset": None, "fidelity": "screen", "params": params, "stop_below": trial.config.get(STOP_KEY),
                      "node": node_of(trial)}
            if result is not None:
                record.update({k: result.get(k) for k in (
                    "accuracy", "agreement", "top1", "top5", "kl", "gmacs", "speedup", "images_per_s", "feasible",
                    "summary", "schedule", "eval_seconds", "load_seconds", "trial_seconds", "num_images",
                    "predicted_speedup", "predicted_images_per_s", "output_of")})
                if result.get("stopped"):  # scored on its first images only: never on the front
                    record["fidelity"] = STOPPED
                record["seconds"] = result.get("eval_seconds")
                if isinstance(record.get("schedule"), str):  # reported as JSON text (Tune's loggers want scalars)
                    record["schedule"] = json.loads(record["schedule"])
                _label_optuna_trial(searcher, trial.trial_id, record)  # before Tune tells Optuna the result
            run_dir.append_record(cfg.out, record)
            if records is not None:
                records[trial.trial_id] = record
            for front in fronts:
                front.add(record)
            progress.set_postfix(front=len(shown), hv=f"{shown.hypervolume:.4f}")
            progress.update(1)

        def on_trial_result(self, iteration, trials, trial, result, **info):  # type: ignore[no-untyped-def]
            state = "COMPLETE" if all(finite(result.get(o)) for o in cfg.setup.objectives) else "FAIL"
            self._record(trial, state, result)

        def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            self._record(trial, "FAIL", None)

    return Recorder()


class TunePhase(Phase):
    """The searched trials up to --trials, as a phase (search.staged): when it begins, the study
    (with the presets told) gives the starting points and the early-stopping bar; then Optuna's
    suggestions, through the concurrency or in-order limiter, until the last is suggested."""

    name = "tune"

    def __init__(self, cfg: SearchConfig, storage) -> None:  # type: ignore[no-untyped-def]
        self.cfg, self.storage = cfg, storage
        self.search = None  # the limiter around the searcher, made when the phase begins
        self.remaining = self.suggested = 0
        self.progress = None

    def begin(self) -> None:
        import optuna
        from tqdm import tqdm

        cfg = self.cfg
        study = optuna.load_study(study_name=run_dir.study_name(cfg.out), storage=self.storage)  # presets_phase created it
        done, failed = run_dir.settle_stale_trials(study, run_dir.read_records(cfg.out), list(cfg.setup.objectives),
                                                   cfg.out)
        if done or failed:
            print(f"resuming {cfg.out}: of the trials left running, {done} completed from the trial log and "
                  f"{failed} marked FAIL", file=sys.stderr)
        # --trials counts searched trials; the presets (injected trials with a "preset" attribute) come on top.
        finished = sum(run_dir.counts_against_budget(t) and "preset" not in t.user_attrs
                       for t in study.get_trials(deepcopy=False))
        self.remaining = cfg.trials - finished
        if self.remaining <= 0:
            return
        objectives = [pareto.OBJECTIVES[o] for o in cfg.setup.objectives]
        reference = pareto.reference_point(objectives, baseline_gmacs=gmacs(Schedule.empty(cfg.setup.space.spec)))
        shown = RunningFront(objectives, reference)  # the progress bar's front and hypervolume
        bar = RunningFront([pareto.OBJECTIVES["accuracy"], pareto.OBJECTIVES["gmacs"]])  # the early-stopping bar
        records = latest_records(run_dir.read_records(cfg.out))  # read once; then kept up to date trial by trial
        for front in (shown, bar):
            front.extend(records)
        by_ray_trial: dict[str, dict[str, Any]] = {}  # --deterministic: the bar learns them in suggestion order
        trims = trim_keys(_told_presets(study), cfg.setup.space)
        searcher, self.search = _searcher(cfg, self.storage, bar, starting_points(cfg, study), total=self.remaining,
                                          records=by_ray_trial, unstopped=trims)
        self.progress = tqdm(total=cfg.trials, initial=finished, desc="trials", unit="trial", file=sys.stderr)
        self.callback = _callback(cfg, searcher, self.progress, [shown] if cfg.deterministic else [shown, bar],
                                  by_ray_trial if cfg.deterministic else None)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.suggested >= self.remaining:
            return FINISHED
        config = self.search.suggest(trial_id)
        if config == FINISHED:  # never expected: --trials bounds the search
            self.remaining = self.suggested
        elif config is not None:
            self.suggested += 1
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.search.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self.search.on_trial_complete(trial_id, result=result, error=error)

    def end(self) -> None:
        if self.progress is not None:
            self.progress.close()


def run_tune(cfg: SearchConfig, run: dict[str, Any], storage, *, trainable=None) -> None:  # type: ignore[no-untyped-def]
    """The searched trials alone, as a Tune experiment of their own. ``trainable``: what each Ray trial
    runs (default the worker's, search.worker.stage_trainable; bench/driver.py passes a no-op to time
    the driver alone)."""
    run_phases(cfg, run, [TunePhase(cfg, storage)], "tune", trainable)
