"""From the trial log to the outcome: one record per Ray trial, the records the front is built from
(confirmed, fine-tuned, highest fidelity), the front, its files and the closing table."""

from __future__ import annotations

import math
import sys
from typing import Any

from search import latency, pareto, report, run_dir
from search.config import EXIT_EMPTY_FRONT, SearchConfig, SearchOutcome
from spaces import Schedule, gmacs
from spaces.presets import effective_key

STOPPED = "stopped"  # the fidelity of a searched trial stopped early: scored on its first images only


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def objective_points(records: list[dict[str, Any]], objectives) -> tuple:  # type: ignore[no-untyped-def]
    import numpy as np

    ok = [r for r in records if r.get("state") == "COMPLETE" and r.get("feasible")
          and all(finite(r.get(o.name)) for o in objectives)]
    return np.array([[r[o.name] for o in objectives] for r in ok]).reshape(-1, len(objectives)), ok


def latest_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per Ray trial (the last one written)."""
    by_id: dict[str, dict[str, Any]] = {}
    for r in records:
        by_id[r.get("ray_trial") or str(len(by_id))] = r
    return list(by_id.values())


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
    every = latest_records(run_dir.read_records(cfg.out))
    report.write_trials_csv(cfg.out / "trials.csv", every)
    records = [r for r in every if r.get("fidelity", "screen") == "screen"]  # the screening, in trial order
    front, presets, best, finetuned = final_front(cfg, every)
    baseline = gmacs(Schedule.empty(cfg.setup.space.spec))
    reference = pareto.reference_point(objectives, baseline_gmacs=baseline)
    import numpy as np

    points, ok = objective_points(records, objectives)  # feasible, complete, in the order they finished
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
    run["latency_error"] = latency.predictor_error([*front, *presets])
    run["unreduced"] = unreduced_reference(every, baseline)
    print(report.front_table(front, presets, objectives, searched, verdict_on=verdict_objectives(objectives),
                             unreduced=run["unreduced"]))
    run["front_size"], run["hypervolume"] = len(front), history[-1] if history else 0.0
    run_dir.write_run_json(cfg.out, run)
    return SearchOutcome(cfg.out, records, front, 0)


def final_front(cfg: SearchConfig, every: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                                       list[dict[str, Any]], bool]:
    """The front (on the run's objectives), the presets, the pool both come from, and whether
    fine-tunes ran, from one record per Ray trial."""
    objectives = [pareto.OBJECTIVES[o] for o in cfg.setup.objectives]
    best, finetuned = _front_pool(every)
    presets = [r for r in best if r.get("preset") and r.get("state") == "COMPLETE"]
    # A sampler can rebuild a preset exactly (a local move of an irrelevant parameter): the preset
    # stands for it on the front and in the verdict.
    preset_keys = {effective_key(Schedule.from_dict(p["schedule"])) for p in presets if p.get("schedule")}
    best = [r for r in best if r.get("preset") or not _runs_a_preset(r, preset_keys)]
    return report.front_records(best, objectives, search_only=False), presets, best, finetuned


def unreduced_reference(records: list[dict[str, Any]], baseline_gmacs: float) -> dict[str, Any] | None:
    """The unreduced model's GMACs and its accuracy on the screening and on the confirmation images
    (each preset's and each confirmed point's record carries it): the ceiling a verdict is read
    against. None when no record carries it (runs before it was recorded)."""
    def first(confirm: bool) -> float | None:
        return next((r["unreduced_accuracy"] for r in records if finite(r.get("unreduced_accuracy"))
                     and (r.get("fidelity") == "confirm") == confirm), None)

    screen, confirmed = first(confirm=False), first(confirm=True)
    if screen is None and confirmed is None:
        return None
    return {"gmacs": baseline_gmacs, "screen_accuracy": screen, "confirmed_accuracy": confirmed}


def verdict_objectives(objectives: list[pareto.Objective]) -> list[pareto.Objective]:
    """What the verdict on the presets compares: the run's objectives less the predicted speed (a
    model's estimate, not a measurement; accuracy against GMACs by default)."""
    return [o for o in objectives if o.name != "predicted_speedup"]


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
    """Screening minus confirmed accuracy over the front's confirmed points (searched and presets;
    not a preset whose screening stopped early: its screening accuracy is on its first images)."""
    import statistics

    gaps = {kind: [r["screen_accuracy"] - r["confirmed_accuracy"] for r in front
                   if r.get("fidelity") == "confirm" and finite(r.get("screen_accuracy")) and not r.get("screen_stopped")
                   and finite(r.get("confirmed_accuracy")) and bool(r.get("preset")) == (kind == "preset")]
            for kind in ("search", "preset")}
    if not any(gaps.values()):
        return None
    return {kind: {"points": len(g), "median": statistics.median(g), "mean": statistics.fmean(g)} if g else None
            for kind, g in gaps.items()}
