"""tokensched command line (``tokensched``, or ``python run_search.py``).

    tokensched --budget 65%                    the search (the default command)
    tokensched eval --preset tome:13            one schedule: accuracy, agreement, GMACs, speed
    tokensched gmacs --model deit_small_patch16_224 --preset evit:0.7 [--json]
    tokensched finetune --config runs/<run>/configs/0007.yaml [--data DIR] [--steps S | --epochs E]
    tokensched make-data data/shapes-val [--split heldout|train] [--num-images N]

Errors at the boundary print one line and exit with code 2; a search whose front is empty
exits with code 3. ``parser`` builds the flags, ``checks`` checks inputs at the boundary,
``commands`` runs each subcommand.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from search.cli.checks import EXIT_BAD_INPUT
from search.cli.commands import COMMANDS, cmd_search
from search.cli.parser import build_parser

__all__ = ["EXIT_BAD_INPUT", "console", "exit_process", "main"]


def main(argv: Sequence[str] | None = None, *, prog: str = "run_search.py", exiting: bool = False) -> int:
    """Run one command line (default: ``sys.argv[1:]``); returns the exit code. ``exiting``: the
    process ends right after (the search then shuts Ray down while it writes its reports)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        if not argv[0].startswith("-"):
            print(f"error: unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)} "
                  "(or search flags such as --budget 65%)", file=sys.stderr)
            return EXIT_BAD_INPUT
        argv = ["search", *argv]  # `tokensched --budget 65%` is the search
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        if args.command == "search":
            return cmd_search(args, argv[1:], exiting=exiting)
        return COMMANDS[args.command](args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def exit_process(code: int) -> NoReturn:
    """End the process with `code` once everything is written: the atexit handlers run (Ray's
    shutdown, the run directory's clean-up) and the output is flushed, then the interpreter's own
    teardown is skipped (slow with torch, timm and Ray loaded, and nothing is left to write)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written to it
            pass
    os._exit(code)


def console() -> None:
    """The ``tokensched`` console script (pyproject's [project.scripts])."""
    exit_process(main(prog="tokensched", exiting=True))
