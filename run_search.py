#!/usr/bin/env python
"""tokensched command line.

    python run_search.py gmacs --model deit_small_patch16_224 --preset evit:0.7 [--json]

Errors at the boundary print one line and exit with code 2.
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
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
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


def _resolve_schedule(args: argparse.Namespace, spec):  # type: ignore[no-untyped-def]
    from spaces import Schedule

    if args.preset is not None:
        return Schedule.from_preset(args.preset, spec)
    schedule = Schedule.load(args.schedule)
    if not schedule.model.same_shape(spec):
        raise ValueError(
            f"schedule {args.schedule} is for {schedule.model.name} (depth {schedule.model.depth}, "
            f"{schedule.model.tokens} tokens, width {schedule.model.embed_dim}), not {spec.name} "
            f"(depth {spec.depth}, {spec.tokens} tokens, width {spec.embed_dim})"
        )
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

    if args.device.startswith("cuda") and not _cuda():
        raise ValueError(f"--device {args.device}: no CUDA device here")
    if args.model is not None and not args.pretrained and args.checkpoint is None:
        print(f"warning: {args.model} has random weights (add --pretrained or --checkpoint)", file=sys.stderr)
    model = load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, device=args.device)
    data = load_eval_set(args.data, data_config(model), num_images=args.num_images, seed=args.seed)
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


COMMANDS = {"gmacs": cmd_gmacs, "eval": cmd_eval}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return COMMANDS[args.command](args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
