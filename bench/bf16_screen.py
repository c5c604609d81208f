"""How far is bf16 screening from fp32? Screen a run's schedules both ways and compare.

    python bench/bf16_screen.py --run runs/<run> [--most 12] [--num-images 2000] [--device cuda]

Each schedule is evaluated on the screening images in fp32 and under bf16 autocast
(`--screen-precision bf16`), against the same fp32 reference: the table gives the largest and the
median difference of their accuracies, the share of images whose top-1 agrees between the two,
and the seconds of both (ABBA per schedule). On a CPU without bf16 units the bf16 side is slower;
the agreement is what this measures there, the speed needs a GPU (bench/gpu.sh).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from bench.prefix_cache import _run_schedules  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--most", type=int, default=12)
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    from reducers import apply_schedule, remove_schedule
    from search.data import load_eval_set
    from search.evaluate import eval_batch_size, predict
    from search.models import data_config, load_model
    from search.run_dir import model_args

    torch.set_num_threads(args.threads)
    run = json.loads((args.run / "run.json").read_text())
    named = model_args(run)
    model = load_model(named["model"], pretrained=named["pretrained"], checkpoint=named["checkpoint"], device=args.device)
    schedules = _run_schedules(args.run)
    if len(schedules) > args.most:
        schedules = [schedules[round(i * (len(schedules) - 1) / (args.most - 1))] for i in range(args.most)]
    images = args.num_images or run["num_images"]
    data = load_eval_set(run["data"], data_config(model), num_images=images, seed=run["seed"], num_classes=model.num_classes)
    batch = eval_batch_size("auto", args.device)
    labels = data.labels
    diffs, agree, seconds = [], [], {"fp32": 0.0, "bf16": 0.0}
    for i, schedule in enumerate(schedules):
        apply_schedule(model, schedule)
        logits = {}
        for side in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            start = time.perf_counter()
            logits[side] = predict(model, data, batch_size=batch, dtype=torch.bfloat16 if side == "bf16" else None)
            seconds[side] += time.perf_counter() - start
        remove_schedule(model)
        acc = {k: (v.argmax(1) == labels).float().mean().item() for k, v in logits.items()}
        diffs.append(100 * abs(acc["bf16"] - acc["fp32"]))
        agree.append((logits["bf16"].argmax(1) == logits["fp32"].argmax(1)).float().mean().item())
    print(f"{args.run}: {len(schedules)} schedules on {images} images, {args.device}, batch {batch}")
    print(f"top-1 difference bf16 - fp32 (points): max {max(diffs):.2f}, median {statistics.median(diffs):.2f}; "
          f"top-1 agreement of bf16 with fp32: min {100 * min(agree):.2f} %, median {100 * statistics.median(agree):.2f} %")
    print(f"seconds: fp32 {seconds['fp32']:.1f}, bf16 {seconds['bf16']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
