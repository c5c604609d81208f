"""Search spaces: define-by-run functions of an Optuna trial that return a Schedule.

They only call `trial.suggest_*`, always every parameter, with fixed bounds and stable
names (PITFALLS 7: conditional spaces silently degrade NSGA-II and GP to random sampling),
so the same function serves Optuna, Ray Tune's OptunaSearch and `optuna.trial.FixedTrial`.
The budget is met by construction (`fit_budget` rescales the keep ratios) and also recorded
with `trial.set_constraint` (<= 0 is feasible).

    two-phase  an early and a late method, each in every block of its phase, one keep ratio per
               phase, a first reducing block and a switch block (seven numbers, two methods)
    per-layer  every block: method, keep, and the method's own parameters, after a first
               block that may reduce (`layers.first`; the blocks before it keep every token)
    staged     three reduction stages (first block, spacing), a method per stage, one keep
               ratio applied geometrically, as the papers do
    tome, evit, idlevit, ppt, tcvit   the single-method families of the papers
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from spaces.budget import fit_target, most_reduced
from spaces.cost import gmacs
from spaces.model_spec import ModelSpec
from spaces.presets import effective_key
from spaces.schedule import CLS_METHODS, FUSE_WEIGHTS, IDLE_RANKS, METHODS, LayerPlan, Schedule, ppt_threshold

REDUCING = tuple(m for m in METHODS if m != "none")
KEEP_RANGE = (0.1, 1.0)
FRACTION_RANGE = (0.5, 1.0)  # share of the budget a trial aims at without min_gmacs: the front spreads below the budget
STAGES = 3
FAMILIES = {"evit": "prune", "idlevit": "idle", "ppt": "adaptive", "tcvit": "condense"}
SPACES = ("two-phase", "per-layer", "staged", "tome", *FAMILIES)


def runnable_methods(spec: ModelSpec) -> tuple[str, ...]:
    """The reducing methods `spec`'s model can run: all of them, or without a class token ToMe's merge only."""
    return REDUCING if spec.class_token else tuple(m for m in REDUCING if m not in CLS_METHODS)


class TrialLike(Protocol):
    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...
    def suggest_int(self, name: str, low: int, high: int) -> int: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


BUDGET_PARAM = "budget.fraction"  # the share of the budget a trial aims at (its cost axis)


@dataclass(frozen=True)
class SearchSpace:
    """A named space for one model, method set and budget; call it with a trial."""

    name: str
    spec: ModelSpec
    methods: tuple[str, ...] | None = None  # None: every method the model can run (runnable_methods)
    budget_gmacs: float | None = None
    min_gmacs: float | None = None  # the cheapest a trial aims at (default: half the budget)

    def __post_init__(self) -> None:
        if self.name not in SPACES:
            raise ValueError(f"unknown space {self.name!r}; valid: {', '.join(SPACES)}")
        family = FAMILIES.get(self.name) or ("merge" if self.name == "tome" else None)
        if family in CLS_METHODS and not self.spec.class_token:
            raise ValueError(f"space {self.name!r} uses method {family!r}, which ranks tokens by the class token's "
                             f"attention, and {self.spec.name} has none; use --space per-layer or tome")
        if self.methods is None:
            object.__setattr__(self, "methods", runnable_methods(self.spec))
        bad = [m for m in self.methods if m not in REDUCING]
        if bad or not self.methods:
            raise ValueError(f"unknown method(s) {bad or '(none given)'}; valid: {', '.join(REDUCING)}")
        needs_cls = sorted(set(self.methods) & set(CLS_METHODS))
        if needs_cls and not self.spec.class_token:
            raise ValueError(f"methods {', '.join(needs_cls)} rank tokens by the class token's attention and "
                             f"{self.spec.name} has none; use --methods {','.join(runnable_methods(self.spec))}")
        if family and family not in self.methods:
            raise ValueError(f"space {self.name!r} uses method {family!r}, which --methods excludes")
        if self.min_gmacs is not None and not (self.min_gmacs > 0 and (self.budget_gmacs is None
                                                                       or self.min_gmacs <= self.budget_gmacs)):
            raise ValueError(f"--min-gmacs must be positive and at most the budget ({self.budget_gmacs} GMACs), "
                             f"got {self.min_gmacs}")

    @property
    def fraction_range(self) -> tuple[float, float]:
        """The share of the budget a trial aims at: from min_gmacs (or half the budget) up to all of it."""
        if self.min_gmacs is None or self.budget_gmacs is None:
            return FRACTION_RANGE
        return (min(1.0, self.min_gmacs / self.budget_gmacs), 1.0)

    def __call__(self, trial: TrialLike) -> Schedule:
        schedule = _BUILDERS[self.name](trial, self)
        if self.budget_gmacs is not None:
            fraction = trial.suggest_float(BUDGET_PARAM, *self.fraction_range)
            schedule = fit_target(schedule, fraction * self.budget_gmacs)
            if hasattr(trial, "set_constraint"):
                trial.set_constraint("budget_gmacs", gmacs(schedule) - self.budget_gmacs)
        return schedule

    def optuna_space(self, trial: TrialLike) -> None:
        """The form Ray Tune's OptunaSearch wants: suggest, return nothing."""
        self(trial)


