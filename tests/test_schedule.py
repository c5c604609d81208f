"""Schedules as data: validation, serialisation, presets and the papers' GMACs."""

from __future__ import annotations

import dataclasses

import pytest

from search.models import model_spec
from spaces import LayerPlan, Schedule, breakdown, from_preset, gmacs, kept_count
from spaces.presets import paper_presets, tome_r_per_block


@pytest.fixture(scope="module")
def deit_s():
    return model_spec("deit_small_patch16_224")


# REFERENCE.md, DeiT-S. Paper values are printed to one decimal (two for PPT).
TOME = {"tome:8": 3.4, "tome:13": 2.7, "tome:16": 2.3}
EVIT = {"evit:0.9": 4.0, "evit:0.8": 3.5, "evit:0.7": 3.0, "evit:0.6": 2.6, "evit:0.5": 2.3}
IDLEVIT = {f"idlevit:{k}": g for k, g in zip((0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3), (4.0, 3.5, 3.1, 2.7, 2.4, 2.1, 1.9), strict=True)}
# The papers count the model's matrix products only (no LayerNorm, no reducer overhead:
# PITFALLS 2); IdleViT also counts the keys it ranks with, which our overhead term holds.
# EViT 0.6: the token counts REFERENCE.md prescribes (197 -> 120 -> 74 -> 46) give 2.635 GMACs
# in the paper's own convention, which the paper prints as 2.6: 0.03 is out of reach for that
# row; it must still round to the paper's value.
ROUNDED_ONLY = {"evit:0.6"}


def test_unreduced_deit_s_is_4_6(deit_s) -> None:
    assert gmacs(Schedule.empty(deit_s)) == pytest.approx(4.6, abs=0.03)


@pytest.mark.parametrize("preset,paper", list(TOME.items()) + list(EVIT.items()) + [("ppt", 2.94)])
def test_presets_reproduce_paper_gmacs(deit_s, preset: str, paper: float) -> None:
    schedule = from_preset(preset, deit_s)
    ours = gmacs(schedule, norms=False, overhead=False)
    if preset in ROUNDED_ONLY:
        assert round(ours, 1) == paper and abs(ours - paper) < 0.04, (preset, ours)
    else:
        assert ours == pytest.approx(paper, abs=0.03), (preset, ours)
    # What really runs (LayerNorm and the reducer's own matmuls included) stays within 0.05.
    assert gmacs(schedule) == pytest.approx(paper, abs=0.05)


@pytest.mark.parametrize("preset,paper", list(IDLEVIT.items()))
def test_idlevit_within_0_1_of_paper(deit_s, preset: str, paper: float) -> None:
    schedule = from_preset(preset, deit_s)
    assert gmacs(schedule, norms=False) == pytest.approx(paper, abs=0.1)
    assert gmacs(schedule) == pytest.approx(paper, abs=0.1)


def test_idlevit_code_layout_is_3_24_at_0_7(deit_s) -> None:
    # REFERENCE.md: the official code idles blocks 4-11 in stages 3/3/2 -> 3.24 at k=0.7
    assert gmacs(from_preset("idlevit-code:0.7", deit_s)) == pytest.approx(3.24, abs=0.03)


def test_token_counts_of_the_papers(deit_s) -> None:
    tome13 = from_preset("tome:13", deit_s)
    assert tome13.tokens_entering()[:2] == [197, 184] and tome13.tokens_entering()[11] == 54
    assert breakdown(tome13)[-1].tokens_out == 41
    evit = from_preset("evit:0.7", deit_s).tokens_entering()
    assert (evit[3], evit[4], evit[7], evit[10]) == (197, 140, 100, 72)
    ppt = from_preset("ppt", deit_s)
    assert [ppt.tokens_entering()[i] for i in (3, 4, 7, 10)] == [197, 147, 97, 49]


# DiffRate's own count (DiffRate/patch/deit.py, calculate_flop_inference: qkv, proj, QK^T and AV at
# the incoming N, the MLP at the kept N, patch embedding and head; no norms, no merge matmul),
# recomputed for each published DeiT-S schedule; the README prints 2.905 for "2.9".
DIFFRATE = {"diffrate:2.3": 2.327226, "diffrate:2.5": 2.504742, "diffrate:2.7": 2.709187,
            "diffrate:2.9": 2.905256, "diffrate:3.1": 3.107984}


