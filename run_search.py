#!/usr/bin/env python
"""tokensched command line.

    python run_search.py --budget 65%                    the search (the default command)
    python run_search.py eval --preset tome:13            one schedule: accuracy, agreement, GMACs, speed
    python run_search.py gmacs --model deit_small_patch16_224 --preset evit:0.7 [--json]
    python run_search.py finetune --config runs/<run>/configs/0007.yaml [--data DIR] [--steps S | --epochs E]
    python run_search.py make-data data/shapes-val [--split heldout|train] [--num-images N]

Errors at the boundary print one line and exit with code 2; a search whose front is empty
exits with code 3.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input in one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", help="a paper's schedule: tome:13, tome:13,-1, evit:0.7, idlevit:0.7, ppt, tcvit:0.7, none")
    group.add_argument("--schedule", help="a schedule file (YAML or JSON)")


def build_parser() -> argparse.ArgumentParser:
    from search.models import DEFAULT_MODEL

    parser = _Parser(prog="run_search.py", description="Search token-reduction schedules for timm ViTs.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    g = sub.add_parser("gmacs", help="GMACs and tokens per block of a schedule (no weights needed)")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default: {DEFAULT_MODEL})")
    _add_schedule_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object")

    e = sub.add_parser("eval", help="accuracy, agreement, GMACs and measured speed-up of one schedule")
    _add_model_args(e)
    _add_schedule_args(e)
    e.add_argument("--num-images", type=_positive_int, default=2000, help="screening subset size (default 2000)")
    e.add_argument("--batch-size", type=_positive_int, default=256, help="evaluation batch (default 256)")
    e.add_argument("--timing-batch", type=_positive_int, default=64, help="throughput batch (default 64)")
    e.add_argument("--repeats", type=_positive_int, default=5, help="timed repeats, median reported (default 5)")
    e.add_argument("--no-timing", action="store_true", help="skip the throughput measurement")
    e.add_argument("--amp", action="store_true", help="time under autocast (bf16 on CPU, fp16 on CUDA)")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser("search", help="search schedules under a budget (the default command)")
    _add_search_args(s)

    f = sub.add_parser("finetune", help="fine-tune an exported config: distillation + token cut loss (IdleViT recipe)")
    _add_finetune_args(f)

    d = sub.add_parser("make-data", help="write the embedded data set as an ImageFolder of PNGs (to try --data)")
    d.add_argument("out", help="directory to create (must not exist or be empty)")
    d.add_argument("--split", choices=("heldout", "train"), default="heldout", help="which split (default heldout)")
    d.add_argument("--num-images", type=_positive_int, default=2000, help="images to write (default 2000)")
    d.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    return parser


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    from search.data import TIMM_CROP_SCALE

    p.add_argument("--config", required=True, help="an exported config: runs/<run>/configs/<id>.yaml")
    p.add_argument("--model", default=None, help="timm model name (default: the model the config was searched on)")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs network or cache)")
    p.add_argument("--checkpoint", default=None, help="local weights (default: the config's source checkpoint)")
    p.add_argument("--data", default=None,
                   help="training images: an ImageFolder or flat directory (default: the embedded training stream)")
    p.add_argument("--eval-data", default=None,
                   help="held-out images scored before and after (default: the config's search data, else the "
                        "embedded held-out set)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=None, help="optimiser steps")
    length.add_argument("--epochs", type=_positive_int, default=None,
                        help="passes over --data (the embedded stream: 10,000 images per epoch); default 30 "
                             "(IdleViT's recipe) when neither --steps nor --epochs is given")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per step and process (default 64)")
    p.add_argument("--crop-scale", type=_crop_scale, default=TIMM_CROP_SCALE,
                   help=f"smallest image area of the random-resized crop on --data (default {TIMM_CROP_SCALE}, "
                        "timm's; 1.0 for the embedded set, whose label sits in small objects)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, cosine to 1%% of it (default 1e-4)")
    p.add_argument("--alpha", type=float, default=5.0, help="weight of the distillation KL (default 5)")
    p.add_argument("--beta", type=float, default=500.0, help="weight of the feature MSE (default 500)")
    p.add_argument("--theta", type=float, default=20.0, help="weight of the token cut loss (default 20)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default 0: before and after)")
    p.add_argument("--out", default=None, help="output directory (default: <config dir>/../finetune/<config name>)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--num-images", type=_positive_int, default=2000, help="held-out images scored (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training stream and dropout (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    from search.data import TIMM_CROP_SCALE
    from search.pareto import OBJECTIVES
    from search.run_dir import SAMPLERS
    from spaces.search_space import REDUCING, SPACES

    _add_model_args(p)
    p.add_argument("--budget", required=True, help="GMACs budget: 3.0GMACs, '3.0 GMACs', 65%% (of the unreduced model) or 0.65x")
    p.add_argument("--space", default="per-layer", help=f"search space: {', '.join(SPACES)} (default per-layer)")
    p.add_argument("--methods", default=",".join(REDUCING), help=f"methods to choose from (default {','.join(REDUCING)})")
    p.add_argument("--sampler", default="nsga2", help=f"Optuna sampler: {', '.join(SAMPLERS)} (default nsga2)")
    p.add_argument("--objectives", default="accuracy,gmacs",
                   help=f"objectives, comma-separated from {', '.join(OBJECTIVES)} (default accuracy,gmacs)")
    p.add_argument("--trials", type=_positive_int, default=60,
                   help="searched trials (default 60); every preset in range is evaluated besides them")
    p.add_argument("--out", default=None, help="run directory (default runs/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default SQLite in --out; journal:PATH for a file journal)")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local Ray)")
    p.add_argument("--cpus-per-trial", type=_positive_float, default=1.0, help="CPUs per trial (default 1)")
    p.add_argument("--gpus-per-trial", type=_non_negative_float, default=0.0, help="GPUs per trial (default 0)")
    p.add_argument("--concurrency", type=_positive_int, default=2, help="trials at once (default 2)")
    p.add_argument("--num-images", type=_positive_int, default=2000, help="screening subset size (default 2000)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="evaluation batch (default 256)")
    p.add_argument("--timing-batch", type=_positive_int, default=64, help="throughput batch (default 64)")
    p.add_argument("--no-presets", action="store_true", help="do not evaluate the paper presets")
    p.add_argument("--confirm-images", type=_positive_int, default=2000,
                   help="images disjoint from the screening set on which the front and the presets are re-scored "
                        "(default 2000)")
    p.add_argument("--min-gmacs", default=None,
                   help="the cheapest the front should reach, like --budget (default: the cheapest preset under the budget)")
    p.add_argument("--finetune-top", type=_non_negative_int, default=0,
                   help="after screening, fine-tune this many of the most promising candidates (default 0)")
    p.add_argument("--finetune-steps", type=_positive_int, default=100, help="steps of each short fine-tune (default 100)")
    p.add_argument("--finetune-batch", type=_positive_int, default=32, help="batch of the short fine-tunes (default 32)")
    p.add_argument("--finetune-lr", type=float, default=3e-4, help="peak learning rate of the short fine-tunes (default 3e-4)")
    p.add_argument("--finetune-crop-scale", type=_crop_scale, default=TIMM_CROP_SCALE,
                   help=f"smallest image area of the random-resized crop on --finetune-data (default {TIMM_CROP_SCALE}, timm's)")
    p.add_argument("--finetune-data", default=None,
                   help="training images for the short fine-tunes (needed with --data; default: the embedded training stream)")
    p.add_argument("--trial-timeout", type=_positive_float, default=None,
                   help="seconds a screening trial may run; a longer one ends its worker and is recorded as FAIL "
                        "(default: no limit)")
    p.add_argument("--retries", type=_non_negative_int, default=0,
                   help="times a failed or killed trial is run again (Ray's FailureConfig; default 0)")
    p.add_argument("--fail-trials", default="", help=argparse.SUPPRESS)  # test hook: "3:raise,5:nan"


def _int_at_least(minimum: int):  # type: ignore[no-untyped-def]
    """An argparse type: an integer >= minimum ("must be positive" for 1)."""
    bound = "positive" if minimum == 1 else f">= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _float_above(minimum: float, *, inclusive: bool):  # type: ignore[no-untyped-def]
    """An argparse type: a finite number > minimum (>= with inclusive)."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum:g}, got {text}")
        return value

    return parse