def _layer_params(trial: TrialLike, prefix: str, methods: tuple[str, ...]) -> dict[str, Any]:
    """Every parameter a block may use, always suggested (fixed bounds)."""
    return {"keep": trial.suggest_float(f"{prefix}.keep", *KEEP_RANGE), **_method_params(trial, prefix, methods)}


def _method_params(trial: TrialLike, prefix: str, methods: tuple[str, ...]) -> dict[str, Any]:
    """The methods' own parameters besides keep (fixed bounds, always suggested)."""
    params: dict[str, Any] = {}
    if "condense" in methods:
        params["order"] = trial.suggest_int(f"{prefix}.order", 1, 3)
        params["alpha"] = trial.suggest_float(f"{prefix}.alpha", 0.0, 1.0)
    if "prune" in methods:
        params["fuse"] = trial.suggest_categorical(f"{prefix}.fuse", [True, False])
        params["fuse_weights"] = trial.suggest_categorical(f"{prefix}.fuse_weights", list(FUSE_WEIGHTS))
    if "idle" in methods:
        params["rank"] = trial.suggest_categorical(f"{prefix}.rank", list(IDLE_RANKS))
    if "diffrate" in methods:
        params["merge_keep"] = trial.suggest_float(f"{prefix}.merge_keep", *KEEP_RANGE)
    return params


def _plan(method: str, params: dict[str, Any], spec: ModelSpec, keep: float | None = None) -> LayerPlan:
    if method == "none":
        return LayerPlan()
    kwargs: dict[str, Any] = {"keep": params["keep"] if keep is None else keep}
    if method == "condense":
        kwargs.update(order=params.get("order", 2), alpha=params.get("alpha", 0.5))
    if method == "prune":
        kwargs.update(fuse=params.get("fuse", True), fuse_weights=params.get("fuse_weights", "raw"))
    if method == "idle":
        kwargs["rank"] = params.get("rank", "logits")
    if method == "adaptive":
        kwargs["threshold"] = ppt_threshold(spec.num_patches)
    if method == "diffrate":
        kwargs["merge_keep"] = params.get("merge_keep", 1.0)
    return LayerPlan(method, **kwargs)


def _prop_attn(trial: TrialLike) -> bool:
    return bool(trial.suggest_categorical("prop_attn", [True, False]))


def _first_reducing_max(depth: int) -> int:
    return depth // 2


def _out_of_budget(schedule: Schedule, space: SearchSpace) -> bool:
    """Whether even the most reduced form of `schedule` costs more than the space's budget."""
    return space.budget_gmacs is not None and gmacs(most_reduced(schedule)) > space.budget_gmacs


