"""Train the embedded default model (``tokensched_vit_shapes``) on the synthetic data set.

    python -m search.embedded.train --out search/embedded/weights/ --steps 1500 [--seed 0] [--overwrite]
    python -m search.embedded.train --out search/embedded/weights/ --minutes 40

Every step draws a fresh batch from the seeded stream (``search.embedded.synthetic.stream_batch``),
so the data are effectively infinite and their order is fixed by ``--seed``: the same
command with the same ``--steps`` and thread count reproduces the same weights. AdamW,
linear warm-up then cosine decay, label smoothing, gradient clipping, a clutter curriculum
(few distractors at first, all of them after ``--clutter-ramp`` of the steps), a count
curriculum (for the first ``--count-gap`` of the steps no "few" image holds 3 tiles and every
count of a range is drawn uniformly, so the classes are two tiles apart and 5-6 tile images
common while the model learns to count; trained on 1-3 against 4-6 from the start, or on 1-2
against mostly 4, it stayed at chance on the count after 560 and 675 steps) and a 2-D
sin-cos start for the learned position embedding. ``--minutes`` times a few steps at the
start and converts the budget into a step count (logged; use ``--steps`` for a run that
repeats exactly), because the LR schedule needs the total.

Progress (images/s, loss, LR, held-out accuracy on ``--eval-images`` images) goes to
``<run-dir>/train_embedded.log``; a checkpoint (model, optimiser, step) is written at every
evaluation to ``<run-dir>/checkpoint.pt`` and ``--resume`` continues from it. At the end the
weights are written to ``<out>/tokensched_vit_shapes.safetensors`` (fp32) and a summary to
``<run-dir>/summary.json``. An existing weights file is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import build_sincos2d_pos_embed
from torch import nn

from search import embedded
from search.embedded.synthetic import COUNTS, make_split, normalize, stream_batch

__all__ = ["boundary_at", "clutter_at", "evaluate_heldout", "init_pos_embed", "lr_at", "main", "train"]

log = logging.getLogger("train_embedded")


def lr_at(step: int, *, total: int, warmup: int, peak: float, final: float) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then cosine down to ``final``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def evaluate_heldout(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                     batch_size: int = 256) -> dict[str, float]:
    """Accuracy of ``model`` on ``uint8 [N, 3, 64, 64]`` images, eval mode, batches of 256.

    Returns ``top1``, ``pattern`` and ``count`` (accuracy of each half of the label: the body's
    fill pattern, few or many tiles) and
    ``seconds`` (wall time of the whole pass, normalisation included).
    """
    was_training = model.training
    model.eval()
    start, preds = time.perf_counter(), []
    for i in range(0, labels.shape[0], batch_size):
        preds.append(model(normalize(images[i : i + batch_size])).argmax(-1))
    seconds = time.perf_counter() - start
    model.train(was_training)
    pred = torch.cat(preds)
    counts = len(COUNTS)
    return {"top1": (pred == labels).float().mean().item(),
            "pattern": (pred // counts == labels // counts).float().mean().item(),
            "count": (pred % counts == labels % counts).float().mean().item(), "seconds": seconds}


def clutter_at(step: int, total: int, args: argparse.Namespace) -> float:
    """Curriculum: distractors ramp linearly from ``--clutter-start`` to all of them over the
    first ``--clutter-ramp`` fraction of the steps (objects are learned first, then found)."""
    ramp = args.clutter_ramp * total
    if ramp <= 0 or step >= ramp:
        return 1.0
    return args.clutter_start + (1.0 - args.clutter_start) * step / ramp


def boundary_at(step: int, total: int, args: argparse.Namespace) -> bool:
    """Count curriculum: whether step ``step`` may draw "few" images with 3 tiles (the count next
    to the class boundary); not during the first ``--count-gap`` fraction of the steps."""
    return step >= args.count_gap * total


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, args: argparse.Namespace,
                total: int) -> float:
    images, labels = stream_batch(step, args.batch_size, seed=args.seed, clutter=clutter_at(step, total, args),
                                  boundary=boundary_at(step, total, args))
    lr = lr_at(step, total=total, warmup=args.warmup_steps, peak=args.lr, final=args.lr * 0.01)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = F.cross_entropy(model(normalize(images)), labels, label_smoothing=args.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    optimizer.step()
    return loss.item()


def init_pos_embed(model: nn.Module) -> None:
    """Start the learned position embedding at 2-D sin-cos values (as MAE fixes it).

    The architecture is unchanged (``pos_embed`` stays a learned parameter and the class
    token's entry starts at zero); a 2-D layout from the start lets a from-scratch ViT
    relate neighbouring patches early instead of learning the grid from data.
    """
    grid = model.patch_embed.grid_size
    sincos = build_sincos2d_pos_embed(list(grid), model.embed_dim)  # [H*W, C]
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, model.num_prefix_tokens :] = sincos


def _make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    # No weight decay on biases, norms, position embedding and class token (as in DeiT).
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))


def _steps_for_minutes(model: nn.Module, optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> int:
    """Time a few real training steps (they are kept) and convert ``--minutes`` into steps."""
    probe = 8
    start = time.perf_counter()
    for step in range(probe):
        _train_step(model, optimizer, step, args, total=10**9)
    per_step = (time.perf_counter() - start) / probe
    # Evaluations take time too: about one held-out pass per eval interval.
    total = int(args.minutes * 60 / per_step * 0.95)
    log.info("timing: %.3f s/step -> --minutes %g = %d steps", per_step, args.minutes, total)
    return max(total, args.warmup_steps + 1)


def _checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "total": total}, tmp)
    tmp.replace(path)


def train(args: argparse.Namespace) -> dict[str, object]:
    """Run the training described by ``args``; returns the summary (also written to JSON)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run_dir, out_file = Path(args.run_dir), Path(args.out) / f"{args.model}.safetensors"
    ckpt_path = run_dir / "checkpoint.pt"
    model = timm.create_model(args.model, pretrained=False)
    init_pos_embed(model)
    optimizer = _make_optimizer(model, args)
    heldout = make_split("heldout", args.eval_images, seed=0)
    start_step = 0
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, total = state["step"], state["total"]
        log.info("resumed from %s at step %d of %d", ckpt_path, start_step, total)
    elif args.steps is not None:
        total = args.steps
    else:
        total = _steps_for_minutes(model, optimizer, args)
        start_step = 8  # the timing steps were real steps 0..7
    log.info("training %s for %d steps of %d images (seed %d)", args.model, total, args.batch_size, args.seed)
    wall0 = last_eval = time.perf_counter()
    window_start, window_images, losses = wall0, 0, []
    model.train()
    for step in range(start_step, total):
        losses.append(_train_step(model, optimizer, step, args, total))
        window_images += args.batch_size
        now = time.perf_counter()
        if (step + 1) % args.log_every == 0:
            log.info("step %d/%d loss %.4f lr %.2e %.1f img/s", step + 1, total, sum(losses) / len(losses),
                     optimizer.param_groups[0]["lr"], window_images / (now - window_start))
            window_start, window_images, losses = now, 0, []
        if now - last_eval >= args.eval_minutes * 60 and step + 1 < total:
            res = evaluate_heldout(model, *heldout)
            log.info("step %d held-out top-1 %.4f (pattern %.4f, count %.4f; eval %.1f s), %.1f min elapsed",
                     step + 1, res["top1"], res["pattern"], res["count"], res["seconds"], (now - wall0) / 60)
            _checkpoint(ckpt_path, model, optimizer, step + 1, total)
            last_eval = time.perf_counter()
            window_start, window_images = last_eval, 0
    res = evaluate_heldout(model, *heldout)
    acc, secs = res["top1"], res["seconds"]
    wall = time.perf_counter() - wall0
    _checkpoint(ckpt_path, model, optimizer, total, total)
    tmp = out_file.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"architecture": args.model, "steps": str(total), "seed": str(args.seed),
                        "heldout_top1": f"{acc:.4f}"})
    tmp.chmod(0o644)  # safetensors writes 0600; the weights ship as package data
    tmp.replace(out_file)
    summary = {"steps": total, "batch_size": args.batch_size, "seed": args.seed, "heldout_top1": acc,
               "heldout_pattern": res["pattern"], "heldout_count": res["count"],
               "heldout_images": args.eval_images, "eval_seconds": secs, "train_minutes": wall / 60,
               "weights": str(out_file), "argv": sys.argv}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("done: held-out top-1 %.4f on %d images (eval %.1f s), %.1f min, weights %s",
             acc, args.eval_images, secs, wall / 60, out_file)
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.embedded.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for <model>.safetensors")
    p.add_argument("--model", default=embedded.NAME, choices=(embedded.NAME, embedded.NAME_GAP),
                   help=f"architecture (default {embedded.NAME}; {embedded.NAME_GAP}: no class token, average-pooled)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="number of training steps (exactly reproducible)")
    budget.add_argument("--minutes", type=float, help="wall-clock budget, converted to steps at the start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--clutter-start", type=float, default=0.0, help="share of the distractors at step 0")
    p.add_argument("--clutter-ramp", type=float, default=0.2, help="fraction of the steps to reach full clutter")
    p.add_argument("--count-gap", type=float, default=0.4,
                   help="fraction of the steps in which no 'few' image holds 3 tiles and counts are uniform "
                        "(count curriculum)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--eval-images", type=int, default=2000, help="held-out images for the evaluations")
    p.add_argument("--eval-minutes", type=float, default=4.0, help="evaluate and checkpoint this often")
    p.add_argument("--log-every", type=int, default=20, help="log loss and images/s every N steps")
    p.add_argument("--run-dir", default="runs/train_embedded", help="log, checkpoint and summary go here")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing weights file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out_file = Path(args.out) / f"{args.model}.safetensors"
    if (args.steps is not None and args.steps < 1) or (args.minutes is not None and args.minutes <= 0):
        print("error: --steps and --minutes must be positive", file=sys.stderr)
        return 2
    for flag in ("count_gap", "clutter_start"):  # fractions of the run / of the distractors
        if not 0.0 <= getattr(args, flag) <= 1.0:
            print(f"error: --{flag.replace('_', '-')} must be between 0 and 1, got {getattr(args, flag)}", file=sys.stderr)
            return 2
    if out_file.exists() and not args.overwrite:
        print(f"error: {out_file} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(Path(args.run_dir) / "train_embedded.log")])
    log.info("argv: %s", " ".join(sys.argv))
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
