"""The shared prefix: a forward from the cached tokens entering block k equals the full forward."""

from __future__ import annotations

import pytest
import torch

from reducers import apply_schedule, remove_schedule
from reducers.prefix import embed, forward_from, tokens_entering
from search.data import embedded_set
from search.evaluate import evaluate, predict, predict_keeping
from search.models import load_model
from search.prefix_cache import PrefixCache, shared_blocks
from spaces import LayerPlan, ModelSpec, Schedule

PLANS = {
    "prune": LayerPlan("prune", keep=0.7),
    "merge": LayerPlan("merge", r=8),
    "idle": LayerPlan("idle", keep=0.5),
    "condense": LayerPlan("condense", keep=0.7),
    "adaptive": LayerPlan("adaptive", r=8, threshold=0.0),
    "diffrate": LayerPlan("diffrate", keep=0.8, merge_keep=0.8),
}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model("tokensched_vit_shapes").eval()  # random weights: nothing to tune the test to


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    return embedded_set(24, seed=3)


def _schedule(model: torch.nn.Module, method: str, first: int) -> Schedule:
    spec = ModelSpec.from_model(model)
    layers = [LayerPlan()] * first + [PLANS[method]] * 2 + [LayerPlan()] * (spec.depth - first - 2)
    return Schedule(spec, tuple(layers))


@pytest.mark.parametrize("first", [0, 3, 6])
@pytest.mark.parametrize("method", sorted(PLANS))
def test_forward_from_the_cached_prefix_equals_the_full_forward(model, data, method: str, first: int) -> None:
    schedule = _schedule(model, method, first)
    assert schedule.first_reducing_block() == first
    cache = PrefixCache(model, data, batch_size=10, budget_bytes=1 << 30)
    tokens = cache.tokens(first)
    assert (tokens is None) == (first == 0)
    apply_schedule(model, schedule)
    try:
        full = predict(model, data, batch_size=10)
        begin = None if tokens is None else (first, tokens)
        from_prefix = predict(model, data, batch_size=10, start=begin)
    finally:
        remove_schedule(model)
    torch.testing.assert_close(from_prefix, full, rtol=0, atol=1e-5)


def test_evaluate_with_a_prefix_cache_scores_like_without(model, data) -> None:
    reference = predict(model, data, batch_size=8)
    cache = PrefixCache(model, data, batch_size=8, budget_bytes=1 << 30)
    for first in (3, 6, 3):
        schedule = _schedule(model, "merge", first)
        plain = evaluate(model, schedule, data, reference, batch_size=8)
        cached = evaluate(model, schedule, data, reference, batch_size=8, prefix=cache)
        assert cached["agreement"] == plain["agreement"] and cached["kl"] == pytest.approx(plain["kl"], abs=1e-6)
    assert cache.computed_blocks == 6  # blocks 0-2 once, then 3-5 from the cached block 3; block 3 reused


def test_prefix_cache_keeps_to_its_budget_and_drops_the_least_recently_used(model, data) -> None:
    one_block = 24 * 65 * 128 * 4  # images x tokens x width x fp32
    assert PrefixCache(model, data, batch_size=8, budget_bytes=0).block_bytes() == one_block
    cache = PrefixCache(model, data, batch_size=8, budget_bytes=2 * one_block)
    for block in (2, 4, 2, 6):
        assert cache.tokens(block) is not None
    assert sorted(cache._blocks) == [2, 6] and cache.nbytes() <= 2 * one_block
    small = PrefixCache(model, data, batch_size=8, budget_bytes=one_block - 1)
    assert small.tokens(3) is None and small.computed_blocks == 0  # known not to fit: not computed


def test_the_prefix_is_the_unreduced_models(model, data) -> None:
    x = next(data.batches(4))[0]
    apply_schedule(model, _schedule(model, "prune", 3))
    try:
        with pytest.raises(ValueError, match="remove the schedule"):
            tokens_entering(model, embed(model, x), 0, 3)
    finally:
        remove_schedule(model)
    with torch.inference_mode():
        torch.testing.assert_close(forward_from(model, embed(model, x), 0), model(x), rtol=0, atol=1e-6)


def test_an_identity_schedule_reuses_the_reference_only_when_told_it_is_this_models(model, data) -> None:
    spec = ModelSpec.from_model(model)
    fake = torch.zeros(len(data), model.num_classes)
    fake[:, 0] = 1.0
    reused = evaluate(model, Schedule.empty(spec), data, fake, batch_size=8, reference_is_model=True)
    computed = evaluate(model, Schedule.empty(spec), data, fake, batch_size=8)
    assert reused["agreement"] == 1.0 and reused["kl"] == 0.0
    assert computed["kl"] > 0.0


