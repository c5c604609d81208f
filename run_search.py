#!/usr/bin/env python
"""tokensched command line, run from a checkout: ``python run_search.py --budget 65%``.

The same as the installed ``tokensched`` command; the code is in ``search/cli/``:

    python run_search.py --budget 65%                    the search (the default command)
    python run_search.py eval --preset tome:13            one schedule: accuracy, agreement, GMACs, speed
    python run_search.py gmacs --model deit_small_patch16_224 --preset evit:0.7 [--json]
    python run_search.py finetune --config runs/<run>/configs/0007.yaml [--data DIR] [--steps S | --epochs E]
    python run_search.py make-data data/shapes-val [--split heldout|train] [--num-images N]
"""

from __future__ import annotations

from search.cli import exit_process, main

__all__ = ["main"]

if __name__ == "__main__":
    exit_process(main(exiting=True))