@pytest.mark.parametrize("preset,theirs", list(DIFFRATE.items()))
def test_diffrate_presets_reproduce_the_published_gmacs(deit_s, preset: str, theirs: float) -> None:
    schedule = from_preset(preset, deit_s)
    ours = gmacs(schedule, norms=False, overhead=False)
    assert ours == pytest.approx(float(preset.split(":")[1]), abs=0.03)
    # Their formula counts the class token as a patch in the embedding (+0.0003 G), nothing else differs.
    assert ours == pytest.approx(theirs, abs=0.001)
    assert gmacs(schedule) == pytest.approx(theirs, abs=0.05)


def test_diffrate_token_counts_follow_the_published_lists(deit_s) -> None:
    schedule = from_preset("diffrate:2.9", deit_s)
    rows = breakdown(schedule)
    assert [r.tokens_out for r in rows] == [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]
    assert schedule.layers[0].method == "none" and schedule.layers[1].kept == (195, 193)
    # "2.5": blocks 6 and 7 publish prune counts above what enters them (no-ops, as in their code).
    rows = breakdown(from_preset("diffrate:2.5", deit_s))
    assert [r.tokens_out for r in rows] == [197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3]
    assert "diffrate:2.9" in paper_presets("deit_small_patch16_224")
    assert not any(p.startswith("diffrate") for p in paper_presets("deit_tiny_patch16_224"))


@pytest.mark.parametrize("preset,match", [
    ("diffrate:2.8", "no DiffRate schedule at '2.8'.*diffrate:2.3, diffrate:2.5, diffrate:2.7, diffrate:2.9, diffrate:3.1"),
    ("diffrate", "e.g. diffrate:2.9"),
])
def test_diffrate_bad_levels(deit_s, preset: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_preset(preset, deit_s)


def test_diffrate_for_a_model_without_a_published_schedule() -> None:
    with pytest.raises(ValueError, match="no schedule for deit_tiny_patch16_224; available: deit_small_patch16_224"):
        from_preset("diffrate:2.9", model_spec("deit_tiny_patch16_224"))


def test_idlevit_active_counts_are_the_official_int(deit_s) -> None:
    # IdleViT's code: int(196 * k**s) patch tokens active, CLS on top: 137.2, 96.04, 67.23 at k=0.7.
    schedule = from_preset("idlevit:0.7", deit_s)
    assert [p.active(196) for p in schedule.layers[3::3]] == [137, 96, 67]
    assert [p.method for p in schedule.layers] == ["none"] * 3 + ["idle"] * 9  # infer.py: blocks 3-11
    code = from_preset("idlevit-code:0.7", deit_s)
    assert [p.method for p in code.layers] == ["none"] * 4 + ["idle"] * 8  # main.py: blocks 4-11
    assert [p.active(196) for p in code.layers[4:]] == [137] * 3 + [96] * 3 + [67] * 2
    assert LayerPlan("idle", keep=0.7, rank="softmax").active(196) == 138  # our variant: ceil


def test_ppt_threshold_is_official_on_196_patches_and_scaled_elsewhere(deit_s) -> None:
    assert from_preset("ppt", deit_s).layers[3].threshold == 7e-5
    embedded = dataclasses.replace(deit_s, name="small", num_patches=64)
    assert from_preset("ppt", embedded).layers[3].threshold == pytest.approx(7e-5 * (196 / 64) ** 2)


def test_schema_1_files_load_as_the_rules_they_were_made_with(deit_s) -> None:
    old = from_preset("evit:0.7", deit_s).to_dict()
    old["schema_version"] = 1
    for plan in old["layers"]:
        plan.pop("fuse_weights", None)
    old["layers"][0] = {"method": "idle", "keep": 0.7}
    loaded = Schedule.from_dict(old)
    assert loaded.layers[3].fuse_weights == "normalized" and loaded.layers[0].rank == "softmax"
    assert Schedule.from_dict(from_preset("evit:0.7", deit_s).to_dict()).layers[3].fuse_weights == "raw"


def test_tome_decreasing_schedule() -> None:
    assert tome_r_per_block(12, 8, -1.0)[0] == 16 and tome_r_per_block(12, 8, -1.0)[-1] == 0
    assert tome_r_per_block(12, 8) == [8] * 12


def test_counting_rule() -> None:
    assert kept_count(196, 0.7) == 138 and kept_count(139, 0.7) == 98 and kept_count(10, 1.0) == 10
    assert kept_count(140, 0.7) == 98  # 0.7 * 140 = 98.00000000000001 in floating point
    assert kept_count(5, 0.01) == 1
    assert LayerPlan("merge", r=100).removed(97) == 48  # bipartite: at most n // 2


@pytest.mark.parametrize("preset", paper_presets("deit_small_patch16_224") + ["tome:13,-1", "idlevit-code:0.5", "ppt:30", "none"])
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_round_trip(deit_s, tmp_path, preset: str, fmt: str) -> None:
    schedule = from_preset(preset, deit_s)
    path = schedule.save(tmp_path / f"s.{fmt}")
    assert Schedule.load(path) == schedule
    assert Schedule.from_text(path.read_text()).to_dict() == schedule.to_dict()


def test_frozen(deit_s) -> None:
    schedule = from_preset("evit:0.7", deit_s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.name = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.layers[3].keep = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "drop"}, "unknown method"),
    ({"method": "prune", "keep": 0.0}, "keep must be in"),
    ({"method": "prune", "keep": 1.5}, "keep must be in"),
    ({"method": "prune", "r": 3}, "r is only for"),
    ({"method": "merge", "r": -1}, "non-negative"),
    ({"method": "condense", "order": 0}, "order"),
    ({"method": "condense", "alpha": 2.0}, "alpha"),
    ({"method": "condense", "weighting": "mean"}, "unknown weighting"),
    ({"method": "prune", "fuse_weights": "mean"}, "unknown fuse_weights"),
    ({"method": "idle", "rank": "random"}, "unknown rank"),
    ({"method": "diffrate", "merge_keep": 0.0}, "merge_keep"),
    ({"method": "diffrate", "kept": (5,)}, "two positive integers"),
    ({"method": "prune", "kept": (5, 3)}, "only for diffrate"),
])
def test_layer_plan_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayerPlan(**kwargs)


