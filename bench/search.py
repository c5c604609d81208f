"""Search efficiency: hypervolume against trials for each sampler, and the cost of a trial.

    python bench/search.py [--trials 40] [--reference-trials 120] [--budget 65%] [--num-images 1000]
                           [--samplers nsga2,tpe,random] [--out runs/bench_search]
    python bench/search.py --cost runs/<run>     # the cost split of one finished search

Runs the real search (`run_search.py`, local Ray) once per sampler on the embedded default,
same seed, same budget, same fixed reference point (PITFALLS 18), plus one long random
search as a reference for what is reachable. Prints the hypervolume after 10, 20, ... trials
for each, and the per-trial overhead: the time the search spends outside evaluation (Ray
scheduling, Optuna sampling and storage, the driver's bookkeeping), as a fraction of the
time spent evaluating. Writes <out>/hypervolume.csv and <out>/hypervolume.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from search import pareto, report  # noqa: E402
from search.run_dir import read_records  # noqa: E402


def run_search(out: Path, sampler: str, trials: int, args: argparse.Namespace) -> None:
    if (out / "run.json").is_file():
        print(f"reusing finished run {out}", file=sys.stderr)
        return
    cmd = [sys.executable, "run_search.py", "--budget", args.budget, "--sampler", sampler, "--trials", str(trials),
           "--num-images", str(args.num_images), "--seed", str(args.seed), "--out", str(out), "--no-presets",
           "--concurrency", str(args.concurrency)]
    print("$", " ".join(cmd[1:]), file=sys.stderr)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def history(out: Path) -> tuple[list[float], dict]:
    run = json.loads((out / "run.json").read_text())
    objectives = [pareto.OBJECTIVES[o] for o in run["objectives"]]
    records = [r for r in read_records(out)]
    ok = [r.get("state") == "COMPLETE" and bool(r.get("feasible")) for r in records]
    points = np.array([[r.get(o.name) if r.get(o.name) is not None else np.nan for o in objectives] for r in records])
    ref = pareto.reference_point(objectives, baseline_gmacs=run["baseline_gmacs"])
    hv = pareto.hypervolume_history(points, np.array(ok), [o.direction for o in objectives], ref)
    return hv, run


def overhead(out: Path, run: dict) -> dict[str, float]:
    """Time outside evaluation as a fraction of evaluation time (the worker's one-off load excluded)."""
    records = read_records(out)
    evaluating = sum(r.get("eval_seconds") or 0.0 for r in records)
    loading = sum(r.get("load_seconds") or 0.0 for r in records)
    tune = sum(t["tune"] for t in run.get("timing_s", []))
    busy = tune * run["concurrency"]  # worker-seconds the search held
    in_trial = sum(r.get("trial_seconds") or 0.0 for r in records)
    outside = busy - evaluating - loading
    nan = float("nan")
    return {"trials": len(records), "tune_s": tune, "eval_s": evaluating, "load_s": loading, "outside_s": outside,
            "overhead_fraction": outside / evaluating if evaluating else nan,
            "in_trial_fraction": (in_trial - evaluating - loading) / evaluating if evaluating else nan,
            "seconds_per_trial": tune / max(1, len(records))}


def print_cost(out: Path) -> None:
    """The cost of a trial in one finished run directory (``--cost DIR``)."""
    run = json.loads((out / "run.json").read_text())
    c = overhead(out, run)
    print(f"{out}: {c['trials']} trials, tune {c['tune_s']:.1f} s x {run['concurrency']} workers; evaluation "
          f"{c['eval_s']:.1f} s, one-off load {c['load_s']:.1f} s, outside evaluation {c['outside_s']:.1f} s "
          f"= {100 * c['overhead_fraction']:.1f} % of evaluation (inside the trainable: "
          f"{100 * c['in_trial_fraction']:.1f} %)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--reference-trials", type=int, default=120)
    p.add_argument("--budget", default="65%")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--samplers", default="nsga2,tpe,random")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_search")
    p.add_argument("--cost", type=Path, default=None, help="only print the cost split of this finished run")
    args = p.parse_args()
    if args.cost is not None:
        if not (args.cost / "run.json").is_file():
            print(f"error: no finished run in {args.cost} (run.json missing)", file=sys.stderr)
            return 2
        print_cost(args.cost)
        return 0
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    runs = {s: (out / s, s, args.trials) for s in args.samplers.split(",")}
    if args.reference_trials:
        runs["random-long"] = (out / "random-long", "random", args.reference_trials)
    histories, costs = {}, {}
    for label, (path, sampler, trials) in runs.items():
        run_search(path, sampler, trials, args)
        histories[label], run = history(path)
        costs[label] = overhead(path, run)
    report.plot_hypervolume(out, histories)
    marks = list(range(10, max(len(h) for h in histories.values()) + 1, 10))
    print(f"hypervolume (accuracy x GMACs, fixed reference) on {run['model']}, budget {args.budget}, "
          f"{args.num_images} screening images, seed {args.seed}")
    print(f"{'sampler':12s}" + "".join(f"{m:>9d}" for m in marks))
    for label, h in histories.items():
        print(f"{label:12s}" + "".join(f"{h[m - 1]:9.4f}" if m <= len(h) else " " * 9 for m in marks))
    print("\nper-trial cost")
    print(f"{'sampler':12s} {'trials':>6s} {'s/trial':>8s} {'eval s':>8s} {'overhead':>9s}")
    for label, c in costs.items():
        print(f"{label:12s} {c['trials']:6d} {c['seconds_per_trial']:8.2f} {c['eval_s']:8.1f} "
              f"{100 * c['overhead_fraction']:8.1f}%")
    (out / "summary.json").write_text(json.dumps({"histories": histories, "costs": costs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
