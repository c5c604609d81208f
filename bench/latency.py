"""The latency model against the clock: build (or reuse) a profile, then time paper presets for real.

    python bench/latency.py [--model deit_small_patch16_224] [--img-size 224] [--device cuda]
                            [--batch 256] [--latency-batch 1] [--dtype bfloat16] [--presets tome:8,evit:0.7,...]
                            [--threads N] [--csv out.csv] [--run RUN_DIR [--most N]] [--rebuild]

--run times the schedules a search re-timed (its front and presets, from trials.jsonl) instead of
--presets; --rebuild builds a new profile instead of the cached one. The error is printed for the
profile's prediction (blocks fitted to whole models) and for its blocks alone (scale 1, the rest
the unreduced model's remainder: the prediction before the whole-model fit).

For every preset: GMAC share, predicted images/s and speed-up (the profile), measured images/s and
speed-up at --batch (evaluate.throughput_many: ABBA quartets against the unreduced model, two passes),
and the latency at --latency-batch; then the predictor's error (median absolute % error, Spearman).
Random weights: speed does not depend on them. One process, ratios from the same run.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search import latency  # noqa: E402
from search.evaluate import throughput_many  # noqa: E402
from search.models import DEFAULT_MODEL, create, load_model  # noqa: E402
from spaces import ModelSpec, Schedule, from_preset, gmacs  # noqa: E402

FAMILIES = "tome:4,tome:8,tome:8,-1,evit:0.7,evit:0.5,idlevit:0.7,idlevit:0.5,ppt,tcvit:0.7,tcvit:0.5"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--img-size", type=int, default=None, help="timm img_size (default: the model's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--latency-batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--presets", default=FAMILIES)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--csv", default=None)
    p.add_argument("--run", type=Path, default=None, help="time the schedules this run re-timed")
    p.add_argument("--most", type=int, default=None, help="with --run: at most this many of them")
    p.add_argument("--rebuild", action="store_true", help="build a new profile (the cache is not read)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == DEFAULT_MODEL:
        model = load_model(None, device=args.device)
    else:
        kw = {"img_size": args.img_size} if args.img_size else {}
        model = create(args.model, pretrained=False, **kw).to(args.device).eval()
    spec = ModelSpec.from_model(model, name=args.model)
    key = latency.current_key(args.model, args.device, batch=args.batch, threads=args.threads, dtype=args.dtype)
    profile = None if args.rebuild else latency.cached(key)
    how = f"cached: {latency.cache_path(key)}"
    if profile is None:
        profile = latency.build(model, key, log=lambda s: print(s, file=sys.stderr))
        profile.save(latency.cache_path(key))
        how = f"built in {profile.build_seconds:.1f} s"
    print(f"profile: {key} ({how})")
    names, schedules = _run_schedules(args.run, args.most) if args.run else _presets(args.presets, spec)
    blocks_alone = _blocks_alone(profile)
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    batched = throughput_many(model, schedules, batch_size=args.batch, repeats=args.passes, dtype=dtype,
                              schedule_warmup=1 if args.device.startswith("cuda") else 0)
    single = throughput_many(model, schedules, batch_size=args.latency_batch, repeats=args.passes, dtype=dtype,
                             schedule_warmup=1 if args.device.startswith("cuda") else 0)
    seconds = time.perf_counter() - start
    base = gmacs(Schedule.empty(spec))
    rows = []
    for name, s, b, one in zip(names, schedules, batched, single, strict=True):
        rows.append({"preset": name, "gmacs_share": gmacs(s) / base, **latency.prediction(profile, s),
                     "measured_images_per_s": b.images_per_s, "measured_speedup": b.speedup,
                     "baseline_images_per_s": b.baseline_images_per_s,
                     "latency_ms": 1e3 * args.latency_batch / one.images_per_s, "latency_speedup": one.speedup,
                     "ray_trial": name})
    alone = [{**r, **latency.prediction(blocks_alone, s)} for r, s in zip(rows, schedules, strict=True)]
    cols = ["preset", "gmacs_share", "predicted_images_per_s", "measured_images_per_s", "predicted_speedup",
            "measured_speedup", "latency_ms", "latency_speedup"]
    print(f"{args.model} on {key.device_name}, {args.dtype}, batch {args.batch} (latency at batch "
          f"{args.latency_batch}), {args.threads} thread(s); timed in {seconds:.1f} s")
    print("".join(f"{c:>23}" for c in cols))
    for r in rows:
        print("".join(f"{r[c]:>23.4g}" if isinstance(r[c], float) else f"{r[c]:>23}" for c in cols))
    print(f"predictor error (rest {profile.rest_us / 1e3:.2f} ms + {profile.scale:.3f} x blocks):",
          latency.predictor_error(rows))
    print(f"predictor error, blocks alone (rest {blocks_alone.rest_us / 1e3:.2f} ms + 1 x blocks):",
          latency.predictor_error(alone))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return 0


def _presets(names: str, spec: ModelSpec) -> tuple[list[str], list[Schedule]]:
    unique = [n for n in dict.fromkeys(x.strip() for x in names.split(",")) if n]
    return unique, [from_preset(n, spec) for n in unique]


def _run_schedules(run: Path, most: int | None) -> tuple[list[str], list[Schedule]]:
    """The schedules `run` re-timed (one per Ray trial), named by preset or trial number."""
    from search import run_dir
    from search.outcome import latest_records

    timed = [r for r in latest_records(run_dir.read_records(run)) if r.get("measured_speedup") and r.get("schedule")]
    timed = timed[:most] if most else timed
    return ([str(r.get("preset") or r.get("trial")) for r in timed], [Schedule.from_dict(r["schedule"]) for r in timed])


def _blocks_alone(profile: latency.LatencyProfile) -> latency.LatencyProfile:
    """The profile without its whole-model fit: scale 1, the rest what the unreduced model's
    measured time leaves over its blocks (how versions 1 and 2 predicted)."""
    from dataclasses import replace

    unreduced = next((c for c in profile.calibration if c["summary"] == "none"), None)
    rest = max(0.0, unreduced["measured_us"] - unreduced["blocks_us"]) if unreduced else profile.rest_us
    return replace(profile, rest_us=rest, scale=1.0)


if __name__ == "__main__":
    raise SystemExit(main())
