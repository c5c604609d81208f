"""The search: Optuna proposes schedules, Ray Tune runs them, the run directory keeps everything.

    run(SearchConfig(...)) -> SearchOutcome

Optuna (NSGA-II by default, pinned) samples define-by-run spaces through Ray Tune's
OptunaSearch; the study lives in SQLite in the run directory (or `--storage`), so
optuna-dashboard can open it and `--resume` continues it. Ray Tune runs each trial in a
reused actor that loaded the model and the screening data once. The paper presets that fit
the budget are enqueued first. Every reported result is appended to trials.jsonl by the
driver (the single writer), which is what the reports and resume read.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from search import pareto, report, run_dir
from search.worker import FAULT_KEY, STOP_KEY, FinetuneJob, WorkerSetup, schedule_from_params
from spaces import Schedule, gmacs
from spaces.presets import effective_key, presets_in_range
from spaces.search_space import FRACTION_RANGE, SearchSpace, cheapest_gmacs, preset_params

STUDY_PREFIX = "tokensched"
EXIT_EMPTY_FRONT = 3


@dataclass(frozen=True)
class SearchConfig:
    setup: WorkerSetup
    budget: str
    out: Path
    trials: int = 60
    sampler: str = "local-nsga2"
    resume: bool = False
    storage: str | None = None
    ray_address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    concurrency: int = 2
    presets: bool = True
    seed: int = 0
    command: str = ""
    fault_trials: dict[int, str] = field(default_factory=dict)  # test hook: suggestion index -> "raise" | "nan"
    finetune_top: int = 0  # promote this many screened candidates to a short fine-tune
    finetune: FinetuneJob | None = None  # how (steps, data, batch); needed when finetune_top > 0
    retries: int = 0  # Ray FailureConfig: a failed or killed trial is run again this many times
    fault_finetunes: dict[int, str] = field(default_factory=dict)  # test hook: candidate index -> "raise" | "hang"


@dataclass
class SearchOutcome:
    out: Path
    records: list[dict[str, Any]]
    front: list[dict[str, Any]]
    exit_code: int


def _settings(cfg: SearchConfig) -> dict[str, Any]:
    s, space = cfg.setup, cfg.setup.space
    return {
        "command": cfg.command, "model": space.spec.name, "checkpoint": s.checkpoint, "pretrained": s.pretrained,
        "data": s.data, "num_images": s.num_images, "seed": cfg.seed, "budget": cfg.budget,
        "budget_gmacs": round(space.budget_gmacs or 0.0, 9), "baseline_gmacs": gmacs(Schedule.empty(space.spec)),
        "min_gmacs": None if space.min_gmacs is None else round(space.min_gmacs, 9),
        "confirm_images": s.confirm_images, "presets": cfg.presets, "stop_chunk": s.stop_chunk,
        "space": space.name, "methods": list(space.methods), "objectives": list(s.objectives), "sampler": cfg.sampler,
        "trials": cfg.trials, "device": s.device, "batch_size": s.batch_size, "precision": "fp32",
        "timing": dict(s.timing) if s.timing else None, "concurrency": cfg.concurrency,
        "cpus_per_trial": cfg.cpus_per_trial, "gpus_per_trial": cfg.gpus_per_trial,
        "storage": cfg.storage or f"sqlite:///{(cfg.out / run_dir.STUDY_DB).resolve()}",
        "versions": run_dir.versions(),
    }


def check_budget(space: SearchSpace) -> None:
    """A budget below the cheapest schedule of the space is bad input (say what the minimum is)."""
    floor = cheapest_gmacs(space)
    if space.budget_gmacs is not None and space.budget_gmacs < floor:
        raise ValueError(f"budget {space.budget_gmacs:.3f} GMACs is below the cheapest schedule of space "
                         f"{space.name!r} on {space.spec.name} ({floor:.3f} GMACs)")


def run_presets(space: SearchSpace) -> list[Schedule]:
    """Every preset of every family whose GMACs lie between the space's min_gmacs and its budget
    (spaces.presets.presets_in_range), evaluated in every run as fixed schedules."""
    return presets_in_range(space.spec, space.budget_gmacs, space.min_gmacs)


def default_min_gmacs(space: SearchSpace, presets: bool) -> float | None:
    """Where the front should reach down to: the cheapest preset under the budget (half the budget
    without presets, or when none fits)."""
    if space.budget_gmacs is None:
        return None
    fitting = [gmacs(s) for s in presets_in_range(space.spec, space.budget_gmacs)] if presets else []
    return min(fitting) if fitting else space.budget_gmacs * FRACTION_RANGE[0]


def check_ray_address(address: str | None, timeout: float = 3.0) -> None:
    """Fail fast on an unreachable cluster (ray.init would wait for minutes)."""
    import socket

    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"malformed --ray-address {address!r}; use HOST:PORT (or ray://HOST:PORT)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ValueError(f"cannot reach Ray at {address}: {err.strerror or err}") from None


def ray_auth_mode(address: str | None) -> str | None:
    """The RAY_AUTH_MODE this driver runs with, when the user has not set one.

    Ray 2.60 checks a token when the cluster was started with ``~/.ray/auth_token`` present
    (``ray start --head`` then turns token auth on by itself): a cluster driver sends the token
    if one is there. The local Ray this driver starts runs without (it binds to localhost).
    """
    if "RAY_AUTH_MODE" in os.environ:
        return os.environ["RAY_AUTH_MODE"]
    if address is None:
        return "disabled"
    if os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").is_file():
        return "token"
    return None


def check_cluster_resources(cfg: SearchConfig) -> None:
    """Resources per trial must fit one node of the cluster (Ray would wait forever otherwise)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for key, flag, need in (("CPU", "--cpus-per-trial", cfg.cpus_per_trial), ("GPU", "--gpus-per-trial", cfg.gpus_per_trial)):
        most = max((n.get(key, 0.0) for n in nodes), default=0.0)
        if need > most:
            raise ValueError(f"{flag} {need:g}: no node of the Ray cluster has that many ({most:g} at most)")


