"""A per-device latency model: time each block kind once, then predict a schedule's time like its GMACs.

The profile times single blocks of the model, alone, at the run's batch, dtype, thread count and
device, as a function of the patch tokens entering them: the unreduced block (with and without the
proportional-attention bias that sized tokens bring), the MLP half alone, and every reduction
method at a reference keep ratio, each kind in a block of its own. At each token count every kind
is timed in one chain of ABBA quartets with the unreduced block at full tokens (`chain_ratios`,
the protocol of search/evaluate.py's `throughput_many`: warm-up first, median of the ratios), so a
drifting machine scales every kind and its partner alike; an entry is its ratio times the partner's
median time.

Each kind's timings are smoothed by a least-squares quadratic in the token count (`fit_curve`).
A schedule's prediction sums, block by block from the tokens entering it (spaces/cost.py's
`breakdown`), what its plan costs:

* none (or a plan that changes nothing): the unreduced block at n tokens;
* an after-attention method m keeping n -> k: T_m(n) - MLP(k_ref) + MLP(k), where T_m(n) was timed
  at the reference keep (leaving k_ref), so the reduction's own cost comes from the table and the
  MLP is charged on the tokens that are really kept; with sized tokens, the bias's extra cost;
* idle with K of n active: T_idle(n) - T_none(K_ref) + T_none(K) (ranking over n, the block on K);

plus the rest of the model (patch embedding, final norm, head). Blocks timed alone do not add up
to the whole model they sit in (caches, dispatch, the reducers' bookkeeping between blocks), so the
profile also times a few whole models (`calibration_schedules`: unreduced, and each method in a
fixed schedule of its own, never a run's schedules) and fits whole = rest + scale * (sum of its
blocks) to them by least squares; a prediction is that line. Values are microseconds per batch.

Profiles are versioned JSON files keyed by model, device name, torch version, dtype, batch and
threads (`ProfileKey`); `cached_profile` reuses one while its key matches and rebuilds it otherwise.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from spaces import LayerPlan, ModelSpec, Schedule, breakdown
from spaces.schedule import CLS_METHODS

FORMAT = "tokensched-latency-profile"
VERSION = 3  # 3: rest and scale fitted to whole models; 2: every kind in one chain per token count
# The reference plan each after-attention method and idle is timed with (keep 0.5 of the tokens).
REFERENCE_PLANS: dict[str, LayerPlan] = {
    "prune": LayerPlan("prune", keep=0.5),
    "merge": LayerPlan("merge", keep=0.5),
    "condense": LayerPlan("condense", keep=0.5),
    "adaptive": LayerPlan("adaptive", keep=0.5),
    "diffrate": LayerPlan("diffrate", keep=0.5, merge_keep=0.8),
    "idle": LayerPlan("idle", keep=0.5),
}
NONE, SIZED, MLP = "none", "none~sized", "mlp"
SIZE_METHODS = ("merge", "condense", "adaptive", "diffrate")  # reducers that give tokens sizes > 1


@dataclass(frozen=True)
class ProfileKey:
    """What a profile was measured for; a profile is reused only where every field matches."""

    model: str
    device: str  # "cpu" or "cuda"
    device_name: str  # the CPU model or the GPU name
    torch: str
    dtype: str
    batch: int
    threads: int

    def mismatch(self, other: ProfileKey) -> list[str]:
        """The fields that differ, as 'field: ours vs theirs'."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]


@dataclass(frozen=True)
class Protocol:
    """How each entry is timed (`chain_ratios`: ABBA quartets sharing the partner, median ratio)."""

    warmup: int = 1
    repeats: int = 2  # passes of the chain: two ratios each
    min_time_s: float = 0.01


