"""The embedded default: generated data, the shipped model, and evaluation on it."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import search.embedded as embedded
from run_search import main
from search import synthetic
from search.data import embedded_set
from search.evaluate import evaluate, predict
from search.models import load_model
from spaces import ModelSpec, Schedule
from spaces.presets import paper_presets

needs_weights = pytest.mark.skipif(not embedded.WEIGHTS.is_file(),
                                   reason="the embedded default's weights are not trained yet (issue 3)")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model()


@pytest.fixture(scope="module")
def heldout():
    return embedded_set(2000)


@pytest.fixture(scope="module")
def reference(model, heldout) -> torch.Tensor:
    return predict(model, heldout)


def test_splits_are_seeded_balanced_and_distinct() -> None:
    a, b = synthetic.make_split("heldout", 200), synthetic.make_split("heldout", 200)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    train = synthetic.make_split("train", 200)
    assert not torch.equal(train[0], a[0])
    assert a[0].dtype == torch.uint8 and a[0].shape == (200, 3, 64, 64)
    assert torch.bincount(a[1], minlength=10).tolist() == [20] * 10


def test_object_covers_a_minority_of_patches() -> None:
    """The largest object (28 px across) touches at most ~4.5 x 4.5 of the 8 x 8 patches."""
    assert embedded.ARCH["img_size"] // embedded.ARCH["patch_size"] == 8
    half_size_px = max(synthetic._HALF_SIZE)  # the largest object spans 2 * 14 = 28 px
    covered = (2 * half_size_px / 8 + 1) ** 2  # at most ~4.5 x 4.5 patches
    assert covered < 64 / 2


@needs_weights
def test_pretrained_loads_the_shipped_weights_offline() -> None:
    model = timm.create_model(embedded.NAME, pretrained=True)
    assert embedded.WEIGHTS.is_file() and embedded.WEIGHTS.stat().st_size <= 25 * 2**20
    spec = ModelSpec.from_model(model)
    assert spec.depth == 12 and spec.num_patches >= 64
    from safetensors.torch import load_file

    shipped = load_file(str(embedded.WEIGHTS))
    torch.testing.assert_close(model.state_dict()["head.weight"], shipped["head.weight"])


@needs_weights
def test_unreduced_accuracy_is_at_least_90(model, heldout, reference) -> None:
    top1 = (reference.argmax(1) == heldout.labels).float().mean().item()
    assert top1 >= 0.90, top1


@needs_weights
def test_every_preset_evaluates_and_empty_agrees_exactly(model, heldout, reference) -> None:
    spec = ModelSpec.from_model(model)
    empty = evaluate(model, Schedule.empty(spec), heldout, reference)
    assert empty["agreement"] == 1.0
    for preset in paper_presets()[::4] + ["tome:4,-1", "idlevit-code:0.7"]:
        out = evaluate(model, Schedule.from_preset(preset, spec), heldout, reference)
        assert 0.0 <= out["top1"] <= 1.0 and out["gmacs"] < empty["gmacs"], preset


@needs_weights
def test_eval_cli_on_the_embedded_default(capsys) -> None:
    assert main(["eval", "--preset", "tome:4", "--num-images", "500", "--repeats", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == embedded.NAME and out["num_images"] == 500
    assert out["images_per_s"] > 0 and out["speedup_min"] <= out["speedup"] <= out["speedup_max"]