def _init_ray(cfg: SearchConfig) -> str | None:
    """Connect to `--ray-address`, or start a local Ray with its dashboard; returns the dashboard URL."""
    import ray

    if ray.is_initialized():
        return None
    try:
        if cfg.ray_address:
            ctx = ray.init(address=cfg.ray_address, log_to_driver=False, configure_logging=False)
        else:
            # address="local": always a new local Ray, even when another cluster runs on this host (PITFALLS 14)
            ctx = ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                           log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ValueError(f"cannot reach Ray at {cfg.ray_address or 'local'}: {str(err).splitlines()[0]}") from None
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


def stop_bar(records: list[dict[str, Any]], at_gmacs: float) -> float | None:
    """The accuracy a new trial of `at_gmacs` must be able to reach to enter the front: the best
    screening accuracy measured so far (presets included) at no more GMACs; None when there is none."""
    reached = [r["accuracy"] for r in records if r.get("fidelity", "screen") == "screen" and r.get("state") == "COMPLETE"
               and r.get("feasible") and _finite(r.get("accuracy")) and _finite(r.get("gmacs"))
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
                    "summary", "schedule", "eval_seconds", "load_seconds", "trial_seconds", "num_images")})
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
            points = _points(screened, objectives)
            hv = pareto.hypervolume(points[0], [o.direction for o in objectives], reference) if len(points[0]) else 0.0
            progress.set_postfix(front=len(front), hv=f"{hv:.4f}")
            progress.update(1)

        def on_trial_result(self, iteration, trials, trial, result, **info):  # type: ignore[no-untyped-def]
            state = "COMPLETE" if all(_finite(result.get(o.name)) for o in objectives) else "FAIL"
            self._record(trial, state, result)

        def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            self._record(trial, "FAIL", None)

    return Recorder()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _points(records: list[dict[str, Any]], objectives) -> tuple:  # type: ignore[no-untyped-def]
    import numpy as np

    ok = [r for r in records if r.get("state") == "COMPLETE" and r.get("feasible")
          and all(_finite(r.get(o.name)) for o in objectives)]
    return np.array([[r[o.name] for o in objectives] for r in ok]).reshape(-1, len(objectives)), ok


