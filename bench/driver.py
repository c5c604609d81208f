"""How many trials a second can the search driver feed? The real driver with a no-op evaluation.

    python bench/driver.py --trials 200            # then --trials 2000
    python bench/driver.py --trials 200 --storage sqlite:///tmp/s.db   # another storage

Runs the searched-trials stage exactly as a search does (search/tune_stage.run_tune: Ray Tune,
OptunaSearch with the default sampler on the per-layer space of the embedded default, the run's
Optuna storage, the trial log, the progress bar and the early-stopping bar) at --concurrency 8 with
fractional CPUs per trial, but each Ray trial only reports made-up scores (no model, no images),
so what is timed is the driver. It prints the trials per second and the driver's time per trial
split into: sampling (OptunaSearch.suggest: Optuna's ask, the sampler, the define-by-run space and
the stop bar, storage calls excluded), storage (every call on the Optuna storage object), recording
(the trial log, the progress bar's front and hypervolume, Optuna's tell; storage excluded) and Ray
(everything else of Tune's loop: scheduling, actors, results, its experiment checkpoints), over
the whole run and in windows around trial 100 and the last trial. Each finished trial's running
totals also go to <out>/driver_timeline.csv as it happens (a run stopped early still has them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

PHASES = ("sampling", "storage", "recording")


class Phases:
    """Exclusive wall time per phase: time in a nested phase (a storage call inside a suggestion)
    counts for the inner phase only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._inner: list[float] = []
        self._names: list[str] = []

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self.calls[name] += not self._names or self._names[-1] != name  # outermost calls only
            self._inner.append(0.0)
            self._names.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = self._inner.pop()
                self._names.pop()
                self.seconds[name] += elapsed - inner
                if self._inner:
                    self._inner[-1] += elapsed

        return timed


def noop_trainable(config: dict[str, Any], setup: Any) -> None:
    """A Ray trial that evaluates nothing: scores drawn from its parameters (seeded by them), at
    the GMACs its budget share aims at, so a front forms as in a search."""
    from ray import tune

    params = {k: v for k, v in config.items() if not k.startswith("__")}
    rng = random.Random(json.dumps(params, sort_keys=True, default=str))
    fraction = float(params.get("budget.fraction", 1.0))
    tune.report({"accuracy": 0.55 + 0.35 * fraction + 0.1 * rng.random(),
                 "gmacs": fraction * (setup.space.budget_gmacs or 1.0), "feasible": True, "summary": "no-op",
                 "schedule": None, "stopped": False, "num_images": 0, "eval_seconds": 0.0, "load_seconds": 0.0,
                 "trial_seconds": 0.0, "agreement": None, "top1": None, "top5": None, "kl": None})


