"""Train the embedded default model from scratch on the generated shapes-on-clutter set.

    python -m search.train_embedded --out search/weights [--steps 2000] [--seed 0]

Deterministic for a given seed, step count and thread count: a fixed generated training set,
a seeded batch order, and random dihedral augmentation (flips and quarter turns leave every
class unchanged). AdamW, linear warm-up then cosine decay, label smoothing, gradient clipping.
A checkpoint every --eval-every steps lets a killed run continue with --resume. Writes
<out>/tokensched_vit_shapes.safetensors and <out>/tokensched_vit_shapes.json (its metrics).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from search import embedded, synthetic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(embedded.WEIGHTS.parent), help="output directory")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--train-images", type=int, default=60000, help="size of the generated training set")
    p.add_argument("--heldout-images", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_checkpoint.pt")
    return p.parse_args(argv)


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return 1e-2 * args.lr + 0.5 * (args.lr - 1e-2 * args.lr) * (1 + math.cos(math.pi * progress))


def dihedral(x: Tensor, k: int) -> Tensor:
    """One of the 8 symmetries of the square (k in 0..7), applied to the whole batch."""
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return x.flip(3) if k >= 4 else x


def generate_train(num_images: int, seed: int, chunk: int = 2000) -> tuple[Tensor, Tensor]:
    """The training set, generated in balanced chunks from one seeded stream (bounded memory)."""
    gen = synthetic.split_generator("train", seed)
    parts = [synthetic.make_images(min(chunk, num_images - i), gen) for i in range(0, num_images, chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.inference_mode()
def heldout_accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    model.eval()
    correct = sum((model(synthetic.normalize(images[i:i + 256])).argmax(1) == labels[i:i + 256]).sum().item()
                  for i in range(0, len(images), 256))
    model.train()
    return correct / len(images)


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "train_log.txt").open("a")
    say = lambda msg: (print(msg, flush=True), log.write(msg + "\n"), log.flush())  # noqa: E731
    start = time.perf_counter()
    train_x, train_y = generate_train(args.train_images, args.seed)
    held_x, held_y = synthetic.make_split("heldout", args.heldout_images, seed=args.seed)
    say(f"generated {len(train_x)} train / {len(held_x)} held-out images in {time.perf_counter() - start:.0f} s")
    model = timm.create_model(embedded.NAME, pretrained=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    order = torch.Generator().manual_seed(args.seed + 1)
    step, ckpt = 0, out / "train_checkpoint.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        order.set_state(state["order"])
        step = state["step"]
        say(f"resumed at step {step}")
    perm, pos = torch.randperm(len(train_x), generator=order), 0
    tic = time.perf_counter()
    while step < args.steps:
        if pos + args.batch > len(perm):
            perm, pos = torch.randperm(len(train_x), generator=order), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        k = int(torch.randint(8, (1,), generator=order))
        x = synthetic.normalize(dihedral(train_x[idx], k))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            acc = heldout_accuracy(model, held_x, held_y)
            rate = args.eval_every * args.batch / (time.perf_counter() - tic)
            say(f"step {step}/{args.steps} loss {loss.item():.3f} held-out {100 * acc:.2f} % ({rate:.0f} img/s)")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "order": order.get_state(), "step": step},
                       ckpt)
            tic = time.perf_counter()
    acc = heldout_accuracy(model, held_x, held_y)
    weights = out / f"{embedded.NAME}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    metrics = {"heldout_top1": acc, "heldout_images": len(held_x), "steps": args.steps, "batch": args.batch,
               "seed": args.seed, "train_images": args.train_images, "minutes": (time.perf_counter() - start) / 60,
               "command": f"python -m search.train_embedded --out {args.out} --steps {args.steps} --seed {args.seed}"}
    (out / f"{embedded.NAME}.json").write_text(json.dumps(metrics, indent=2))
    say(f"held-out top-1 {100 * acc:.2f} %; wrote {weights}")
    return metrics


if __name__ == "__main__":
    train(parse_args())
