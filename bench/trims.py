"""The presets' trimmed tails on the embedded default: the same predictions at fewer GMACs, and the time saved.

    python bench/trims.py [--budget 65%] [--num-images 2000] [--seed 1] [--repeats 9]

For every preset in the default run's range (the budget down to the cheapest preset) whose per-layer
parameters have a trimmed tail (`spaces.search_space.trimmed_tail`: its last block's patch tokens
pruned to a tenth after that block's attention), the GMACs it saves, whether its top-1 predictions
and logits on `--num-images` held-out images of seed `--seed` (the default run's confirmation
images) are the preset's, and the preset's time over the trim's at batch 64 and at batch 1. Timing
protocol (PITFALLS.md item 4): eval mode, inference mode, fp32, the process's threads, the two
timed alternately in ABBA order (`search.evaluate.timed_pairs`), each sample at least 50 ms of
forwards, the median of `--repeats` pairs. Prints one row per trim; exit 1 unless every trim
predicts what its preset predicts on every image.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reducers import apply_schedule, remove_schedule  # noqa: E402
from search.data import embedded_set  # noqa: E402
from search.evaluate import predict, time_call, timed_pairs  # noqa: E402
from search.models import load_model  # noqa: E402
from spaces import ModelSpec, Schedule, gmacs  # noqa: E402
from spaces.budget import parse_budget  # noqa: E402
from spaces.presets import presets_in_range  # noqa: E402
from spaces.search_space import SearchSpace, preset_params, trimmed_tail  # noqa: E402


def trims(space: SearchSpace) -> list[tuple[Schedule, Schedule]]:
    """(preset, its trimmed tail) for every preset in the space's range that has one."""
    out = []
    for preset in presets_in_range(space.spec, space.budget_gmacs, space.min_gmacs):
        params = preset_params(preset, space)
        trimmed = trimmed_tail(params, space) if params is not None else None
        if trimmed is not None:
            out.append((preset, space(optuna.trial.FixedTrial(trimmed))))
    return out


@torch.inference_mode()
def time_ratio(model: torch.nn.Module, a: Schedule, b: Schedule, batch: int, repeats: int) -> float:
    """Median over ABBA pairs of time(a) / time(b) at `batch` (random images of the model's size)."""
    x = torch.randn(batch, 3, *model.patch_embed.img_size)

    def timer(schedule: Schedule, calls: int):  # type: ignore[no-untyped-def]
        def run() -> float:
            apply_schedule(model, schedule)
            return time_call(lambda: model(x), torch.device("cpu"), calls)
        return run

    for s in (a, b):
        timer(s, 2)()
    calls = max(1, math.ceil(0.05 / timer(a, 1)()))
    ta, tb = timed_pairs(timer(a, calls), timer(b, calls), repeats)
    remove_schedule(model)
    return statistics.median(x / y for x, y in zip(ta, tb, strict=True))


def logits(model: torch.nn.Module, schedule: Schedule, images) -> torch.Tensor:  # type: ignore[no-untyped-def]
    apply_schedule(model, schedule)
    try:
        return predict(model, images, batch_size=256)
    finally:
        remove_schedule(model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="65%")
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)

    model = load_model()
    spec = ModelSpec.from_model(model)
    baseline = gmacs(Schedule.empty(spec))
    budget = parse_budget(args.budget, baseline)
    cheapest = min(gmacs(s) for s in presets_in_range(spec, budget))
    space = SearchSpace("per-layer", spec, budget_gmacs=budget, min_gmacs=cheapest)
    images = embedded_set(args.num_images, seed=args.seed)
    print(f"{'preset':12s} {'GMACs share':>11s} {'trimmed':>8s} {'saved':>7s} {'same top-1':>10s} "
          f"{'max |dlogit|':>12s} {'time x b64':>10s} {'time x b1':>9s}")
    exact = True
    for preset, trim in trims(space):
        a, b = logits(model, preset, images), logits(model, trim, images)
        same = int((a.argmax(-1) == b.argmax(-1)).sum())
        exact &= same == len(images)
        r64, r1 = (time_ratio(model, preset, trim, batch, args.repeats) for batch in (64, 1))
        print(f"{preset.name:12s} {gmacs(preset) / baseline:11.4f} {gmacs(trim) / baseline:8.4f} "
              f"{100 * (1 - gmacs(trim) / gmacs(preset)):6.2f}% {same:>5d}/{len(images):<4d} "
              f"{(a - b).abs().max().item():12.2e} {r64:10.3f} {r1:9.3f}")
    print("time x: the preset's time over the trim's (above 1: the trim is faster)")
    print("PASS: every trim predicts what its preset predicts" if exact else "FAIL: a trim changed a prediction")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
