"""The timm patch: identity, removal, token bookkeeping and model coverage."""

from __future__ import annotations

import pytest
import timm
import torch

from reducers import apply_schedule, current_schedule, last_forward_state, remove_schedule
from spaces import LayerPlan, ModelSpec, Schedule, from_preset, tokens_entering

# (timm name, kwargs): small images keep the suite fast; the architectures are the real ones.
MODELS = {
    "deit_tiny": ("deit_tiny_patch16_224", {"img_size": 128}),
    "deit_small": ("deit_small_patch16_224", {"img_size": 128}),
    "deit_base": ("deit_base_patch16_224", {"img_size": 96, "depth": 4}),
    "vit_small_augreg": ("vit_small_patch16_224", {"img_size": 128}),
    "deit3_layerscale": ("deit3_small_patch16_224", {"img_size": 128}),
    "registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 112}),
    "distilled": ("deit_small_distilled_patch16_224", {"img_size": 128}),
}

# One plan of every method at keep 1.0: each must be exactly the identity.
IDENTITY_PLANS = [
    LayerPlan("prune", keep=1.0, fuse=True),
    LayerPlan("merge", keep=1.0),
    LayerPlan("merge", r=0),
    LayerPlan("idle", keep=1.0),
    LayerPlan("condense", keep=1.0, order=3),
    LayerPlan("adaptive", keep=1.0),
]


def _model(key: str) -> torch.nn.Module:
    name, kwargs = MODELS[key]
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def _set_fused(model: torch.nn.Module, fused: bool) -> None:
    for blk in model.blocks:
        blk.attn.fused_attn = fused


