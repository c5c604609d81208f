"""The papers' own schedules by name (see ../shared/REFERENCE.md for their GMACs on DeiT-S).

    none               the unreduced model
    tome:<r>           ToMe: merge r tokens in every block (Bolya et al. 2023)
    tome:<r>,<inflect> ToMe's schedule shape; inflect -1 decreases linearly from 2r to 0
    evit:<keep>        EViT: prune + fuse at blocks depth/4, depth/2, 3*depth/4 (3, 6, 9 on 12 blocks)
    idlevit:<k>        IdleViT, four equal stages, stage s keeps int(k**s n) active: blocks 3-11 in
                       3/3/3 on 12 blocks, the layout of the official infer.py
    idlevit-code:<k>   IdleViT, the official main.py layout: first third full, then stages of
                       3/3/2 blocks (blocks 4-11 on 12 blocks)
    ppt[:<r>]          PPT: prune-or-pool r tokens at blocks 3, 6, 9 (r=50 on 196 patches, scaled;
                       threshold 7e-5 on 196 patches, scaled by (196 / n)^2, see ppt_threshold)
    tcvit:<keep>       TC-ViT (our design, no public code): condense at blocks 3, 6, 9, order 2
    diffrate:<gflops>  DiffRate's published searched schedules for DeiT-S (2.3, 2.5, 2.7, 2.9, 3.1):
                       per block, sort by CLS attention, prune, then merge (Chen et al. 2023)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from spaces.model_spec import ModelSpec
from spaces.schedule import AFTER_ATTENTION, LayerPlan, Schedule, ppt_threshold

PRESET_NAMES = ("none", "tome", "evit", "idlevit", "idlevit-code", "ppt", "tcvit", "diffrate")
PPT_R_DEIT = 50  # PPT's r on DeiT-S (196 patches)
EVIT_KEEPS = (0.9, 0.8, 0.7, 0.6, 0.5)  # the keep rates of EViT's paper (REFERENCE.md)
IDLEVIT_KEEPS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # IdleViT's paper
TCVIT_KEEPS = (0.7, 0.5)


def _quarter_blocks(depth: int) -> list[int]:
    """EViT/PPT reduce at 1/4, 1/2 and 3/4 of the depth: blocks 3, 6, 9 of 12."""
    return sorted({depth // 4, depth // 2, (3 * depth) // 4} - {0})


def _at(spec: ModelSpec, where: dict[int, LayerPlan]) -> tuple[LayerPlan, ...]:
    return tuple(where.get(i, LayerPlan()) for i in range(spec.depth))


def _parse_float(text: str, preset: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"preset {preset!r}: {text!r} is not a number") from None


def _parse_int(text: str, preset: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"preset {preset!r}: {text!r} is not an integer") from None


def tome_r_per_block(depth: int, r: int, inflect: float = 0.0) -> list[int]:
    """ToMe's per-block r: linear from int(r * (1 - inflect)) to its mirror about r."""
    start = int(r * (1.0 - inflect))
    end = 2 * r - start
    step = (end - start) / max(depth - 1, 1)
    return [max(0, int(start + step * i)) for i in range(depth)]


def _tome(args: str, spec: ModelSpec, preset: str) -> Schedule:
    parts = args.split(",")
    if len(parts) > 2 or not parts[0]:
        raise ValueError(f"preset {preset!r}: expected tome:<r> or tome:<r>,<inflect>")
    r = _parse_int(parts[0], preset)
    if r < 0:
        raise ValueError(f"preset {preset!r}: r must be >= 0")
    inflect = _parse_float(parts[1], preset) if len(parts) == 2 else 0.0
    rs = tome_r_per_block(spec.depth, r, inflect)
    layers = tuple(LayerPlan("merge", r=ri) if ri else LayerPlan() for ri in rs)
    return Schedule(spec, layers, prop_attn=True, name=preset)


def _keep_arg(args: str, preset: str) -> float:
    keep = _parse_float(args, preset)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"preset {preset!r}: keep must be in (0, 1], got {keep}")
    return keep


def _evit(args: str, spec: ModelSpec, preset: str) -> Schedule:
    keep = _keep_arg(args, preset)
    plan = LayerPlan("prune", keep=keep, fuse=True)
    # EViT attends without size bias: the fused token is an ordinary token to it.
    return Schedule(spec, _at(spec, {i: plan for i in _quarter_blocks(spec.depth)}), prop_attn=False, name=preset)


def _idle_schedule(spec: ModelSpec, stages: list[list[int]], k: float, preset: str) -> Schedule:
    where = {}
    for s, blocks in enumerate(stages):
        keep = k**s
        for i in blocks:
            if keep < 1.0:
                where[i] = LayerPlan("idle", keep=keep)
    return Schedule(spec, _at(spec, where), prop_attn=False, name=preset)