def per_layer(trial: TrialLike, space: SearchSpace) -> Schedule:
    """A method and keep ratio per block; blocks before `layers.first` keep every token.

    Every paper starts reducing after a few intact blocks (EViT, IdleViT, PPT and TC-ViT at the
    fourth); one integer for where reduction may begin lets the sampler learn that at once
    instead of through a `none` drawn in each early block. `layers.first = 0` is the free space.
    Under a budget, a start too late to meet it moves earlier until it can (still feasible by
    construction; the trial's parameter stays what the sampler drew).
    """
    choices = ["none", *space.methods]
    first = trial.suggest_int("layers.first", 0, _first_reducing_max(space.spec.depth))
    methods, params = [], []
    for i in range(space.spec.depth):
        methods.append(trial.suggest_categorical(f"layer{i:02d}.method", choices))
        params.append(_layer_params(trial, f"layer{i:02d}", space.methods))
    prop_attn = _prop_attn(trial)

    def build(start: int) -> Schedule:
        layers = tuple(_plan(m if i >= start else "none", p, space.spec)
                       for i, (m, p) in enumerate(zip(methods, params, strict=True)))
        return Schedule(space.spec, layers, prop_attn=prop_attn, name="per-layer")

    schedule = build(first)
    while first > 0 and _out_of_budget(schedule, space):
        first -= 1
        schedule = build(first)
    return schedule