def _run_tune(cfg: SearchConfig, run: dict[str, Any], storage) -> None:  # type: ignore[no-untyped-def]
    import optuna
    from ray import tune
    from tqdm import tqdm

    from search.worker import trainable

    study_name = f"{STUDY_PREFIX}-{cfg.out.resolve().name}"
    study = optuna.load_study(study_name=study_name, storage=storage)  # _run_presets created it
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
    records = _latest(run_dir.read_records(cfg.out))  # read once; then kept in step with the file
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


def _batches(items: list[Any], concurrency: int, most: int = 8) -> list[list[Any]]:
    """Items dealt round-robin into at least `concurrency` batches of at most `most` each (one Ray
    trial per batch: the trial's start-up is paid once per batch, not once per item)."""
    count = min(len(items), max(concurrency, math.ceil(len(items) / most)))
    return [items[i::count] for i in range(count)] if items else []


def _run_fixed(cfg: SearchConfig, run: dict[str, Any], items: list[dict[str, Any]], stage: str, desc: str,
               on_result) -> None:  # type: ignore[no-untyped-def]
    """Evaluate fixed schedules in batches of Ray trials (reused actors, the search's concurrency).
    Each item holds ``schedule`` (a dict) and ``images`` ("screen" or "confirm"); ``on_result(item,
    record_id, state, result)`` records each outcome, under an id of its own (``<ray trial>-<index>``)."""
    from ray import tune
    from tqdm import tqdm

    from search.worker import fixed_trainable

    if not items:
        return
    progress = tqdm(total=len(items), desc=desc, unit="schedule", file=sys.stderr)

    class FixedRecorder(tune.Callback):
        def __init__(self) -> None:
            self.reported: dict[str, int] = {}  # Ray trial -> items recorded

        def on_trial_result(self, iteration, trials, trial, result, **info):  # type: ignore[no-untyped-def]
            index = int(result["item"])
            state = "COMPLETE" if _finite(result.get("accuracy")) else "FAIL"
            on_result(trial.config["items"][index], f"{trial.trial_id}-{index}", state, result)
            self.reported[trial.trial_id] = index + 1
            progress.update(1)

        def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            batch = trial.config["items"]
            for index in range(self.reported.get(trial.trial_id, 0), len(batch)):  # the ones it did not reach
                on_result(batch[index], f"{trial.trial_id}-{index}", "FAIL", None)
                progress.update(1)

    _fit_grid(cfg, run, tune.with_parameters(fixed_trainable, setup=cfg.setup), "items",
              _batches(items, cfg.concurrency), stage, FixedRecorder())
    progress.close()


def _fit_grid(cfg: SearchConfig, run: dict[str, Any], trainable, key: str, items: list[Any], stage: str,
              callback) -> None:  # type: ignore[no-untyped-def]
    """One Ray trial per item (``config[key]``), in reused actors with the search's resources per
    trial and concurrency; Tune's records go to <out>/ray/<stage>-<segment>."""
    from ray import tune

    resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={key: tune.grid_search(items)},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.concurrency, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str((cfg.out / "ray").resolve()),
                                  name=f"{stage}-{len(run.get('resumed', [])) + 1}", verbose=0,
                                  callbacks=[callback]),
    ).fit()


_RESULT_KEYS = ("accuracy", "agreement", "top1", "top5", "kl", "gmacs", "speedup", "images_per_s", "feasible", "error",
                "summary", "eval_seconds", "trial_seconds", "num_images")


def _study(cfg: SearchConfig, storage):  # type: ignore[no-untyped-def]
    """The run's Optuna study (created here; Ray's OptunaSearch loads the same one)."""
    import optuna

    directions = ["maximize" if pareto.OBJECTIVES[o].direction == "max" else "minimize" for o in cfg.setup.objectives]
    return optuna.create_study(storage=storage, sampler=run_dir.sampler(cfg.sampler, cfg.seed, cfg.setup.space),
                               study_name=f"{STUDY_PREFIX}-{cfg.out.resolve().name}", directions=directions,
                               load_if_exists=True)


