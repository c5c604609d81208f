"""Measured speed-up of each reduction method against its GMAC speed-up, in one process.

    python bench/reducers.py [--batch 32] [--repeats 7] [--target 0.65] [--model deit_small_patch16_224]
                             [--device cpu] [--json OUT] [--quick]

For every method the paper preset whose cost-model GMACs lie closest to target x the
unreduced GMACs is chosen by a 1-D search over its numeric argument (evit:<keep>,
tome:<r>, idlevit:<k>, tcvit:<keep>, ppt:<r>). Protocol (PITFALLS.md item 4): random-init
model, fp32, eval mode, torch.inference_mode, a fixed batch, fused attention on in the
baseline and the reduced model alike, warm-up forwards, device synchronisation around each
timed forward, and the median of `repeats` forwards. The baseline is timed in the same
process, interleaved with each candidate in ABBA order so that slow drift cancels; only
ratios are reported, never absolute numbers from different runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Run as `python bench/reducers.py`, this file's folder comes first on sys.path and its own
# name would shadow the `reducers` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from reducers import apply_schedule  # noqa: E402
from search.evaluate import time_call, timed_pairs  # noqa: E402
from spaces import ModelSpec, Schedule, from_preset, gmacs  # noqa: E402

# method -> (preset family, kind of its numeric argument)
METHODS: dict[str, tuple[str, str]] = {
    "prune": ("evit", "keep"),  # EViT prune + fuse at blocks 3, 6, 9
    "merge": ("tome", "r"),  # ToMe, constant r in every block
    "idle": ("idlevit", "keep"),  # IdleViT, four stages
    "condense": ("tcvit", "keep"),  # TC-ViT at blocks 3, 6, 9, order 2
    "adaptive": ("ppt", "r"),  # PPT prune-or-pool at blocks 3, 6, 9
}
DEFAULTS = {"model": "deit_small_patch16_224", "batch": 32, "repeats": 7}
QUICK = {"model": "deit_tiny_patch16_224", "batch": 8, "repeats": 3}
DRIFT_WARN = 1.25  # baseline medians further apart than this across methods: a busy machine


@dataclass(frozen=True)
class Row:
    method: str
    preset: str
    gmacs: float
    gmac_speedup: float  # baseline GMACs / these GMACs
    measured_speedup: float  # median baseline time / median time
    efficiency: float  # measured / GMAC speed-up
    spread_min: float  # min and max of the per-pair speed-up over the repeats
    spread_max: float
    ms_per_batch: float  # median
    base_ms_per_batch: float  # median of the baseline timed beside it


def closest_preset(family: str, kind: str, spec: ModelSpec, target: float) -> tuple[str, Schedule]:
    """The preset `family:<arg>` whose GMACs are closest to `target` (ties: the first)."""
    if kind == "keep":
        args = [f"{k / 100:.2f}" for k in range(5, 101)]
    else:
        args = [str(r) for r in range(spec.num_patches // 2 + 1)]
    schedules = [from_preset(f"{family}:{a}", spec) for a in args]
    best = min(schedules, key=lambda s: abs(gmacs(s) - target))
    return best.name, best


def attention_backend(device: torch.device) -> str:
    text = "fused F.scaled_dot_product_attention (fused_attn=True) in baseline and reduced blocks alike"
    if device.type == "cuda":
        kernels = [name for name in ("flash", "mem_efficient", "cudnn", "math")
                   if getattr(torch.backends.cuda, f"{name}_sdp_enabled", lambda: False)()]
        text += f"; SDPA kernels enabled: {', '.join(kernels)}"
    return text + "; condense blocks need the attention matrix and run it explicitly"


def measure(method: str, preset: str, schedule: Schedule, base: nn.Module, cand: nn.Module,
            images: torch.Tensor, args: argparse.Namespace, device: torch.device, base_gmacs: float) -> Row:
    apply_schedule(cand, schedule)
    for _ in range(args.warmup):
        time_call(lambda: cand(images), device)
    base_t, cand_t = timed_pairs(lambda: time_call(lambda: base(images), device),
                                 lambda: time_call(lambda: cand(images), device), args.repeats)
    pair_speedups = [b / c for b, c in zip(base_t, cand_t, strict=True)]
    g = gmacs(schedule)
    measured = statistics.median(base_t) / statistics.median(cand_t)
    return Row(method=method, preset=preset, gmacs=g, gmac_speedup=base_gmacs / g, measured_speedup=measured,
               efficiency=measured / (base_gmacs / g), spread_min=min(pair_speedups), spread_max=max(pair_speedups),
               ms_per_batch=1e3 * statistics.median(cand_t), base_ms_per_batch=1e3 * statistics.median(base_t))


def print_table(rows: list[Row]) -> None:
    print(f"{'method':<9} {'preset':<13} {'GMACs':>6} {'GMAC x':>7} {'measured x':>10} {'efficiency':>10} "
          f"{'spread (min-max)':>16} {'ms/batch':>9} {'base ms':>8}")
    for r in rows:
        print(f"{r.method:<9} {r.preset:<13} {r.gmacs:6.3f} {r.gmac_speedup:7.2f} {r.measured_speedup:10.2f} "
              f"{r.efficiency:10.2f} {f'{r.spread_min:.2f}-{r.spread_max:.2f}':>16} {r.ms_per_batch:9.1f} "
              f"{r.base_ms_per_batch:8.1f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help=f"timm model name (default {DEFAULTS['model']})")
    p.add_argument("--batch", type=int, help=f"images per forward (default {DEFAULTS['batch']})")
    p.add_argument("--repeats", type=int, help=f"timed forwards per model and method (default {DEFAULTS['repeats']})")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per model before timing (default 2)")
    p.add_argument("--target", type=float, default=0.65, help="GMACs as a fraction of the unreduced model")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i> (default cpu)")
    p.add_argument("--json", type=Path, help="write the rows (and the settings) to this file")
    p.add_argument("--quick", action="store_true", help="smoke run: deit_tiny, batch 8, 3 repeats")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args: argparse.Namespace) -> torch.device:
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"need --batch >= 1, --repeats >= 1, --warmup >= 0; got {args.batch}, {args.repeats}, {args.warmup}")
    if not 0.0 < args.target <= 1.0:
        raise ValueError(f"--target must be in (0, 1], got {args.target}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:i], got {args.device!r}")
    if not timm.is_model(args.model):
        raise ValueError(f"unknown timm model {args.model!r}")
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = check_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval().to(device)
    for blk in base.blocks:
        blk.attn.fused_attn = True  # the same backend for baseline and candidates
    cand = copy.deepcopy(base)
    spec = ModelSpec.from_model(base, name=args.model)
    base_gmacs = gmacs(Schedule.empty(spec))
    images = torch.randn(args.batch, 3, *base.patch_embed.img_size, device=device)

    print(f"torch {torch.__version__} | timm {timm.__version__} | device {device} | threads {torch.get_num_threads()} "
          f"| batch {args.batch} | fp32 | eval + inference_mode")
    print(f"model {args.model} (random init) | attention: {attention_backend(device)}")
    print(f"protocol: {args.warmup} warm-up forwards per model, median of {args.repeats} timed forwards, "
          f"baseline and candidate interleaved (ABBA)")
    print(f"baseline {base_gmacs:.3f} GMACs; target {args.target:.2f} x = {args.target * base_gmacs:.3f} GMACs\n")
    rows = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            time_call(lambda: base(images), device)
        for method, (family, kind) in METHODS.items():
            preset, schedule = closest_preset(family, kind, spec, args.target * base_gmacs)
            rows.append(measure(method, preset, schedule, base, cand, images, args, device, base_gmacs))
    print_table(rows)
    base_ms = [r.base_ms_per_batch for r in rows]
    if max(base_ms) > DRIFT_WARN * min(base_ms):
        print(f"\nwarning: the baseline's median ranged {min(base_ms):.1f}-{max(base_ms):.1f} ms/batch across "
              "methods; the machine was probably busy, so these ratios are unreliable")
    if args.json:
        meta = {"torch": torch.__version__, "timm": timm.__version__, "device": str(device),
                "threads": torch.get_num_threads(), "batch": args.batch, "repeats": args.repeats,
                "warmup": args.warmup, "model": args.model, "target": args.target, "dtype": "float32",
                "attention": attention_backend(device), "baseline_gmacs": base_gmacs}
        args.json.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
