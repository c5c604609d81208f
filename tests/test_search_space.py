"""Search spaces: feasible by construction, stable parameters, presets rebuilt exactly."""

from __future__ import annotations

import math

import optuna
import pytest
import torch

from search.models import DEFAULT_MODEL, model_spec
from search.report import COST_TIE
from spaces import Schedule, from_preset, gmacs
from spaces.budget import parse_budget
from spaces.cost import breakdown
from spaces.search_space import (
    KEEP_RANGE,
    REDUCING,
    SPACES,
    TRIM_MIN_SAVING,
    SearchSpace,
    cheapest_gmacs,
    preset_params,
    trimmed_tail,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def spec():
    return model_spec(DEFAULT_MODEL)


def _space(spec, name: str = "per-layer", budget: str = "65%") -> SearchSpace:
    return SearchSpace(name, spec, budget_gmacs=parse_budget(budget, gmacs(Schedule.empty(spec))))


def _free_params(depth: int, method: str, first: int) -> dict:
    """Every per-layer parameter: `method` at keep 0.5 in every block, reduction from `first` on."""
    params: dict = {"layers.first": first, "prop_attn": False, "budget.fraction": 1.0}
    for i in range(depth):
        params.update({f"layer{i:02d}.method": method, f"layer{i:02d}.keep": 0.5, f"layer{i:02d}.order": 2,
                       f"layer{i:02d}.alpha": 0.5, f"layer{i:02d}.fuse": True, f"layer{i:02d}.fuse_weights": "raw",
                       f"layer{i:02d}.rank": "logits", f"layer{i:02d}.merge_keep": 1.0})
    return params


@pytest.mark.parametrize("name", SPACES)
def test_every_sampled_schedule_meets_the_budget(spec, name: str) -> None:
    space = _space(spec, name)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        schedule = space(trial)
        assert gmacs(schedule) <= space.budget_gmacs + 1e-12, schedule.summary()
        study.tell(trial, [0.0, gmacs(schedule)])
        recorded = study.trials[-1].system_attrs["constraints:budget_gmacs"]
        assert recorded == pytest.approx(gmacs(schedule) - space.budget_gmacs) and recorded <= 1e-12


def test_blocks_before_layers_first_keep_every_token(spec) -> None:
    space = SearchSpace("per-layer", spec)  # no budget: the keep ratios stay as given
    for first in (0, 3, spec.depth // 2):
        schedule = space(optuna.trial.FixedTrial(_free_params(spec.depth, "prune", first)))
        assert [plan.method for plan in schedule.layers] == ["none"] * first + ["prune"] * (spec.depth - first)
        assert all(plan.keep == 0.5 for plan in schedule.layers[first:])


@pytest.mark.parametrize("name", ["per-layer", "staged"])
def test_a_start_too_late_for_the_budget_moves_earlier(spec, name: str) -> None:
    """Reducing only from the middle on cannot reach 40 %: the space starts earlier (where the
    sampler drew a method) instead of returning an infeasible schedule."""
    space = _space(spec, name, budget="40%")
    if name == "per-layer":
        params = _free_params(spec.depth, "prune", spec.depth // 2)
    else:
        params = {"stages.first": spec.depth // 2, "stages.gap": 4, "stages.keep": 0.5, "stages.order": 2,
                  "stages.alpha": 0.5, "stages.fuse": True, "stages.fuse_weights": "raw", "stages.rank": "logits",
                  "stages.merge_keep": 1.0, "prop_attn": False, "budget.fraction": 1.0,
                  **{f"stage{s}.method": "prune" for s in range(3)}}
    late = SearchSpace(name, spec)(optuna.trial.FixedTrial(params))  # no budget: as drawn
    assert gmacs(late) > space.budget_gmacs  # even at its smallest keep ratios (checked next)
    fitted = space(optuna.trial.FixedTrial(params))
    assert gmacs(fitted) <= space.budget_gmacs
    first_reducing = min(i for i, plan in enumerate(fitted.layers) if plan.method != "none")
    assert first_reducing < min(i for i, plan in enumerate(late.layers) if plan.method != "none")


@pytest.mark.parametrize("preset", ["evit:0.5", "evit:0.6", "ppt", "idlevit:0.5", "idlevit:0.6", "tcvit:0.5"])
def test_presets_that_fit_are_rebuilt_exactly_by_the_per_layer_space(spec, preset: str) -> None:
    space = _space(spec)
    schedule = from_preset(preset, spec)
    params = preset_params(schedule, space)
    assert params is not None, preset
    assert params["layers.first"] == 3  # every one of these papers starts at the fourth block
    rebuilt = space(optuna.trial.FixedTrial(params))
    assert rebuilt.tokens_entering() == schedule.tokens_entering()
    assert gmacs(rebuilt) == pytest.approx(gmacs(schedule), abs=1e-12)


def test_presets_over_the_budget_or_outside_the_methods_are_not_enqueued(spec) -> None:
    assert preset_params(from_preset("evit:0.9", spec), _space(spec)) is None  # above 65 %
    prune_only = SearchSpace("per-layer", spec, methods=("prune",), budget_gmacs=_space(spec).budget_gmacs)
    assert preset_params(from_preset("ppt", spec), prune_only) is None


@pytest.mark.parametrize("name", SPACES)
def test_cheapest_gmacs_is_a_floor_of_what_the_space_samples(spec, name: str) -> None:
    space = SearchSpace(name, spec, budget_gmacs=1e-9)  # asks for less than anything can reach
    floor = cheapest_gmacs(space)
    assert 0 < floor < gmacs(Schedule.empty(spec))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        assert gmacs(space(study.ask())) >= floor - 1e-12


def test_unknown_space_and_methods_are_refused(spec) -> None:
    with pytest.raises(ValueError, match="unknown space"):
        SearchSpace("zigzag", spec)
    with pytest.raises(ValueError, match="unknown method"):
        SearchSpace("per-layer", spec, methods=("prune", "shuffle"))
    with pytest.raises(ValueError, match="--methods excludes"):
        SearchSpace("evit", spec, methods=tuple(m for m in REDUCING if m != "prune"))


def test_a_model_without_a_class_token_searches_and_presets_merging_only(spec) -> None:
    from dataclasses import replace

    from spaces.presets import presets_in_range

    pooled = replace(spec, name="pooled", class_token=False)
    assert SearchSpace("per-layer", pooled).methods == ("merge",)
    assert SearchSpace("per-layer", spec).methods == REDUCING
    with pytest.raises(ValueError, match="prune rank tokens by the class token's attention and pooled has none"):
        SearchSpace("per-layer", pooled, methods=("merge", "prune"))
    with pytest.raises(ValueError, match="space 'idlevit' uses method 'idle'"):
        SearchSpace("idlevit", pooled)
    study = optuna.create_study()
    space = _space(pooled, "two-phase")
    assert all({p.method for p in space(study.ask()).layers} <= {"none", "merge"} for _ in range(10))
    chosen = presets_in_range(pooled, None)
    assert chosen and all(s.name.startswith("tome:") for s in chosen)
    assert {s.name.split(":")[0] for s in presets_in_range(spec, None)} > {"tome"}


def test_two_phase_runs_the_early_method_then_the_late_one(spec) -> None:
    params = {"phase.first": 2, "phase.switch": 6, "phase.early": "merge", "phase.late": "diffrate",
              "phase.early_keep": 0.8, "phase.late_keep": 0.6, "phase.order": 2, "phase.alpha": 0.5,
              "phase.fuse": True, "phase.fuse_weights": "raw", "phase.rank": "logits", "phase.merge_keep": 0.9,
              "prop_attn": True}
    schedule = SearchSpace("two-phase", spec)(optuna.trial.FixedTrial(params))  # no budget: as drawn
    assert [p.method for p in schedule.layers] == ["none"] * 2 + ["merge"] * 4 + ["diffrate"] * (spec.depth - 6)
    assert {p.keep for p in schedule.layers[2:6]} == {0.8} and {p.keep for p in schedule.layers[6:]} == {0.6}
    assert {p.merge_keep for p in schedule.layers[6:]} == {0.9}
    fitted = _space(spec, "two-phase", budget="30%")(optuna.trial.FixedTrial({**params, "budget.fraction": 1.0}))
    assert gmacs(fitted) <= _space(spec, budget="30%").budget_gmacs  # both phases rescaled together
    assert [p.method for p in fitted.layers][6:] == ["diffrate"] * (spec.depth - 6)


def test_uniform_starts_run_each_method_alone_at_both_ends_of_the_budget_range() -> None:
    import optuna

    from search.models import DEFAULT_MODEL, model_spec
    from spaces import gmacs
    from spaces.search_space import SearchSpace, uniform_starts

    spec = model_spec(DEFAULT_MODEL)
    budget = 0.65 * gmacs(Schedule.empty(spec))
    space = SearchSpace("per-layer", spec, budget_gmacs=budget)
    starts = uniform_starts(space)
    assert len(starts) == 2 * len(space.methods)
    low, high = space.fraction_range
    cost = []
    methods = [*space.methods, *space.methods]  # every method at the top of the range, then at the bottom
    for params, method, fraction in zip(starts, methods, [high] * len(space.methods) + [low] * len(space.methods),
                                        strict=True):
        schedule = space(optuna.trial.FixedTrial(params))  # every parameter of the space, in range
        used = [p for p in schedule.layers if p.method != "none"]
        assert {p.method for p in used} == {method} and len({p.keep for p in used}) == 1  # one keep everywhere
        first = next(i for i, p in enumerate(schedule.layers) if p.method != "none")
        assert first == (0 if method in ("merge", "diffrate") else spec.depth // 4)
        assert params["budget.fraction"] == fraction and gmacs(schedule) <= budget + 1e-9
        cost.append(gmacs(schedule))
    half = len(space.methods)
    assert all(top > bottom for top, bottom in zip(cost[:half], cost[half:], strict=True))  # the low end costs less
    assert uniform_starts(SearchSpace("staged", spec, budget_gmacs=budget)) == []


def test_front_loaded_starts_reduce_most_first_and_keep_every_token_in_the_last_block() -> None:
    import optuna

    from search.models import DEFAULT_MODEL, model_spec
    from spaces import gmacs
    from spaces.search_space import FRONT_LOADED_POWERS, SearchSpace, front_loaded_starts

    spec = model_spec(DEFAULT_MODEL)
    budget = 0.65 * gmacs(Schedule.empty(spec))
    space = SearchSpace("per-layer", spec, budget_gmacs=budget, min_gmacs=0.4 * budget)
    starts = front_loaded_starts(space)
    low, high = space.fraction_range
    fractions = [f for f in ((low * high) ** 0.5, low, high) for _ in FRONT_LOADED_POWERS]
    assert [p["budget.fraction"] for p in starts] == pytest.approx(fractions)
    for params in starts:
        schedule = space(optuna.trial.FixedTrial(params))
        assert {p.method for p in schedule.layers[:-1]} == {"merge"} and schedule.layers[-1].method in ("merge", "none")
        keeps = [p.keep if p.method != "none" else 1.0 for p in schedule.layers]
        assert keeps == sorted(keeps) and keeps[0] < keeps[-2] and keeps[-1] == 1.0  # rising to every token kept
        assert gmacs(schedule) <= params["budget.fraction"] * budget + 1e-9
    removal = [[1 - params[f"layer{i:02d}.keep"] for i in range(spec.depth)] for params in starts[:2]]
    assert removal[0][0] == removal[1][0] == pytest.approx(0.5)  # one first-block share, more front-loaded at p=2
    assert removal[1][spec.depth // 2] < removal[0][spec.depth // 2]

    pruning = SearchSpace("per-layer", spec, budget_gmacs=budget, methods=("prune", "idle"))
    for params in front_loaded_starts(pruning):  # no merge: the first method, from a quarter of the depth
        schedule = pruning(optuna.trial.FixedTrial(params))
        reducing = [i for i, p in enumerate(schedule.layers) if p.method != "none" and p.keep < 1.0]
        assert {schedule.layers[i].method for i in reducing} == {"prune"} and reducing[0] == spec.depth // 4
    assert front_loaded_starts(SearchSpace("staged", spec, budget_gmacs=budget)) == []


def _run_space(spec) -> SearchSpace:
    """The default run's space: 65 % of the GMACs, down to the cheapest preset (ToMe's at 16.6 %)."""
    baseline = gmacs(Schedule.empty(spec))
    return SearchSpace("per-layer", spec, budget_gmacs=0.65 * baseline, min_gmacs=0.16 * baseline)


def _study_with(space: SearchSpace, presets: list[str], searched: int = 0) -> optuna.Study:
    """An in-memory study holding `presets` told as finished trials (as the presets stage does) and
    `searched` enqueued searched trials (a resumed run's)."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for name in presets:
        study.enqueue_trial(preset_params(from_preset(name, space.spec), space), user_attrs={"preset": name})
        trial = study.ask()
        space(trial)
        study.tell(trial, [0.9, 1.0])
    for _ in range(searched):
        study.enqueue_trial({})
    return study


def test_the_local_sampler_starts_from_the_presets_trims_or_uniform_with_nothing_to_move_from(spec, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from search.config import SearchConfig
    from search.tune_stage import starting_points
    from search.worker import WorkerSetup
    from spaces.search_space import front_loaded_starts

    space = _run_space(spec)
    cfg = SearchConfig(setup=WorkerSetup(space=space), budget="65%", out=tmp_path, presets=False, trials=60)
    empty = _study_with(space, [])
    assert len(starting_points(cfg, empty)) == 12
    assert len(starting_points(replace(cfg, trials=20), empty)) == 4  # at most a fifth of the trials
    assert starting_points(replace(cfg, sampler="random"), empty) == []  # random search stays random
    told = _study_with(space, ["tome:4", "tome:10", "idlevit:0.5", "evit:0.5"])
    starts = starting_points(replace(cfg, presets=True), told)
    trims = [trimmed_tail(preset_params(from_preset(n, spec), space), space) for n in ("tome:4", "evit:0.5")]
    expected = [*trims, *front_loaded_starts(space)]  # tome:10 and idlevit:0.5 have no trim
    assert starts == expected and len(starts) == 8
    assert starting_points(replace(cfg, presets=True, trials=5), told) == expected[:1]
    assert starting_points(replace(cfg, presets=True), _study_with(space, ["tome:4"], searched=1)) == []  # resumed


@pytest.mark.parametrize("preset", ["tome:4", "tome:3,-1", "evit:0.5", "ppt", "tcvit:0.5"])
def test_a_trimmed_tail_keeps_every_block_but_the_last_and_prunes_its_patch_tokens_to_a_tenth(spec, preset: str) -> None:
    space = _run_space(spec)
    schedule = from_preset(preset, spec)
    trimmed = trimmed_tail(preset_params(schedule, space), space)
    assert trimmed is not None, preset
    rebuilt = space(optuna.trial.FixedTrial(trimmed))
    rows, preset_rows = breakdown(rebuilt), breakdown(schedule)
    assert rows[:-1] == preset_rows[:-1]  # every block but the last runs the preset's token counts
    assert (rows[-1].tokens_in, rows[-1].tokens_attn) == (preset_rows[-1].tokens_in, preset_rows[-1].tokens_attn)
    assert [p.method for p in rebuilt.layers[:-1]] == [p.method for p in schedule.layers[:-1]]
    last = rebuilt.layers[-1]
    assert (last.method, last.fuse) == ("prune", False)
    n = schedule.patch_tokens_entering()[-1]
    assert last.patch_tokens_after(n) == math.ceil(KEEP_RANGE[0] * n) < n  # the fewest the space keeps
    assert gmacs(rebuilt) < gmacs(schedule) * (1 - 1e-3)


def test_no_trim_where_it_would_change_predictions_or_save_nothing(spec) -> None:
    space = _run_space(spec)
    idle = from_preset("idlevit:0.5", spec)  # IdleViT picks the active tokens before the last attention
    assert trimmed_tail(preset_params(idle, space), space) is None
    late = from_preset("tome:10", spec)  # one patch token is left by the last block: nothing to trim
    assert trimmed_tail(preset_params(late, space), space) is None
    tiny = from_preset("tome:6", spec)  # the trim saves 0.18 % of the GMACs: more than a verdict's cost tie
    assert TRIM_MIN_SAVING == COST_TIE
    assert trimmed_tail(preset_params(tiny, space), space) is not None
    assert trimmed_tail(preset_params(tiny, space), space, min_saving=0.01) is None
    merge_only = SearchSpace("per-layer", spec, methods=("merge",), budget_gmacs=space.budget_gmacs)
    tome = from_preset("tome:4", spec)
    assert trimmed_tail(preset_params(tome, merge_only), merge_only) is None  # prune is not in the space


def test_a_trimmed_tail_gives_the_same_logits_on_a_model_pooled_by_its_class_token(spec) -> None:
    from reducers import apply_schedule, remove_schedule
    from search.data import embedded_set
    from search.evaluate import predict
    from search.models import load_model

    model, data, space = load_model(), embedded_set(64, seed=3), _run_space(spec)
    assert model.global_pool == "token"
    preset = from_preset("tome:4,-1", spec)
    trimmed = space(optuna.trial.FixedTrial(trimmed_tail(preset_params(preset, space), space)))

    def logits(schedule: Schedule) -> torch.Tensor:
        apply_schedule(model, schedule)
        try:
            return predict(model, data, batch_size=32)
        finally:
            remove_schedule(model)

    assert torch.allclose(logits(preset), logits(trimmed), atol=1e-5)