def _inject_preset(cfg: SearchConfig, study, record: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:  # type: ignore[no-untyped-def]
    """Tell the study a measured preset as a finished trial, so the sampler can build on it (a parent
    for NSGA-II, a good point for TPE). Returns its trial number and parameters, or None when the
    space cannot express the preset."""
    import optuna

    space = cfg.setup.space
    schedule = Schedule.from_dict(record["schedule"])
    params = preset_params(schedule, space)
    if params is None:
        return None
    study.enqueue_trial(params, user_attrs={"preset": record["preset"]})
    trial = study.ask()
    rebuilt = space(trial)
    if rebuilt.tokens_entering() != schedule.tokens_entering():  # the enqueued point did not come back
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return None
    for key in DASHBOARD_ATTRS:
        if record.get(key) is not None:
            trial.set_user_attr(key, record[key])
    study.tell(trial, [record[o] for o in cfg.setup.objectives])
    return trial.number, params


def _run_presets(cfg: SearchConfig, run: dict[str, Any], storage) -> None:  # type: ignore[no-untyped-def]
    """Every preset in range, evaluated on the screening images as a fixed schedule and recorded; the
    ones the space can express are then told to the study as finished trials."""
    study = _study(cfg, storage)
    if not cfg.presets:
        return
    records = _latest(run_dir.read_records(cfg.out))
    done = {r["preset"] for r in records if r.get("preset") and r.get("fidelity", "screen") == "screen"}
    items = [{"preset": s.name, "schedule": s.to_dict(), "images": "screen"}
             for s in run_presets(cfg.setup.space) if s.name not in done]

    def record(item: dict[str, Any], trial_id: str, state: str, result: dict[str, Any] | None) -> None:
        rec = {"trial": None, "ray_trial": trial_id, "state": state, "preset": item["preset"], "fidelity": "screen",
               "params": None, "schedule": item["schedule"]}
        rec.update({k: (result or {}).get(k) for k in _RESULT_KEYS})
        rec["seconds"] = rec.get("eval_seconds")
        run_dir.append_record(cfg.out, rec)

    _run_fixed(cfg, run, items, "presets", "presets", record)
    told = {t.user_attrs.get("preset") for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    for rec in _latest(run_dir.read_records(cfg.out)):
        if rec.get("preset") and rec.get("state") == "COMPLETE" and rec.get("fidelity", "screen") == "screen" \
                and rec["preset"] not in told and all(_finite(rec.get(o)) for o in cfg.setup.objectives):
            told_as = _inject_preset(cfg, study, rec)
            if told_as is not None:  # same ray_trial: the new line replaces the record
                run_dir.append_record(cfg.out, {**rec, "trial": told_as[0], "params": told_as[1]})


def _confirm_candidates(cfg: SearchConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What is re-scored on the confirmation images: every preset, and the searched schedules on the
    screening front of the searched trials."""
    objectives = [pareto.OBJECTIVES[o] for o in cfg.setup.objectives]
    screened = [r for r in records if r.get("fidelity", "screen") == "screen" and r.get("state") == "COMPLETE"]
    presets = [r for r in screened if r.get("preset")]
    searched = report.front_records([r for r in screened if not r.get("preset")], objectives)
    return [r for r in [*presets, *searched] if r.get("schedule")]


def _run_confirm(cfg: SearchConfig, run: dict[str, Any]) -> None:
    """Re-score the candidates on images disjoint from the screening images (selection optimism)."""
    records = _latest(run_dir.read_records(cfg.out))
    confirmed = {r.get("of_ray_trial") for r in records if r.get("fidelity") == "confirm"}
    candidates = [r for r in _confirm_candidates(cfg, records) if r["ray_trial"] not in confirmed]
    items = [{"of": r["ray_trial"], "schedule": r["schedule"], "images": "confirm"} for r in candidates]
    by_id = {r["ray_trial"]: r for r in candidates}

    def record(item: dict[str, Any], trial_id: str, state: str, result: dict[str, Any] | None) -> None:
        screen = by_id[item["of"]]
        rec = {k: screen.get(k) for k in ("trial", "preset", "params", "summary", "schedule", "feasible", "gmacs",
                                          "speedup", "images_per_s")}
        rec.update({"ray_trial": trial_id, "of_ray_trial": item["of"], "state": state, "fidelity": "confirm",
                    "screen_accuracy": screen.get("accuracy")})
        rec.update({k: (result or {}).get(k) for k in ("accuracy", "agreement", "top1", "top5", "kl", "error",
                                                        "eval_seconds", "trial_seconds", "num_images")})
        rec["confirmed_accuracy"] = rec["accuracy"]
        run_dir.append_record(cfg.out, rec)

    _run_fixed(cfg, run, items, "confirm", "confirm", record)


def run(cfg: SearchConfig) -> SearchOutcome:
    """The whole search: prepare the run directory, run the trials, write every output."""
    start = time.perf_counter()
    # Tune's new console output prints configuration boxes and a TensorBoard hint on stdout even at
    # verbose=0; the legacy reporter at verbose=0 prints nothing, so stdout keeps the closing table.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    mode = ray_auth_mode(cfg.ray_address)
    if mode is not None:  # before anything imports Ray: it reads RAY_AUTH_MODE once, at import
        os.environ["RAY_AUTH_MODE"] = mode
    space = cfg.setup.space
    check_budget(space)
    settings = _settings(cfg)
    run_dir.prepare(cfg.out, settings, resume=cfg.resume, create=False)  # all checks before anything is written
    check_ray_address(cfg.ray_address)
    run_dir.lock(cfg.out)  # held until this process exits: a second driver on --out gets exit code 2
    dashboard = _init_ray(cfg)
    check_cluster_resources(cfg)
    run = run_dir.prepare(cfg.out, settings, resume=cfg.resume)
    run["dashboard"] = dashboard
    run_dir.write_run_json(cfg.out, run)  # before the study exists, so a kill from here on can be resumed
    storage = run_dir.storage(cfg.storage, cfg.out)
    if dashboard:
        print(f"Ray dashboard: {dashboard}", file=sys.stderr)
    print(f"Optuna study: {run['storage']} (optuna-dashboard {run['storage']})", file=sys.stderr)
    tic = time.perf_counter()
    _run_presets(cfg, run, storage)
    presets_done = time.perf_counter()
    _run_tune(cfg, run, storage)
    toc = time.perf_counter()
    _run_confirm(cfg, run)
    confirmed = time.perf_counter()
    if cfg.finetune_top > 0:
        _run_finetunes(cfg, run)
    run.setdefault("timing_s", []).append({
        "ray_init_and_setup": round(tic - start, 3), "presets": round(presets_done - tic, 3),
        "tune": round(toc - presets_done, 3), "confirm": round(confirmed - toc, 3),
        "finetune": round(time.perf_counter() - confirmed, 3)})
    return finish(cfg, run)


STOPPED = "stopped"  # the fidelity of a searched trial stopped early: scored on its first images only


def fidelity_name(steps: int) -> str:
    return f"finetune:{steps}"


def promoted(cfg: SearchConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``finetune_top`` most promising screened candidates not fine-tuned yet: feasible
    screen records ordered by non-dominated rank, then hypervolume contribution."""
    import numpy as np

    objectives = [pareto.OBJECTIVES[o] for o in cfg.setup.objectives]
    # Candidates the space can rebuild from their parameters (searched trials, presets told to the study).
    screened = [r for r in records if r.get("fidelity") == "screen" and r.get("params") and r.get("trial") is not None]
    points, ok = _points(screened, objectives)
    if not ok:
        return []
    reference = pareto.reference_point(objectives, baseline_gmacs=gmacs(Schedule.empty(cfg.setup.space.spec)))
    order = pareto.promotion_order(points, [o.direction for o in objectives], reference)
    chosen = [ok[i] for i in np.asarray(order)[: cfg.finetune_top]]
    done = {r.get("trial") for r in records if r.get("fidelity", "").startswith("finetune") and r.get("state") == "COMPLETE"}
    return [r for r in chosen if r.get("trial") not in done]


def _run_finetunes(cfg: SearchConfig, run: dict[str, Any]) -> None:
    """Short fine-tunes of the promoted candidates as Ray trials; each result is appended to
    trials.jsonl with a fidelity tag (the speed objectives carry over: the schedule is unchanged)."""
    from ray import tune
    from tqdm import tqdm

    from search.worker import finetune_trainable

    assert cfg.finetune is not None
    # Not finetune/: that is where `run_search.py finetune --config` writes the full fine-tune by default.
    job = replace(cfg.finetune, out_root=str((cfg.out / "promoted").resolve()))
    records = _latest(run_dir.read_records(cfg.out))
    candidates = promoted(cfg, records)
    if not candidates:
        return
    by_trial = {r["trial"]: r for r in candidates}
    fidelity = fidelity_name(cfg.finetune.steps)
    progress = tqdm(total=len(candidates), desc="fine-tunes", unit="trial", file=sys.stderr)

    class FinetuneRecorder(tune.Callback):
        def _record(self, trial, state: str, result: dict[str, Any] | None) -> None:  # type: ignore[no-untyped-def]
            screen = by_trial[trial.config["candidate"]["trial"]]
            record = {k: screen.get(k) for k in ("trial", "preset", "params", "summary", "schedule", "feasible",
                                                  "speedup", "images_per_s", "gmacs")}
            record.update({"ray_trial": trial.trial_id, "state": state, "fidelity": fidelity})
            if result is not None:  # accuracy on the confirmation images, as every record the front is built from
                record.update({k: result.get(k) for k in ("agreement", "top1", "top5", "kl", "weights",
                                                          "finetune_seconds", "trial_seconds")})
                record.update({"accuracy": result.get("confirmed_accuracy"), "screen_accuracy": result.get("accuracy"),
                               "confirmed_accuracy": result.get("confirmed_accuracy"), "error": result.get("error")})
            else:
                record.update({"accuracy": None, "error": "its worker ended (past --finetune-timeout, or killed)"})
            run_dir.append_record(cfg.out, record)
            progress.update(1)

        def on_trial_result(self, iteration, trials, trial, result, **info):  # type: ignore[no-untyped-def]
            self._record(trial, "COMPLETE" if _finite(result.get("accuracy")) else "FAIL", result)

        def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            self._record(trial, "FAIL", None)

    faults = cfg.fault_finetunes  # test hook: the candidate's fault rides in its parameters
    space = [{"trial": r["trial"], "params": {**r["params"], **({FAULT_KEY: faults[i]} if i in faults else {})}}
             for i, r in enumerate(candidates)]
    _fit_grid(cfg, run, tune.with_parameters(finetune_trainable, setup=cfg.setup, job=job), "candidate", space,
              "finetune", FinetuneRecorder())
    progress.close()


def _fidelity_rank(record: dict[str, Any]) -> tuple[int, int]:
    """screen < finetune:S (more steps higher)."""
    f = str(record.get("fidelity") or "screen")
    if f.startswith("finetune:"):
        return 1, int(f.split(":", 1)[1])
    return 0, 0


def highest_fidelity(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per candidate: its completed record of the highest fidelity (screen otherwise)."""
    best: dict[Any, dict[str, Any]] = {}
    for r in records:
        key = r.get("trial") if r.get("trial") is not None else r.get("ray_trial")
        if key not in best or (r.get("state") == "COMPLETE" and _fidelity_rank(r) > _fidelity_rank(best[key])):
            best[key] = r
    return list(best.values())


def finish(cfg: SearchConfig, run: dict[str, Any]) -> SearchOutcome:
    """Front, plots, configs and the closing table from trials.jsonl."""
    objectives = [pareto.OBJECTIVES[o] for o in cfg.setup.objectives]
    directions = [o.direction for o in objectives]
    every = _latest(run_dir.read_records(cfg.out))
    report.write_trials_csv(cfg.out / "trials.csv", every)
    records = [r for r in every if r.get("fidelity", "screen") == "screen"]  # the screening, in trial order
    best, finetuned = _front_pool(every)
    presets = [r for r in best if r.get("preset") and r.get("state") == "COMPLETE"]
    # A sampler can rebuild a preset exactly (a local move of an irrelevant parameter): the preset
    # stands for it on the front and in the verdict.
    preset_keys = {effective_key(Schedule.from_dict(p["schedule"])) for p in presets if p.get("schedule")}
    best = [r for r in best if r.get("preset") or not _runs_a_preset(r, preset_keys)]
    front = report.front_records(best, objectives, search_only=False)
    baseline = gmacs(Schedule.empty(cfg.setup.space.spec))
    reference = pareto.reference_point(objectives, baseline_gmacs=baseline)
    import numpy as np

    points, ok = _points(records, objectives)  # feasible, complete, in the order they finished
    history = pareto.hypervolume_history(points, np.ones(len(ok), dtype=bool), directions, reference)
    report.plot_hypervolume(cfg.out, {cfg.sampler: history})
    run["selection_optimism"] = selection_optimism(front)
    if not front:
        print("no feasible trial completed: the front is empty (see trials.csv)", file=sys.stderr)
        return SearchOutcome(cfg.out, records, front, EXIT_EMPTY_FRONT)
    report.write_front(cfg.out, front, objectives)
    title = f"{cfg.setup.space.spec.name}: {cfg.setup.space.name} space, budget {cfg.budget}"
    confirmed = any(r.get("fidelity") == "confirm" for r in best)
    screen_front = report.front_records(records, objectives, search_only=False) if finetuned or confirmed else None
    shown = {r.get("of_ray_trial") for r in best}
    plotted = [*best, *(r for r in records if r.get("ray_trial") not in shown and r not in best)]
    report.plot_front(cfg.out, plotted, front, objectives, title=title, budget_gmacs=cfg.setup.space.budget_gmacs,
                      screen_front=screen_front)
    src = {"model": run["model"], "checkpoint": run["checkpoint"], "data": run["data"],
           "finetune_data": cfg.finetune.data if cfg.finetune else None,
           "budget_gmacs": run["budget_gmacs"], "run_dir": str(cfg.out)}
    run_dir.replace_configs(cfg.out, lambda root: report.export_configs(root, front, run=src))  # stale ones go
    searched = [r for r in best if not r.get("preset") and r.get("state") == "COMPLETE"]
    print(report.front_table(front, presets, objectives, searched))
    run["front_size"], run["hypervolume"] = len(front), history[-1] if history else 0.0
    run_dir.write_run_json(cfg.out, run)
    return SearchOutcome(cfg.out, records, front, 0)


def _runs_a_preset(record: dict[str, Any], preset_keys: set[tuple]) -> bool:
    """Whether a searched trial runs exactly what a preset runs (``effective_key`` of each preset)."""
    return bool(record.get("schedule")) and effective_key(Schedule.from_dict(record["schedule"])) in preset_keys


def _front_pool(every: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """The records the front is built from, and whether fine-tunes ran. With confirmation records,
    the confirmed ones (every preset and the searched candidates, scored on disjoint images), a
    fine-tuned record replacing its candidate's; without them (older runs), the highest fidelity."""
    finetuned = [r for r in every if str(r.get("fidelity", "")).startswith("finetune")]
    confirmed = [r for r in every if r.get("fidelity") == "confirm"]
    if not confirmed:
        return highest_fidelity([r for r in every if r.get("fidelity") != STOPPED]), bool(finetuned)
    tuned = {r.get("trial"): r for r in highest_fidelity(finetuned) if r.get("state") == "COMPLETE"}
    pool = [tuned.pop(r.get("trial")) if r.get("trial") in tuned else r for r in confirmed]
    return pool + list(tuned.values()), bool(finetuned)


def selection_optimism(front: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Screening minus confirmed accuracy over the front's confirmed points (searched and presets)."""
    import statistics

    gaps = {kind: [r["screen_accuracy"] - r["confirmed_accuracy"] for r in front
                   if r.get("fidelity") == "confirm" and _finite(r.get("screen_accuracy"))
                   and _finite(r.get("confirmed_accuracy")) and bool(r.get("preset")) == (kind == "preset")]
            for kind in ("search", "preset")}
    if not any(gaps.values()):
        return None
    return {kind: {"points": len(g), "median": statistics.median(g), "mean": statistics.fmean(g)} if g else None
            for kind, g in gaps.items()}


def _latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per Ray trial (the last one written)."""
    by_id: dict[str, dict[str, Any]] = {}
    for r in records:
        by_id[r.get("ray_trial") or str(len(by_id))] = r
    return list(by_id.values())


def command_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["python", "run_search.py", *argv])

