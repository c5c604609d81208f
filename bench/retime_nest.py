"""How many schedules the re-timing may nest between two timings of the unreduced model.

    python bench/retime_nest.py --run runs/<run> [--nests 1,2,3] [--passes 4] [--batch 64]
                                [--threads 1] [--most N]

evaluate.throughput_many times each schedule in a palindrome between two timings of the unreduced
model, B S1 S1 B (nest 1) or B S1 S2 S2 S1 B (nest 2), ...: the more schedules share a pair of
baselines, the less time goes to the unreduced model, the costliest forward. This bench times the
schedules a search re-timed (its front and presets, from trials.jsonl) with each nest, `--passes`
one-pass chains each, the nests alternated in ABBA order in one process, and prints per nest:
seconds a pass, the median over schedules of the relative spread of a schedule's speed-up across
passes (the re-timing's own noise; the search re-times in one pass), and the median ratio of a
schedule's mean speed-up to the first nest's (a bias) with the median and largest relative
difference. The schedules run on the embedded default model, the default command's, at the trials'
thread count (`--threads`, default 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.latency import _run_schedules  # noqa: E402
from search.evaluate import throughput_many  # noqa: E402
from search.models import DEFAULT_MODEL, load_model  # noqa: E402


def abba(nests: list[int], passes: int) -> list[int]:
    """The order of the passes: the nests forwards, then backwards, `passes` times each."""
    order: list[int] = []
    for p in range(passes):
        order += nests if p % 2 == 0 else nests[::-1]
    return order


def spread(values: list[float]) -> float:
    """Relative spread of one schedule's speed-ups across passes: (max - min) / median."""
    return (max(values) - min(values)) / statistics.median(values)


def summarize(speedups: dict[int, list[list[float]]], seconds: dict[int, list[float]]) -> list[dict[str, float]]:
    """Per nest: seconds a pass, median spread across passes, and the median ratio of each schedule's
    mean speed-up to the first nest's, with the median and largest relative difference."""
    first = next(iter(speedups))
    means = {n: [statistics.fmean(s) for s in zip(*runs, strict=True)] for n, runs in speedups.items()}
    rows = []
    for n, runs in speedups.items():
        ratios = [m / r for m, r in zip(means[n], means[first], strict=True)]
        diffs = [abs(q - 1) for q in ratios]
        rows.append({"nest": n, "seconds_per_pass": statistics.median(seconds[n]),
                     "median_spread": statistics.median(spread(list(s)) for s in zip(*runs, strict=True)),
                     "median_ratio": statistics.median(ratios), "median_diff": statistics.median(diffs),
                     "max_diff": max(diffs)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a search's run directory (its re-timed schedules)")
    p.add_argument("--nests", default="1,2,3")
    p.add_argument("--passes", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--most", type=int, default=None)
    args = p.parse_args(argv)
    try:
        nests = [int(n) for n in args.nests.split(",")]
    except ValueError:
        nests = []
    if not nests or min(nests) < 1:
        print(f"error: --nests must be positive integers separated by commas, got {args.nests!r}", file=sys.stderr)
        return 2
    if args.passes < 2:
        print(f"error: --passes must be at least 2 (a spread needs two), got {args.passes}", file=sys.stderr)
        return 2
    for flag, value in (("--batch", args.batch), ("--threads", args.threads), ("--most", args.most)):
        if value is not None and value < 1:
            print(f"error: {flag} must be at least 1, got {value}", file=sys.stderr)
            return 2
    if not (args.run / "trials.jsonl").is_file():
        print(f"error: --run {args.run}: no trials.jsonl there", file=sys.stderr)
        return 2
    schedules = _run_schedules(args.run, args.most)[1]  # the schedules the run re-timed, in its order
    if not schedules:
        print(f"error: --run {args.run}: no re-timed schedule in its trials.jsonl", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model = load_model(DEFAULT_MODEL)
    speedups: dict[int, list[list[float]]] = {n: [] for n in nests}
    seconds: dict[int, list[float]] = {n: [] for n in nests}
    for n in abba(nests, args.passes):
        start = time.perf_counter()
        found = throughput_many(model, schedules, batch_size=args.batch, warmup=2, schedule_warmup=0, nest=n)
        seconds[n].append(time.perf_counter() - start)
        speedups[n].append([t.speedup for t in found])
    print(f"{len(schedules)} schedules of {args.run}, batch {args.batch}, {args.threads} thread(s), "
          f"{args.passes} passes per nest in ABBA order")
    print(f"{'nest':>5} {'s/pass':>8} {'median spread':>14} {'median ratio':>13} {'median diff':>12} {'max diff':>9}")
    for r in summarize(speedups, seconds):
        print(f"{r['nest']:>5} {r['seconds_per_pass']:>8.2f} {100 * r['median_spread']:>13.2f}% "
              f"{r['median_ratio']:>13.4f} {100 * r['median_diff']:>11.2f}% {100 * r['max_diff']:>8.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
