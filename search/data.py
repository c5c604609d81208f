"""Evaluation data: the embedded default, or an ImageFolder / ImageNet-val directory.

Screening evaluates many schedules on the same images, so the screening subset is decoded
once (timm's eval transforms, resolved from the model's data config, minus the final
normalisation) into one uint8 tensor and normalised batch by batch. 2,000 ImageNet images at
224 px take about 300 MB this way.

Layouts accepted by `--data DIR`:
  DIR/<class>/<image>   ImageFolder (ImageNet-val prepared with class folders): labels known
  DIR/<image>           a flat folder of images: no labels, agreement with the unreduced model only

Fine-tuning reads a directory through `FolderStream`: batch `step` is a fixed slice of a seeded
per-epoch permutation, decoded with timm's training transforms seeded per image, so a resumed
job sees exactly the batches (augmentations included) it would have seen.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".jpeg")
NO_LABEL = -1
TIMM_CROP_SCALE = 0.08  # timm's smallest random-resized-crop area (its training default)


@dataclass
class TensorSet:
    """A decoded evaluation set: uint8 images, labels (NO_LABEL when unknown), normalisation."""

    images: Tensor  # [N, 3, H, W] uint8
    labels: Tensor  # [N] long
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    skipped: int = 0  # unreadable files left out

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def has_labels(self) -> bool:
        return bool((self.labels != NO_LABEL).all())

    def batches(self, batch_size: int, device: torch.device | str = "cpu"):  # type: ignore[no-untyped-def]
        """Yield (normalised float images [b, 3, H, W], labels [b]) on `device`."""
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1) * 255.0
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1) * 255.0
        for start in range(0, len(self), batch_size):
            images = self.images[start:start + batch_size].to(device, non_blocking=True)
            yield (images.float() - mean) / std, self.labels[start:start + batch_size]


def embedded_set(num_images: int = 2000, *, seed: int = 0) -> TensorSet:
    """The held-out split of the embedded shapes-on-clutter data set (generated, cached in memory)."""
    from search.embedded import synthetic

    images, labels = synthetic.make_split("heldout", num_images, seed=seed)
    return TensorSet(images, labels, synthetic.MEAN, synthetic.STD, source=f"embedded:heldout:{seed}")


def _uint8_eval_transform(data_config: dict):  # type: ignore[no-untyped-def]
    """timm's eval transform for this data config, producing uint8 instead of normalised floats."""
    from timm.data import create_transform
    from torchvision import transforms as T

    steps = create_transform(**data_config, is_training=False).transforms
    kept = [t for t in steps if type(t).__name__ not in ("Normalize", "MaybeToTensor", "ToTensor")]
    return T.Compose([*kept, T.PILToTensor()])


class _Files(Dataset):
    """(path, label) pairs; unreadable images come back as None and are counted, not fatal."""

    def __init__(self, items: list[tuple[str, int]], transform) -> None:  # type: ignore[no-untyped-def]
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        from PIL import Image

        path, label = self.items[index]
        try:
            with Image.open(path) as img:
                return self.transform(img.convert("RGB")), label
        except (OSError, ValueError, SyntaxError):
            return None


def _collate(batch: list):  # type: ignore[no-untyped-def]
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good]), skipped


def list_images(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageFolder layout if there are class folders, else a flat unlabeled folder."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes:
        items = [(str(f), label) for label, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
                 if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
        return items, classes
    return [(str(f), NO_LABEL) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS], []


def required_images(root: Path, num_classes: int | None = None, *, what: str = "data directory") -> list[tuple[str, int]]:
    """``list_images`` of a directory that must exist and hold images (ValueError otherwise;
    ``what`` names the directory in the message, e.g. the flag that gave it).

    With ``num_classes`` (the model's), class folders whose count differs are not the model's
    classes (a 10-folder set under an ImageNet head, say): their labels are dropped with a
    warning, so the directory is used like a flat one (agreement and distillation only).
    """
    if not root.is_dir():
        raise ValueError(f"{what} not found: {root}")
    items, classes = list_images(root)
    if not items:
        raise ValueError(f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS[:5])}...)")
    if classes and num_classes is not None and len(classes) != num_classes:
        print(f"warning: {root} has {len(classes)} class folders but the model has {num_classes} classes; "
              "its labels are ignored (agreement and distillation only)", file=sys.stderr)
        items = [(path, NO_LABEL) for path, _ in items]
    return items