_positive_float, _non_negative_float = _float_above(0.0, inclusive=False), _float_above(0.0, inclusive=True)


def _crop_scale(text: str) -> float:
    """argparse type: a share of the image area in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="timm model name (default: the embedded default with its weights)")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs network or cache)")
    p.add_argument("--checkpoint", default=None, help="local weights (.safetensors or .pth)")
    p.add_argument("--data", default=None, help="ImageFolder / ImageNet-val directory (default: the embedded held-out set)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0, help="seed of the screening subset (default 0)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_device(device: str) -> None:
    """--device must name a device torch knows and that this machine has (ValueError otherwise)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r}: not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not _cuda():
        raise ValueError(f"--device {device}: no CUDA device here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"--device {device}: not usable here ({str(err).splitlines()[0]})") from None


def _check_out_dir(path, flag: str) -> None:  # type: ignore[no-untyped-def]
    """A directory to be created (or reused) at ``path`` must be creatable: no file in the way, a
    writable existing ancestor. Probed with a temporary directory that is removed at once."""
    import tempfile
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file, not a directory")
    if path.is_dir():
        return  # whether its content may be added to is the command's own check
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path}: {ancestor} is a file, not a directory")
    try:
        Path(tempfile.mkdtemp(dir=ancestor, prefix=".tokensched-probe-")).rmdir()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create a directory in {ancestor} ({err.strerror})") from None


