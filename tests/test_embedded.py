"""The embedded default: generated data, the shipped model, and evaluation on it."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch

import search.embedded as embedded
from run_search import main
from search.data import embedded_set
from search.embedded import synthetic
from search.embedded.train import boundary_at, lr_at
from search.embedded.train import main as train_main
from search.evaluate import evaluate, predict
from search.models import load_model
from spaces import ModelSpec, Schedule, from_preset
from spaces.presets import paper_presets

needs_weights = pytest.mark.skipif(not embedded.WEIGHTS.is_file(),
                                   reason="the embedded default's weights are not trained yet")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model()


@pytest.fixture(scope="module")
def heldout():
    return embedded_set(2000)


@pytest.fixture(scope="module")
def reference(model, heldout) -> torch.Tensor:
    return predict(model, heldout)


def test_same_seed_gives_identical_tensors() -> None:
    a, b = synthetic.make_split("heldout", 200), synthetic.make_split("heldout", 200)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c, d = synthetic.stream_batch(7, 32, seed=3), synthetic.stream_batch(7, 32, seed=3)
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


def test_splits_and_stream_come_from_different_seeds() -> None:
    heldout = synthetic.make_split("heldout", 200)
    train = synthetic.make_split("train", 200)
    other_seed = synthetic.make_split("heldout", 200, seed=1)
    stream = synthetic.stream_batch(0, 200)
    for images, _ in (train, other_seed, stream):
        assert not torch.equal(images, heldout[0])
    assert not torch.equal(synthetic.stream_batch(1, 200)[0], stream[0])
    with pytest.raises(ValueError, match="unknown split"):
        synthetic.make_split("val", 10)


def test_shapes_ranges_and_class_balance() -> None:
    images, labels = synthetic.make_split("heldout", 200)
    assert images.dtype == torch.uint8 and images.shape == (200, 3, 64, 64)
    assert labels.dtype == torch.long and labels.shape == (200,)
    assert torch.bincount(labels, minlength=10).tolist() == [20] * synthetic.NUM_CLASSES
    assert len(synthetic.CLASS_NAMES) == synthetic.NUM_CLASSES == 10
    floats = synthetic.to_float(images)
    assert floats.min() >= 0.0 and floats.max() <= 1.0 and floats.std() > 0.1
    normed = synthetic.normalize(images)
    assert abs(normed.mean().item()) < 0.2 and 0.7 < normed.std().item() < 1.3
    dataset = synthetic.SyntheticShapes("heldout", 200)
    image, label = dataset[5]
    assert len(dataset) == 200 and image.shape == (3, 64, 64) and label == int(labels[5])
    torch.testing.assert_close(image, normed[5])


def test_objects_cover_a_minority_of_patches() -> None:
    images, labels, masks = synthetic.make_images(1000, synthetic.split_generator("heldout"), return_mask=True)
    assert torch.equal(images, synthetic.make_split("heldout", 1000)[0])  # the masks change nothing
    assert masks.shape == (1000, 2, 64, 64) and not (masks[:, 0] & masks[:, 1]).any()  # apart
    grid = embedded.ARCH["img_size"] // embedded.ARCH["patch_size"]
    assert grid == 8
    touched = masks.view(-1, 2, grid, 8, grid, 8).any(dim=5).any(dim=3)  # [N, 2, 8, 8] patches hit
    assert not (touched[:, 0] & touched[:, 1]).any()  # no patch shows both the body and a tile
    union = touched.any(dim=1).sum(dim=(1, 2)).float()
    assert union.min() >= 5 and union.max() < 32  # always a minority of the 64 patches
    assert 10 <= union.mean() <= 20
    # The count half of the label is the number of tile tokens: one patch per tile.
    body, tiles = touched.sum(dim=(2, 3)).unbind(1)
    assert body.min() >= 4
    many = labels % len(synthetic.COUNTS) == synthetic.COUNTS.index("many")
    assert set(tiles[~many].tolist()) == {1, 2, 3} and set(tiles[many].tolist()) == {4, 5, 6}
    assert torch.equal(synthetic.tiles_per_image(masks), tiles)
    cells = masks[:, 1].view(-1, grid, 8, grid, 8).sum(dim=(2, 4))  # tile pixels per patch
    assert (cells[cells > 0] >= 20).all()  # each tile sits whole inside its patch (5.6 px or more across)
    assert torch.equal(synthetic.tile_patches(masks), (cells > 0).flatten(1))  # raster order, as the tokens
    assert synthetic.TILE_COUNTS == {"few": (1, 3), "many": (4, 6)}


def _tiles_of_few_and_many(num_images: int, split: str, seed: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles per image of the generated "few" images and of the "many" images."""
    _, labels, masks = synthetic.make_images(num_images, synthetic.split_generator(split, seed), return_mask=True, **kw)
    tiles = synthetic.tiles_per_image(masks)
    many = labels % len(synthetic.COUNTS) == synthetic.COUNTS.index("many")
    return tiles[~many], tiles[many]


def test_count_curriculum_leaves_out_three_tiles_only_when_asked() -> None:
    def tiles_per_class(**kw):  # the tile counts that occur, for "few" and "many" images
        few, many = _tiles_of_few_and_many(400, "train", 5, **kw)
        return set(few.tolist()), set(many.tolist())

    assert tiles_per_class() == ({1, 2, 3}, {4, 5, 6})
    assert tiles_per_class(boundary=False) == ({1, 2}, {4, 5, 6})
    args = argparse.Namespace(count_gap=0.4)
    assert [boundary_at(s, 100, args) for s in (0, 39, 40, 99)] == [False, False, True, True]
    assert boundary_at(0, 100, argparse.Namespace(count_gap=0.0))


