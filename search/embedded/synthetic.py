"""The embedded default data set: seeded splits, the training stream, normalisation, PNG folders.

The images come from ``search.embedded.draw`` (what each image holds and how the label is made);
this module fixes the seeds and hands them out. Public API (the drawing's names are re-exported):

- ``make_images(num_images, generator, *, return_mask=False, clutter=1.0, boundary=True)``: images
  ``uint8 [N, 3, 64, 64]`` and labels ``long [N]`` (and the objects' pixel mask) drawn
  from a ``torch.Generator`` (the primitive the others build on).
- ``make_split(split, num_images, seed=None)``: a fixed split, ``"train"`` or ``"heldout"``;
  the two splits use different generator seeds for the same ``seed``.
- ``stream_batch(step, batch_size, seed=0)``: the training stream, a fresh batch per step.
- ``tiles_per_image(masks)`` / ``tile_patches(masks)``: the tile count of every image and the
  patches that hold the tiles, from ``make_images``' masks.
- ``to_float(images)`` / ``normalize(images)``: ``uint8`` -> float in ``[0, 1]`` ->
  normalised with ``MEAN``/``STD`` (the values declared in the model's pretrained_cfg).
- ``SyntheticShapes``: a map-style ``torch.utils.data.Dataset`` over one split.
- ``write_folder(root, split, num_images)``: a split as an ImageFolder of PNGs (class folders
  named by ``CLASS_NAMES``), to try the ``--data DIR`` path offline
  (``python run_search.py make-data``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from search.embedded.draw import (
    BOUNDARY_SHARE,
    CLASS_NAMES,
    COUNTS,
    IMAGE_SIZE,
    NUM_CLASSES,
    PATTERNS,
    TILE_COUNTS,
    make_images,
    tile_patches,
    tiles_per_image,
)

__all__ = [
    "BOUNDARY_SHARE",
    "CLASS_NAMES",
    "COUNTS",
    "IMAGE_SIZE",
    "MEAN",
    "NUM_CLASSES",
    "PATTERNS",
    "SPLITS",
    "STD",
    "SyntheticShapes",
    "TILE_COUNTS",
    "make_images",
    "make_split",
    "normalize",
    "split_generator",
    "stream_batch",
    "tile_patches",
    "tiles_per_image",
    "to_float",
    "write_folder",
]

# Per-channel statistics of the generated images as float in [0, 1] (measured on 20,000
# training images: mean 0.50, std 0.19; rounded); declared in the model's pretrained_cfg.
MEAN = (0.5, 0.5, 0.5)
STD = (0.2, 0.2, 0.2)
# Split name -> first word of the seed sequence, so split seeds never collide.
SPLITS = {"train": 0, "heldout": 1}
STREAM_KEY = 2  # seed-sequence key of the training stream (disjoint from both splits)


def split_generator(split: str, seed: int = 0) -> torch.Generator:
    """A ``torch.Generator`` for ``split`` and ``seed``; different splits never share seeds."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {sorted(SPLITS)}")
    return _generator(SPLITS[split], seed)


def _generator(*key: int) -> torch.Generator:
    # SeedSequence hashes the whole key, so (split, seed) pairs map to unrelated streams.
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def make_split(split: str, num_images: int, seed: int | None = None) -> tuple[Tensor, Tensor]:
    """A fixed split: ``(images uint8 [N, 3, 64, 64], labels long [N])``.

    ``split`` is ``"train"`` or ``"heldout"``; ``seed`` defaults to 0. The same
    ``(split, num_images, seed)`` always gives identical tensors; the two splits come from
    different generator seeds. The first ``k`` images do depend on ``num_images`` (the label
    permutation is drawn over all ``N``), so compare splits of equal size.
    """
    return make_images(num_images, split_generator(split, 0 if seed is None else seed))


def stream_batch(step: int, batch_size: int, seed: int = 0, *, clutter: float = 1.0,
                 boundary: bool = True) -> tuple[Tensor, Tensor]:
    """Batch ``step`` of the endless training stream: fresh images for every step.

    Deterministic in ``(step, batch_size, seed)`` and independent of the order in which steps
    are requested, so a resumed run sees the same data. Disjoint in seed from both splits.
    """
    if step < 0 or batch_size < 1:
        raise ValueError(f"need step >= 0 and batch_size >= 1, got step={step}, batch_size={batch_size}")
    return make_images(batch_size, _generator(STREAM_KEY, seed, step), clutter=clutter, boundary=boundary)


def write_folder(root: str | Path, split: str, num_images: int, seed: int = 0) -> Path:
    """Write split ``(split, num_images, seed)`` as an ImageFolder of PNGs: ``root/<k>_<class name>/<i>.png``.

    Folder names start with the class index (``00_hstripes_few``), so ImageFolder's sorted
    order is the model's class order, as ImageNet's sorted synsets are.

    The same images as ``make_split`` (PNG is lossless), so a model evaluated on the folder
    through timm's transforms scores what it scores on the tensors. ``root`` must not exist or
    be empty: nothing is overwritten (ValueError otherwise).
    """
    from PIL import Image

    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"{root} exists and is not an empty directory; nothing is overwritten")
    if num_images < 1:
        raise ValueError(f"need at least one image, got {num_images}")
    images, labels = make_split(split, num_images, seed)
    folders = [root / f"{k:02d}_{name}" for k, name in enumerate(CLASS_NAMES)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    width = len(str(num_images - 1))
    for i, (image, label) in enumerate(zip(images.permute(0, 2, 3, 1).numpy(), labels.tolist(), strict=True)):
        Image.fromarray(image).save(folders[label] / f"{split}_{i:0{width}d}.png")
    return root


def to_float(images: Tensor) -> Tensor:
    """``uint8 [N, 3, H, W]`` -> ``float32`` in ``[0, 1]``."""
    return images.float().div_(255.0)


def normalize(images: Tensor) -> Tensor:
    """``uint8 [N, 3, H, W]`` (or float in ``[0, 1]``) -> normalised ``float32`` with ``MEAN``/``STD``."""
    x = to_float(images) if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


class SyntheticShapes(Dataset):
    """A map-style Dataset over one split: item ``i`` is ``(image float [3, 64, 64], label)``.

    The whole split is generated once at construction (``uint8``, 12 KiB per image).
    Images are normalised with ``MEAN``/``STD`` unless ``normalized=False`` (then float in
    ``[0, 1]``).
    """

    def __init__(self, split: str = "heldout", num_images: int = 2000, *, seed: int | None = None,
                 normalized: bool = True) -> None:
        self.images, self.labels = make_split(split, num_images, seed)
        self.normalized = normalized
        self.classes = list(CLASS_NAMES)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index : index + 1]
        image = normalize(image) if self.normalized else to_float(image)
        return image[0], int(self.labels[index])