def instrument(phases: Phases, storage: Any) -> None:
    """Time the storage object's calls, OptunaSearch's suggestions and tells, and the trial recorder."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    from search import tune_stage

    # Their classes, not the instance (Tune pickles the searcher, storage included); Optuna wraps an
    # RDBStorage in its _CachedStorage, whose calls then reach RDBStorage's private methods.
    classes = {type(storage), type(optuna.storages.get_storage(storage))}
    for cls in classes:
        for name in dir(optuna.storages.BaseStorage):
            if not name.startswith("_") and callable(getattr(cls, name, None)):
                setattr(cls, name, phases.wrap(getattr(cls, name), "storage"))
    ConcurrencyLimiter.suggest = phases.wrap(ConcurrencyLimiter.suggest, "sampling")
    ConcurrencyLimiter.on_trial_complete = phases.wrap(ConcurrencyLimiter.on_trial_complete, "recording")
    make_callback = tune_stage._callback

    def timed_callback(*args: Any, **kwargs: Any) -> Any:
        recorder = make_callback(*args, **kwargs)
        for hook in ("on_trial_start", "on_trial_result", "on_trial_error"):
            setattr(recorder, hook, phases.wrap(getattr(recorder, hook), "recording"))
        return recorder

    tune_stage._callback = timed_callback


def timeline_hook(phases: Phases, path: Path, start: float) -> Callable[[], None]:
    """Appends (finished trials, seconds since the stage began, running phase totals) per trial."""
    with path.open("w") as f:
        f.write("trials,seconds," + ",".join(f"{p}_s" for p in PHASES) + "\n")
    count = [0]

    def tick() -> None:
        count[0] += 1
        with path.open("a") as f:
            f.write(f"{count[0]},{time.perf_counter() - start:.4f},"
                    + ",".join(f"{phases.seconds[p]:.4f}" for p in PHASES) + "\n")

    return tick


def window(rows: list[list[float]], at: int, half: int) -> dict[str, float] | None:
    """Per-trial wall and phase times between finished trials at-half and at+half (clipped to the run)."""
    hi = min(at + half, len(rows))
    lo = max(1, hi - 2 * half)
    if hi - lo < 2:
        return None
    a, b = rows[lo - 1], rows[hi - 1]
    n = hi - lo
    wall = (b[1] - a[1]) / n
    out = {"from": lo, "to": hi, "wall_ms": 1e3 * wall}
    for i, p in enumerate(PHASES):
        out[f"{p}_ms"] = 1e3 * (b[2 + i] - a[2 + i]) / n
    out["ray_ms"] = out["wall_ms"] - sum(out[f"{p}_ms"] for p in PHASES)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from search import driver, run_dir, tune_stage
    from search.cli.commands import search_config
    from search.cli.parser import build_parser
    from search.fixed_stage import create_study

    argv = ["search", "--budget", "65%", "--objectives", "accuracy,gmacs", "--no-presets", "--trials", str(args.trials), "--concurrency",
            str(args.concurrency), "--cpus-per-trial", str(args.cpus_per_trial), "--out", str(args.out)]
    if args.storage:
        argv += ["--storage", args.storage]
    cfg = search_config(build_parser().parse_args(argv), argv)
    settings = driver._settings(cfg)
    run = run_dir.prepare(cfg.out, settings, resume=False)
    driver._init_ray(cfg)
    run_dir.write_run_json(cfg.out, run)
    storage = run_dir.storage(cfg.storage, cfg.out)
    create_study(cfg, storage)  # the searched trials load it
    phases = Phases()
    instrument(phases, storage)
    start = time.perf_counter()
    tick = timeline_hook(phases, cfg.out / "driver_timeline.csv", start)
    append = run_dir.append_record

    def append_and_tick(out: Path, record: dict[str, Any]) -> None:
        append(out, record)
        tick()

    tune_stage.run_dir.append_record = append_and_tick  # type: ignore[attr-defined]
    stopped = None
    try:
        tune_stage.run_tune(cfg, run, storage, trainable=noop_trainable)
    except Exception as err:  # noqa: BLE001 - e.g. Ray losing its node on an overloaded machine: report what ran
        stopped = f"{type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}"[:300]
    total = time.perf_counter() - start
    tune_stage.run_dir.append_record = append  # type: ignore[attr-defined]
    rows = [[float(x) for x in line.split(",")] for line in (cfg.out / "driver_timeline.csv").read_text().splitlines()[1:]]
    n = len(rows)
    settled = rows[min(9, n - 1)]
    return {
        "stopped": stopped, "trials": n, "seconds": total, "trials_per_s": n / total,
        "sustained_trials_per_s": (n - settled[0]) / (rows[-1][1] - settled[1]) if n > 10 else None,
        "storage": settings["storage"], "storage_calls_per_trial": phases.calls["storage"] / max(n, 1),
        "per_trial_ms": {p: 1e3 * phases.seconds[p] / max(n, 1) for p in PHASES}
        | {"ray": 1e3 * (total - sum(phases.seconds.values())) / max(n, 1)},
        "around_100": window(rows, 100, 25), "at_end": window(rows, n, 25),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--cpus-per-trial", type=float, default=0.25)
    p.add_argument("--storage", default=None, help="as the search's --storage (default: the search's default)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one, removed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    keep = args.out is not None
    args.out = args.out or Path(tempfile.mkdtemp(prefix="bench-driver-")) / "run"
    try:
        result = run(args)
    finally:
        if not keep:
            shutil.rmtree(args.out.parent, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["stopped"]:
        print(f"stopped early by {result['stopped']}")
    print(f"{result['trials']} trials in {result['seconds']:.1f} s: {result['trials_per_s']:.2f} trials/s "
          f"({result['sustained_trials_per_s'] or float('nan'):.2f} after the 10th); storage {result['storage']}, "
          f"{result['storage_calls_per_trial']:.0f} storage calls per trial")
    print("driver ms per trial   " + "  ".join(f"{k} {v:.1f}" for k, v in result["per_trial_ms"].items()))
    for name in ("around_100", "at_end"):
        w = result[name]
        if w:
            print(f"trials {w['from']:>5}-{w['to']:<5} wall {w['wall_ms']:.1f} ms/trial: "
                  + "  ".join(f"{p} {w[f'{p}_ms']:.1f}" for p in (*PHASES, "ray")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
