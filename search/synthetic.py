"""The embedded default data set: shapes on clutter, generated on the fly from a seed.

Each 64x64 RGB image holds one *object* on a cluttered background. The label is
``shape * 2 + style`` with five shapes (circle, square, triangle, diamond, cross) and two
styles (solid, outlined), so 10 classes. The object is 18-28 px across, so it touches
roughly 9-16 of the 64 patches of an 8x8 patch grid; its class needs both its outline
(spread over those patches) and its interior (solid or hollow). Everything else is clutter
that carries no label information: a smooth coloured texture, short strokes and small blobs
drawn in the same colour distribution as the object. Most patch tokens are therefore
redundant, yet dropping or merging object tokens early costs accuracy.

Drawing is vectorised over the batch with signed distance functions on a shared pixel
grid; the only Python loops run over the (few) distractors, never over pixels.

Public API:

- ``make_images(num_images, generator)``: images ``uint8 [N, 3, 64, 64]`` and labels
  ``long [N]`` drawn from a ``torch.Generator`` (the primitive the others build on).
- ``make_split(split, num_images, seed=None)``: a fixed split, ``"train"`` or ``"heldout"``;
  the two splits use different generator seeds for the same ``seed``.
- ``stream_batch(step, batch_size, seed=0)``: the training stream, a fresh batch per step.
- ``to_float(images)`` / ``normalize(images)``: ``uint8`` -> float in ``[0, 1]`` ->
  normalised with ``MEAN``/``STD`` (the values declared in the model's pretrained_cfg).
- ``SyntheticShapes``: a map-style ``torch.utils.data.Dataset`` over one split.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "CLASS_NAMES",
    "IMAGE_SIZE",
    "MEAN",
    "NUM_CLASSES",
    "SHAPES",
    "SPLITS",
    "STD",
    "STYLES",
    "SyntheticShapes",
    "make_images",
    "make_split",
    "normalize",
    "split_generator",
    "stream_batch",
    "to_float",
]

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
STYLES = ("solid", "outlined")
NUM_CLASSES = len(SHAPES) * len(STYLES)
CLASS_NAMES = tuple(f"{shape}_{style}" for shape in SHAPES for style in STYLES)
# Per-channel statistics of the generated images as float in [0, 1] (measured on 20,000
# training images, rounded); declared as mean/std in the model's pretrained_cfg.
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
# Split name -> first word of the seed sequence, so split seeds never collide.
SPLITS = {"train": 0, "heldout": 1}
STREAM_KEY = 2  # seed-sequence key of the training stream (disjoint from both splits)

_HALF_SIZE = (9.0, 14.0)  # object half-size in px: 18-28 px across
_OUTLINE_PX = 2.0  # outline thickness of outlined objects
_NUM_STROKES = (6, 12)  # distractor strokes per image (inclusive range)
_NUM_BLOBS = (4, 9)  # distractor blobs per image (inclusive range)


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> Tensor:
    return torch.rand(shape, generator=generator) * (high - low) + low


def _grid() -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``(x, y)``, each ``[1, H, W]``."""
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x[None], y[None]


def _shape_sdf(u: Tensor, v: Tensor, shape: Tensor) -> Tensor:
    """Signed distance (in units of the half-size) to each image's shape; ``[N, H, W]``.

    ``u, v``: object-centred coordinates divided by the half-size, ``[N, H, W]``;
    ``shape``: index into ``SHAPES``, ``[N]``. Negative inside. The scales of the shapes
    are chosen so their areas are similar (size alone does not give the class away).
    """
    au, av = u.abs(), v.abs()
    circle = torch.sqrt(u * u + v * v) - 0.95
    square = torch.maximum(au, av) - 0.8
    # Upward triangle: apex (0, -1), base v = 0.8 with half-width 1.
    triangle = torch.maximum(v - 0.8, (1.8 * au - (v + 1.0)) / math.hypot(1.8, 1.0))
    diamond = (au + av - 1.15) / math.sqrt(2.0)
    cross = torch.minimum(
        torch.maximum(au - 0.36, av - 1.0), torch.maximum(au - 1.0, av - 0.36)
    )
    all_sdf = torch.stack([circle, square, triangle, diamond, cross], dim=1)  # [N, 5, H, W]
    return all_sdf.gather(1, shape.view(-1, 1, 1, 1).expand(-1, 1, *u.shape[1:]))[:, 0]


def _coverage(distance_px: Tensor) -> Tensor:
    """Anti-aliased coverage from a signed pixel distance (negative inside); in ``[0, 1]``."""
    return (0.5 - distance_px).clamp(0.0, 1.0)


def _contrasting_colour(generator: torch.Generator, base: Tensor) -> Tensor:
    """Colours ``[N, 3]`` that differ from ``base`` by 0.3-0.55 per channel."""
    delta = _uniform(generator, tuple(base.shape), 0.3, 0.55)
    return torch.where(base > 0.5, base - delta, base + delta).clamp(0.0, 1.0)


def _paint(canvas: Tensor, alpha: Tensor, colour: Tensor) -> Tensor:
    """Alpha-blend ``colour [N, 3]`` over ``canvas [N, 3, H, W]`` with ``alpha [N, H, W]``."""
    alpha = alpha[:, None]
    return canvas * (1.0 - alpha) + colour[:, :, None, None] * alpha


