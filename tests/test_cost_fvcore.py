"""The analytic cost model (spaces/cost.py) against fvcore's FlopCountAnalysis.

fvcore traces one forward pass and counts matmuls, linear layers, convolutions and norms in
MACs, the convention of spaces/cost.py. Attention must be unfused (PITFALLS.md item 1: fused
SDPA hides the attention matmuls from fvcore), the model in eval mode. fvcore freezes
data-dependent shapes at trace time (PITFALLS.md item 3), which is what we want here: the
trace sees the token counts this batch produced. The cost model counts PPT's similarity for
every image (an upper bound) and the CLS row beside fused attention, which the unfused trace
does not compute; both are far below the 1 % tolerance.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest
import timm
import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

from reducers import apply_schedule, last_forward_state, remove_schedule
from spaces import LayerPlan, ModelSpec, Schedule, from_preset, macs, tokens_entering
from spaces.schedule import DEFAULT_PPT_THRESHOLD, METHODS

MODELS = ("deit_small_patch16_224", "deit_tiny_patch16_224")
BATCH = 2
REL_TOL = 0.01
RANDOM_SEEDS = range(6)


def _everywhere(plan: LayerPlan) -> Callable[[ModelSpec], Schedule]:
    """One method alone, in every block (token counts compound from block to block)."""
    return lambda spec: Schedule(spec, (plan,) * spec.depth, name=plan.method)


def _preset(name: str) -> Callable[[ModelSpec], Schedule]:
    return lambda spec: from_preset(name, spec)


def _deit_s_only(name: str) -> Callable[[ModelSpec], Schedule]:
    """A preset published for DeiT-S only (DiffRate's schedules)."""

    def build(spec: ModelSpec) -> Schedule:
        if spec.name != "deit_small_patch16_224":
            pytest.skip(f"{name} is published for DeiT-S only")
        return from_preset(name, spec)

    return build


def _random_mixed(seed: int) -> Callable[[ModelSpec], Schedule]:
    """Each block a random method with random keep, order, alpha, fusion and threshold."""

    def build(spec: ModelSpec) -> Schedule:
        rng = random.Random(seed)
        layers = tuple(
            LayerPlan(
                method=rng.choice(METHODS),
                keep=rng.uniform(0.5, 1.0),
                fuse=rng.random() < 0.5,
                order=rng.randint(1, 3),
                alpha=rng.random(),
                weighting=rng.choice(("size", "size_relevance")),
                threshold=rng.choice((0.0, DEFAULT_PPT_THRESHOLD, 1.0)),  # prune, either, merge
                merge_keep=rng.uniform(0.5, 1.0),
                rank=rng.choice(("logits", "softmax")),
            )
            for _ in range(spec.depth)
        )
        return Schedule(spec, layers, prop_attn=rng.random() < 0.5, name=f"random{seed}")

    return build


CASES: dict[str, Callable[[ModelSpec], Schedule]] = {
    "prune-fuse": _everywhere(LayerPlan("prune", keep=0.85, fuse=True)),
    "prune-nofuse": _everywhere(LayerPlan("prune", keep=0.85, fuse=False)),
    "merge": _everywhere(LayerPlan("merge", keep=0.85)),
    "idle": _everywhere(LayerPlan("idle", keep=0.6)),
    "idle-softmax": _everywhere(LayerPlan("idle", keep=0.6, rank="softmax")),
    "condense-order1": _everywhere(LayerPlan("condense", keep=0.85, order=1)),
    "condense-order3": _everywhere(LayerPlan("condense", keep=0.85, order=3, weighting="size")),
    "adaptive": _everywhere(LayerPlan("adaptive", keep=0.85)),
    "adaptive-prune": _everywhere(LayerPlan("adaptive", keep=0.85, threshold=0.0)),  # every image prunes
    "adaptive-merge": _everywhere(LayerPlan("adaptive", keep=0.85, threshold=1.0)),  # every image merges
    "diffrate": _everywhere(LayerPlan("diffrate", keep=0.9, merge_keep=0.85)),
    "diffrate-prune-only": _everywhere(LayerPlan("diffrate", keep=0.85)),
    "diffrate:2.9": _deit_s_only("diffrate:2.9"),
    **{name: _preset(name) for name in (
        "none", "tome:13", "tome:13,-1", "evit:0.7", "idlevit:0.7", "idlevit-code:0.6", "ppt", "ppt:30", "tcvit:0.6",
    )},
    **{f"random{seed}": _random_mixed(seed) for seed in RANDOM_SEEDS},
}


@pytest.fixture(scope="module", params=MODELS)
def model(request: pytest.FixtureRequest) -> Iterator[nn.Module]:
    """A random-init timm DeiT, created once per module, eval mode, attention unfused."""
    torch.manual_seed(0)
    m = timm.create_model(request.param, pretrained=False).eval()
    for blk in m.blocks:
        blk.attn.fused_attn = False
    yield m
    remove_schedule(m)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def fvcore_macs(model: nn.Module, images: torch.Tensor) -> tuple[float, dict[str, int]]:
    """fvcore's count per image, and its per-operator counts for the whole batch."""
    analysis = FlopCountAnalysis(model, images).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total() / images.shape[0], dict(analysis.by_operator())


@pytest.mark.parametrize("case", list(CASES))
def test_cost_model_matches_fvcore(model: nn.Module, images: torch.Tensor, case: str) -> None:
    schedule = CASES[case](ModelSpec.from_model(model))
    apply_schedule(model, schedule)
    counted, ops = fvcore_macs(model, images)
    predicted = macs(schedule)
    rel = (counted - predicted) / predicted
    assert abs(rel) <= REL_TOL, (
        f"{case} ({schedule.summary()}): fvcore {counted / 1e9:.4f} G, cost model {predicted / 1e9:.4f} G, "
        f"rel {rel:+.4%}; fvcore ops (batch {images.shape[0]}): {ops}"
    )


@pytest.mark.parametrize("case", list(CASES))
def test_token_counts_match_forward(model: nn.Module, images: torch.Tensor, case: str) -> None:
    schedule = CASES[case](ModelSpec.from_model(model))
    apply_schedule(model, schedule)
    with torch.inference_mode():
        model(images)
    state = last_forward_state(model)
    assert state is not None
    assert state.tokens_in == tokens_entering(schedule)


def test_unpatched_model_matches_cost_model(model: nn.Module, images: torch.Tensor) -> None:
    remove_schedule(model)
    counted, ops = fvcore_macs(model, images)
    predicted = macs(Schedule.empty(ModelSpec.from_model(model)))
    assert abs(counted - predicted) <= REL_TOL * predicted, (counted, predicted, ops)


def test_unpatched_model_matches_reference(model: nn.Module, images: torch.Tensor) -> None:
    """REFERENCE.md: DeiT-S 4.6 GMACs; DeiT-T 1.3 (fvcore, fused attention off)."""
    remove_schedule(model)
    counted, _ = fvcore_macs(model, images)
    expected = {"deit_small_patch16_224": 4.60, "deit_tiny_patch16_224": 1.26}[model.pretrained_cfg["architecture"]]
    assert counted / 1e9 == pytest.approx(expected, abs=0.01)