def test_bf16_screening_runs_under_autocast_and_keeps_the_fp32_reference(model, data) -> None:
    reference = predict(model, data, batch_size=8)
    schedule = _schedule(model, "merge", 3)
    fp32 = evaluate(model, schedule, data, reference, batch_size=8)
    bf16 = evaluate(model, schedule, data, reference, batch_size=8, dtype=torch.bfloat16)
    apply_schedule(model, schedule)
    try:
        low = predict(model, data, batch_size=8, dtype=torch.bfloat16)
        high = predict(model, data, batch_size=8)
    finally:
        remove_schedule(model)
    assert low.dtype == torch.float32 and not torch.equal(low, high)  # returned as fp32, computed in bf16
    assert (low - high).abs().max() < 0.5  # close, not equal
    assert bf16["kl"] != fp32["kl"]
    spec = ModelSpec.from_model(model)
    unreduced = evaluate(model, Schedule.empty(spec), data, reference, batch_size=8, reference_is_model=True,
                         dtype=torch.bfloat16)
    assert unreduced["kl"] > 0.0  # the unreduced bf16 forward runs; the fp32 reference is not reused for it


def test_shared_blocks_are_all_that_fit_spread_over_the_depth() -> None:
    assert shared_blocks(12, 10, 1000) == tuple(range(1, 12))  # all of them fit
    assert shared_blocks(12, 10, 30) == (3, 6, 9)
    assert shared_blocks(12, 10, 10) == (6,)
    assert shared_blocks(12, 10, 9) == ()


def test_the_reference_pass_keeps_the_tokens_entering_blocks_and_its_logits_are_predicts(model, data) -> None:
    logits, kept = predict_keeping(model, data, batch_size=10, blocks=(2, 7))
    assert torch.equal(logits, predict(model, data, batch_size=10))  # the hooks change nothing
    cache = PrefixCache(model, data, batch_size=10, budget_bytes=1 << 30)
    assert sorted(kept) == [2, 7] and all(torch.equal(kept[k], cache.tokens(k)) for k in kept)


def test_a_forward_starts_from_a_shared_block_before_its_first_reduction_when_its_own_does_not_fit(model, data) -> None:
    _, kept = predict_keeping(model, data, batch_size=10, blocks=(3,))
    one_block = kept[3].numel() * kept[3].element_size()
    cache = PrefixCache(model, data, batch_size=10, budget_bytes=one_block, shared=kept)  # no room left
    assert cache.start(2) is None and cache.start(3)[0] == 3 and cache.start(6)[0] == 3
    assert cache.computed_blocks == 0
    roomy = PrefixCache(model, data, batch_size=10, budget_bytes=2 * one_block, shared=kept)
    assert roomy.start(6)[0] == 6 and roomy.computed_blocks == 3  # blocks 3-5, from the shared block 3
    reference = predict(model, data, batch_size=10)
    for first in (4, 6):
        schedule = _schedule(model, "merge", first)
        plain = evaluate(model, schedule, data, reference, batch_size=10)
        shared = evaluate(model, schedule, data, reference, batch_size=10, prefix=cache)
        assert shared["agreement"] == plain["agreement"] and shared["kl"] == pytest.approx(plain["kl"], abs=1e-6)


def test_shared_blocks_written_after_the_cache_was_made_are_found_when_asked_for(model, data) -> None:
    _, kept = predict_keeping(model, data, batch_size=10, blocks=(2, 5))
    written: dict[int, torch.Tensor] = {2: kept[2]}  # block 5's file is not there yet
    asked: list[set[int]] = []

    def more(known) -> dict[int, torch.Tensor]:  # type: ignore[no-untyped-def]
        asked.append(set(known))
        return {k: t for k, t in written.items() if k not in known}

    one_block = kept[2].numel() * kept[2].element_size()
    cache = PrefixCache(model, data, batch_size=10, budget_bytes=one_block, shared={}, more_shared=more)
    assert cache.start(5)[0] == 2 and asked == [set()]  # block 5 not written: from block 2, mapped now
    written[5] = kept[5]
    assert cache.start(5)[0] == 5 and asked[-1] == {2} and cache.computed_blocks == 0
    assert cache.start(2)[0] == 2 and len(asked) == 2  # a shared block at hand asks for nothing
