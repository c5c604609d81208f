"""Evaluation, data loading and model loading on small random models and generated folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from run_search import main
from search.data import balanced_subset, folder_set
from search.evaluate import AUTO_BATCH, accuracy, eval_batch_size, evaluate, predict, throughput, timed_pairs
from search.models import data_config, load_checkpoint
from spaces import ModelSpec, Schedule, from_preset
from tests.images import write_image_folder

TINY = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(TINY, img_size=64, num_classes=3).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of random images (sizes vary) and one corrupt file."""
    return write_image_folder(tmp_path_factory.mktemp("imagefolder"), classes=3, per_class=5, height_step=7, width=50)


def test_folder_set_decodes_balanced_subset_and_skips_corrupt(tiny, folder: Path) -> None:
    data = folder_set(folder, data_config(tiny), num_images=16, seed=0, workers=0)
    assert data.skipped == 1 and len(data) == 15
    assert data.images.dtype == torch.uint8 and data.images.shape[1:] == (3, 64, 64)
    assert sorted(data.labels.tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    x, _ = next(data.batches(4))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 64, 64)


def test_balanced_subset_is_fixed_and_balanced() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 20
    a, b = balanced_subset(labels, 30, seed=3), balanced_subset(labels, 30, seed=3)
    assert a == b and len(set(a)) == 30
    assert [sum(labels[i] == c for i in a) for c in range(3)] == [10, 10, 10]
    assert balanced_subset(labels, 30, seed=4) != a