def staged(trial: TrialLike, space: SearchSpace, *, methods: tuple[str, ...] | None = None) -> Schedule:
    """Stage s reduces at one block to `keep` of its input (idle: k^(s+1) active until the next stage).

    Under a budget, stages too late or too far apart to meet it move earlier (first block, then
    spacing) until they can, as in the per-layer space.
    """
    methods = methods or space.methods
    depth = space.spec.depth
    first = trial.suggest_int("stages.first", 1, max(1, depth // 2))
    gap = trial.suggest_int("stages.gap", 1, max(1, depth // STAGES))
    stage_methods = [trial.suggest_categorical(f"stage{s}.method", list(methods)) for s in range(STAGES)]
    params = _layer_params(trial, "stages", methods)
    prop_attn = _prop_attn(trial)

    def build(first: int, gap: int) -> Schedule:
        blocks = [b for b in (first + s * gap for s in range(STAGES)) if b < depth]
        layers = [LayerPlan()] * depth
        for s, start in enumerate(blocks):
            if stage_methods[s] == "idle":
                end = blocks[s + 1] if s + 1 < len(blocks) else depth
                for b in range(start, end):
                    layers[b] = _plan("idle", params, space.spec, keep=params["keep"] ** (s + 1))
            else:
                layers[start] = _plan(stage_methods[s], params, space.spec)
        return Schedule(space.spec, tuple(layers), prop_attn=prop_attn, name=space.name)

    schedule = build(first, gap)
    while (first > 1 or gap > 1) and _out_of_budget(schedule, space):
        first, gap = (first - 1, gap) if first > 1 else (first, gap - 1)
        schedule = build(first, gap)
    return schedule


def two_phase(trial: TrialLike, space: SearchSpace) -> Schedule:
    """One method in every block of an early phase, another in every block of a late phase.

    Blocks before `phase.first` keep every token; blocks `first` .. `switch - 1` run `phase.early`
    and the rest `phase.late`, each block keeping `phase.early_keep` / `phase.late_keep` of its
    input (idle: that share active). Seven numbers and two methods: the papers' shapes (ToMe's
    constant rate, EViT's and PPT's three stages) and mixed ones (merge while the class token
    still reads the patches, prune or sort-and-merge after it has read them) in a space a sampler
    can learn in tens of trials. A start too late for the budget moves earlier, as in per-layer.
    """
    depth, methods = space.spec.depth, space.methods
    first = trial.suggest_int("phase.first", 0, _first_reducing_max(depth))
    switch = trial.suggest_int("phase.switch", 1, depth - 1)
    early = trial.suggest_categorical("phase.early", list(methods))
    late = trial.suggest_categorical("phase.late", list(methods))
    early_keep = trial.suggest_float("phase.early_keep", *KEEP_RANGE)
    late_keep = trial.suggest_float("phase.late_keep", *KEEP_RANGE)
    extras = _method_params(trial, "phase", methods)
    prop_attn = _prop_attn(trial)

    def build(start: int) -> Schedule:
        layers = []
        for i in range(depth):
            if i < start:
                layers.append(LayerPlan())
            elif i < max(switch, start):
                layers.append(_plan(early, {**extras, "keep": early_keep}, space.spec))
            else:
                layers.append(_plan(late, {**extras, "keep": late_keep}, space.spec))
        return Schedule(space.spec, tuple(layers), prop_attn=prop_attn, name="two-phase")

    schedule = build(first)
    while first > 0 and _out_of_budget(schedule, space):
        first -= 1
        schedule = build(first)
    return schedule


def tome(trial: TrialLike, space: SearchSpace) -> Schedule:
    """ToMe's family: r merged per block, linear schedule shape (inflect -1 decreasing .. 1 increasing)."""
    from spaces.presets import tome_r_per_block

    r = trial.suggest_int("tome.r", 1, max(1, space.spec.num_patches // space.spec.depth))
    inflect = trial.suggest_float("tome.inflect", -1.0, 1.0)
    rs = tome_r_per_block(space.spec.depth, r, inflect)
    layers = tuple(LayerPlan("merge", r=x) if x else LayerPlan() for x in rs)
    return Schedule(space.spec, layers, prop_attn=_prop_attn(trial), name="tome")


def _family(name: str):  # type: ignore[no-untyped-def]
    def build(trial: TrialLike, space: SearchSpace) -> Schedule:
        return staged(trial, space, methods=(FAMILIES[name],))

    return build


_BUILDERS = {"two-phase": two_phase, "per-layer": per_layer, "staged": staged, "tome": tome,
             **{n: _family(n) for n in FAMILIES}}


def preset_params(schedule: Schedule, space: SearchSpace) -> dict[str, Any] | None:
    """The per-layer parameters that rebuild a preset exactly, or None if the space cannot.

    Used to enqueue the papers' presets as the first trials (validated here, since Optuna
    accepts out-of-range seeds with only a warning: PITFALLS 11).
    """
    import optuna

    if space.name != "per-layer":
        return None
    entering = schedule.patch_tokens_entering()
    reducing = [i for i, plan in enumerate(schedule.layers) if plan.method != "none"]
    first = min(reducing[0] if reducing else 0, _first_reducing_max(space.spec.depth))
    params: dict[str, Any] = {"prop_attn": schedule.prop_attn, "layers.first": first}
    if space.budget_gmacs is not None:
        params[BUDGET_PARAM] = gmacs(schedule) / space.budget_gmacs
        low, high = space.fraction_range
        if not low <= params[BUDGET_PARAM] <= high:
            return None
    for i, plan in enumerate(schedule.layers):
        if plan.method != "none" and plan.method not in space.methods:
            return None
        n = entering[i]
        keep = (n - plan.removed(n)) / n if plan.r is not None else plan.keep
        merge_keep = plan.merge_keep
        if plan.method == "diffrate" and plan.kept is not None:
            pruned, merged = plan.diffrate_counts(n)
            keep, merge_keep = pruned / n, merged / pruned
        prefix = f"layer{i:02d}"
        params[f"{prefix}.method"] = plan.method
        params[f"{prefix}.keep"] = 1.0 if plan.method == "none" else keep
        if "diffrate" in space.methods:
            params[f"{prefix}.merge_keep"] = merge_keep if plan.method == "diffrate" else 1.0
        if "condense" in space.methods:
            params[f"{prefix}.order"], params[f"{prefix}.alpha"] = plan.order, plan.alpha
        if "prune" in space.methods:
            params[f"{prefix}.fuse"] = plan.fuse
            params[f"{prefix}.fuse_weights"] = plan.fuse_weights
        if "idle" in space.methods:
            params[f"{prefix}.rank"] = plan.rank
    if not all(KEEP_RANGE[0] <= v <= KEEP_RANGE[1] for k, v in params.items() if k.endswith(".keep")):
        return None
    rebuilt = space(optuna.trial.FixedTrial(params))
    if rebuilt.tokens_entering() != schedule.tokens_entering() or abs(gmacs(rebuilt) - gmacs(schedule)) > 1e-9:
        return None
    return params


TRIM_MIN_SAVING = 1e-3  # a trim must save more than this share of the GMACs (search.report.COST_TIE: less is a tie)


def trimmed_tail(params: dict[str, Any], space: SearchSpace, *, min_saving: float = TRIM_MIN_SAVING) -> dict[str, Any] | None:
    """The per-layer parameters of the same schedule with its last block trimmed: its patch tokens
    pruned to the fewest the space keeps (10 %) after that block's attention, before its MLP; None
    when the space cannot say it or it saves no more than `min_saving` of the GMACs.

    On a model pooled by its class token, the MLP of the last block's patch tokens computes what
    no later layer reads: the class token's output, hence every prediction, is the same, and the
    trimmed schedule costs less. The blocks before it are kept exactly (the budget share is set
    to the trimmed cost, so the budget fit leaves every keep ratio as it is); a schedule the fit
    had rescaled, or whose last block idles tokens (IdleViT picks its active tokens before
    attention, so the class token would read fewer), has no trim.
    """
    import optuna

    if space.name != "per-layer" or "prune" not in space.methods or space.budget_gmacs is None:
        return None
    unfitted = replace(space, budget_gmacs=None, min_gmacs=None)
    schedule = space(optuna.trial.FixedTrial(params))
    if schedule.layers[-1].method == "idle" or effective_key(unfitted(optuna.trial.FixedTrial(params))) != effective_key(schedule):
        return None
    last = f"layer{space.spec.depth - 1:02d}"
    trimmed = {**params, f"{last}.method": "prune", f"{last}.keep": KEEP_RANGE[0], f"{last}.fuse": False}
    target = unfitted(optuna.trial.FixedTrial(trimmed))
    cost = gmacs(target)
    if cost >= gmacs(schedule) * (1 - min_saving):
        return None
    trimmed[BUDGET_PARAM] = cost / space.budget_gmacs * (1 + 1e-9)  # at the trimmed cost: the fit keeps every ratio
    low, high = space.fraction_range
    if not low <= trimmed[BUDGET_PARAM] <= high:
        return None
    rebuilt = space(optuna.trial.FixedTrial(trimmed))
    return trimmed if effective_key(rebuilt) == effective_key(target) else None


def trimmed_tails(presets: Iterable[dict[str, Any]], space: SearchSpace) -> list[dict[str, Any]]:
    """`trimmed_tail` of each of these presets' parameters, in their order; those without one are left out."""
    return [t for t in (trimmed_tail(p, space) for p in presets) if t is not None]


def trim_keys(presets: Iterable[dict[str, Any]], space: SearchSpace) -> frozenset[tuple]:
    """What the trimmed tails of these presets' parameters run (`effective_key` of their schedules)."""
    import optuna

    return frozenset(effective_key(space(optuna.trial.FixedTrial(t))) for t in trimmed_tails(presets, space))


class _UniformTrial:
    """Answers a per-layer space's suggestions for one method in every block from `first`, at one
    keep ratio (the budget fit rescales it), LayerPlan's defaults for the methods' own parameters
    and a merge share of 0.8 (DiffRate's default of 1.0 would not merge); records what it answered."""

    def __init__(self, method: str, first: int, fraction: float) -> None:
        plan = LayerPlan()
        self.values: dict[str, Any] = {"method": method, "first": first, "fraction": fraction, "keep": 0.9,
                                       "merge_keep": 0.8, "prop_attn": True, "order": plan.order,
                                       "alpha": plan.alpha, "fuse": plan.fuse, "fuse_weights": plan.fuse_weights,
                                       "rank": plan.rank}
        self.params: dict[str, Any] = {}

    def _answer(self, name: str, clamp=lambda v: v) -> Any:  # type: ignore[no-untyped-def]
        self.params[name] = clamp(self.values[name.rsplit(".", 1)[-1]])
        return self.params[name]

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        return self._answer(name, lambda v: min(high, max(low, v)))

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return self._answer(name, lambda v: min(high, max(low, v)))

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._answer(name, lambda v: v if v in choices else choices[0])


def _start_block(method: str, space: SearchSpace) -> int:
    """Where a starting point's method begins to reduce: block 0 for a merging method (as ToMe
    does), a quarter of the depth for the others (as EViT, IdleViT, TC-ViT and PPT do)."""
    return 0 if method in ("merge", "diffrate") else space.spec.depth // 4


def uniform_starts(space: SearchSpace) -> list[dict[str, Any]]:
    """First trials for a search with nothing to start from (no presets): each method alone, the
    same keep ratio in every block, at the top and the bottom of the budget range. Merging methods
    start at block 0 (as ToMe does), the others at a quarter of the depth (as EViT, IdleViT, TC-ViT
    and PPT do: the class token's attention ranks nothing in the first blocks). Per-layer space only."""
    if space.name != "per-layer":
        return []
    starts = []
    for fraction in (space.fraction_range[1], space.fraction_range[0]):  # every method at the top first
        for method in space.methods:
            trial = _UniformTrial(method, _start_block(method, space), fraction)
            space(trial)
            starts.append(trial.params)
    return starts


FRONT_LOADED_POWERS = (1.0, 2.0)  # the removal share of a front-loaded start falls as (1 - depth) ** power
FRONT_LOADED_REMOVAL = 0.5  # the removal share at the first reducing block (the budget fit rescales it)


class _FrontLoadedTrial(_UniformTrial):
    """A uniform start whose keep ratio rises with depth: block ``first + i`` keeps
    ``1 - FRONT_LOADED_REMOVAL * (1 - x) ** power``, x going from 0 there to 1 at the last block."""

    def __init__(self, method: str, first: int, fraction: float, depth: int, power: float) -> None:
        super().__init__(method, first, fraction)
        span = max(depth - 1 - first, 1)
        self.keeps = [1.0 - FRONT_LOADED_REMOVAL * (1.0 - min(1.0, max(0.0, (i - first) / span))) ** power
                      for i in range(depth)]

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        block, _, leaf = name.partition(".")
        if leaf == "keep" and block.startswith("layer"):
            self.params[name] = min(high, max(low, self.keeps[int(block[len("layer"):])]))
            return self.params[name]
        return super().suggest_float(name, low, high, log=log)


def front_loaded_params(space: SearchSpace, fraction: float, power: float) -> dict[str, Any]:
    """The per-layer parameters of one front-loaded shape (`_FrontLoadedTrial`) at `fraction` of
    the budget: ToMe's merge when the space has it (from block 0), else the space's first method
    (from a quarter of the depth, as in `uniform_starts`)."""
    method = "merge" if "merge" in space.methods else space.methods[0]
    trial = _FrontLoadedTrial(method, _start_block(method, space), fraction, space.spec.depth, power)
    space(trial)
    return trial.params


def front_loaded_starts(space: SearchSpace) -> list[dict[str, Any]]:
    """First trials beside the presets' trims: one method reducing most in its first block and less
    with depth, to every token kept in the last (`front_loaded_params`, for each of
    FRONT_LOADED_POWERS), at the middle, the bottom and the top of the budget range. Token
    reduction hurts least early for a merge and where few tokens are left late (docs/RESULTS.md §4,
    session 35: such shapes beat ToMe's decreasing presets at their cost); a 60-trial search rarely
    draws a per-layer shape that monotone, and the challenges carry a start's shape to every
    preset's cost. Per-layer space only."""
    if space.name != "per-layer":
        return []
    low, high = space.fraction_range
    return [front_loaded_params(space, fraction, power)
            for fraction in ((low * high) ** 0.5, low, high) for power in FRONT_LOADED_POWERS]


class _ExtremeTrial:
    """Answers every suggestion with the most reducing value, for one method."""

    def __init__(self, method: str) -> None:
        self.method = method

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        return low

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return high if name == "tome.r" else low

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self.method if self.method in choices else (False if False in choices else choices[0])


def cheapest_gmacs(space: SearchSpace) -> float:
    """The fewest GMACs any schedule of this space reaches (what a budget must at least allow)."""
    from dataclasses import replace

    unbounded = replace(space, budget_gmacs=1e-9, min_gmacs=None)  # fit_target then returns the most reduced version
    return min(gmacs(unbounded(_ExtremeTrial(m))) for m in space.methods)
