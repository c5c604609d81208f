"""Search efficiency: hypervolume against trials for each sampler over seeds, and the cost of a trial.

    python bench/search.py [--trials 60] [--reference-trials 240] [--seeds 0,1,2] [--budget 65%]
                           [--num-images 1000] [--samplers local-nsga2,nsga2] [--out runs/bench_search]
    python bench/search.py --cost runs/<run>     # the cost split of one finished search

Runs the real search (`run_search.py`, local Ray, presets excluded so it measures the search
itself) once per sampler and seed on the embedded default, same budget, same fixed reference
point (PITFALLS 18), on accuracy and GMACs (`--objectives accuracy,gmacs`, no re-timing), plus one long random search per seed (`--reference-trials`); random search
is memoryless, so its first `--trials` trials stand for a random run of that length.
Every searched trial counts, the early-stopped ones included (they are never on the front).
Prints the median over seeds of the hypervolume after 10, 20, ... trials for each sampler, the
two verdicts of issue 18 item 6 (the first sampler after --trials against random after
--reference-trials; the first sampler against random at every checkpoint), and the per-trial
overhead. Writes <out>/hypervolume.csv, <out>/hypervolume.png and <out>/summary.json.
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


def run_search(out: Path, sampler: str, trials: int, seed: int, args: argparse.Namespace) -> None:
    if (out / "run.json").is_file() and "hypervolume" in json.loads((out / "run.json").read_text()):
        print(f"reusing finished run {out}", file=sys.stderr)
        return
    if out.exists():  # a run that did not finish: resume it
        cmd_tail = ["--resume"]
    else:
        cmd_tail = []
    cmd = [sys.executable, "run_search.py", "--budget", args.budget, "--sampler", sampler, "--trials", str(trials),
           "--num-images", str(args.num_images), "--seed", str(seed), "--out", str(out), "--no-presets",
           "--concurrency", str(args.concurrency), "--confirm-images", str(args.confirm_images),
           "--objectives", "accuracy,gmacs", "--no-retime", *cmd_tail]
    print("$", " ".join(cmd[1:]), file=sys.stderr)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def history(out: Path) -> tuple[list[float], dict]:
    """Hypervolume after each searched trial, in the order they finished (stopped trials count as
    trials and add nothing; confirmation records are not trials)."""
    run = json.loads((out / "run.json").read_text())
    objectives = [pareto.OBJECTIVES[o] for o in run["objectives"]]
    records = [r for r in read_records(out) if r.get("fidelity", "screen") in ("screen", "stopped")
               and not r.get("preset")]
    ok = [r.get("state") == "COMPLETE" and bool(r.get("feasible")) and r.get("fidelity", "screen") == "screen"
          for r in records]
    points = np.array([[r.get(o.name) if r.get(o.name) is not None else np.nan for o in objectives] for r in records])
    points = points.reshape(-1, len(objectives))
    ref = pareto.reference_point(objectives, baseline_gmacs=run["baseline_gmacs"])
    hv = pareto.hypervolume_history(points, np.array(ok, dtype=bool), [o.direction for o in objectives], ref)
    return hv, run


def overhead(out: Path, run: dict) -> dict[str, float]:
    """Time outside evaluation as a fraction of evaluation time (the worker's one-off load excluded),
    over the searched trials (the tune stage)."""
    records = [r for r in read_records(out) if r.get("fidelity", "screen") in ("screen", "stopped")
               and not r.get("preset")]
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


def _median_at(histories: list[list[float]], trials: int) -> float:
    return float(np.median([h[min(trials, len(h)) - 1] if h else 0.0 for h in histories]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--reference-trials", type=int, default=240)
    p.add_argument("--budget", default="65%")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--confirm-images", type=int, default=100, help="the search re-scores its front; not used here")
    p.add_argument("--samplers", default="local-nsga2,nsga2", help="the first is the one judged; random search "
                   "runs once per seed for --reference-trials, and its first --trials trials are random's run")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--seeds", default="0,1,2")
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
    seeds = [int(x) for x in args.seeds.split(",")]
    samplers = args.samplers.split(",")
    runs = {s: (s, args.trials) for s in samplers if s != "random"}
    runs["random-long"] = ("random", max(args.reference_trials, args.trials))
    histories: dict[str, list[list[float]]] = {label: [] for label in runs}
    costs: dict[str, list[dict]] = {label: [] for label in runs}
    for seed in seeds:
        for label, (sampler, trials) in runs.items():
            path = out / f"{label}-seed{seed}"
            run_search(path, sampler, trials, seed, args)
            h, run = history(path)
            histories[label].append(h)
            costs[label].append(overhead(path, run))
    # Random search is memoryless: its first --trials trials are what a --trials run would have drawn.
    histories["random"] = [h[: args.trials] for h in histories["random-long"]]
    medians = {label: [_median_at(hs, m) for m in range(1, max(map(len, hs)) + 1)] for label, hs in histories.items()}
    report.plot_hypervolume(out, medians)
    marks = list(range(10, max(len(h) for h in medians.values()) + 1, 10))
    print(f"median hypervolume over seeds {seeds} (accuracy x GMACs, fixed reference) on {run['model']}, "
          f"budget {args.budget}, {args.num_images} screening images, presets excluded")
    print(f"{'sampler':12s}" + "".join(f"{m:>9d}" for m in marks))
    for label, h in medians.items():
        print(f"{label:12s}" + "".join(f"{h[m - 1]:9.4f}" if m <= len(h) else " " * 9 for m in marks))
    judged, verdicts = samplers[0], {}
    if args.reference_trials:
        ours, theirs = _median_at(histories[judged], args.trials), _median_at(histories["random-long"],
                                                                              args.reference_trials)
        verdicts["budget"] = ours >= theirs
        print(f"\n{judged} after {args.trials} trials {ours:.4f} vs random after {args.reference_trials} "
              f"{theirs:.4f}: {'PASS' if ours >= theirs else 'FAIL'}")
    checked = [m for m in marks if m <= args.trials]
    behind = [m for m in checked if _median_at(histories[judged], m) < _median_at(histories["random"], m)]
    tied = [m for m in checked if _median_at(histories[judged], m) == _median_at(histories["random"], m)]
    verdicts["every_checkpoint"] = not behind
    print(f"{judged} at least random's at every checkpoint: {'PASS' if not behind else f'FAIL at {behind}'}"
          f"{f' (tied at {tied})' if tied else ''}")
    print("\nper-trial cost (median over seeds)")
    print(f"{'sampler':12s} {'trials':>6s} {'s/trial':>8s} {'eval s':>8s} {'overhead':>9s}")
    for label, cs in costs.items():
        med = {k: float(np.median([c[k] for c in cs])) for k in ("trials", "seconds_per_trial", "eval_s",
                                                                  "overhead_fraction")}
        print(f"{label:12s} {int(med['trials']):6d} {med['seconds_per_trial']:8.2f} {med['eval_s']:8.1f} "
              f"{100 * med['overhead_fraction']:8.1f}%")
    (out / "summary.json").write_text(json.dumps({"seeds": seeds, "histories": histories, "medians": medians,
                                                  "verdicts": verdicts, "costs": costs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