def _resolve_schedule(args: argparse.Namespace, spec):  # type: ignore[no-untyped-def]
    from spaces import Schedule

    if args.preset is not None:
        return _check_merge_counts(Schedule.from_preset(args.preset, spec), f"--preset {args.preset}")
    try:
        schedule = Schedule.load(args.schedule)
    except UnicodeDecodeError:
        raise ValueError(f"--schedule {args.schedule}: not a text file (expected YAML or JSON)") from None
    except ValueError as err:
        if str(args.schedule) in str(err):
            raise
        raise ValueError(f"--schedule {args.schedule}: {err}") from None
    _check_merge_counts(schedule, f"--schedule {args.schedule}")
    if not schedule.model.same_shape(spec):
        raise ValueError(
            f"schedule {args.schedule} is for {schedule.model.name} (depth {schedule.model.depth}, "
            f"{schedule.model.tokens} tokens, width {schedule.model.embed_dim}), not {spec.name} "
            f"(depth {spec.depth}, {spec.tokens} tokens, width {spec.embed_dim})"
        )
    return schedule


def _check_merge_counts(schedule, what: str):  # type: ignore[no-untyped-def]
    """A merge count r above half the patch tokens can never be met (ToMe merges at most half of
    them in a block; its code clamps r silently), so it is a typo, not a schedule."""
    most = schedule.model.num_patches // 2
    for i, plan in enumerate(schedule.layers):
        if plan.r is not None and plan.r > most:
            raise ValueError(f"{what}: block {i} merges r={plan.r} tokens, but a block can merge at most {most} "
                             f"(half of {schedule.model.num_patches} patch tokens)")
    return schedule


