"""Off-the-shelf paper presets on the embedded default: top-1, GMAC share and measured speed-up.

    python bench/presets_embedded.py [--num-images 2000] [--presets none,ppt,tome:4,...]

Prints how long the unreduced model takes to evaluate the screening set (eval mode,
inference mode, batch 256, the process's default threads), the preset table (speed-up: the
preset against the unreduced model timed alternately in this process, batch 64, median of 5)
and, to explain it, two more tables: the accuracy of the count half of the label (few or many
tiles) by the number of tiles in the image, for every preset (reduction shifts the model's
count, which changes the class only next to the boundary, 3 against 4 tiles); the
*readiness* of the class token: top-1 when every patch token is dropped after block k, so blocks
k+1.. see the class token alone (once that is at the full model's accuracy, reducing tokens
after block k can cost nothing); and, for the ToMe presets, which tokens ToMe merges in every
block: how many hold a tile, and how many hold a tile mixed with other patches.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reducers import apply_schedule, last_forward_state, remove_schedule  # noqa: E402
from reducers.merge import merge  # noqa: E402
from search.data import TensorSet, embedded_set  # noqa: E402
from search.embedded import synthetic  # noqa: E402
from search.evaluate import evaluate, predict  # noqa: E402
from search.models import load_model  # noqa: E402
from spaces import ModelSpec, Schedule, from_preset  # noqa: E402
from spaces.schedule import DEFAULT_PPT_THRESHOLD  # noqa: E402

PRESETS = "none,ppt,tome:4,evit:0.5,idlevit:0.5,tcvit:0.5,evit:0.4,tome:6"


@torch.inference_mode()
def cls_readiness(model: torch.nn.Module, data: TensorSet, batch_size: int = 256) -> list[float]:
    """Top-1 for each k when only the class token continues after block k (timm ViT, no reduction)."""
    correct = torch.zeros(len(model.blocks))
    for images, labels in data.batches(batch_size):
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for k, block in enumerate(model.blocks):
            x = block(x)
            cls = x[:, :1]
            for later in model.blocks[k + 1 :]:
                cls = later(cls)
            correct[k] += (model.forward_head(model.norm(cls)).argmax(-1) == labels).sum()
    return (correct / len(data)).tolist()


def tile_patches(num_images: int) -> torch.Tensor:
    """``bool [N, 64]``: the patches holding a tile in every image of ``embedded_set(num_images)``
    (the same generator, seed 0)."""
    _, _, masks = synthetic.make_images(num_images, synthetic.split_generator("heldout", 0), return_mask=True)
    return synthetic.tile_patches(masks)


@torch.inference_mode()
def merge_trace(model: torch.nn.Module, schedule: Schedule, data: TensorSet, patches: torch.Tensor,
                batch_size: int = 250) -> list[tuple[int, float, float, float]]:
    """What ToMe's merges do to the tile tokens, block by block (a schedule that only merges).

    ``patches``: ``bool [N, 64]``, the patches of each image that hold a tile (``tile_patches``).

    Every merge the model makes is applied, with the same plan (``reducers.merge.merge`` and the
    same keys), to a map of each token's share of every original patch, so each token knows
    which patches it holds. Returns, per merging block: (patch tokens entering it, tokens
    holding a tile afterwards, of them the tokens that also hold other patches, the share of
    images with such a mixed token), averaged over the images.
    """
    # The k-th merge call is the k-th merging block: ToMe presets merge in every block until too
    # few tokens are left, so the blocks that end up merging nothing come last.
    merging = [i for i, plan in enumerate(schedule.layers) if plan.method == "merge"]
    totals = torch.zeros(len(merging), 4)
    state: dict[str, Any] = {}

    def traced(x, size, metric, *, num_prefix, r):  # type: ignore[no-untyped-def]
        state["shares"], _ = merge(state["shares"], size, metric, num_prefix=num_prefix, r=r)
        held = state["shares"][:, num_prefix:] > 0  # [B, n', 64]: the patches each token holds
        tile = state["tiles"][:, None, :]
        has_tile = (held & tile).any(-1)
        mixed = has_tile & (held & ~tile).any(-1)
        k = state["calls"]
        totals[k] += torch.tensor([x.shape[1] - num_prefix, has_tile.sum(1).float().mean(),
                                   mixed.sum(1).float().mean(), mixed.any(1).float().mean()]) * x.shape[0]
        state["calls"] = k + 1
        return merge(x, size, metric, num_prefix=num_prefix, r=r)

    apply_schedule(model, schedule)
    try:
        with mock.patch("reducers.patch.merge", traced):
            for start, (images, _) in zip(range(0, len(data), batch_size), data.batches(batch_size), strict=True):
                b, n = images.shape[0], patches.shape[1]
                prefix = torch.zeros(b, model.num_prefix_tokens, n)
                state.update(shares=torch.cat([prefix, torch.eye(n).expand(b, n, n)], dim=1),
                             tiles=patches[start : start + b], calls=0)
                model(images)
    finally:
        remove_schedule(model)
    totals /= len(data)
    return [(block, *row.tolist()) for block, row in zip(merging, totals, strict=False) if row[0] > 0]


def our_variant(schedule: Schedule) -> Schedule | None:
    """The preset with our variant rules in place of the official ones (None if it has none):
    prune's normalised fused token, idle's softmax ranking (and ceil count), PPT's unscaled
    threshold (7e-5, set for 196 patches)."""
    swaps = {"prune": {"fuse_weights": "normalized"}, "idle": {"rank": "softmax"},
             "adaptive": {"threshold": DEFAULT_PPT_THRESHOLD}}
    layers = tuple(replace(plan, **swaps.get(plan.method, {})) for plan in schedule.layers)
    if layers == schedule.layers:
        return None
    return replace(schedule, layers=layers, name=f"{schedule.name} (variant)")


@torch.inference_mode()
def pruned_share(model: torch.nn.Module, schedule: Schedule, data: TensorSet, batch_size: int = 256) -> dict[int, float]:
    """PPT: the share of images that take the pruning path in each adaptive block (the rest pool)."""
    pruned: dict[int, float] = {}
    apply_schedule(model, schedule)
    try:
        for images, _ in data.batches(batch_size):
            model(images)
            for block, mask in last_forward_state(model).pruned_images:
                pruned[block] = pruned.get(block, 0.0) + float(mask.sum())
    finally:
        remove_schedule(model)
    return {block: count / len(data) for block, count in pruned.items()}


def predict_under(model: torch.nn.Module, schedule: Schedule, data: TensorSet) -> torch.Tensor:
    """``long [N]``: the class ``model`` predicts for every image under ``schedule`` (removed after)."""
    apply_schedule(model, schedule)
    try:
        return predict(model, data).argmax(1)
    finally:
        remove_schedule(model)


def count_right_by_tiles(pred: torch.Tensor, labels: torch.Tensor, tiles: torch.Tensor) -> list[float]:
    """Accuracy of the few/many half of ``pred`` for images with 1, 2, ..., ``tiles.max()`` tiles."""
    right = pred % len(synthetic.COUNTS) == labels % len(synthetic.COUNTS)
    return [right[tiles == k].float().mean().item() for k in range(1, int(tiles.max()) + 1)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--presets", default=PRESETS)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per preset (median reported)")
    args = p.parse_args()
    model, data = load_model(), embedded_set(args.num_images)
    spec = ModelSpec.from_model(model)
    start = time.perf_counter()
    reference = predict(model, data)
    seconds = time.perf_counter() - start
    print(f"unreduced: {len(data)} images evaluated in {seconds:.1f} s ({len(data) / seconds:.0f} images/s, batch 256)")
    print("| preset | GMACs share | top-1 | speed-up (measured) | images/s |\n|---|---|---|---|---|")
    names = args.presets.split(",")
    for name in names:
        r = evaluate(model, from_preset(name, spec), data, reference,
                     timing={"batch_size": 64, "repeats": args.repeats})
        print(f"| `{name}` | {100 * r['gmacs'] / r['baseline_gmacs']:.0f} % | {100 * r['top1']:.2f} | "
              f"{r['speedup']:.2f} ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {r['images_per_s']:.0f} |")
    print("\nofficial rule against our variant (prune: normalised fused token; idle: softmax ranking, ceil count;"
          " ppt: the unscaled threshold 7e-5):")
    print("| preset | GMACs share (official / variant) | top-1 official | top-1 variant |\n|---|---|---|---|")
    for name in names:
        official = from_preset(name, spec)
        variant = our_variant(official)
        if variant is None:
            continue
        a = evaluate(model, official, data, reference)
        b = evaluate(model, variant, data, reference)
        print(f"| `{name}` | {100 * a['gmacs'] / a['baseline_gmacs']:.0f} % / {100 * b['gmacs'] / b['baseline_gmacs']:.0f} % "
              f"| {100 * a['top1']:.2f} | {100 * b['top1']:.2f} |")
    for name in names:
        official = from_preset(name, spec)
        if not any(plan.method == "adaptive" for plan in official.layers):
            continue
        print(f"\n`{name}`: share of images on PPT's pruning path per block (the rest pool):")
        print("| threshold | " + " | ".join(f"block {b}" for b, plan in enumerate(official.layers)
                                           if plan.method == "adaptive") + " |")
        print("|---" * (1 + sum(plan.method == "adaptive" for plan in official.layers)) + "|")
        for schedule in (official, our_variant(official)):
            shares = pruned_share(model, schedule, data)
            print(f"| {schedule.layers[[p.method for p in schedule.layers].index('adaptive')].threshold:.3g} | "
                  + " | ".join(f"{100 * shares.get(b, 0.0):.1f} %" for b, plan in enumerate(schedule.layers)
                               if plan.method == "adaptive") + " |")
    patches = tile_patches(len(data))
    tiles = patches.sum(dim=1)
    few, many = synthetic.TILE_COUNTS["few"], synthetic.TILE_COUNTS["many"]
    print(f"\ncount half right (few = {few[0]}-{few[1]} tiles, many = {many[0]}-{many[1]}), by tiles in the image (%):")
    print("| preset | " + " | ".join(str(k) for k in range(1, int(tiles.max()) + 1)) + " |")
    print("|---" * (int(tiles.max()) + 1) + "|")
    for name in names:
        row = count_right_by_tiles(predict_under(model, from_preset(name, spec), data), data.labels, tiles)
        print(f"| `{name}` | " + " | ".join(f"{100 * a:.1f}" for a in row) + " |")
    print("\nclass token alone after block k (top-1):")
    print("| k | " + " | ".join(str(k) for k in range(len(model.blocks))) + " |")
    print("|---" * (len(model.blocks) + 1) + "|")
    print("| top-1 | " + " | ".join(f"{100 * a:.1f}" for a in cls_readiness(model, data)) + " |")
    for name in names:
        schedule = from_preset(name, spec)
        if {plan.method for plan in schedule.layers} - {"none"} != {"merge"}:
            continue  # the trace follows ToMe's merges only
        print(f"\n`{name}`: what the merges do to the tile tokens (per image, mean of {len(data)}; "
              f"{tiles.float().mean():.2f} tiles):")
        print("| block | patch tokens in | tokens holding a tile | of them mixed with other patches | "
              "images with a mixed tile token |\n|---|---|---|---|---|")
        for block, tokens_in, holding, mixed, images in merge_trace(model, schedule, data, patches):
            print(f"| {block} | {tokens_in:.0f} | {holding:.2f} | {mixed:.2f} | {100 * images:.0f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
