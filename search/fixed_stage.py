"""Fixed schedules as batches of Ray trials: every preset in range on the screening images (then
told to the study as finished trials), and the confirmation of the candidates on images disjoint
from the screening images."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

from search import paired, pareto, report, run_dir, screen_bars
from search.config import SearchConfig
from search.idle_actors import keep_idle_actors
from search.outcome import STOPPED, finite, latest_records
from search.staged import FINISHED, Phase
from search.tune_stage import DASHBOARD_ATTRS
from search.worker import presets_stop
from spaces import Schedule, gmacs
from spaces.presets import effective_key, output_key, presets_in_range
from spaces.search_space import SearchSpace, preset_params, trim_keys


def run_presets(space: SearchSpace) -> list[Schedule]:
    """Every preset of every family whose GMACs lie between the space's min_gmacs and its budget
    (spaces.presets.presets_in_range), evaluated in every run as fixed schedules."""
    return presets_in_range(space.spec, space.budget_gmacs, space.min_gmacs)


def presets_to_run(space: SearchSpace, records: list[dict[str, Any]]) -> list[Schedule]:
    """The presets in range without a completed screening record: all of them in a new run; on
    `--resume`, the ones not reached and the ones that failed (a worker lost with its batch fails
    every preset it had left; a preset that fails by itself fails again and is recorded again)."""
    done = {r["preset"] for r in records if r.get("preset") and _screened(r)}
    return [s for s in run_presets(space) if s.name not in done]


def _screened(record: dict[str, Any]) -> bool:
    """A completed screening: on every image, or stopped early (presets stop against each other)."""
    return record.get("fidelity", "screen") in ("screen", STOPPED) and record.get("state") == "COMPLETE"


def _batches(items: list[Any], concurrency: int, most: int = 8,
             cost: Callable[[Any], float] = lambda item: 1.0,
             order: Callable[[Any], float] | None = None,
             group: Callable[[Any], Any] | None = None) -> list[list[Any]]:
    """Items dealt into batches of about equal `cost` (one Ray trial per batch: the trial's start-up
    is paid once per batch, not once per item): enough batches for about `most` items each, rounded
    up to a multiple of `concurrency`, so the workers finish together. Costliest first, each item to the
    cheapest batch so far (longest processing time first); the costliest batches first, each in
    `order` when given. Items of one `group` go to one batch one after the other, in their order here,
    and cost what the costliest of them costs (the first to run writes what the others read:
    search.output_memo)."""
    if not items:
        return []
    grouped: dict[Any, list[Any]] = {}
    for i, item in enumerate(items):
        grouped.setdefault(group(item) if group else i, []).append(item)
    units = [(max(map(cost, unit)), unit) for unit in grouped.values()]
    count = min(len(units), concurrency * math.ceil(math.ceil(len(items) / most) / concurrency))
    batches: list[list[list[Any]]] = [[] for _ in range(count)]
    totals = [0.0] * count
    for unit_cost, unit in sorted(units, key=lambda u: u[0], reverse=True):
        slot = min(range(count), key=lambda i: (totals[i], sum(map(len, batches[i]))))
        batches[slot].append(unit)
        totals[slot] += unit_cost
    return [[item for unit in (sorted(batches[i], key=lambda u: order(u[0])) if order else batches[i]) for item in unit]
            for i in sorted(range(count), key=lambda i: -totals[i])]


def _item_cost(item: dict[str, Any]) -> float:
    """The GMACs of a fixed schedule: its evaluation time goes with them."""
    return gmacs(Schedule.from_dict(item["schedule"]))


def _output_group(item: dict[str, Any]) -> tuple:
    """The items that predict the same (spaces.presets.output_key) run in one batch, one after the other."""
    return output_key(Schedule.from_dict(item["schedule"]))


class _FixedRecorder:
    """Records each schedule of a batch as its result arrives (``on_result``), and the ones a failed
    batch did not reach as FAIL."""

    def __init__(self, on_result, progress) -> None:  # type: ignore[no-untyped-def]
        self.on_result, self.progress = on_result, progress
        self.reported: dict[str, int] = {}  # Ray trial -> items recorded

    def on_trial_result(self, iteration, trials, trial, result, **info):  # type: ignore[no-untyped-def]
        index = int(result["item"])
        state = "COMPLETE" if finite(result.get("accuracy")) else "FAIL"
        self.on_result(trial.config["items"][index], f"{trial.trial_id}-{index}", state, result)
        self.reported[trial.trial_id] = index + 1
        self.progress.update(1)

    def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
        batch = trial.config["items"]
        for index in range(self.reported.get(trial.trial_id, 0), len(batch)):  # the ones it did not reach
            self.on_result(batch[index], f"{trial.trial_id}-{index}", "FAIL", None)
            self.progress.update(1)


Prepared = tuple[list[dict[str, Any]], Callable[..., None] | None]  # the items, and how each outcome is recorded


class FixedPhase(Phase):
    """Fixed schedules in batches of Ray trials, at most the search's concurrency at once (search.staged).
    ``prepare()``, when the phase begins, returns the items and ``on_result``: each item holds
    ``schedule`` (a dict), ``images`` ("screen" or "confirm") and optionally ``stop`` (stop early
    against the others, search.screen_bars: each batch then runs its cheapest schedules first, so
    that the costlier ones find bars); ``on_result(item, record_id, state, result)`` records each
    outcome, under an id of its own (``<ray trial>-<index>``). ``after()`` runs once all are recorded."""

    def __init__(self, name: str, concurrency: int, prepare: Callable[[], Prepared],
                 after: Callable[[], None] | None = None) -> None:
        self.name, self.concurrency, self.prepare, self.after = name, concurrency, prepare, after
        self.batches: list[list[dict[str, Any]]] = []
        self.live: set[str] = set()
        self.progress = None

    def begin(self) -> None:
        from tqdm import tqdm

        items, on_result = self.prepare()
        if not items:
            return
        self.progress = tqdm(total=len(items), desc=self.name, unit="schedule", file=sys.stderr)
        self.callback = _FixedRecorder(on_result, self.progress)
        self.batches = _batches(items, self.concurrency, cost=_item_cost,
                                order=_item_cost if any(item.get("stop") for item in items) else None,
                                group=_output_group)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if not self.batches:
            return FINISHED
        if len(self.live) >= self.concurrency:
            return None
        self.live.add(trial_id)
        return {"items": self.batches.pop(0)}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self.live.discard(trial_id)

    def end(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.after is not None:
            self.after()


def fit_grid(cfg: SearchConfig, run: dict[str, Any], trainable, key: str, items: list[Any], stage: str,
              callback) -> None:  # type: ignore[no-untyped-def]
    """One Ray trial per item (``config[key]``), in reused actors with the search's resources per
    trial and concurrency; Tune's records go to <out>/ray/<stage>-<segment>."""
    from ray import tune

    resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={key: tune.grid_search(items)},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.concurrency, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str((cfg.out / "ray").resolve()),
                                  name=f"{stage}-{len(run.get('resumed', [])) + 1}", verbose=0,
                                  callbacks=[callback]),
    )
    with keep_idle_actors():
        tuner.fit()


