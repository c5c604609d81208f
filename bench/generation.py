"""How fast the embedded data set is generated (moved here from a unit test: issue 21, item 15).

    python bench/generation.py [--images 2000] [--repeats 5]

Prints images/s of `synthetic.make_split` (median and range of the repeats, after a warm-up) and
the seconds 2,000 training images take, the figure the unit test used to assert (< 2 s). Wall
time depends on the machine and its load, so it is measured here, not asserted in the tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.embedded import synthetic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images per repeat (default 2000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    parser.add_argument("--split", default="train", choices=("train", "heldout"))
    args = parser.parse_args(argv)
    synthetic.make_split(args.split, 64)  # warm-up
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        synthetic.make_split(args.split, args.images)
        seconds.append(time.perf_counter() - start)
    rates = sorted(args.images / s for s in seconds)
    print(f"make_split({args.split!r}, {args.images}): median {statistics.median(seconds):.3f} s, "
          f"{statistics.median(rates):.0f} images/s (range {rates[0]:.0f}-{rates[-1]:.0f}, {args.repeats} repeats)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