def _default_workers(workers: int | None) -> int:
    """DataLoader workers: as given, else one per core up to 8."""
    return min(8, os.cpu_count() or 1) if workers is None else workers


def balanced_subset(labels: list[int], num: int, *, seed: int) -> list[int]:
    """A fixed, seeded, class-balanced subset: round-robin over classes in a seeded order."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i in torch.randperm(len(labels), generator=g).tolist():
        by_class.setdefault(labels[i], []).append(i)
    picked: list[int] = []
    queues = [by_class[c] for c in sorted(by_class)]
    while len(picked) < min(num, len(labels)):
        for q in queues:
            if q and len(picked) < num:
                picked.append(q.pop())
    return sorted(picked)


def disjoint_subset(labels: list[int], num: int, *, seed: int, set_aside: int) -> list[int]:
    """A balanced subset of ``num`` indices disjoint from ``balanced_subset(labels, set_aside, seed)``
    (the screening images): drawn from the rest with seed + 1."""
    if set_aside + num > len(labels):
        raise ValueError(f"{num} confirmation images requested but the data holds {len(labels)} images, "
                         f"{set_aside} of them set aside for screening")
    taken = set(balanced_subset(labels, set_aside, seed=seed))
    rest = [i for i in range(len(labels)) if i not in taken]
    return sorted(rest[j] for j in balanced_subset([labels[i] for i in rest], num, seed=seed + 1))


def folder_set(root: str | Path, data_config: dict, *, num_images: int = 2000, seed: int = 0,
               workers: int | None = None, num_classes: int | None = None, set_aside: int | None = None) -> TensorSet:
    """Decode a class-balanced subset of an image directory once, with timm's eval transforms.

    With ``set_aside`` (the screening set's size) the subset is disjoint from the screening set
    drawn with the same seed: the confirmation images.
    """
    root = Path(root)
    items = required_images(root, num_classes)
    labels = [label for _, label in items]
    picked = (balanced_subset(labels, num_images, seed=seed) if set_aside is None
              else disjoint_subset(labels, num_images, seed=seed, set_aside=set_aside))
    chosen = [items[i] for i in picked]
    loader = DataLoader(_Files(chosen, _uint8_eval_transform(data_config)), batch_size=64,
                        num_workers=_default_workers(workers),
                        collate_fn=_collate, pin_memory=torch.cuda.is_available())
    images, labels, skipped = [], [], 0
    for x, y, bad in loader:
        skipped += bad
        if x is not None:
            images.append(x)
            labels.append(y)
    if not images:
        raise ValueError(f"none of the {len(chosen)} images in {root} could be read")
    return TensorSet(torch.cat(images), torch.cat(labels), tuple(data_config["mean"]), tuple(data_config["std"]),
                     source=str(root), skipped=skipped)


def load_eval_set(data: str | None, data_config: dict, *, num_images: int = 2000, seed: int = 0,
                  num_classes: int | None = None) -> TensorSet:
    """`--data DIR`, or the embedded default when no directory is given."""
    if data is None:
        return embedded_set(num_images, seed=seed)
    return folder_set(data, data_config, num_images=num_images, seed=seed, num_classes=num_classes)


CONFIRM_SEED_OFFSET = 1  # the embedded default's confirmation images: the held-out split at seed + 1


def load_confirm_set(data: str | None, data_config: dict, *, num_images: int, screen_images: int, seed: int = 0,
                     num_classes: int | None = None) -> TensorSet:
    """Images disjoint from the screening set of ``load_eval_set(..., num_images=screen_images, seed=seed)``:
    for the embedded default another seed of its held-out split, for `--data DIR` a balanced
    subset of the images the screening subset left."""
    if data is None:
        return embedded_set(num_images, seed=seed + CONFIRM_SEED_OFFSET)
    return folder_set(data, data_config, num_images=num_images, seed=seed, num_classes=num_classes,
                      set_aside=screen_images)


class _SeededFiles(Dataset):
    """Training items keyed by (index, seed): the augmentation is a function of the key alone.

    An unreadable file is replaced by the next one in the list (and counted), so batches keep
    their size; only ``max_tries`` unreadable files in a row are an error.
    """

    def __init__(self, items: list[tuple[str, int]], transform, max_tries: int = 16) -> None:  # type: ignore[no-untyped-def]
        self.items, self.transform, self.max_tries = items, transform, max_tries

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, int]:
        from PIL import Image

        index, seed = key
        for skipped in range(min(self.max_tries, len(self.items))):
            path, label = self.items[(index + skipped) % len(self.items)]
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
            except (OSError, ValueError, SyntaxError):
                continue
            random.seed(seed)  # timm's RandomResizedCrop draws from `random`, flips and jitter from torch
            torch.manual_seed(seed)
            return self.transform(img), label, skipped
        raise ValueError(f"{self.max_tries} unreadable images in a row from {self.items[index][0]}")


def _collate_train(batch: list) -> tuple[Tensor, Tensor, int]:  # type: ignore[type-arg]
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), sum(b[2] for b in batch)


class _Steps:
    """The batch sampler of a FolderStream from step ``start`` on: lists of (index, seed) keys."""

    def __init__(self, stream: FolderStream, start: int) -> None:
        self.stream, self.start = stream, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return (self.stream.keys(step) for step in count(self.start))


class FolderStream:
    """Step-indexed training batches from an ImageFolder or flat directory (labels NO_LABEL).

    ``stream(step)`` -> (normalised float images [B, 3, H, W], labels [B]). Image position
    ``p = step * B + j`` is item ``perm_e[p % n]`` of epoch ``e = p // n``, with a permutation
    seeded per epoch. Consecutive steps are decoded ahead by a DataLoader's workers; asking for
    any other step restarts the loader there.
    """

    def __init__(self, root: str | Path, data_config: dict, *, batch_size: int, seed: int = 0,
                 workers: int | None = None, num_classes: int | None = None, crop_scale: float = TIMM_CROP_SCALE) -> None:
        from timm.data import create_transform

        if not 0.0 < crop_scale <= 1.0:
            raise ValueError(f"crop scale must be in (0, 1], got {crop_scale}")
        items = required_images(Path(root), num_classes)
        # crop_scale: smallest image area a random-resized crop keeps (timm's default 0.08; 1.0 keeps
        # the whole image, for data whose label sits in a small object anywhere, like the embedded set's).
        transform = create_transform(**data_config, is_training=True, scale=(crop_scale, 1.0))
        self.files = _SeededFiles(items, transform)
        self.batch_size, self.seed = batch_size, seed
        self.workers = _default_workers(workers)
        self.skipped = 0  # unreadable files replaced so far
        self._perms: dict[int, Tensor] = {}
        self._batches: Iterator | None = None
        self._next = -1

    def __len__(self) -> int:
        return len(self.files)

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}  # keep two epochs at most
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self.files), generator=g)
        return self._perms[epoch]

    def keys(self, step: int) -> list[tuple[int, int]]:
        """The (item index, augmentation seed) of every image of batch ``step``."""
        n, b = len(self.files), self.batch_size
        return [(int(self._perm(p // n)[p % n]), ((self.seed * 1_000_003 + step) * 65_537 + p % b) % 2**62)
                for p in range(step * b, (step + 1) * b)]

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        if self._batches is None or step != self._next:
            loader = DataLoader(self.files, batch_sampler=_Steps(self, step), num_workers=self.workers,
                                collate_fn=_collate_train, pin_memory=torch.cuda.is_available())
            self._batches = iter(loader)
        images, labels, skipped = next(self._batches)
        self.skipped += skipped
        self._next = step + 1
        return images, labels