def _idlevit(args: str, spec: ModelSpec, preset: str) -> Schedule:
    """Four equal stages; stage s runs int(k**s n) of the patch tokens (the official infer.py layout)."""
    k = _keep_arg(args, preset)
    d = spec.depth
    bounds = [round(d * s / 4) for s in range(5)]
    return _idle_schedule(spec, [list(range(bounds[s], bounds[s + 1])) for s in range(4)], k, preset)


def _idlevit_code(args: str, spec: ModelSpec, preset: str) -> Schedule:
    """The official main.py on 12 blocks: blocks 0-3 full, then 4-6, 7-9, 10-11 at k, k^2, k^3."""
    k = _keep_arg(args, preset)
    d = spec.depth
    first = d // 3
    rest = d - first
    sizes = [rest - 2 * (rest * 3 // 8), rest * 3 // 8, rest * 3 // 8][::-1]  # 3/3/2 on 8 blocks
    stages, start = [list(range(first))], first
    for size in sizes:
        stages.append(list(range(start, start + size)))
        start += size
    return _idle_schedule(spec, stages, k, preset)


def _ppt(args: str, spec: ModelSpec, preset: str) -> Schedule:
    if args:
        r = _parse_int(args, preset)
    else:
        r = round(PPT_R_DEIT * spec.num_patches / 196)  # 50 on DeiT-S; same fraction elsewhere
    if r < 0:
        raise ValueError(f"preset {preset!r}: r must be >= 0")
    plan = LayerPlan("adaptive", r=r, threshold=ppt_threshold(spec.num_patches))
    return Schedule(spec, _at(spec, {i: plan for i in _quarter_blocks(spec.depth)}), prop_attn=True, name=preset)


def _tcvit(args: str, spec: ModelSpec, preset: str) -> Schedule:
    keep = _keep_arg(args, preset)
    plan = LayerPlan("condense", keep=keep, order=2, alpha=0.5, weighting="size_relevance")
    return Schedule(spec, _at(spec, {i: plan for i in _quarter_blocks(spec.depth)}), prop_attn=True, name=preset)


# DiffRate's compression_rate.json (OpenGVLab/DiffRate), "ViT-S-DeiT": per block, the tokens kept
# after the prune and after the merge, class token included (197 = all), as published.
DIFFRATE_SCHEDULES: dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = {
    "deit_small_patch16_224": {
        "2.3": ((197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3),
                (197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3)),
        "2.5": ((197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3),
                (197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3)),
        "2.7": ((197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3),
                (197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3)),
        "2.9": ((197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3),
                (197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3)),
        "3.1": ((197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3),
                (197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3)),
    },
}


def diffrate_presets(model_name: str | None = None) -> list[str]:
    """The diffrate:<gflops> presets published for `model_name` (all models when None)."""
    names = [model_name] if model_name is not None else list(DIFFRATE_SCHEDULES)
    return [f"diffrate:{level}" for name in names for level in DIFFRATE_SCHEDULES.get(name, {})]


def _diffrate(args: str, spec: ModelSpec, preset: str) -> Schedule:
    available = ", ".join(f"{model} ({', '.join(f'diffrate:{level}' for level in levels)})"
                          for model, levels in DIFFRATE_SCHEDULES.items())
    levels = DIFFRATE_SCHEDULES.get(spec.name)
    if levels is None:
        raise ValueError(f"preset {preset!r}: DiffRate published no schedule for {spec.name}; available: {available}")
    if args not in levels:
        raise ValueError(f"preset {preset!r}: no DiffRate schedule at {args!r} GFLOPs for {spec.name}; "
                         f"available: {', '.join(f'diffrate:{level}' for level in levels)}")
    pruned, merged = levels[args]
    if len(pruned) != spec.depth or spec.num_prefix_tokens != 1 or pruned[0] != spec.tokens:
        raise ValueError(f"preset {preset!r}: the published schedule is for {len(pruned)} blocks and "
                         f"{pruned[0]} tokens; this {spec.name} has {spec.depth} blocks and {spec.tokens} tokens")
    p = spec.num_prefix_tokens
    layers = tuple(LayerPlan("diffrate", kept=(a - p, b - p)) if min(a, b) < spec.tokens else LayerPlan()
                   for a, b in zip(pruned, merged, strict=True))
    return Schedule(spec, layers, prop_attn=True, name=preset)


def _none(args: str, spec: ModelSpec, preset: str) -> Schedule:
    if args:
        raise ValueError(f"preset {preset!r}: 'none' takes no arguments")
    return Schedule.empty(spec)


_BUILDERS: dict[str, Callable[[str, ModelSpec, str], Schedule]] = {
    "none": _none,
    "tome": _tome,
    "evit": _evit,
    "idlevit": _idlevit,
    "idlevit-code": _idlevit_code,
    "ppt": _ppt,
    "tcvit": _tcvit,
    "diffrate": _diffrate,
}


def build_preset(name: str, spec: ModelSpec) -> Schedule:
    """Parse `family[:args]` and build the schedule for `spec`."""
    family, _, args = name.strip().partition(":")
    if family not in _BUILDERS:
        raise ValueError(f"unknown preset {name!r}; valid families: {', '.join(PRESET_NAMES)}")
    if family not in ("none", "ppt") and not args:
        example = {"tome": "tome:13", "diffrate": "diffrate:2.9"}.get(family, f"{family}:0.7")
        raise ValueError(f"preset {name!r} needs an argument, e.g. {example}")
    return _BUILDERS[family](args, spec, name.strip())


def from_preset(name: str, model: Any) -> Schedule:
    """A paper's own schedule by name, e.g. ``tome:13``, ``evit:0.7``, ``idlevit:0.7``, ``ppt``, for a
    ModelSpec or a timm VisionTransformer."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec.from_model(model)
    return build_preset(name, spec)


def family_presets(spec: ModelSpec) -> list[str]:
    """Every preset of every family for `spec`, in the order a run evaluates them: ToMe's constant
    and decreasing schedules for every r up to 2 n / depth (ToMe's r = 16 on DeiT-S is 1 n / depth;
    beyond twice that almost every token is merged away by mid-depth), the papers' keep ratios for
    EViT, IdleViT (both layouts) and TC-ViT, PPT, and DiffRate's published schedules for this model."""
    r_max = max(1, math.ceil(2 * spec.num_patches / spec.depth))
    return (
        [f"tome:{r}" for r in range(1, r_max + 1)]
        + [f"tome:{r},-1" for r in range(1, r_max + 1)]
        + [f"evit:{k}" for k in EVIT_KEEPS]
        + ["ppt"]
        + [f"idlevit:{k}" for k in IDLEVIT_KEEPS]
        + [f"idlevit-code:{k}" for k in IDLEVIT_KEEPS]
        + [f"tcvit:{k}" for k in TCVIT_KEEPS]
        + diffrate_presets(spec.name)
    )


def effective_key(schedule: Schedule) -> tuple:
    """What a schedule runs: the token counts of every block and each plan without its amounts,
    so ToMe's r and the keep ratio giving the same counts compare equal."""
    from spaces.cost import breakdown

    entering = schedule.patch_tokens_entering()
    plans = tuple(LayerPlan() if p.is_identity(n) else replace(p, keep=1.0, r=None, kept=None, merge_keep=1.0)
                  for p, n in zip(schedule.layers, entering, strict=False))  # a plan removing nothing is none
    return (tuple((b.tokens_in, b.tokens_attn, b.tokens_out) for b in breakdown(schedule)), schedule.prop_attn, plans)


def output_key(schedule: Schedule) -> tuple:
    """What a schedule's predictions depend on when the model's head reads only its prefix tokens
    (reducers.patch.head_reads_prefix_only): `effective_key` without the last block's reduction
    after attention. That reduction removes patch tokens after the last attention, before the
    MLP, and nothing after reads them; the prefix tokens pass unchanged. Schedules with the same
    output_key predict the same (up to the rounding of the MLP's product over fewer rows)."""
    if schedule.layers[-1].method not in AFTER_ATTENTION:
        return effective_key(schedule)
    return effective_key(replace(schedule, layers=(*schedule.layers[:-1], LayerPlan())))


def presets_in_range(spec: ModelSpec, max_gmacs: float | None, min_gmacs: float | None = None) -> list[Schedule]:
    """The presets of `family_presets` whose GMACs lie in [min_gmacs, max_gmacs] and that the model
    can run (on a model without a class token, ToMe's only), one per distinct schedule (ToMe's
    decreasing schedules coincide once r passes about n / 4: the first name is kept)."""
    from spaces.cost import gmacs

    chosen, seen = [], set()
    for name in family_presets(spec):
        schedule = build_preset(name, spec)
        if not spec.class_token and schedule.cls_methods():
            continue
        cost = gmacs(schedule)
        if (max_gmacs is not None and cost > max_gmacs + 1e-12) or (min_gmacs is not None and cost < min_gmacs - 1e-12):
            continue
        key = effective_key(schedule)
        if key not in seen:
            seen.add(key)
            chosen.append(schedule)
    return chosen


def paper_presets(model_name: str | None = None) -> list[str]:
    """The presets of REFERENCE.md, in the order a search evaluates them; DiffRate's published
    schedules are added for the model they were published for (`model_name`)."""
    return (
        ["tome:8", "tome:13", "tome:16"]
        + [f"evit:{k}" for k in EVIT_KEEPS]
        + ["ppt"]
        + [f"idlevit:{k}" for k in IDLEVIT_KEEPS]
        + [f"tcvit:{k}" for k in TCVIT_KEEPS]
        + (diffrate_presets(model_name) if model_name is not None else [])
    )