def test_most_images_sit_next_to_the_class_boundary() -> None:
    def share_at_boundary(**kw):  # share of "few" images with 3 tiles and of "many" images with 4
        few, many = _tiles_of_few_and_many(4000, "heldout", 3, **kw)
        return (few == 3).float().mean().item(), (many == 4).float().mean().item()

    few, many = share_at_boundary()
    assert synthetic.BOUNDARY_SHARE == 0.9
    assert abs(few - 0.9 - 0.1 / 3) < 0.025 and abs(many - 0.9 - 0.1 / 3) < 0.025  # 90 % plus a third of the rest
    few, many = share_at_boundary(boundary=False)  # the curriculum: no 3, every other count uniform
    assert few == 0.0 and abs(many - 1 / 3) < 0.03


def test_lr_schedule_warms_up_then_decays() -> None:
    lrs = [lr_at(s, total=100, warmup=10, peak=1.0, final=0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and lrs[-1] < 0.02


def test_training_command_repeats_exactly_and_keeps_existing_weights(tmp_path, capsys) -> None:
    """The shipped weights are reproducible because a run is a pure function of its arguments."""
    from safetensors.torch import load_file

    argv = ["--steps", "3", "--batch-size", "8", "--warmup-steps", "1", "--eval-images", "20", "--threads", "1"]
    weights = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert train_main(["--out", str(out), "--run-dir", str(out), *argv]) == 0
        weights.append(load_file(str(out / embedded.WEIGHTS.name)))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 3 and 0.0 <= summary["heldout_top1"] <= 1.0
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
    first = tmp_path / "a" / embedded.WEIGHTS.name
    before = first.read_bytes()
    capsys.readouterr()
    assert train_main(["--out", str(tmp_path / "a"), "--run-dir", str(tmp_path / "a"), *argv]) == 2
    assert "--overwrite" in capsys.readouterr().err and first.read_bytes() == before


@pytest.mark.parametrize("argv,flag", [(["--steps", "3", "--count-gap", "1.5"], "--count-gap"),
                                       (["--steps", "3", "--count-gap", "-0.1"], "--count-gap"),
                                       (["--steps", "3", "--clutter-start", "2"], "--clutter-start"),
                                       (["--steps", "0"], "--steps")])
def test_training_command_refuses_bad_fractions_and_lengths(tmp_path, capsys, argv, flag) -> None:
    assert train_main(["--out", str(tmp_path / "w"), "--run-dir", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and flag in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()  # nothing written


def test_architecture_is_a_plain_12_block_vit() -> None:
    model = timm.create_model(embedded.NAME)
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    assert len(model.blocks) == 12 and model.num_prefix_tokens == 1 and model.global_pool == "token"
    assert model.patch_embed.num_patches == 64
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 64, 64) and cfg["num_classes"] == 10 and cfg["crop_pct"] == 1.0
    assert tuple(cfg["mean"]) == synthetic.MEAN and tuple(cfg["std"]) == synthetic.STD


def test_pooled_variant_has_no_class_token_and_trains_under_its_own_name(tmp_path) -> None:
    from search.models import model_spec

    model = timm.create_model(embedded.NAME_GAP)
    assert model.num_prefix_tokens == 0 and model.cls_token is None and model.global_pool == "avg"
    spec = model_spec(embedded.NAME_GAP)
    assert not spec.class_token and spec.depth == 12 and spec.num_patches == 64
    argv = ["--steps", "1", "--batch-size", "4", "--warmup-steps", "1", "--eval-images", "10", "--threads", "1"]
    assert train_main(["--model", embedded.NAME_GAP, "--out", str(tmp_path), "--run-dir", str(tmp_path), *argv]) == 0
    trained = timm.create_model(embedded.NAME_GAP, pretrained=True,
                                pretrained_cfg_overlay={"file": str(tmp_path / f"{embedded.NAME_GAP}.safetensors")})
    assert trained.pos_embed.shape == (1, 64, 128)


@needs_weights
def test_pretrained_loads_the_shipped_weights_offline() -> None:
    model = timm.create_model(embedded.NAME, pretrained=True)
    assert embedded.WEIGHTS.is_file() and embedded.WEIGHTS.stat().st_size <= 25 * 2**20
    spec = ModelSpec.from_model(model)
    assert spec.depth == 12 and spec.num_patches >= 64
    from safetensors.torch import load_file

    shipped = load_file(str(embedded.WEIGHTS))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, shipped[key], rtol=0, atol=0)


@needs_weights
def test_unreduced_accuracy_is_at_least_90(model, heldout, reference) -> None:
    top1 = (reference.argmax(1) == heldout.labels).float().mean().item()
    assert top1 >= 0.90, top1


@needs_weights
def test_every_preset_evaluates_and_empty_agrees_exactly(model) -> None:
    few = embedded_set(128)  # screening-sized, keeps the test fast
    reference = predict(model, few)
    spec = ModelSpec.from_model(model)
    empty = evaluate(model, Schedule.empty(spec), few, reference)
    assert empty["agreement"] == 1.0
    for preset in paper_presets()[::4] + ["tome:4,-1", "idlevit-code:0.7"]:
        out = evaluate(model, from_preset(preset, spec), few, reference)
        assert 0.0 <= out["top1"] <= 1.0 and out["gmacs"] < empty["gmacs"], preset


@needs_weights
def test_eval_cli_on_the_embedded_default(capsys) -> None:
    assert main(["eval", "--preset", "tome:4", "--num-images", "200", "--repeats", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == embedded.NAME and out["num_images"] == 200
    assert out["images_per_s"] > 0 and out["speedup_min"] <= out["speedup"] <= out["speedup_max"]
