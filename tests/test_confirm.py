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
