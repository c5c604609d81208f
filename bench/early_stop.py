"""What did early stopping cost? Re-screen a finished run's stopped trials on every image.

    python bench/early_stop.py runs/<run>

A searched trial stops once a 95 % upper confidence bound of its accuracy falls below the best
accuracy measured at no more GMACs (issue 18 item 5). This evaluates each stopped trial of the
run on all the screening images, as if it had not stopped, and reports: how many would have
reached their bar (a wrong stop), how many would have entered the run's screening front, and the
share of the searched trials' screening images that stopping saved.
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    args = p.parse_args()
    if not (args.run / "run.json").is_file():
        print(f"error: no finished run in {args.run} (run.json missing)", file=sys.stderr)
        return 2
    run = json.loads((args.run / "run.json").read_text())

    import torch

    from search.models import model_spec
    from search.worker import WorkerSetup, evaluate_fixed
    from spaces import Schedule
    from spaces.search_space import SearchSpace

    torch.set_num_threads(2)
    records = latest_records(read_records(args.run))
    screened = [r for r in records if r.get("fidelity", "screen") == "screen" and r.get("state") == "COMPLETE"
                and r.get("feasible")]
    searched = [r for r in records if not r.get("preset") and r.get("fidelity") in ("screen", "stopped")
                and r.get("state") == "COMPLETE"]
    stopped = [r for r in searched if r["fidelity"] == "stopped"]
    spec = model_spec(run["model"])
    setup = WorkerSetup(space=SearchSpace(run["space"], spec, budget_gmacs=run["budget_gmacs"]), **model_args(run),
                        data=run["data"], num_images=run["num_images"], seed=run["seed"],
                        batch_size=run["batch_size"], threads=2, confirm_images=run["confirm_images"])
    start = time.perf_counter()
    wrong, would_enter = [], []
    for r in stopped:
        full = evaluate_fixed(setup, Schedule.from_dict(r["schedule"]), "screen")["accuracy"]
        if r.get("stop_below") is not None and full >= r["stop_below"]:
            wrong.append((r["trial"], full, r["stop_below"]))
        points = np.array([[x["accuracy"], x["gmacs"]] for x in screened] + [[full, r["gmacs"]]])
        if pareto.non_dominated(points, ["max", "min"])[-1]:
            would_enter.append((r["trial"], full, r["gmacs"]))
        print(f"trial {r['trial']}: stopped at {r['num_images']} images ({100 * r['accuracy']:.2f} %), "
              f"all {run['num_images']}: {100 * full:.2f} %, bar {100 * (r.get('stop_below') or 0):.2f} %",
              file=sys.stderr, flush=True)
    seen = sum(r.get("num_images") or run["num_images"] for r in searched)
    print(f"{args.run}: {len(stopped)} of {len(searched)} searched trials stopped early; they screened "
          f"{seen} of {len(searched) * run['num_images']} images ({100 * (1 - seen / (len(searched) * run['num_images'])):.0f} % "
          f"saved)")
    print(f"re-screened on all {run['num_images']} images ({time.perf_counter() - start:.0f} s): "
          f"{len(wrong)} would have reached their bar {wrong or ''}, "
          f"{len(would_enter)} would have entered the screening front {would_enter or ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