@pytest.mark.parametrize("preset,match", [
    ("magic:3", "unknown preset"), ("evit", "needs an argument"), ("evit:x", "not a number"),
    ("evit:1.5", "keep must be in"), ("tome:1,2,3", "expected tome"), ("none:3", "no arguments"),
])
def test_bad_presets(deit_s, preset: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_preset(preset, deit_s)


def test_wrong_depth_and_malformed_files(deit_s, tmp_path) -> None:
    with pytest.raises(ValueError, match="depth 12"):
        Schedule(deit_s, (LayerPlan(),) * 6)
    bad = tmp_path / "bad.yaml"
    for text, match in [("layers: [", "malformed"), ("[1, 2]", "malformed"), ("schema_version: 99", "schema_version"),
                        ("schema_version: 1\nmodel: {}\nlayers: []", "missing keys")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            Schedule.load(bad)
    with pytest.raises(ValueError, match="not found"):
        Schedule.load(tmp_path / "missing.yaml")


def test_model_spec_of_meta_model_has_no_weights() -> None:
    spec = model_spec("deit_tiny_patch16_224")
    assert (spec.depth, spec.embed_dim, spec.tokens) == (12, 192, 197)


def test_effective_key_equates_schedules_that_run_the_same(deit_s) -> None:
    from dataclasses import replace

    from spaces.presets import effective_key

    tome = from_preset("tome:8", deit_s)
    entering = tome.patch_tokens_entering()
    as_keeps = replace(tome, layers=tuple(LayerPlan("merge", keep=(n - p.removed(n)) / n)
                                          for p, n in zip(tome.layers, entering, strict=False)))
    assert effective_key(as_keeps) == effective_key(tome)  # r and keep ratio giving the same counts
    idle_first = replace(tome, layers=(LayerPlan("idle", keep=1.0), *tome.layers[1:]))
    assert effective_key(idle_first) != effective_key(tome)  # block 0 no longer merges
    late = tome.layers[:-1] + (LayerPlan("condense", keep=1.0),)
    assert effective_key(replace(tome, layers=late)) == effective_key(replace(tome, layers=tome.layers[:-1] + (LayerPlan(),)))
    assert effective_key(replace(tome, prop_attn=False)) != effective_key(tome)
