"""What does the shared prefix save? Evaluate schedules with and without the worker's prefix cache.

    python bench/prefix_cache.py --run runs/<run>                 # the schedules a search screened
    python bench/prefix_cache.py --model deit_small_patch16_224 --num-images 256 --schedules 24

Every schedule is evaluated twice in one process, with the prefix cache (search.prefix_cache)
and without, in ABBA order per schedule so drift cancels; the accuracies must be equal and the
table gives the evaluation seconds of both and the share saved, with the cache's own cost (the
blocks it ran to fill itself) counted on the cached side. With --model, the schedules are the
presets of every family plus random draws of the per-layer space (random weights, the embedded
images resized), since no ImageNet weights or images can be downloaded here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))


def _run_schedules(run: Path):  # type: ignore[no-untyped-def]
    from search.outcome import latest_records
    from search.run_dir import read_records
    from spaces import Schedule

    records = latest_records(read_records(run))
    return [Schedule.from_dict(r["schedule"] if isinstance(r["schedule"], dict) else json.loads(r["schedule"]))
            for r in records if r.get("state") == "COMPLETE" and r.get("fidelity") in ("screen", "stopped")
            and r.get("schedule")]


def _drawn_schedules(spec, count: int, seed: int):  # type: ignore[no-untyped-def]
    import optuna

    from spaces import Schedule, gmacs
    from spaces.presets import presets_in_range
    from spaces.search_space import SearchSpace

    space = SearchSpace("per-layer", spec, budget_gmacs=gmacs(Schedule.empty(spec)))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn = []
    for _ in range(count):
        trial = study.ask()
        drawn.append(space(trial))
        study.tell(trial, 0.0)
    return presets_in_range(spec, None) + drawn


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None, help="a finished run: its screened schedules")
    p.add_argument("--model", default=None, help="a timm name (random weights), when no --run")
    p.add_argument("--num-images", type=int, default=None, help="screening images (default: the run's, or 256)")
    p.add_argument("--schedules", type=int, default=24, help="random per-layer draws besides the presets (--model)")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--most", type=int, default=None, help="at most this many schedules, evenly spaced")
    args = p.parse_args()
    if (args.run is None) == (args.model is None):
        print("error: give exactly one of --run and --model", file=sys.stderr)
        return 2

    import torch

    from search.data import load_eval_set
    from search.evaluate import eval_batch_size, evaluate, predict
    from search.models import data_config, load_model
    from search.prefix_cache import PrefixCache
    from search.run_dir import model_args
    from spaces import ModelSpec

    torch.set_num_threads(args.threads)
    batch = eval_batch_size(args.batch_size, "cpu")
    if args.run is not None:
        run = json.loads((args.run / "run.json").read_text())
        named = model_args(run)
        model = load_model(named["model"], pretrained=named["pretrained"], checkpoint=named["checkpoint"])
        schedules, images = _run_schedules(args.run), args.num_images or run["num_images"]

    else:
        torch.manual_seed(args.seed)
        model = load_model(args.model)
        schedules, images = _drawn_schedules(ModelSpec.from_model(model, name=args.model), args.schedules, args.seed), \
            args.num_images or 256
    if args.most and len(schedules) > args.most:
        schedules = [schedules[round(i * (len(schedules) - 1) / (args.most - 1))] for i in range(args.most)]
    data = load_eval_set(None, data_config(model), num_images=images, seed=args.seed, num_classes=model.num_classes)
    size = tuple(model.patch_embed.img_size)
    if tuple(data.images.shape[-2:]) != size:  # the embedded 64 px images, resized to the named model's input
        resized = torch.nn.functional.interpolate(data.images.float(), size=size, mode="bilinear", antialias=False)
        data = replace(data, images=resized.round().clamp(0, 255).to(torch.uint8))
    reference = predict(model, data, batch_size=batch)
    cache = PrefixCache(model, data, batch_size=batch, budget_bytes=4 << 30)
    seconds = {"plain": 0.0, "cached": 0.0}
    equal = 0
    for i, schedule in enumerate(schedules):
        results = {}
        for side in (("plain", "cached") if i % 2 == 0 else ("cached", "plain")):
            start = time.perf_counter()
            results[side] = evaluate(model, schedule, data, reference, batch_size=batch,
                                     prefix=cache if side == "cached" else None)
            seconds[side] += time.perf_counter() - start
        equal += results["plain"]["agreement"] == results["cached"]["agreement"] \
            and results["plain"]["top1"] == results["cached"]["top1"]
    firsts = sorted(s.first_reducing_block() for s in schedules)
    print(f"{args.run or args.model}: {len(schedules)} schedules on {images} images, batch {batch}, "
          f"{args.threads} thread(s); first reducing block: median {firsts[len(firsts) // 2]}, "
          f"{sum(f > 0 for f in firsts)} of {len(firsts)} after block 0")
    print(f"equal accuracy and agreement with and without the cache: {equal} of {len(schedules)}")
    print(f"evaluation seconds: without {seconds['plain']:.1f}, with {seconds['cached']:.1f} "
          f"(cache filled with {cache.computed_blocks} block passes), saved "
          f"{100 * (1 - seconds['cached'] / seconds['plain']):.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