@dataclass(frozen=True)
class LatencyProfile:
    key: ProfileKey
    spec: dict[str, Any]  # the ModelSpec the blocks were timed on (its shape)
    grid: tuple[int, ...]  # patch tokens entering the block, ascending
    tables: dict[str, tuple[float, ...]]  # kind -> microseconds per batch at each grid point
    rest_us: float  # patch embedding, final norm and head, per batch (fitted with `scale`)
    base_block_us: float  # the unreduced block at full tokens (every entry's ABBA partner)
    scale: float = 1.0  # whole model = rest_us + scale * (sum of its blocks' table values)
    calibration: tuple[dict[str, Any], ...] = ()  # the whole models fitted: summary, measured_us, blocks_us
    protocol: Protocol = field(default_factory=Protocol)
    build_seconds: float = 0.0
    created: str = ""
    fits: dict[str, tuple[float, ...]] = field(default_factory=dict)  # kind -> quadratic in n (derived)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fits", {k: fit_curve(self.grid, v) for k, v in self.tables.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "key": asdict(self.key), "spec": self.spec,
                "grid": list(self.grid), "tables": {k: list(v) for k, v in self.tables.items()},
                "rest_us": self.rest_us, "base_block_us": self.base_block_us, "scale": self.scale,
                "calibration": list(self.calibration), "protocol": asdict(self.protocol),
                "build_seconds": self.build_seconds, "created": self.created,
                "fits (derived, a*n^2 + b*n + c)": {k: list(v) for k, v in self.fits.items()}}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<profile>") -> LatencyProfile:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a tokensched latency profile")
        if data.get("version") != VERSION:
            raise ValueError(f"{source}: profile version {data.get('version')!r}, this tokensched reads {VERSION}")
        try:
            grid = tuple(int(n) for n in data["grid"])
            tables = {str(k): tuple(float(v) for v in vals) for k, vals in data["tables"].items()}
            missing = sorted(set(timed_kinds(ModelSpec.from_dict(data["spec"]))) - set(tables))
            if missing or any(len(v) != len(grid) for v in tables.values()) or list(grid) != sorted(set(grid)):
                raise ValueError(f"tables missing {missing} or not one value per grid point")
            return cls(key=ProfileKey(**data["key"]), spec=dict(data["spec"]), grid=grid, tables=tables,
                       rest_us=float(data["rest_us"]), base_block_us=float(data["base_block_us"]),
                       scale=float(data.get("scale", 1.0)),
                       calibration=tuple(dict(c) for c in data.get("calibration", ())),
                       protocol=Protocol(**data.get("protocol", {})), build_seconds=float(data.get("build_seconds", 0)),
                       created=str(data.get("created", "")))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{source}: malformed latency profile ({type(err).__name__}: {err})") from None
        except ValueError as err:
            raise ValueError(f"{source}: malformed latency profile ({err})") from None

    def save(self, path: str | Path) -> Path:
        """Write atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read a latency profile ({type(err).__name__})") from None
        return cls.from_dict(data, source=str(path))


def fit_curve(grid: tuple[int, ...], values: tuple[float, ...]) -> tuple[float, ...]:
    """Least-squares quadratic a*n^2 + b*n + c through the timed points (attention grows as n^2, the
    rest as n): one smooth curve per kind averages the noise of single timings on a shared machine."""
    import numpy as np

    degree = min(2, len(grid) - 1)
    return tuple(float(c) for c in np.polyfit(np.asarray(grid, float), np.asarray(values, float), degree))


def _at(profile: LatencyProfile, kind: str, n: float) -> float:
    """Microseconds of `kind` with n patch tokens: its fitted curve, n clamped to the timed range."""
    n = min(max(n, profile.grid[0]), profile.grid[-1])
    value = 0.0
    for c in profile.fits[kind]:  # Horner
        value = value * n + c
    return value


def block_us(profile: LatencyProfile, plan: LayerPlan, n: int, *, sized: bool) -> float:
    """Predicted microseconds of one block running `plan` with n patch tokens entering (module docstring)."""
    plain = SIZED if sized else NONE
    if plan.method == "none" or plan.is_identity(n):
        return _at(profile, plain, n)
    ref = REFERENCE_PLANS[plan.method]
    if plan.method == "idle":
        return _at(profile, "idle", n) - _at(profile, NONE, ref.active(n)) + _at(profile, plain, plan.active(n))
    bias = _at(profile, SIZED, n) - _at(profile, NONE, n) if sized else 0.0
    return (_at(profile, plan.method, n) - _at(profile, MLP, ref.patch_tokens_after(n))
            + _at(profile, MLP, plan.patch_tokens_after(n)) + bias)


def gives_sizes(plan: LayerPlan, n: int) -> bool:
    """Whether tokens leave this block carrying sizes (then attention adds the log-size bias)."""
    if plan.is_identity(n):
        return False
    return plan.method in SIZE_METHODS or (plan.method == "prune" and plan.fuse)


def blocks_us(profile: LatencyProfile, schedule: Schedule) -> float:
    """The sum of `schedule`'s blocks as timed alone (before the whole-model fit)."""
    p = schedule.model.num_prefix_tokens
    total, sized = 0.0, False
    for plan, row in zip(schedule.layers, breakdown(schedule), strict=True):
        n = row.tokens_in - p
        total += block_us(profile, plan, n, sized=sized and schedule.prop_attn)
        sized = sized or gives_sizes(plan, n)
    return total


