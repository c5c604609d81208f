"""Schedules that predict the same share one evaluation (search.output_memo, spaces.presets.output_key)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch

from reducers import apply_schedule, remove_schedule
from reducers.patch import head_reads_prefix_only
from search.data import TensorSet
from search.evaluate import EarlyStop, evaluate, predict
from search.fixed_stage import _batches
from search.output_memo import OutputMemo
from spaces import ModelSpec, Schedule, from_preset
from spaces.presets import effective_key, output_key
from spaces.schedule import AFTER_ATTENTION, LayerPlan

TINY = "deit_tiny_patch16_224"


def _tiny(**kwargs) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return timm.create_model(TINY, img_size=64, num_classes=3, **kwargs).eval()


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return _tiny()


@pytest.fixture(scope="module")
def data() -> TensorSet:
    g = torch.Generator().manual_seed(1)
    return TensorSet(torch.randint(0, 256, (24, 3, 64, 64), dtype=torch.uint8, generator=g),
                     torch.randint(0, 3, (24,), generator=g), mean=(0.5,) * 3, std=(0.5,) * 3, source="random")


def _last(schedule: Schedule, plan: LayerPlan) -> Schedule:
    return replace(schedule, layers=(*schedule.layers[:-1], plan), name="custom")


PLANS = {"prune": LayerPlan("prune", keep=0.25, fuse=False), "merge": LayerPlan("merge", keep=0.5),
         "condense": LayerPlan("condense", keep=0.5), "adaptive": LayerPlan("adaptive", keep=0.5),
         "diffrate": LayerPlan("diffrate", keep=0.5, merge_keep=0.5)}


def test_the_output_key_leaves_out_only_a_reduction_after_the_last_attention(tiny) -> None:
    spec = ModelSpec.from_model(tiny)
    base = from_preset("tome:1", spec)
    plain = _last(base, LayerPlan())
    assert sorted(PLANS) == sorted(AFTER_ATTENTION)
    for method, plan in PLANS.items():
        varied = _last(base, plan)
        assert effective_key(varied) != effective_key(plain), method  # it runs something else ...
        assert output_key(varied) == output_key(plain) == effective_key(plain), method  # ... predicting the same
    idle = _last(base, LayerPlan("idle", keep=0.5))  # picks its tokens before the last attention
    assert output_key(idle) != output_key(plain)
    earlier = replace(base, layers=(*base.layers[:-2], LayerPlan("prune", keep=0.5), base.layers[-1]))
    assert output_key(earlier) != output_key(base)  # a block before the last still counts


def test_after_the_last_attention_no_method_changes_what_a_token_pooled_head_reads(tiny, data) -> None:
    spec = ModelSpec.from_model(tiny)
    base = from_preset("tome:1", spec)
    assert head_reads_prefix_only(tiny)

    def logits(model: torch.nn.Module, schedule: Schedule) -> torch.Tensor:
        apply_schedule(model, schedule)
        try:
            return predict(model, data, batch_size=8)
        finally:
            remove_schedule(model)

    plain = logits(tiny, _last(base, LayerPlan()))
    for method, plan in PLANS.items():
        assert torch.allclose(logits(tiny, _last(base, plan)), plain, atol=1e-5), method
    averaged = _tiny(global_pool="avg")
    assert not head_reads_prefix_only(averaged)  # an average reads the patch tokens: nothing is shared
    assert not torch.allclose(logits(averaged, _last(base, PLANS["prune"])), logits(averaged, _last(base, LayerPlan())),
                              atol=1e-5)


def test_a_schedule_predicting_what_an_evaluated_one_predicts_reuses_its_result(tiny, data, tmp_path: Path) -> None:
    spec = ModelSpec.from_model(tiny)
    preset = from_preset("tome:1", spec)
    trimmed = _last(preset, PLANS["prune"])
    reference = predict(tiny, data, batch_size=8)
    memo = OutputMemo(tmp_path, "confirm", ("tiny", 0))
    ran = evaluate(tiny, preset, data, reference, batch_size=8, hits=True, memo=memo)
    assert "output_of" not in ran and memo.get(trimmed) is not None
    reused = evaluate(None, trimmed, data, reference, batch_size=8, hits=True, memo=memo)  # type: ignore[arg-type]
    assert reused["output_of"] == preset.summary()  # no forward: the model is not even given
    for key in ("top1", "top5", "agreement", "kl", "num_images", "stopped"):
        assert reused[key] == ran[key], key
    assert torch.equal(reused["hits"], ran["hits"]) and reused["gmacs"] < ran["gmacs"]
    direct = evaluate(tiny, trimmed, data, reference, batch_size=8, hits=True)
    assert torch.equal(direct["hits"], ran["hits"]) and direct["top1"] == ran["top1"]  # what it would have measured
    assert OutputMemo(tmp_path, "screen", ("tiny", 0)).get(trimmed) is None  # another image set
    assert OutputMemo(tmp_path, "confirm", ("tiny", 1)).get(trimmed) is None  # another model or data
    assert memo.get(trimmed, torch.bfloat16) is None  # another precision


def test_an_evaluation_stopped_early_is_not_shared(tiny, data, tmp_path: Path) -> None:
    spec = ModelSpec.from_model(tiny)
    preset = from_preset("tome:2", spec)
    reference = predict(tiny, data, batch_size=8)
    memo = OutputMemo(tmp_path, "screen", ("tiny", 0))
    out = evaluate(tiny, preset, data, reference, batch_size=8, early_stop=EarlyStop(1.01, chunk=8), memo=memo)
    assert out["stopped"] and memo.get(preset) is None


def test_batches_keep_the_schedules_of_one_output_together_in_their_order() -> None:
    items = [("a", 5.0), ("b", 4.0), ("a", 4.5), ("c", 3.0), ("d", 2.0), ("a", 1.0), ("e", 2.5), ("f", 1.5)]
    batches = _batches(items, concurrency=2, most=2, cost=lambda it: it[1], group=lambda it: it[0])
    assert sorted(i for b in batches for i in b) == sorted(items)
    holding = [b for b in batches if any(g == "a" for g, _ in b)]
    assert len(holding) == 1
    batch = holding[0]
    first = batch.index(("a", 5.0))
    assert batch[first:first + 3] == [("a", 5.0), ("a", 4.5), ("a", 1.0)]  # together, in their order


def test_a_worker_shares_results_only_on_the_same_images_of_a_model_with_a_class_token_head(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace as with_

    from search.worker import WorkerSetup, output_memo
    from spaces.search_space import SearchSpace

    spec = ModelSpec.from_model(tiny)
    setup = WorkerSetup(space=SearchSpace("per-layer", spec), cache_dir=str(tmp_path), confirm_images=20)
    schedule = from_preset("tome:1", spec)
    path = output_memo(setup, tiny, "confirm").path(schedule, None)
    assert output_memo(with_(setup, confirm_images=30), tiny, "confirm").path(schedule, None) != path
    assert output_memo(with_(setup, seed=1), tiny, "confirm").path(schedule, None) != path
    assert output_memo(setup, tiny, "screen").path(schedule, None) != path
    assert output_memo(with_(setup, cache_dir=None), tiny, "confirm") is None  # no run cache to share through
    assert output_memo(setup, _tiny(global_pool="avg"), "confirm") is None  # the head reads the patch tokens