def _background(generator: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
    """Smooth coloured texture ``[N, 3, H, W]`` and its base colour ``[N, 3]``."""
    base = _uniform(generator, (n, 3), 0.2, 0.8)
    noise = torch.rand((n, 3, 8, 8), generator=generator) - 0.5  # low-frequency texture
    texture = torch.nn.functional.interpolate(noise, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")
    amplitude = _uniform(generator, (n, 1, 1, 1), 0.1, 0.35)
    return base[:, :, None, None] + amplitude * texture, base


def _strokes(generator: torch.Generator, canvas: Tensor, base: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Draw 6-12 short line segments (3-14 px, 1-2.5 px wide) per image."""
    n = canvas.shape[0]
    count = torch.randint(_NUM_STROKES[0], _NUM_STROKES[1] + 1, (n,), generator=generator)
    for k in range(_NUM_STROKES[1]):
        ax, ay = (_uniform(generator, (n, 1, 1), 0.0, IMAGE_SIZE) for _ in range(2))
        angle = _uniform(generator, (n, 1, 1), 0.0, 2 * math.pi)
        length = _uniform(generator, (n, 1, 1), 3.0, 14.0)
        width = _uniform(generator, (n, 1, 1), 1.0, 2.5)
        dx, dy = torch.cos(angle) * length, torch.sin(angle) * length
        # Distance to the segment a -> a + d: project, clamp to [0, 1], measure.
        t = (((x - ax) * dx + (y - ay) * dy) / (length * length)).clamp(0.0, 1.0)
        dist = torch.hypot(x - ax - t * dx, y - ay - t * dy) - width / 2
        alpha = _coverage(dist) * (k < count).float()[:, None, None]
        canvas = _paint(canvas, alpha, _contrasting_colour(generator, base))
    return canvas


def _blobs(generator: torch.Generator, canvas: Tensor, base: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Draw 4-9 small discs or rings (radius 1.5-4 px) per image."""
    n = canvas.shape[0]
    count = torch.randint(_NUM_BLOBS[0], _NUM_BLOBS[1] + 1, (n,), generator=generator)
    for k in range(_NUM_BLOBS[1]):
        cx, cy = (_uniform(generator, (n, 1, 1), 0.0, IMAGE_SIZE) for _ in range(2))
        radius = _uniform(generator, (n, 1, 1), 1.5, 4.0)
        ring = torch.rand((n, 1, 1), generator=generator) < 0.5
        dist = torch.hypot(x - cx, y - cy) - radius
        dist = torch.where(ring, dist.abs() - 0.75, dist)
        alpha = _coverage(dist) * (k < count).float()[:, None, None]
        canvas = _paint(canvas, alpha, _contrasting_colour(generator, base))
    return canvas


def _objects(generator: torch.Generator, canvas: Tensor, base: Tensor, labels: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Draw each image's labelled object, fully inside the image, on top of the clutter."""
    n = canvas.shape[0]
    shape, outlined = labels // len(STYLES), labels % len(STYLES)
    half = _uniform(generator, (n, 1, 1), *_HALF_SIZE)
    margin = half + 1.0
    cx = margin + torch.rand((n, 1, 1), generator=generator) * (IMAGE_SIZE - 2 * margin)
    cy = margin + torch.rand((n, 1, 1), generator=generator) * (IMAGE_SIZE - 2 * margin)
    dist = _shape_sdf((x - cx) / half, (y - cy) / half, shape) * half  # [N, H, W], in px
    hollow = (dist.abs() - _OUTLINE_PX / 2).clamp(min=-0.5)
    dist = torch.where(outlined.bool()[:, None, None], hollow, dist)
    return _paint(canvas, _coverage(dist), _contrasting_colour(generator, base))


def make_images(num_images: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Generate ``num_images`` images and labels from ``generator`` (consumed in a fixed order).

    Returns ``(images uint8 [N, 3, 64, 64], labels long [N])``. Labels are a random
    permutation of ``arange(N) % NUM_CLASSES``, so classes are balanced to within one.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    n = num_images
    labels = torch.randperm(n, generator=generator) % NUM_CLASSES
    x, y = _grid()
    canvas, base = _background(generator, n)
    canvas = _strokes(generator, canvas, base, x, y)
    canvas = _blobs(generator, canvas, base, x, y)
    canvas = _objects(generator, canvas, base, labels, x, y)
    canvas = canvas + 0.02 * torch.randn(canvas.shape, generator=generator)  # sensor noise
    images = (canvas.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return images, labels.long()


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


def stream_batch(step: int, batch_size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Batch ``step`` of the endless training stream: fresh images for every step.

    Deterministic in ``(step, batch_size, seed)`` and independent of the order in which steps
    are requested, so a resumed run sees the same data. Disjoint in seed from both splits.
    """
    if step < 0 or batch_size < 1:
        raise ValueError(f"need step >= 0 and batch_size >= 1, got step={step}, batch_size={batch_size}")
    return make_images(batch_size, _generator(STREAM_KEY, seed, step))


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
