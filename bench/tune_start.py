"""What a Ray Tune stage costs before any evaluation: experiments of two empty trials on a local Ray.

    python bench/tune_start.py [--stages 3] [--preload]

Each stage of a search is one Ray Tune experiment whose new actors import torch and timm before
their first trial. This runs `--stages` experiments of two trials (one CPU each, two at a time,
actors reused, as the search runs them) whose trainable only reports, then the same with a
trainable that imports torch and timm first, and prints each experiment's wall seconds. With
`--preload`, the local Ray starts its workers with torch and timm imported
(`_system_config={"preload_python_modules": [...]}`), the option this measures against.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def trainable(config: dict) -> None:
    from ray import tune

    if config["imports"]:
        import timm  # noqa: F401
        import torch  # noqa: F401
    tune.report({"trial": config["trial"]})


def stage_seconds(storage: str, imports: bool) -> float:
    from ray import tune

    start = time.perf_counter()
    tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
               param_space={"trial": tune.grid_search([0, 1]), "imports": imports},
               tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
               run_config=tune.RunConfig(storage_path=storage, name=f"stage-{time.time_ns()}", verbose=0)).fit()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--preload", action="store_true", help="Ray workers start with torch and timm imported")
    args = parser.parse_args()
    if args.stages < 1:
        print(f"error: --stages must be at least 1, got {args.stages}", file=sys.stderr)
        raise SystemExit(2)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    config = {"preload_python_modules": ["torch", "timm"]} if args.preload else {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config=config)
    with tempfile.TemporaryDirectory() as storage:
        for imports in (False, True):
            seconds = [stage_seconds(storage, imports) for _ in range(args.stages)]
            print(f"trainable {'imports torch and timm' if imports else 'imports nothing':24} preload={args.preload}: "
                  + ", ".join(f"{s:.2f} s" for s in seconds), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
