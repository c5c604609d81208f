"""Which evaluation batch is fastest per image? Time the forward of a model at several batches.

    python bench/batch_size.py [--model NAME] [--threads 1] [--presets none,tome:8,evit:0.7]

`--batch-size auto` picks search.evaluate.AUTO_BATCH per device type; this measures it. For each
schedule, every batch size is timed in rotating order within one process (warm-up, then the
median of `--repeats` samples), and the table gives seconds per 2,000 images and the ratio to the
auto batch. Compare ratios within one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="timm name (default: the embedded default with its weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a search worker uses --cpus-per-trial: 1)")
    p.add_argument("--batches", default="16,32,64,128,256")
    p.add_argument("--presets", default="none,tome:8,evit:0.7,idlevit:0.5")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import torch

    from reducers import apply_schedule, remove_schedule
    from search.evaluate import eval_batch_size, time_call
    from search.models import load_model
    from spaces.presets import from_preset

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device).eval()
    device = torch.device(args.device)
    size = tuple(model.patch_embed.img_size)
    batches = [int(b) for b in args.batches.split(",")]
    auto = eval_batch_size("auto", args.device)
    print(f"model {args.model or 'embedded default'}, device {args.device}, threads {args.threads}, "
          f"auto batch {auto}; seconds per 2,000 images (ratio to batch {auto})")
    print(f"{'schedule':14s} " + " ".join(f"{b:>14d}" for b in batches))
    for name in args.presets.split(","):
        apply_schedule(model, from_preset(name, model))
        inputs = {b: torch.randn(b, 3, *size, device=device) for b in batches}
        samples: dict[int, list[float]] = {b: [] for b in batches}
        with torch.inference_mode():
            for b in batches:  # warm-up
                model(inputs[b])
            for r in range(args.repeats):
                order = batches[r % len(batches):] + batches[:r % len(batches)]  # rotate: drift spreads evenly
                for b in order:
                    samples[b].append(time_call(lambda x=inputs[b]: model(x), device) / b * 2000)
        remove_schedule(model)
        per = {b: statistics.median(s) for b, s in samples.items()}
        ref = per.get(auto, per[batches[0]])
        print(f"{name:14s} " + " ".join(f"{per[b]:7.2f} ({per[b] / ref:4.2f})" for b in batches), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
