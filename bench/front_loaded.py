"""Front-loaded merge shapes against ToMe's presets at the presets' GMACs, on many new images.

    python bench/front_loaded.py [--presets tome:6,-1 tome:8,-1] [--powers 1 2 3] [--seeds 100-109]

The local sampler's front-loaded starts (`spaces.search_space.front_loaded_starts`) run ToMe's
merge in every block with a keep ratio rising from 0.5 in block 0 to 1 in the last (the removal
share falling as (1 - depth)^power), rescaled by the budget fit. This builds that shape for each
`--powers` through the default run's per-layer space (65 % of the embedded default's GMACs), at
each preset's GMACs, and scores it and the preset (and, first, the unreduced model) on the held-out images of `--seeds` (2,000 a
seed, disjoint from every run's screening and confirmation seeds below 100): accuracy, GMACs
over the preset's, the images only one of the two gets right and the exact McNemar p-value.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.holdout import HeldOut, parse_seeds  # noqa: E402
from search.paired import mcnemar_p  # noqa: E402
from spaces import ModelSpec, Schedule, from_preset, gmacs  # noqa: E402
from spaces.search_space import SearchSpace, front_loaded_params  # noqa: E402


def shape_at(space: SearchSpace, power: float, target_gmacs: float) -> Schedule:
    """The front-loaded merge shape of `power` fitted to at most `target_gmacs`."""
    return space(optuna.trial.FixedTrial(front_loaded_params(space, target_gmacs / space.budget_gmacs, power)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tome:6,-1", "tome:8,-1"])
    ap.add_argument("--powers", nargs="+", type=float, default=[1.0, 2.0, 3.0])
    ap.add_argument("--seeds", default="100-109", help="held-out seeds, a range a-b (2,000 images each)")
    args = ap.parse_args()
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    held_out = HeldOut(seeds)
    right = held_out.right
    spec = ModelSpec.from_model(held_out.model)
    budget = 0.65 * gmacs(Schedule.empty(spec))
    space = SearchSpace("per-layer", spec, budget_gmacs=budget, min_gmacs=0.1 * budget)  # a fraction range reaching every preset

    print(f"{'preset':<12} {'power':>5} {'GMACs x':>7} {'preset':>7} {'shape':>7} {'only preset':>11} {'only shape':>10} "
          f"{'p':>8}  tokens entering each block")
    print(f"{'unreduced':<12} {'':>5} {'':>7} {right(Schedule.empty(spec)).float().mean():>7.4f}", flush=True)
    for name in args.presets:
        preset = from_preset(name, spec)
        base = right(preset)
        print(f"{name:<12} {'':>5} {1.0:>7.3f} {base.float().mean():>7.4f} {'':>7} {'':>11} {'':>10} {'':>8}  "
              f"{preset.tokens_entering()}", flush=True)
        for power in args.powers:
            shape = shape_at(space, power, gmacs(preset))
            hits = right(shape)
            only_p, only_s = int((base & ~hits).sum()), int((hits & ~base).sum())
            print(f"{'':<12} {power:>5g} {gmacs(shape) / gmacs(preset):>7.3f} {base.float().mean():>7.4f} "
                  f"{hits.float().mean():>7.4f} {only_p:>11} {only_s:>10} {mcnemar_p(only_p, only_s):>8.2g}  "
                  f"{shape.tokens_entering()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