def predict_us(profile: LatencyProfile, schedule: Schedule) -> float:
    """Predicted microseconds per batch of `schedule`: the rest of the model plus its scaled blocks."""
    return profile.rest_us + profile.scale * blocks_us(profile, schedule)


def timed_kinds(spec: ModelSpec) -> tuple[str, ...]:
    """The block kinds a profile of `spec` times: the unreduced block (plain and with sizes), the
    MLP alone, and the reference plan of every method the model can run."""
    return (NONE, SIZED, MLP, *(m for m in REFERENCE_PLANS if spec.class_token or m not in CLS_METHODS))


def calibration_schedules(spec: ModelSpec) -> list[Schedule]:
    """Whole models the profile is fitted to: unreduced, ToMe-like merging in every block, and
    pruning, condensing, idling and prune-or-pool from a quarter of the depth on (fixed, any shape;
    on a model without a class token, the first two only)."""
    d = spec.depth
    thirds = (d // 4, d // 2, 3 * d // 4)

    def at(blocks, plan: LayerPlan) -> Schedule:  # type: ignore[no-untyped-def]
        return Schedule(model=spec, layers=tuple(plan if i in blocks else LayerPlan() for i in range(d)))

    every = [Schedule.empty(spec), at(range(d), LayerPlan("merge", keep=0.85)), at(thirds, LayerPlan("prune", keep=0.5)),
             at(thirds, LayerPlan("condense", keep=0.6)), at(range(d // 4, d), LayerPlan("idle", keep=0.5)),
             at(thirds, LayerPlan("adaptive", keep=0.6))]
    return [c for c in every if spec.class_token or not c.cls_methods()]


def fit_whole(measured: list[float], blocks: list[float]) -> tuple[float, float]:
    """(rest, scale) of measured = rest + scale * blocks by least squares, rest >= 0."""
    import numpy as np

    b, m = np.asarray(blocks, float), np.asarray(measured, float)
    if len(b) >= 2 and np.ptp(b) > 0:
        scale, rest = np.polyfit(b, m, 1)
        if rest >= 0 and scale > 0:
            return float(rest), float(scale)
    return 0.0, float((m @ b) / (b @ b))


def prediction(profile: LatencyProfile, schedule: Schedule) -> dict[str, float]:
    """The record fields: predicted images/s and speed-up over the unreduced model."""
    us, base = predict_us(profile, schedule), predict_us(profile, Schedule.empty(schedule.model))
    return {"predicted_images_per_s": profile.key.batch / (us * 1e-6), "predicted_speedup": base / us}


def check_fits(profile: LatencyProfile, spec: ModelSpec, source: str = "profile") -> None:
    """A profile measured on another shape of model cannot price this one (ValueError)."""
    if not spec.same_shape(ModelSpec.from_dict(profile.spec)):
        raise ValueError(f"{source} was measured on {profile.spec.get('name')}, another shape than {spec.name}")


# --- where profiles live and what they are keyed by ---------------------------------------------

def device_name(device: str) -> str:
    """The CPU model (from /proc/cpuinfo where there is one) or the CUDA device's name."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def current_key(model: str, device: str, *, batch: int, threads: int, dtype: str = "float32") -> ProfileKey:
    import torch

    return ProfileKey(model=model, device=torch.device(device).type, device_name=device_name(device),
                      torch=torch.__version__.split("+")[0], dtype=dtype, batch=batch, threads=threads)


def cache_dir() -> Path:
    """$TOKENSCHED_CACHE/latency, else ~/.cache/tokensched/latency."""
    root = os.environ.get("TOKENSCHED_CACHE") or Path.home() / ".cache" / "tokensched"
    return Path(root) / "latency"


def cache_path(key: ProfileKey) -> Path:
    """One file per model, device, dtype, batch and threads (a torch upgrade or another CPU of the
    same kind finds the file and rebuilds it: its key no longer matches)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key.model)
    return cache_dir() / f"{safe}-{key.device}-{key.dtype}-b{key.batch}-t{key.threads}.json"


def load_matching(path: str | Path, key: ProfileKey) -> LatencyProfile:
    """A profile file given on purpose: ValueError unless it was measured for exactly `key`."""
    profile = LatencyProfile.load(path)
    bad = profile.key.mismatch(key)
    if bad:
        raise ValueError(f"--latency-profile {path} was measured for another setting ({'; '.join(bad)}; "
                         "file vs this run)")
    return profile


def cached(key: ProfileKey) -> LatencyProfile | None:
    """The cached profile of `key` when its key still matches (None: build one)."""
    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        profile = LatencyProfile.load(path)
    except ValueError:
        return None  # unreadable or another version: rebuilt
    return profile if not profile.key.mismatch(key) else None


# --- building a profile (torch; one process, the run's settings) --------------------------------

def default_grid(num_patches: int) -> tuple[int, ...]:
    """Patch-token counts to time: 1, then eighths of the full count (1, 8, 16, 24, 32, 48, 64 for 64)."""
    points = {1, *(round(num_patches * f / 8) for f in (1, 2, 3, 4, 6, 8))}
    return tuple(sorted(n for n in points if 1 <= n <= num_patches))


def build(model, key: ProfileKey, *, grid: tuple[int, ...] | None = None,
          protocol: Protocol = Protocol(), log=None) -> LatencyProfile:  # type: ignore[no-untyped-def]
    """Time every block kind of `model` (a timm ViT on its device, threads already set) at `key.batch`.

    Each kind runs in a block of its own (block 0 is the unreduced partner at full tokens), so at
    each token count all kinds are timed in one chain B K1 K1 B K2 K2 B ... (`chain_ratios`): the
    machine's state at that moment is shared by every kind, not only by a kind and its partner.
    """
    import torch

    from reducers import apply_schedule, remove_schedule
    from reducers.patch import block_call, mlp_call
    from search.evaluate import time_call

    start = time.perf_counter()
    spec = ModelSpec.from_model(model, name=key.model)
    kinds = timed_kinds(spec)
    if spec.depth < len(kinds) + 1:
        raise ValueError(f"a latency profile times each of {len(kinds)} block kinds in a block of its own beside "
                         f"an unreduced partner: the model needs {len(kinds) + 1} blocks, it has {spec.depth}")
    grid = grid or default_grid(spec.num_patches)
    device, p = next(model.parameters()).device, spec.num_prefix_tokens
    dtype = getattr(torch, key.dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    gen = torch.Generator().manual_seed(0)
    block_of = {kind: i + 1 for i, kind in enumerate(kinds)}  # block 0: the partner

    def tokens(n: int):  # type: ignore[no-untyped-def]
        return torch.randn(key.batch, n + p, spec.embed_dim, generator=gen).to(device)

    def call(kind: str, n: int):  # type: ignore[no-untyped-def]
        x = tokens(n)
        if kind == MLP:
            return mlp_call(model, block_of[kind], x)
        size = torch.randint(1, 4, (key.batch, n + p, 1), generator=gen).float().to(device) if kind == SIZED else None
        return block_call(model, block_of[kind], x, size=size)

    layers = [LayerPlan()] * spec.depth
    for kind in kinds:
        if kind in REFERENCE_PLANS:
            layers[block_of[kind]] = REFERENCE_PLANS[kind]
    model.eval()
    calibration = calibration_schedules(spec)  # whole models, each a copy (the model's blocks are timed alone)
    wholes = [apply_schedule(copy.deepcopy(remove_schedule(model)), c).eval() for c in calibration]
    apply_schedule(model, Schedule(model=spec, layers=tuple(layers)))
    ratios: dict[str, list[float]] = {kind: [] for kind in kinds}
    base_times: list[float] = []
    with torch.inference_mode(), autocast:
        base = block_call(model, 0, tokens(spec.num_patches))
        for n in grid:
            found = chain_ratios(base, [call(kind, n) for kind in kinds], device, protocol, time_call, base_times)
            for kind, ratio in zip(kinds, found, strict=True):
                ratios[kind].append(ratio)
            if log:
                log(f"latency profile: every kind timed at {n} patch tokens")
        images = torch.randn(key.batch, 3, *model.patch_embed.img_size, generator=gen).to(device)
        found = chain_ratios(base, [lambda m=m: m(images) for m in wholes], device, protocol, time_call, base_times)
    remove_schedule(model)
    base_us = statistics.median(base_times) * 1e6
    tables = {k: tuple(r * base_us for r in v) for k, v in ratios.items()}
    raw = LatencyProfile(key=key, spec=spec.to_dict(), grid=tuple(grid), tables=tables, rest_us=0.0,
                         base_block_us=base_us)
    fitted = [{"summary": c.summary(), "measured_us": r * base_us, "blocks_us": blocks_us(raw, c)}
              for c, r in zip(calibration, found, strict=True)]
    rest, scale = fit_whole([f["measured_us"] for f in fitted], [f["blocks_us"] for f in fitted])
    return replace(raw, rest_us=rest, scale=scale, calibration=tuple(fitted), protocol=protocol,
                   build_seconds=time.perf_counter() - start, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def chain_ratios(base, fns: list, device, protocol: Protocol, time_call, base_times: list[float]) -> list[float]:  # type: ignore[no-untyped-def]
    """Median ratio of each call in `fns` to `base`, timed in `protocol.repeats` passes of one chain
    B F1 F1 B F2 F2 B ... (every other pass backwards): each call sits in an ABBA quartet with the
    base and shares the bases with its neighbours, as evaluate.throughput_many does for models."""
    for _ in range(protocol.warmup - 1):
        base(), [fn() for fn in fns]
    calls = [max(1, math.ceil(protocol.min_time_s / max(time_call(f, device), 1e-9))) for f in [base, *fns]]
    found: list[list[float]] = [[] for _ in fns]
    for rep in range(protocol.repeats):
        order = list(range(len(fns)))[:: -1 if rep % 2 else 1]
        before = time_call(base, device, calls[0])
        for i in order:
            first, second = time_call(fns[i], device, calls[i + 1]), time_call(fns[i], device, calls[i + 1])
            after = time_call(base, device, calls[0])
            found[i] += [first / before, second / after]
            base_times += [before, after]
            before = after
    return [statistics.median(r) for r in found]


# --- how good the prediction was -----------------------------------------------------------------

def _spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None under 3 points or no spread."""
    import pandas as pd

    if len(a) < 3:
        return None
    rho = pd.Series(a).rank().corr(pd.Series(b).rank())
    return None if rho != rho else float(rho)  # NaN: a constant column


def predictor_error(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The prediction against the re-timing over the records that carry both (one per schedule):
    median absolute % error and Spearman rank correlation, for images/s and for the speed-up."""
    seen, rows = set(), []
    for r in records:
        if r.get("ray_trial") in seen:
            continue
        seen.add(r.get("ray_trial"))
        vals = [r.get(k) for k in ("predicted_images_per_s", "measured_images_per_s", "predicted_speedup",
                                   "measured_speedup")]
        if all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in vals):
            rows.append(vals)
    if not rows:
        return None
    out: dict[str, Any] = {"points": len(rows)}
    for name, i in (("images_per_s", 0), ("speedup", 2)):
        pred, meas = [r[i] for r in rows], [r[i + 1] for r in rows]
        errors = [100 * abs(p / m - 1) for p, m in zip(pred, meas, strict=True)]
        out[name] = {"median_abs_pct_error": statistics.median(errors), "max_abs_pct_error": max(errors),
                     "spearman": _spearman(pred, meas)}
    return out
