"""Screen a task variant cheaply: fine-tune the shipped model on it, then the presets off the shelf.

    git apply bench/variants/twins-dense.patch     # the variant of search/synthetic.py
    python bench/screen_variant.py [--steps 300] [--num-images 1000]
    git apply -R bench/variants/twins-dense.patch

A full training takes 45 minutes on 2 CPU cores; this fine-tunes the shipped weights for
``--steps`` steps on the stream of whatever generator ``search/synthetic.py`` holds (batch 128,
AdamW, lr 5e-4 with 20 linear warm-up steps and a cosine decay to 0 by ``train_embedded.lr_at``,
no 3-tile "few" image in the first 20 % of the steps), then prints top-1, the pattern half and the
count half by tiles for the paper presets on held-out images of that generator, and the ToMe
merge trace of ``tome:6``. The model is not converged after 300 steps, so read the differences
between presets, not the levels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from presets_embedded import count_right_by_tiles, merge_trace, predict_under  # noqa: E402

from search import synthetic  # noqa: E402
from search.data import TensorSet  # noqa: E402
from search.models import load_model  # noqa: E402
from search.train_embedded import lr_at  # noqa: E402
from spaces import ModelSpec, Schedule  # noqa: E402

PRESETS = ("none", "evit:0.5", "tcvit:0.5", "idlevit:0.5", "tome:6", "ppt", "tome:4")


def fine_tune(model: torch.nn.Module, steps: int, *, peak_lr: float = 5e-4, warmup: int = 20) -> None:
    """``steps`` AdamW steps on the seeded training stream (seed 7), in place."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.05)
    start = time.perf_counter()
    for step in range(steps):
        lr = lr_at(step, total=steps, warmup=warmup, peak=peak_lr, final=0.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = synthetic.stream_batch(step, 128, seed=7, boundary=step > steps * 0.2)
        loss = torch.nn.functional.cross_entropy(model(synthetic.normalize(images)), labels, label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--num-images", type=int, default=1000)
    args = p.parse_args()
    if args.steps < 0 or args.num_images < 1:
        print("error: --steps must be >= 0 and --num-images >= 1", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = load_model()
    fine_tune(model, args.steps)
    images, labels, masks = synthetic.make_images(args.num_images, synthetic.split_generator("heldout", 0),
                                                  return_mask=True)
    data = TensorSet(images, labels, synthetic.MEAN, synthetic.STD, source="variant:heldout:0")
    patches = synthetic.tile_patches(masks)
    tiles = patches.sum(dim=1)
    spec = ModelSpec.from_model(model)
    print("| preset | top-1 | pattern half | count half right by tiles 1..6 |\n|---|---|---|---|")
    for name in PRESETS:
        pred = predict_under(model, Schedule.from_preset(name, spec), data)
        by_tiles = " ".join(f"{100 * right:.1f}" for right in count_right_by_tiles(pred, labels, tiles))
        pattern = (pred // len(synthetic.COUNTS) == labels // len(synthetic.COUNTS)).float().mean()
        print(f"| `{name}` | {100 * (pred == labels).float().mean():.1f} | {100 * pattern:.1f} | {by_tiles} |")
    print("\n`tome:6` merge trace: | block | patch tokens in | holding a tile | mixed | images with a mixed one |")
    for block, tokens_in, holding, mixed, share in merge_trace(model, Schedule.from_preset("tome:6", spec), data, patches):
        print(f"| {block} | {tokens_in:.0f} | {holding:.2f} | {mixed:.2f} | {100 * share:.0f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
