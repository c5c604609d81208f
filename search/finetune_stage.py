"""The promotion: the most promising screened candidates get a short fine-tune, run as Ray trials and
recorded with a fidelity tag (finetune:<steps>)."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

from search import pareto, run_dir
from search.config import SearchConfig
from search.fixed_stage import fit_grid
from search.outcome import finite, latest_records, objective_points
from search.worker import FAULT_KEY
from spaces import Schedule, gmacs


def fidelity_name(steps: int) -> str:
    return f"finetune:{steps}"


def promoted(cfg: SearchConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``finetune_top`` most promising screened candidates not fine-tuned yet: feasible
    screen records ordered by non-dominated rank, then hypervolume contribution."""
    import numpy as np

    objectives = [pareto.OBJECTIVES[o] for o in cfg.setup.objectives]
    # Candidates the space can rebuild from their parameters (searched trials, presets told to the study).
    screened = [r for r in records if r.get("fidelity") == "screen" and r.get("params") and r.get("trial") is not None]
    points, ok = objective_points(screened, objectives)
    if not ok:
        return []
    reference = pareto.reference_point(objectives, baseline_gmacs=gmacs(Schedule.empty(cfg.setup.space.spec)))
    order = pareto.promotion_order(points, [o.direction for o in objectives], reference)
    chosen = [ok[i] for i in np.asarray(order)[: cfg.finetune_top]]
    done = {r.get("trial") for r in records if r.get("fidelity", "").startswith("finetune") and r.get("state") == "COMPLETE"}
    return [r for r in chosen if r.get("trial") not in done]


def run_finetunes(cfg: SearchConfig, run: dict[str, Any]) -> None:
    """Short fine-tunes of the promoted candidates as Ray trials; each result is appended to
    trials.jsonl with a fidelity tag (the speed objectives carry over: the schedule is unchanged)."""
    from ray import tune
    from tqdm import tqdm

    from search.worker import finetune_trainable

    assert cfg.finetune is not None
    # Not finetune/: that is where `run_search.py finetune --config` writes the full fine-tune by default.
    job = replace(cfg.finetune, out_root=str((cfg.out / "promoted").resolve()))
    records = latest_records(run_dir.read_records(cfg.out))
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
                                                  "speedup", "images_per_s", "gmacs", "predicted_speedup",
                                                  "predicted_images_per_s")}
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
            self._record(trial, "COMPLETE" if finite(result.get("accuracy")) else "FAIL", result)

        def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[no-untyped-def]
            self._record(trial, "FAIL", None)

    faults = cfg.fault_finetunes  # test hook: the candidate's fault rides in its parameters
    space = [{"trial": r["trial"], "params": {**r["params"], **({FAULT_KEY: faults[i]} if i in faults else {})}}
             for i, r in enumerate(candidates)]
    fit_grid(cfg, run, tune.with_parameters(finetune_trainable, setup=cfg.setup, job=job), "candidate", space,
              "finetune", FinetuneRecorder())
    progress.close()