def cmd_gmacs(args: argparse.Namespace) -> int:
    from search.models import model_spec
    from spaces import Schedule, breakdown, gmacs

    spec = model_spec(args.model)
    schedule = _resolve_schedule(args, spec)
    total, base = gmacs(schedule), gmacs(Schedule.empty(spec))
    rows = breakdown(schedule)
    if args.json:
        print(json.dumps({
            "model": spec.name, "schedule": schedule.name, "gmacs": round(total, 6), "baseline_gmacs": round(base, 6),
            "ratio": round(total / base, 6), "tokens": [r.tokens_in for r in rows],
            "tokens_out": rows[-1].tokens_out, "summary": schedule.summary(),
            "blocks": [{"index": r.index, "method": r.method, "tokens_in": r.tokens_in, "tokens_attn": r.tokens_attn,
                        "tokens_mlp": r.tokens_mlp, "gmacs": r.macs / 1e9, "overhead_gmacs": r.overhead_macs / 1e9}
                       for r in rows],
        }))
        return 0
    print(f"model     {spec.name}  ({spec.depth} blocks, {spec.tokens} tokens, width {spec.embed_dim})")
    print(f"schedule  {schedule.name}: {schedule.summary()}")
    print(f"GMACs     {total:.3f}  ({100 * total / base:.1f} % of {base:.3f})")
    print("block  method     tokens in  attn  mlp   GMACs")
    for r in rows:
        print(f"{r.index:5d}  {r.method:9s}  {r.tokens_in:9d}  {r.tokens_attn:4d}  {r.tokens_mlp:4d}  {r.macs / 1e9:.4f}")
    print(f"tokens leaving the last block: {rows[-1].tokens_out}")
    return 0


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Model (eval mode, on the device), its spec, and the screening set, from the CLI flags."""
    from search.data import load_eval_set
    from search.models import data_config, load_model
    from spaces import ModelSpec

    _check_device(args.device)
    if args.model is not None and not args.pretrained and args.checkpoint is None:
        print(f"warning: {args.model} has random weights (add --pretrained or --checkpoint)", file=sys.stderr)
    model = load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, device=args.device)
    data = load_eval_set(args.data, data_config(model), num_images=args.num_images, seed=args.seed,
                         num_classes=model.num_classes)
    if data.skipped:
        print(f"warning: skipped {data.skipped} unreadable image(s)", file=sys.stderr)
    return model, ModelSpec.from_model(model, name=args.model or model.pretrained_cfg.get("architecture")), data


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from search.evaluate import evaluate, predict

    model, spec, data = _load(args)
    schedule = _resolve_schedule(args, spec)
    reference = predict(model, data, batch_size=args.batch_size)
    amp = torch.bfloat16 if args.device == "cpu" else torch.float16
    timing = None if args.no_timing else {"batch_size": args.timing_batch, "repeats": args.repeats,
                                          "dtype": amp if args.amp else torch.float32}
    result = {"model": spec.name, "data": data.source, **evaluate(model, schedule, data, reference,
                                                                  batch_size=args.batch_size, timing=timing)}
    result["skipped_images"] = data.skipped
    if args.json:
        print(json.dumps(result))
        return 0
    pct = lambda v: "n/a (no labels)" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    print(f"model      {spec.name} on {data.source} ({result['num_images']} images)")
    print(f"schedule   {result['schedule']}: {result['summary']}")
    print(f"top-1      {pct(result['top1'])}   top-5 {pct(result['top5'])}")
    print(f"agreement  {100 * result['agreement']:.2f} % with the unreduced model (KL {result['kl']:.4f})")
    print(f"GMACs      {result['gmacs']:.3f} of {result['baseline_gmacs']:.3f} ({100 * result['gmacs'] / result['baseline_gmacs']:.1f} %)")
    if timing is not None:
        print(f"speed      {result['images_per_s']:.1f} images/s vs {result['baseline_images_per_s']:.1f} unreduced: "
              f"{result['speedup']:.2f}x (range {result['speedup_min']:.2f}-{result['speedup_max']:.2f}, "
              f"batch {result['batch_size']}, median of {result['repeats']})")
    return 0


def _split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _check_search_inputs(args: argparse.Namespace) -> None:
    """Make the search's paths absolute and check them (and --pretrained) before Ray starts.

    Ray Tune runs every trial in a working directory of its own, so a relative path would
    fail in each trial instead of once, here.
    """
    from pathlib import Path

    from search.data import required_images
    from search.models import DEFAULT_MODEL, create, load_model, read_checkpoint
    from search.run_dir import check_storage_url

    args.checkpoint, args.data, args.finetune_data = (str(Path(p).resolve()) if p else None
                                                      for p in (args.checkpoint, args.data, args.finetune_data))
    if args.checkpoint:
        read_checkpoint(args.checkpoint)
        load_model(args.model, checkpoint=args.checkpoint)  # another architecture's weights: one error now
    if args.data:
        items = required_images(Path(args.data))
        _check_decodable(items, "--data", args.data)
        # The confirmation images must fit beside the screening images (the embedded default draws
        # them from another seed of its held-out split).
        if args.num_images + args.confirm_images > len(items):
            raise ValueError(f"--confirm-images {args.confirm_images}: {args.data} holds {len(items)} images and "
                             f"{min(args.num_images, len(items))} are set aside for screening (--num-images)")
    if args.finetune_data:
        items = required_images(Path(args.finetune_data), what="--finetune-data directory")
        _check_decodable(items, "--finetune-data", args.finetune_data)
    if args.pretrained and not args.checkpoint:
        create(args.model or DEFAULT_MODEL, pretrained=True)  # offline: one error now, not one per trial
    _check_resources(args)
    if args.storage:
        check_storage_url(args.storage)
    if args.out and not args.resume:
        _check_out_dir(args.out, "--out")


SAMPLE_IMAGES = 16  # decoded before Ray starts: enough to catch a folder of non-images


def _check_decodable(items: list[tuple[str, int]], flag: str, root: str) -> None:
    """A seeded sample of the images must decode (the workers would each fail on a folder of non-images)."""
    import random

    from PIL import Image

    sample = random.Random(0).sample(items, min(SAMPLE_IMAGES, len(items)))
    failures = []
    for path, _ in sample:
        try:
            with Image.open(path) as img:
                img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:
            failures.append((path, err))
    if len(failures) == len(sample):
        path, err = failures[0]
        raise ValueError(f"{flag} {root}: none of {len(sample)} sampled images could be decoded "
                         f"(e.g. {path}: {type(err).__name__})")
    if failures:
        print(f"warning: {flag} {root}: {len(failures)} of {len(sample)} sampled images could not be decoded",
              file=sys.stderr)


def _check_resources(args: argparse.Namespace) -> None:
    """Resources per trial must fit the local machine (Ray would wait forever for a GPU that is not
    there); on a --ray-address cluster the driver checks them against the cluster once connected."""
    import os

    import torch

    if args.ray_address:
        return
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    if args.cpus_per_trial > cpus:
        raise ValueError(f"--cpus-per-trial {args.cpus_per_trial:g}: this machine has {cpus} CPU(s)")
    if args.gpus_per_trial > gpus:
        raise ValueError(f"--gpus-per-trial {args.gpus_per_trial:g}: this machine has {gpus} GPU(s)")
    if args.gpus_per_trial > 0 and not str(args.device).startswith("cuda"):
        raise ValueError(f"--gpus-per-trial {args.gpus_per_trial:g} with --device {args.device}: "
                         "the trials would hold GPUs they do not use")


def search_config(args: argparse.Namespace, argv: Sequence[str]):  # type: ignore[no-untyped-def]
    """Validate the search flags into a SearchConfig (ValueError on bad input)."""
    import math
    from dataclasses import replace
    from pathlib import Path

    from search.driver import SearchConfig, command_line, default_min_gmacs
    from search.models import DEFAULT_MODEL, model_spec
    from search.pareto import OBJECTIVES
    from search.run_dir import SAMPLERS, default_out
    from search.worker import FinetuneJob, WorkerSetup
    from spaces import Schedule, gmacs
    from spaces.budget import parse_budget
    from spaces.search_space import SearchSpace

    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; valid: {', '.join(SAMPLERS)}")
    objectives = _split(args.objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise ValueError(f"unknown objective(s) {bad or '(none)'}; valid: {', '.join(OBJECTIVES)}")
    _check_device(args.device)
    spec = model_spec(args.model or DEFAULT_MODEL)
    baseline = gmacs(Schedule.empty(spec))
    budget = parse_budget(args.budget, baseline)
    if not math.isfinite(budget) or budget > baseline * (1 + 1e-9):
        raise ValueError(f"--budget {args.budget} is {budget:.4g} GMACs, above the unreduced {spec.name} "
                         f"({baseline:.4f} GMACs); use at most 100%")
    space = SearchSpace(args.space, spec, methods=_split(args.methods), budget_gmacs=budget)
    if args.min_gmacs is not None:
        try:
            min_gmacs = parse_budget(args.min_gmacs, baseline)
        except ValueError as err:
            raise ValueError(f"--min-gmacs {args.min_gmacs}: " + str(err).replace("budget", "value")) from None
        if not math.isfinite(min_gmacs) or min_gmacs > budget:
            raise ValueError(f"--min-gmacs {args.min_gmacs} is {min_gmacs:.4g} GMACs, above the budget ({budget:.4f} GMACs)")
    else:
        min_gmacs = default_min_gmacs(space, presets=not args.no_presets)
    space = replace(space, min_gmacs=min_gmacs)
    timing = None
    if {"speedup", "images_per_s"} & set(objectives):
        timing = (("batch_size", args.timing_batch), ("repeats", 3), ("warmup", 1))
    if args.finetune_top:
        if args.data and not args.finetune_data:
            raise ValueError("--finetune-top with --data needs --finetune-data (training images; --data is the "
                             "screening set and must not be trained on)")
        if not args.finetune_lr > 0:
            raise ValueError(f"--finetune-lr must be positive, got {args.finetune_lr}")
    _check_search_inputs(args)
    setup = WorkerSetup(space=space, model=args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                        data=args.data, num_images=args.num_images, seed=args.seed, batch_size=args.batch_size,
                        device=args.device, threads=max(1, int(args.cpus_per_trial)), timing=timing,
                        objectives=objectives, confirm_images=args.confirm_images,
                        trial_timeout=args.trial_timeout)
    faults = {int(k): v for k, v in (item.split(":") for item in _split(args.fail_trials))}
    job = None
    if args.finetune_top:
        job = FinetuneJob(steps=args.finetune_steps, out_root="", data=args.finetune_data,
                          batch_size=args.finetune_batch, lr=args.finetune_lr, crop_scale=args.finetune_crop_scale)
    return SearchConfig(setup=setup, budget=args.budget, out=Path(args.out) if args.out else default_out(),
                        trials=args.trials, sampler=args.sampler, resume=args.resume, storage=args.storage,
                        ray_address=args.ray_address, cpus_per_trial=args.cpus_per_trial,
                        gpus_per_trial=args.gpus_per_trial, concurrency=args.concurrency,
                        presets=not args.no_presets, seed=args.seed, command=command_line(list(argv)),
                        fault_trials=faults, finetune_top=args.finetune_top, finetune=job, retries=args.retries)


def cmd_search(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    from search.driver import check_budget, run

    cfg = search_config(args, argv)
    check_budget(cfg.setup.space)
    return run(cfg).exit_code


def _finetune_model(args: argparse.Namespace, schedule, source: dict):  # type: ignore[no-untyped-def]
    """The model to fine-tune (on the CPU; finetune moves it): the config's model and checkpoint unless overridden."""
    import reducers
    from search.models import DEFAULT_MODEL, load_model

    searched = source.get("model") or schedule.model.name
    if args.model is not None and args.model != searched:
        raise ValueError(f"--model {args.model} is not {searched}, the model config {args.config} was searched on")
    checkpoint = args.checkpoint or source.get("checkpoint")
    pretrained = args.pretrained or bool(source.get("pretrained"))
    if searched != DEFAULT_MODEL and not pretrained and checkpoint is None:
        print(f"warning: {searched} has random weights (add --pretrained or --checkpoint)", file=sys.stderr)
    model = load_model(None if searched == DEFAULT_MODEL else searched, pretrained=pretrained, checkpoint=checkpoint)
    reducers.apply_schedule(model, schedule)  # a ValueError now if the schedule does not fit the model
    reducers.remove_schedule(model)
    return model