def _images(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


def _mixed(spec: ModelSpec) -> Schedule:
    """Every method once, spread over the depth."""
    plans = [LayerPlan("prune", keep=0.8), LayerPlan("merge", keep=0.8), LayerPlan("idle", keep=0.6),
             LayerPlan("condense", keep=0.8, order=2), LayerPlan("adaptive", keep=0.8), LayerPlan("prune", keep=0.7, fuse=False)]
    layers = [LayerPlan()] * spec.depth
    for i, plan in enumerate(plans):
        layers[(i * spec.depth) // len(plans)] = plan
    return Schedule(spec, tuple(layers))


@pytest.fixture(scope="module", params=list(MODELS))
def model_key(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("fused", [True, False])
def test_empty_and_keep_one_are_identity(model_key: str, fused: bool) -> None:
    model = _model(model_key)
    _set_fused(model, fused)
    x = _images(model)
    with torch.inference_mode():
        ref = model(x)
    spec = ModelSpec.from_model(model)
    schedules = [Schedule.empty(spec)] + [Schedule(spec, (plan,) * spec.depth) for plan in IDENTITY_PLANS]
    for schedule in schedules:
        apply_schedule(model, schedule)
        with torch.inference_mode():
            out = model(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0, msg=lambda m, s=schedule: f"{s.summary()}: {m}")
    remove_schedule(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)


def test_counts_match_cost_model_and_prefix_stays(model_key: str) -> None:
    model = _model(model_key)
    spec = ModelSpec.from_model(model)
    schedule = _mixed(spec)
    apply_schedule(model, schedule)
    x = _images(model, batch=3)
    with torch.inference_mode():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
    assert last_forward_state(model).tokens_in == tokens_entering(schedule)
    assert feats.shape[1] == schedule.patch_tokens_entering()[-1] + spec.num_prefix_tokens
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("fused", [True, False])
def test_fused_and_unfused_agree_under_reduction(fused: bool) -> None:
    """The CLS row computed on the side equals the row of the explicit attention matrix."""
    model = _model("deit_small")
    spec = ModelSpec.from_model(model)
    x = _images(model)
    outs = []
    for flag in (True, False):
        _set_fused(model, flag)
        apply_schedule(model, _mixed(spec))
        with torch.inference_mode():
            outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_state_dict_keys_and_loading_unchanged() -> None:
    model = _model("deit3_layerscale")
    keys = list(model.state_dict())
    apply_schedule(model, from_preset("tome:4", model))
    assert list(model.state_dict()) == keys
    fresh = _model("deit3_layerscale")
    model.load_state_dict(fresh.state_dict())  # a timm checkpoint loads into the patched model
    assert current_schedule(model) is not None


def test_reapply_replaces_and_remove_restores_classes() -> None:
    model = _model("deit_tiny")
    cls, block_cls = type(model), type(model.blocks[0])
    apply_schedule(model, from_preset("evit:0.7", model))
    apply_schedule(model, from_preset("tome:4", model))
    assert current_schedule(model).name == "tome:4"
    remove_schedule(model)
    assert type(model) is cls and type(model.blocks[0]) is block_cls
    assert not hasattr(model, "_ts_state") and current_schedule(model) is None
    remove_schedule(model)  # a no-op the second time


def test_gradients_flow_in_training_mode() -> None:
    model = _model("deit_tiny").train()
    apply_schedule(model, _mixed(ModelSpec.from_model(model)))
    model(_images(model)).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_rejects_non_vit_other_depth_and_no_class_token() -> None:
    resnet = timm.create_model("resnet18")
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        apply_schedule(resnet, Schedule.empty(ModelSpec.from_model(_model("deit_tiny"))))
    deit = _model("deit_tiny")
    other = ModelSpec.from_model(_model("deit_base"))
    with pytest.raises(ValueError, match="depth"):
        apply_schedule(deit, from_preset("evit:0.7", other))
    gap = timm.create_model("deit_tiny_patch16_224", img_size=64, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no class token"):
        apply_schedule(gap, from_preset("evit:0.7", gap))
    apply_schedule(gap, from_preset("tome:4", gap))  # ToMe needs no CLS
    with torch.inference_mode():
        assert gap(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_average_pool_weighs_merged_tokens_by_size() -> None:
    """ToMe's MAE patch: after merging, the average pool counts each token as the patches it holds."""
    from reducers.patch import weighted_mean

    x = torch.tensor([[[1.0, 0.0], [4.0, 2.0], [10.0, 6.0]]])
    size = torch.tensor([[[1.0], [3.0], [2.0]]])
    assert torch.equal(weighted_mean(x, size), torch.tensor([[(1 + 12 + 20) / 6, (0 + 6 + 12) / 6]]))
    torch.manual_seed(0)
    gap = timm.create_model("deit_tiny_patch16_224", img_size=64, class_token=False, global_pool="avg").eval()
    images = torch.randn(2, 3, 64, 64)
    spec = ModelSpec.from_model(gap)
    layers = [LayerPlan()] * spec.depth
    layers[-1] = LayerPlan("merge", r=6)  # the sizes reach the pool unchanged by any later block
    apply_schedule(gap, Schedule(spec, tuple(layers)))
    with torch.inference_mode():
        logits = gap(images)
        features = gap.forward_features(images)
        size = last_forward_state(gap).size
        assert size is not None and size.sum(dim=1).eq(spec.num_patches).all()
        expected = gap.head(gap.fc_norm(weighted_mean(features, size)))
        unweighted = gap.head(gap.fc_norm(features.mean(dim=1)))
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, unweighted)  # the sizes are not all 1: the weighting matters


@pytest.mark.parametrize(("name", "kwargs", "problem"), [
    ("eva02_tiny_patch14_224", {}, "Eva is not a timm VisionTransformer"),
    ("vit_base_patch16_rpn_224", {"depth": 2}, "block 0 is a ResPostBlock"),
    ("vit_dwee_patch16_reg1_gap_256", {"depth": 2}, "attention is a DiffAttention"),
    ("vit_small_patch16_224", {"depth": 2, "mlp_layer": timm.layers.GluMlp}, "MLP is a GluMlp"),
    ("vit_base_patch16_siglip_224", {"depth": 2}, "pools by attention"),
])
def test_unsupported_models_are_one_line_errors(name: str, kwargs: dict, problem: str) -> None:
    """What the reducers cannot run or the cost model cannot price is refused by name, before any work."""
    from reducers.patch import check_supported
    from search.models import model_spec

    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    with pytest.raises(ValueError, match=problem):
        check_supported(model)
    if not kwargs:
        with pytest.raises(ValueError, match=problem):
            model_spec(name)
