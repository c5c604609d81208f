"""The searched trials: Optuna (through Ray Tune's OptunaSearch) proposes schedules, Ray Tune runs
them in reused actors, and a Tune callback appends each result to trials.jsonl and keeps the
early-stopping bar of the next suggestions up to date."""

from __future__ import annotations

import json
import sys
from typing import Any

from search import pareto, report, run_dir
from search.config import STUDY_PREFIX, SearchConfig
from search.outcome import STOPPED, finite, latest_records, objective_points
from search.worker import FAULT_KEY, STOP_KEY, schedule_from_params
from spaces import Schedule, gmacs


def stop_bar(records: list[dict[str, Any]], at_gmacs: float) -> float | None:
    """The accuracy a new trial of `at_gmacs` must be able to reach to enter the front: the best
    screening accuracy measured so far (presets included) at no more GMACs; None when there is none."""
    reached = [r["accuracy"] for r in records if r.get("fidelity", "screen") == "screen" and r.get("state") == "COMPLETE"
               and r.get("feasible") and finite(r.get("accuracy")) and finite(r.get("gmacs"))
               and r["gmacs"] <= at_gmacs + 1e-12]
    return max(reached, default=None)


def _searcher(cfg: SearchConfig, storage, records: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    """Ray's OptunaSearch on the run's study; each suggestion carries the early-stopping bar computed
    from `records` (kept up to date by the trial recorder)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    objectives = [pareto.OBJECTIVES[o] for o in cfg.setup.objectives]
    faults = dict(cfg.fault_trials)

    class _Searcher(OptunaSearch):
        """OptunaSearch that can mark chosen suggestions as faulty (test hook)."""

        suggested = 0

        def suggest(self, trial_id: str):  # type: ignore[no-untyped-def]
            config = super().suggest(trial_id)
            if isinstance(config, dict) and self.suggested in faults:
                config = {**config, FAULT_KEY: faults[self.suggested]}
            if isinstance(config, dict) and cfg.setup.stop_chunk and "accuracy" in cfg.setup.objectives:
                bar = stop_bar(records, gmacs(schedule_from_params(cfg.setup.space, config)))
                if bar is not None:
                    config = {**config, STOP_KEY: bar}
            if isinstance(config, dict):
                self.suggested += 1
            return config

    searcher = _Searcher(
        space=cfg.setup.space.optuna_space, metric=[o.name for o in objectives],
        mode=[o.direction for o in objectives],
        sampler=run_dir.sampler(cfg.sampler, run_dir.segment_seed(cfg.seed, cfg.out), cfg.setup.space),
        storage=storage, study_name=f"{STUDY_PREFIX}-{cfg.out.resolve().name}",
    )
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


def _callback(cfg: SearchConfig, searcher, progress, records: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    from ray import tune

    objectives = [pareto.OBJECTIVES[o] for o in cfg.setup.objectives]
    reference = pareto.reference_point(objectives, baseline_gmacs=gmacs(Schedule.empty(cfg.setup.space.spec)))

    class Recorder(tune.Callback):
        """Appends each finished trial to trials.jsonl and advances the progress bar."""

        def _record(self, trial, state: str, result: dict[str, Any] | None) -> None:  # type: ignore[no-untyped-def]
            params = {k: v for k, v in trial.config.items() if not k.startswith("__")}
            record = {"trial": _optuna_number(searcher, trial.trial_id), "ray_trial": trial.trial_id, "state": state,
                      "preset": None, "fidelity": "screen", "params": params, "stop_below": trial.config.get(STOP_KEY)}
            if result is not None:
                record.update({k: result.get(k) for k in (
                    "accuracy", "agreement", "top1", "top5", "kl", "gmacs", "speedup", "images_per_s", "feasible",
                    "summary", "schedule", "eval_seconds", "load_seconds", "trial_seconds", "num_images",
                    "predicted_speedup", "predicted_images_per_s")})
                if result.get("stopped"):  # scored on its first images only: never on the front
                    record["fidelity"] = STOPPED
                record["seconds"] = result.get("eval_seconds")
                if isinstance(record.get("schedule"), str):  # reported as JSON text (Tune's loggers want scalars)
                    record["schedule"] = json.loads(record["schedule"])
                _label_optuna_trial(searcher, trial.trial_id, record)  # before Tune tells Optuna the result
            run_dir.append_record(cfg.out, record)
            records.append(record)
            screened = [r for r in records if r.get("fidelity", "screen") == "screen"]
            front = report.front_records(screened, objectives)
            points = objective_points(screened, objectives)
            hv = pareto.hypervolume(points[0], [o.direction for o in objectives], reference) if len(points[0]) else 0.0
            progress.set_postfix(front=len(front), hv=f"{hv:.4f}")
            progress.update(1)

        def on_trial_result(self, iteration, trials, trial, result, **info):  # type: ignore[no-untyped-def]
            state = "COMPLETE" if all(finite(result.get(o.name)) for o in objectives) else "FAIL"
            self._record(trial, state, result)

        def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            self._record(trial, "FAIL", None)

    return Recorder()


def run_tune(cfg: SearchConfig, run: dict[str, Any], storage, *, trainable=None) -> None:  # type: ignore[no-untyped-def]
    """The searched trials up to --trials. ``trainable``: what each Ray trial runs (default the worker's
    evaluation, search.worker.trainable; bench/driver.py passes a no-op to time the driver alone)."""
    import optuna
    from ray import tune
    from tqdm import tqdm

    if trainable is None:
        from search.worker import trainable

    study_name = f"{STUDY_PREFIX}-{cfg.out.resolve().name}"
    study = optuna.load_study(study_name=study_name, storage=storage)  # evaluate_presets created it
    done, failed = run_dir.settle_stale_trials(study, run_dir.read_records(cfg.out), list(cfg.setup.objectives),
                                               cfg.out)
    if done or failed:
        print(f"resuming {cfg.out}: of the trials left running, {done} completed from the trial log and "
              f"{failed} marked FAIL", file=sys.stderr)
    # --trials counts searched trials; the presets (injected trials with a "preset" attribute) come on top.
    finished = sum(run_dir.counts_against_budget(t) and "preset" not in t.user_attrs
                   for t in study.get_trials(deepcopy=False))
    remaining = cfg.trials - finished
    if remaining <= 0:
        return
    records = latest_records(run_dir.read_records(cfg.out))  # read once; then kept in step with the file
    searcher, limited = _searcher(cfg, storage, records)
    progress = tqdm(total=cfg.trials, initial=finished, desc="trials", unit="trial", file=sys.stderr)
    setup_resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, setup=cfg.setup), setup_resources),
        tune_config=tune.TuneConfig(search_alg=limited, num_samples=remaining, reuse_actors=True),
        run_config=tune.RunConfig(
            storage_path=str((cfg.out / "ray").resolve()), name=f"tune-{len(run.get('resumed', [])) + 1}",
            failure_config=tune.FailureConfig(max_failures=cfg.retries),
            verbose=0, callbacks=[_callback(cfg, searcher, progress, records)],
        ),
    )
    tuner.fit()
    progress.close()