_RESULT_KEYS = ("accuracy", "agreement", "top1", "top5", "kl", "gmacs", "speedup", "images_per_s", "feasible", "error",
                "summary", "eval_seconds", "trial_seconds", "num_images", "predicted_speedup", "predicted_images_per_s",
                "output_of", "unreduced_accuracy")


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


def create_study(cfg: SearchConfig, storage):  # type: ignore[no-untyped-def]
    """The run's Optuna study (created here; Ray's OptunaSearch loads the same one)."""
    import optuna

    directions = ["maximize" if pareto.OBJECTIVES[o].direction == "max" else "minimize" for o in cfg.setup.objectives]
    return optuna.create_study(storage=storage, sampler=run_dir.sampler(cfg.sampler, cfg.seed, cfg.setup.space),
                               study_name=run_dir.study_name(cfg.out), directions=directions,
                               load_if_exists=True)


def presets_phase(cfg: SearchConfig, storage) -> FixedPhase:  # type: ignore[no-untyped-def]
    """Every preset in range, evaluated on the screening images as a fixed schedule and recorded; the
    ones the space can express are then told to the study as finished trials. Creates the study
    when it begins, presets or none."""

    opened: list[Any] = []  # the study, opened when the phase begins and told the presets when it ends

    def prepare() -> Prepared:
        opened.append(create_study(cfg, storage))
        if not cfg.presets:
            return [], None
        records = latest_records(run_dir.read_records(cfg.out))
        stop = presets_stop(cfg.setup)
        if stop:  # the bars start from the presets a resumed run already screened in full
            screen_bars.seed(screen_bars.path_in(cfg.setup.cache_dir),
                             [(r["gmacs"], r["accuracy"]) for r in records if r.get("preset")
                              and r.get("state") == "COMPLETE" and r.get("fidelity", "screen") == "screen"
                              and finite(r.get("accuracy"))])
        items = [{"preset": s.name, "schedule": s.to_dict(), "images": "screen", "stop": stop}
                 for s in presets_to_run(cfg.setup.space, records)]
        return items, record

    def record(item: dict[str, Any], trial_id: str, state: str, result: dict[str, Any] | None) -> None:
        rec = {"trial": None, "ray_trial": trial_id, "state": state, "preset": item["preset"], "fidelity": "screen",
               "params": None, "schedule": item["schedule"]}
        rec.update({k: (result or {}).get(k) for k in _RESULT_KEYS})
        if (result or {}).get("stopped"):  # scored on its first images only: confirmed like every preset
            rec["fidelity"] = STOPPED
        rec["seconds"] = rec.get("eval_seconds")
        run_dir.append_record(cfg.out, rec)

    return FixedPhase("presets", cfg.concurrency, prepare, after=lambda: tell_presets(cfg, opened[0]))


