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
    return parser


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


COMMANDS = {"gmacs": cmd_gmacs}


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