def cmd_finetune(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from search import finetune as ft
    from search.data import load_eval_set
    from search.models import data_config

    _check_device(args.device)
    schedule, source = ft.load_job(args.config)
    out = Path(args.out) if args.out else Path(args.config).parent.parent / "finetune" / Path(args.config).stem
    _check_out_dir(out, "--out")
    if (out / ft.WEIGHTS).exists():
        raise ValueError(f"{out} holds a finished fine-tune ({ft.WEIGHTS}); nothing is overwritten (choose another --out)")
    model = _finetune_model(args, schedule, source)
    stream = ft.train_stream(args.data, data_config(model), args.batch_size, ft.rank_seed(args.seed),
                             num_classes=model.num_classes, crop_scale=args.crop_scale)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = max(1, (ft.EMBEDDED_EPOCH if args.data is None else len(stream)) // (args.batch_size * world))
    steps = args.steps or (args.epochs or 30) * per_epoch
    settings = ft.FinetuneSettings(steps=steps, batch_size=args.batch_size, lr=args.lr, alpha=args.alpha,
                                   beta=args.beta, theta=args.theta, checkpoint_every=args.checkpoint_every,
                                   seed=args.seed, eval_every=args.eval_every)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: the other processes only train
        ft.finetune(model, schedule, stream, settings, out_dir=out, device=args.device)
        return 0
    eval_data = args.eval_data or source.get("data")
    if eval_data is not None and args.data is not None and Path(eval_data).resolve() == Path(args.data).resolve():
        print(f"warning: training and held-out images are the same directory ({eval_data})", file=sys.stderr)
    eval_set = load_eval_set(eval_data, data_config(model), num_images=args.num_images, seed=args.seed,
                             num_classes=model.num_classes)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    log(f"fine-tuning {schedule.name} ({schedule.summary()}) for {steps} steps of {args.batch_size} -> {out}")
    metrics = ft.finetune(model, schedule, stream, settings, out_dir=out, eval_set=eval_set, device=args.device, log=log)
    return _print_finetune(args, out, metrics)


def _print_finetune(args: argparse.Namespace, out, m: dict) -> int:  # type: ignore[no-untyped-def]
    """The one summary line (or JSON object) of a finished fine-tune."""
    before, after = m["before"] or {}, m["after"] or {}
    result = {"config": str(args.config), "out": str(out), "weights": m["weights"], "schedule": m["schedule"],
              "steps": m["steps"], "seconds": m["seconds"], "images_per_s": m["images_per_s"],
              "top1_before": before.get("top1"), "top1_after": after.get("top1"),
              "agreement_before": before.get("agreement"), "agreement_after": after.get("agreement"),
              "cut_loss_first": m["cut_loss_first"], "cut_loss_last": m["cut_loss_last"], "gmacs": m["gmacs"],
              "resumed_from": m["resumed_from"]}  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    cut = "" if m["cut_loss_first"] is None else f", cut loss {m['cut_loss_first']:.4f} -> {m['cut_loss_last']:.4f}"
    print(f"fine-tuned {m['schedule']} for {m['steps']} steps in {m['seconds']:.0f} s ({m['images_per_s']:.1f} img/s): "
          f"top-1 {pct(result['top1_before'])} -> {pct(result['top1_after'])}{cut}; weights {m['weights']}")
    return 0


def cmd_make_data(args: argparse.Namespace) -> int:
    from search.embedded.synthetic import CLASS_NAMES, write_folder

    _check_out_dir(args.out, "make-data")
    root = write_folder(args.out, args.split, args.num_images, args.seed)
    print(f"wrote {args.num_images} {args.split} images of the embedded default to {root}/ "
          f"({len(CLASS_NAMES)} class folders, 64x64 PNG)")
    return 0


COMMANDS = {"gmacs": cmd_gmacs, "eval": cmd_eval, "search": cmd_search, "finetune": cmd_finetune,
            "make-data": cmd_make_data}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        if not argv[0].startswith("-"):
            print(f"error: unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)} "
                  "(or search flags such as --budget 65%)", file=sys.stderr)
            return EXIT_BAD_INPUT
        argv = ["search", *argv]  # `run_search.py --budget 65%` is the search
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        if args.command == "search":
            return cmd_search(args, argv[1:])
        return COMMANDS[args.command](args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