def tell_presets(cfg: SearchConfig, study) -> None:  # type: ignore[no-untyped-def]
    """Tell the study every preset screened in full that it has not been told, in one order."""
    if not cfg.presets:
        return
    told = {t.user_attrs.get("preset") for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    rank = {s.name: i for i, s in enumerate(run_presets(cfg.setup.space))}  # told in one order, however they finished
    for rec in sorted(latest_records(run_dir.read_records(cfg.out)), key=lambda r: rank.get(r.get("preset"), -1)):
        if rec.get("preset") and rec.get("state") == "COMPLETE" and rec.get("fidelity", "screen") == "screen" \
                and rec["preset"] not in told and all(finite(rec.get(o)) for o in cfg.setup.objectives):
            told_as = _inject_preset(cfg, study, rec)
            if told_as is not None:  # same ray_trial: the new line replaces the record
                run_dir.append_record(cfg.out, {**rec, "trial": told_as[0], "params": told_as[1]})


def _confirm_candidates(cfg: SearchConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What is re-scored on the confirmation images: every preset, the searched schedules on the
    screening front of the searched trials, and the searched trials that run a preset's trimmed tail
    (the preset's predictions at fewer GMACs: chosen by what they run, not by their scores)."""
    objectives = [pareto.OBJECTIVES[o] for o in cfg.setup.objectives]
    presets = [r for r in records if r.get("preset") and _screened(r)]  # stopped ones too: every preset
    screened = [r for r in records if r.get("fidelity", "screen") == "screen" and r.get("state") == "COMPLETE"]
    searched = report.front_records([r for r in screened if not r.get("preset")], objectives)
    trims = trim_keys((r["params"] for r in presets if r.get("params")), cfg.setup.space)
    on_front = {id(r) for r in searched}
    searched += [r for r in screened if not r.get("preset") and id(r) not in on_front and r.get("schedule")
                 and effective_key(Schedule.from_dict(r["schedule"])) in trims]
    return [r for r in [*presets, *searched] if r.get("schedule")]


def confirm_phase(cfg: SearchConfig) -> FixedPhase:
    """Re-score the candidates on images disjoint from the screening images (selection optimism);
    the candidates are read when the phase begins, after the searched trials."""
    by_id: dict[str, dict[str, Any]] = {}

    def prepare() -> Prepared:
        records = latest_records(run_dir.read_records(cfg.out))
        confirmed = {r.get("of_ray_trial") for r in records if r.get("fidelity") == "confirm"}
        candidates = [r for r in _confirm_candidates(cfg, records) if r["ray_trial"] not in confirmed]
        by_id.update({r["ray_trial"]: r for r in candidates})
        return [{"of": r["ray_trial"], "schedule": r["schedule"], "images": "confirm"} for r in candidates], record

    def record(item: dict[str, Any], trial_id: str, state: str, result: dict[str, Any] | None) -> None:
        screen = by_id[item["of"]]
        rec = {k: screen.get(k) for k in ("trial", "preset", "params", "summary", "schedule", "feasible", "gmacs",
                                          "speedup", "images_per_s", "predicted_speedup", "predicted_images_per_s")}
        rec.update({"ray_trial": trial_id, "of_ray_trial": item["of"], "state": state, "fidelity": "confirm",
                    "screen_accuracy": screen.get("accuracy"), "screen_images": screen.get("num_images"),
                    "screen_stopped": screen.get("fidelity") == STOPPED})
        rec.update({k: (result or {}).get(k) for k in ("accuracy", "agreement", "top1", "top5", "kl", "error",
                                                        "eval_seconds", "trial_seconds", "num_images", "output_of",
                                                        "unreduced_accuracy", paired.KEY)})
        rec["confirmed_accuracy"] = rec["accuracy"]
        run_dir.append_record(cfg.out, rec)

    return FixedPhase("confirm", cfg.concurrency, prepare)