def test_empty_schedule_agrees_exactly_and_reduction_is_scored(tiny, folder: Path) -> None:
    data = folder_set(folder, data_config(tiny), num_images=15, seed=0, workers=0)
    reference = predict(tiny, data, batch_size=4)
    spec = ModelSpec.from_model(tiny)
    same = evaluate(tiny, Schedule.empty(spec), data, reference, batch_size=4)
    assert same["agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-7)
    assert same["gmacs"] == same["baseline_gmacs"]
    reduced = evaluate(tiny, from_preset("tome:4", spec), data, reference, batch_size=4)
    assert reduced["gmacs"] < same["gmacs"] and 0.0 <= reduced["agreement"] <= 1.0
    assert type(tiny).__name__ == "VisionTransformer"  # evaluate leaves the model unpatched


def test_accuracy_known_answer() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 2.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    out = accuracy(logits, labels, reference=torch.tensor([[1.0, 0.0, 0.0]] * 3))
    assert out.top1 == pytest.approx(2 / 3) and out.top5 == 1.0 and out.agreement == pytest.approx(1 / 3)
    unlabeled = accuracy(logits, torch.full((3,), -1), reference=logits)
    assert unlabeled.top1 is None and unlabeled.agreement == 1.0 and unlabeled.kl == pytest.approx(0.0, abs=1e-7)


def test_timed_pairs_alternate_abba() -> None:
    order: list[str] = []

    def timer(name: str, seconds: float):
        def time_it() -> float:
            order.append(name)
            return seconds
        return time_it

    base, cand = timed_pairs(timer("base", 2.0), timer("cand", 1.0), repeats=3)
    assert order == ["base", "cand", "cand", "base", "base", "cand"]
    assert base == [2.0] * 3 and cand == [1.0] * 3


def test_throughput_positive_and_repeatable(tiny) -> None:
    schedule = from_preset("tome:4", tiny)
    # One forward of this model takes a few ms, so a sample must repeat it to outlast timer noise.
    runs = [throughput(tiny, schedule, batch_size=8, warmup=2, repeats=7, min_time_s=0.2) for _ in range(2)]
    for run in runs:
        assert run.images_per_s > 0 and run.baseline_images_per_s > 0
        assert run.speedup_min <= run.speedup <= run.speedup_max
        assert run.calls_per_sample > 1
    # Two measurements of the same thing overlap within their reported spreads.
    assert runs[0].speedup_min <= runs[1].speedup_max and runs[1].speedup_min <= runs[0].speedup_max


def test_checkpoint_round_trip_and_mismatch(tiny, tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(good))
    fresh = timm.create_model(TINY, img_size=64, num_classes=3)
    load_checkpoint(fresh, good)
    torch.testing.assert_close(fresh.state_dict()["head.weight"], tiny.state_dict()["head.weight"])
    other = timm.create_model("deit_small_patch16_224", img_size=64, num_classes=3)
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(other, good)
    pth = tmp_path / "wrapped.pth"
    torch.save({"model": tiny.state_dict(), "epoch": 3}, pth)
    load_checkpoint(fresh, pth)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_cli_json_on_a_folder(tiny, folder: Path, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(TINY, num_classes=3).state_dict().items()}, str(ckpt))
    code, out, err = _run(["eval", "--model", TINY, "--checkpoint", str(ckpt), "--data", str(folder),
                           "--preset", "evit:0.7", "--timing-batch", "4", "--repeats", "2", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    for key in ("top1", "top5", "agreement", "gmacs", "images_per_s", "speedup"):
        assert key in result
    assert result["num_images"] == 15 and result["skipped_images"] == 1 and "skipped 1" in err


@pytest.mark.parametrize("case", ["missing dir", "empty dir", "no images", "unknown model", "bad checkpoint",
                                  "missing checkpoint", "no network", "bad count", "bad batch",
                                  "batch not a number"])
def test_eval_bad_input(case: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hello")
    small = tmp_path / "small.safetensors"
    save_file({"head.weight": torch.zeros(3, 7)}, str(small))
    base = ["eval", "--model", TINY, "--preset", "none", "--no-timing"]
    argv, match = {
        "missing dir": (base + ["--data", str(tmp_path / "nope")], "data directory not found"),
        "empty dir": (base + ["--data", str(tmp_path / "empty")], "no images"),
        "no images": (base + ["--data", str(tmp_path / "text")], "no images"),
        "unknown model": (["eval", "--model", "vit_nonexistent", "--preset", "none"], "unknown model"),
        "bad checkpoint": (base + ["--checkpoint", str(small)], "does not fit"),
        "missing checkpoint": (base + ["--checkpoint", str(tmp_path / "x.pth")], "checkpoint not found"),
        "no network": (base + ["--pretrained"], "could not load pretrained weights"),
        "bad count": (base + ["--num-images", "0"], "must be positive"),
        "bad batch": (base + ["--batch-size", "0"], "must be positive"),
        "batch not a number": (base + ["--batch-size", "big"], "'big' is not an integer"),
    }[case]
    code, out, err = _run(argv, capsys)
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err


def test_class_folders_that_are_not_the_models_classes_are_unlabelled(tiny, folder: Path, capsys) -> None:
    data = folder_set(folder, data_config(tiny), num_images=16, seed=0, workers=0, num_classes=1000)
    assert not data.has_labels and len(data) == 15 and data.skipped == 1
    assert "3 class folders but the model has 1000 classes" in capsys.readouterr().err


def test_make_data_folder_scores_like_the_embedded_tensors(tmp_path: Path, capsys) -> None:
    root = tmp_path / "val"
    code, out, err = _run(["make-data", str(root), "--num-images", "60"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in root.iterdir())[:2] == ["00_hstripes_few", "01_hstripes_many"]
    assert sum(1 for _ in root.rglob("*.png")) == 60
    scores = []
    for data in ([], ["--data", str(root)]):
        code, out, err = _run(["eval", "--preset", "none", "--no-timing", "--num-images", "60", "--json", *data], capsys)
        assert code == 0, err
        scores.append(json.loads(out)["top1"])
    assert scores[0] == scores[1] > 0.8  # PNG is lossless and the folder order is the class order
    before = sorted(root.rglob("*.png"))
    code, out, err = _run(["make-data", str(root)], capsys)
    assert code == 2 and err.count("\n") == 1 and "nothing is overwritten" in err
    code, out, err = _run(["make-data", str(tmp_path / "none"), "--num-images", "0"], capsys)
    assert code == 2 and err.count("\n") == 1 and "must be positive" in err and not (tmp_path / "none").exists()
    assert sorted(root.rglob("*.png")) == before


def test_auto_batch_size_is_per_device_type_and_a_number_is_kept() -> None:
    assert eval_batch_size("auto", "cpu") == AUTO_BATCH["cpu"] == 64
    assert eval_batch_size("auto", "cuda:1") == AUTO_BATCH["cuda"]
    assert eval_batch_size(48, "cpu") == 48
