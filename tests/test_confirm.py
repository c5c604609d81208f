"""The confirmation images are disjoint from the screening images (issue 18 item 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from search.data import balanced_subset, disjoint_subset, embedded_set, folder_set, load_confirm_set
from search.embedded.synthetic import write_folder


def _rows(images: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in images}


def test_disjoint_subset_never_overlaps_the_screening_subset() -> None:
    labels = [i % 7 for i in range(300)]
    screen = balanced_subset(labels, 120, seed=3)
    confirm = disjoint_subset(labels, 140, seed=3, set_aside=120)
    assert len(confirm) == 140 and not set(screen) & set(confirm)
    assert confirm == disjoint_subset(labels, 140, seed=3, set_aside=120)  # seeded, fixed
    counts = torch.bincount(torch.tensor([labels[i] for i in confirm]))
    assert counts.max() - counts.min() <= 1  # class-balanced
    with pytest.raises(ValueError, match="181 confirmation images requested but the data holds 300 images, 120"):
        disjoint_subset(labels, 181, seed=3, set_aside=120)


def test_embedded_confirmation_images_are_other_images() -> None:
    screen = embedded_set(200, seed=0)
    confirm = load_confirm_set(None, {}, num_images=200, screen_images=200, seed=0)
    assert len(confirm) == 200 and confirm.source != screen.source
    assert not _rows(screen.images) & _rows(confirm.images)


def test_folder_confirmation_images_are_disjoint_files(tmp_path: Path) -> None:
    write_folder(tmp_path / "val", "heldout", 60)
    cfg = {"input_size": (3, 64, 64), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
           "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    screen = folder_set(tmp_path / "val", cfg, num_images=30, seed=0, workers=0)
    confirm = load_confirm_set(str(tmp_path / "val"), cfg, num_images=30, screen_images=30, seed=0)
    assert len(screen) == len(confirm) == 30
    assert not _rows(screen.images) & _rows(confirm.images)  # together: all 60 images, each once
    assert len(_rows(screen.images) | _rows(confirm.images)) == 60


def test_a_searched_trial_running_a_presets_trimmed_tail_is_confirmed_even_off_the_screening_front(tmp_path: Path) -> None:
    """The confirmation candidates: every preset, the searched screening front, and the searched
    trials that run a preset's trimmed tail, chosen by what they run (not by their scores); another
    searched trial off the front is not confirmed."""
    import optuna

    from search.config import SearchConfig
    from search.fixed_stage import _confirm_candidates
    from search.models import model_spec
    from search.worker import WorkerSetup
    from spaces import Schedule, from_preset, gmacs
    from spaces.search_space import SearchSpace, preset_params, trimmed_tail

    spec = model_spec("tokensched_vit_shapes")
    baseline = gmacs(Schedule.empty(spec))
    space = SearchSpace("per-layer", spec, budget_gmacs=0.65 * baseline, min_gmacs=0.16 * baseline)
    params = preset_params(from_preset("tome:4", spec), space)
    trim = space(optuna.trial.FixedTrial(trimmed_tail(params, space)))
    shaved = space(optuna.trial.FixedTrial({**params, "budget.fraction": 0.9 * params["budget.fraction"]}))

    def record(name: str, schedule: Schedule, accuracy: float, **extra) -> dict:  # type: ignore[no-untyped-def]
        return {"ray_trial": name, "fidelity": "screen", "state": "COMPLETE", "accuracy": accuracy,
                "gmacs": gmacs(schedule), "predicted_speedup": baseline / gmacs(schedule), "feasible": True,
                "schedule": schedule.to_dict(), **extra}

    best = from_preset("tome:8", spec)  # cheaper than both and more accurate: alone on the searched front
    records = [record("tome:4", from_preset("tome:4", spec), 0.98, preset="tome:4", params=params),
               record("best", best, 0.99), record("trim", trim, 0.98), record("shaved", shaved, 0.97)]
    cfg = SearchConfig(setup=WorkerSetup(space=space), budget="65%", out=tmp_path, presets=True)
    assert [r["ray_trial"] for r in _confirm_candidates(cfg, records)] == ["tome:4", "best", "trim"]


def test_unreduced_reference_reads_each_image_sets_accuracy_and_is_none_for_older_runs() -> None:
    from search.outcome import unreduced_reference

    records = [{"fidelity": "screen", "preset": "tome:8", "unreduced_accuracy": 0.991},
               {"fidelity": "stopped", "preset": "evit:0.5", "unreduced_accuracy": 0.991},
               {"fidelity": "screen", "trial": 3},  # a searched trial: not recorded there
               {"fidelity": "confirm", "preset": "tome:8", "unreduced_accuracy": 0.9855}]
    assert unreduced_reference(records, 4.6) == {"gmacs": 4.6, "screen_accuracy": 0.991, "confirmed_accuracy": 0.9855}
    assert unreduced_reference(records[:3], 4.6) == {"gmacs": 4.6, "screen_accuracy": 0.991, "confirmed_accuracy": None}
    assert unreduced_reference([{k: v for k, v in r.items() if k != "unreduced_accuracy"} for r in records], 4.6) is None
