"""Does the off-the-shelf rank predict the rank after a short fine-tune? (issue 18 item 7)

    python bench/finetune_rank.py runs/<run> [--candidates 12] [--steps 100] [--batch 32] [--out DIR]

Takes a finished search on the embedded default (or any run whose model loads offline), picks
`--candidates` screened schedules spread along its front (presets and searched: the front
first, then the next non-dominated ranks, evenly over the GMACs), fine-tunes each from the same
weights with the same budget (steps, batch, seed: the in-search fine-tune,
``worker.finetune_schedule``), and scores it on the screening and the confirmation images.
Prints the table and Kendall's tau between the accuracies before and after, over all candidates
and within GMACs-matched pairs (candidates whose GMACs differ by at most 10 %, where the
promotion has to choose), and writes <out>/finetune_rank.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from search import pareto  # noqa: E402
from search.outcome import latest_records  # noqa: E402
from search.run_dir import model_args, read_records  # noqa: E402


def spread_candidates(records: list[dict], count: int) -> list[dict]:
    """`count` records along the accuracy x GMACs front: whole non-dominated ranks until there are
    enough, then `count` of them evenly spaced in GMACs."""
    points = np.array([[r["accuracy"], r["gmacs"]] for r in records])
    ranks = pareto.nondominated_ranks(points, ["max", "min"])
    pool: list[int] = []
    for rank in sorted(set(ranks.tolist())):
        pool += [i for i in range(len(records)) if ranks[i] == rank]
        if len(pool) >= count:
            break
    pool.sort(key=lambda i: records[i]["gmacs"])
    picks = np.unique(np.linspace(0, len(pool) - 1, num=min(count, len(pool))).round().astype(int))
    return [records[pool[i]] for i in picks]


def kendall_tau(a: list[float], b: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def matched_pair_agreement(rows: list[dict], tolerance: float = 0.10) -> tuple[int, int]:
    """Among pairs whose GMACs differ by at most `tolerance` (relative), how many keep their order
    (strictly better before and after), and how many pairs were compared (ties before skipped)."""
    kept = compared = 0
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if abs(a["gmacs"] - b["gmacs"]) > tolerance * max(a["gmacs"], b["gmacs"]):
                continue
            before = np.sign(a["before"] - b["before"])
            if before == 0:
                continue
            compared += 1
            kept += int(before == np.sign(a["after"] - b["after"]))
    return kept, compared


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--candidates", type=int, default=12)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", type=Path, default=None, help="default: <run>/finetune_rank")
    args = p.parse_args()
    run_json = args.run / "run.json"
    if not run_json.is_file():
        print(f"error: no finished run in {args.run} (run.json missing)", file=sys.stderr)
        return 2
    run = json.loads(run_json.read_text())
    out = args.out or args.run / "finetune_rank"
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from search.models import model_spec
    from search.worker import FinetuneJob, WorkerSetup, finetune_schedule
    from spaces import Schedule
    from spaces.search_space import SearchSpace

    torch.set_num_threads(2)
    records = latest_records(read_records(args.run))
    confirmed = {r.get("of_ray_trial"): r for r in records if r.get("fidelity") == "confirm"}
    screened = [r for r in records if r.get("fidelity", "screen") == "screen" and r.get("state") == "COMPLETE"
                and r.get("feasible") and r.get("schedule")]
    chosen = spread_candidates(screened, args.candidates)
    spec = model_spec(run["model"])
    setup = WorkerSetup(space=SearchSpace(run["space"], spec), **model_args(run), data=run["data"],
                        num_images=run["num_images"], seed=run["seed"],
                        batch_size=run["batch_size"], threads=2, confirm_images=run["confirm_images"])
    job = FinetuneJob(steps=args.steps, out_root=str(out), batch_size=args.batch)
    rows = []
    for n, r in enumerate(chosen):
        name = r.get("preset") or f"trial {r['trial']}"
        start = time.perf_counter()
        result = finetune_schedule(setup, job, Schedule.from_dict(r["schedule"]), out / f"{n:02d}")
        before_confirmed = confirmed.get(r["ray_trial"], {}).get("accuracy")
        rows.append({"name": name, "gmacs": r["gmacs"], "before": r["accuracy"], "before_confirmed": before_confirmed,
                     "after": result["accuracy"], "after_confirmed": result["confirmed_accuracy"],
                     "seconds": time.perf_counter() - start})
        print(f"{name:>18s} {100 * r['gmacs'] / run['baseline_gmacs']:5.1f} % GMACs  {100 * r['accuracy']:6.2f} "
              f"-> {100 * result['accuracy']:6.2f}  ({rows[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    tau = kendall_tau([x["before"] for x in rows], [x["after"] for x in rows])
    both = [x for x in rows if x["before_confirmed"] is not None]
    tau_confirmed = kendall_tau([x["before_confirmed"] for x in both], [x["after_confirmed"] for x in both]) \
        if len(both) >= 3 else float("nan")
    kept, compared = matched_pair_agreement(rows)
    print(f"{len(rows)} candidates along the front of {args.run}, {args.steps} steps x {args.batch} images each")
    print(f"{'candidate':>18s} {'GMACs %':>8s} {'before':>8s} {'after':>8s} {'before*':>8s} {'after*':>8s}")
    for x in rows:
        bc = f"{100 * x['before_confirmed']:8.2f}" if x["before_confirmed"] is not None else f"{'-':>8s}"
        print(f"{x['name']:>18s} {100 * x['gmacs'] / run['baseline_gmacs']:8.1f} {100 * x['before']:8.2f} "
              f"{100 * x['after']:8.2f} {bc} {100 * x['after_confirmed']:8.2f}")
    print("(* on the confirmation images)")
    print(f"Kendall tau, screening accuracy before vs after: {tau:.3f}; on the confirmation images: {tau_confirmed:.3f}")
    print(f"GMACs-matched pairs (within 10 %) keeping their order: {kept} of {compared}")
    (out / "finetune_rank.json").write_text(json.dumps({
        "run": str(args.run), "steps": args.steps, "batch": args.batch, "rows": rows, "kendall_tau": tau,
        "kendall_tau_confirmed": tau_confirmed, "matched_pairs_kept": kept, "matched_pairs": compared}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
