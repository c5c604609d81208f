"""The embedded default's images: a patterned body and a few tiles on clutter, drawn from a generator.

Each 64x64 RGB image holds two labelled things on a cluttered background:

- a *body*, 16-24 px across (a disc, square or diamond: a nuisance, not part of the label),
  filled in two colours with one of five patterns: horizontal, vertical, diagonal or
  anti-diagonal stripes, or a checkerboard (period 3.5-5 px, random phase);
- *tiles*: framed squares 5.6-6.8 px across, each inside a cell of its own of the 8 px
  patch grid, away from the body: *few* (1 to 3) or *many* (4 to 6). Nine images in ten
  hold a count next to the class boundary (3 tiles for few, 4 for many, ``BOUNDARY_SHARE``);
  the rest draw uniformly from their range.

The label is ``pattern * 2 + many``: 10 classes (``CLASS_NAMES``). The two halves of the
label live in different tokens and ask different things of them. The pattern is a texture
that every body patch shows (4-25 patches): redundant, any of them will do. The count is
spread over the tile tokens, one tile per patch, and no single token tells it: the model
must weigh how many of the tokens are tiles, and tell 3 from 4. Everything else is clutter
that carries no label information: a smooth coloured texture, short strokes, small discs and
rings, all drawn in the same colour distribution as the objects. Object tokens are a minority
(5-31 of 64, mean ~16).

Why a count, why nine images in ten at the boundary, and the versions tried before: docs/embedded-task.md.

Drawing is vectorised over the batch: every mark is a signed distance function evaluated
in a small window around it, blended into the canvas with one gather/scatter; the only
Python loops run over the (few) distractors and tiles, never over pixels. 2,000 images take about
1.2 s on 2 CPU cores.

``make_images`` is the primitive; ``search.embedded.synthetic`` builds the seeded splits, the
training stream and the normalisation on it. ``tile_patches`` / ``tiles_per_image`` read the
tiles back from its masks (for the benches that trace where the label lives).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "BOUNDARY_SHARE",
    "CLASS_NAMES",
    "COUNTS",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "PATTERNS",
    "TILE_COUNTS",
    "make_images",
    "tile_patches",
    "tiles_per_image",
]

IMAGE_SIZE = 64
PATTERNS = ("hstripes", "vstripes", "diagonal", "antidiagonal", "checker")  # fill of the big object
COUNTS = ("few", "many")  # how many small framed tiles: 1-3 or 4-6
NUM_CLASSES = len(PATTERNS) * len(COUNTS)
CLASS_NAMES = tuple(f"{pattern}_{count}" for pattern in PATTERNS for count in COUNTS)
_BODY_HALF = (8.0, 12.0)  # half-size of the patterned body in px: 16-24 px across
_TILE_HALF = (2.8, 3.4)  # half-side of a tile in px: 5.6-6.8 px across, inside its 8 px cell
_TILE_JITTER = 0.5  # a tile's centre moves up to this many px from its cell's centre
_FRAME_PX = 1.5  # width of a tile's frame
_FEW, _MANY = (1, 3), (4, 6)  # tiles per image (inclusive ranges) for "few" and "many"
TILE_COUNTS = {"few": _FEW, "many": _MANY}  # the same ranges by name, for reports
BOUNDARY_SHARE = 0.9  # share of the images holding a count next to the class boundary: 3 or 4 tiles
_MAX_TILES = _MANY[1]
_CELL = 8  # px: tiles sit in the cells of the model's 8 px patch grid
_GRID = 64 // _CELL
_PERIOD = (3.5, 5.0)  # period of the fill pattern in px
_NUM_STROKES = (6, 12)  # distractor strokes per image (inclusive range)
_NUM_BLOBS = (4, 9)  # distractor blobs per image (inclusive range)
# Every mark is drawn inside a square window of its own (px): only the window's pixels are
# computed, which is what makes generation fast. The canvas has a margin of _PAD px each
# side so distractors can be cut by the image border.
_STROKE_WINDOW, _BLOB_WINDOW, _BODY_WINDOW, _TILE_WINDOW = 16, 10, 28, 10
_PAD = 8
_CANVAS = IMAGE_SIZE + 2 * _PAD


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> Tensor:
    return torch.rand(shape, generator=generator) * (high - low) + low


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``(x, y)`` of a ``size x size`` grid, each ``[1, size, size]``."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x[None], y[None]


def _body_sdf(u: Tensor, v: Tensor, kind: Tensor) -> Tensor:
    """Signed distance (in half-sizes) to a disc, square or diamond (``kind`` 0/1/2, ``[N]``).

    ``u, v``: coordinates relative to the body's centre divided by its half-size,
    ``[N, H, W]``; negative inside. The body's outline is a nuisance (not part of the label).
    """
    au, av = u.abs(), v.abs()
    disc = torch.hypot(u, v) - 1.0
    square = torch.maximum(au, av) - 0.9
    diamond = (au + av - 1.0) / math.sqrt(2.0)
    kind = kind.view(-1, 1, 1)
    return torch.where(kind == 0, disc, torch.where(kind == 1, square, diamond))


def _pattern(x: Tensor, y: Tensor, pattern: Tensor, generator: torch.Generator) -> Tensor:
    """Fill pattern in ``[0, 1]`` at image coordinates ``x, y [N, H, W]``; ``pattern`` ``[N]``.

    Stripes (horizontal, vertical, two diagonals) or a checkerboard, with a random period and
    phase, so any patch of the body shows which one it is.
    """
    n = pattern.shape[0]
    period = _uniform(generator, (n, 1, 1), *_PERIOD)
    phase = _uniform(generator, (n, 2, 1, 1), 0.0, 2 * math.pi)
    direction = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5**0.5, 0.5**0.5], [0.5**0.5, -(0.5**0.5)], [0.0, 0.0]])
    a, b = direction[pattern].view(n, 2, 1, 1).unbind(1)
    k = 2 * math.pi / period
    stripes = torch.sin(k * (a * x + b * y) + phase[:, 0])
    checker = torch.sin(k * x + phase[:, 0]) * torch.sin(k * y + phase[:, 1]) * 2.0
    s = torch.where((pattern == PATTERNS.index("checker")).view(n, 1, 1), checker, stripes)
    return (0.5 + 2.0 * s).clamp_(0.0, 1.0)


def _coverage(distance_px: Tensor) -> Tensor:
    """Anti-aliased coverage from a signed pixel distance (negative inside); in ``[0, 1]``."""
    return (0.5 - distance_px).clamp_(0.0, 1.0)


def _contrasting_colour(generator: torch.Generator, base: Tensor) -> Tensor:
    """Colours ``[N, 3]`` that differ from ``base`` by 0.3-0.55 per channel."""
    delta = _uniform(generator, tuple(base.shape), 0.3, 0.55)
    return torch.where(base > 0.5, base - delta, base + delta).clamp(0.0, 1.0)


def _background(generator: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
    """Smooth coloured texture ``[N, 3, _CANVAS, _CANVAS]`` and its base colour ``[N, 3]``."""
    base = _uniform(generator, (n, 3), 0.2, 0.8)
    noise = torch.rand((n, 3, _CANVAS // 8, _CANVAS // 8), generator=generator) - 0.5  # low frequency
    texture = torch.nn.functional.interpolate(noise, size=(_CANVAS, _CANVAS), mode="bilinear")
    amplitude = _uniform(generator, (n, 1, 1, 1), 0.1, 0.35)
    return texture.mul_(amplitude).add_(base[:, :, None, None]), base


def _blend_window(canvas: Tensor, ox: Tensor, oy: Tensor, alpha: Tensor, colour: Tensor) -> None:
    """Alpha-blend ``colour`` (``[N, C]`` or ``[N, C, W, W]``) into a window of ``canvas [N, C, P, P]``, in place.

    The window of image i is ``alpha.shape[-1]`` px square with top-left ``(ox[i], oy[i])``
    (``long [N, 1]``); ``alpha``: coverage ``[N, W, W]``.
    """
    n, c, p, _ = canvas.shape
    w = alpha.shape[-1]
    x, y = _grid(w)
    index = (oy * p + ox + (y.long() * p + x.long()).view(1, -1))[:, None].expand(-1, c, -1)  # [N, C, W*W]
    flat = canvas.view(n, c, p * p)
    colour = colour.view(n, c, -1)  # [N, C, 1] or [N, C, W*W]
    patch = flat.gather(2, index)
    flat.scatter_(2, index, patch + alpha.view(n, 1, -1) * (colour - patch))


def _stroke(generator: torch.Generator, n: int, x: Tensor, y: Tensor) -> Tensor:
    """Distances ``[N, W, W]`` to a segment (3-12 px long, 1-2.5 px wide) centred in the window."""
    angle = _uniform(generator, (n, 1, 1), 0.0, 2 * math.pi)
    length = _uniform(generator, (n, 1, 1), 3.0, 12.0)
    width = _uniform(generator, (n, 1, 1), 1.0, 2.5)
    dx, dy = torch.cos(angle) * length, torch.sin(angle) * length
    ax, ay = _STROKE_WINDOW / 2 - dx / 2, _STROKE_WINDOW / 2 - dy / 2
    # Distance to the segment a -> a + d: project, clamp to [0, 1], measure.
    t = (((x - ax) * dx + (y - ay) * dy) / (length * length)).clamp(0.0, 1.0)
    return torch.hypot(x - ax - t * dx, y - ay - t * dy) - width / 2


def _blob(generator: torch.Generator, n: int, x: Tensor, y: Tensor) -> Tensor:
    """Distances ``[N, W, W]`` to a disc or ring (radius 1.5-3.5 px) centred in the window."""
    radius = _uniform(generator, (n, 1, 1), 1.5, 3.5)
    ring = torch.rand((n, 1, 1), generator=generator) < 0.5
    dist = torch.hypot(x - _BLOB_WINDOW / 2, y - _BLOB_WINDOW / 2) - radius
    return torch.where(ring, dist.abs() - 0.75, dist)


def _distractors(generator: torch.Generator, canvas: Tensor, base: Tensor, count: Tensor,
                 mark: Callable[[torch.Generator, int, Tensor, Tensor], Tensor], window: int) -> None:
    """Paint ``count [N]`` distractors per image (``mark`` draws one), at random offsets."""
    n = canvas.shape[0]
    x, y = _grid(window)
    for k in range(int(count.max()) if n else 0):
        ox, oy = (torch.randint(0, _CANVAS - window + 1, (n, 1), generator=generator) for _ in range(2))
        alpha = _coverage(mark(generator, n, x, y)) * (k < count).float()[:, None, None]
        _blend_window(canvas, ox, oy, alpha, _contrasting_colour(generator, base))


def _tile_cells(generator: torch.Generator, bx: Tensor, by: Tensor, body_half: Tensor) -> Tensor:
    """``_MAX_TILES`` distinct cells ``long [N, _MAX_TILES]`` of the patch grid, in random order,
    none touching the body's bounding box (grown by 1 px): the first ``count`` hold the tiles."""
    n = bx.shape[0]
    lo = torch.arange(_GRID, dtype=torch.float32) * _CELL  # cell edges along one axis
    hi = lo + _CELL
    def clear(c: Tensor) -> Tensor:  # [N, _GRID]: the cell column (row) is off the body's extent
        return (hi <= (c - body_half - 1.0).view(n, 1)) | (lo >= (c + body_half + 1.0).view(n, 1))
    free = clear(bx)[:, None, :] | clear(by)[:, :, None]  # [N, rows, cols]
    keys = torch.rand((n, _GRID * _GRID), generator=generator) + (~free).view(n, -1).float() * 2.0
    return keys.argsort(dim=1)[:, :_MAX_TILES]


def _window_at(cx: Tensor, cy: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``size`` px window around centres ``[N, 1, 1]``: top-left (canvas px, ``[N, 1]``)
    and the image coordinates ``x, y [N, W, W]`` of its pixels."""
    n = cx.shape[0]
    ox = (cx.floor().long() + _PAD - size // 2).view(n, 1)
    oy = (cy.floor().long() + _PAD - size // 2).view(n, 1)
    x, y = _grid(size)
    return ox, oy, x + (ox - _PAD)[:, :, None], y + (oy - _PAD)[:, :, None]


def _objects(generator: torch.Generator, canvas: Tensor, base: Tensor, labels: Tensor,
             boundary: bool = True) -> list[tuple[Tensor, ...]]:
    """Paint each image's patterned body and its framed tiles into ``canvas`` in place.

    ``boundary=False`` leaves out the count next to the class boundary (a "few" image holds at
    most ``_FEW[1] - 1`` tiles) and draws every count of a range uniformly, the count curriculum
    of training.

    Returns ``(ox, oy, coverage [N, W, W])`` of every window, body first (for ``return_mask``).
    """
    n = canvas.shape[0]
    pattern, many = labels // len(COUNTS), labels % len(COUNTS)
    body_half = _uniform(generator, (n, 1, 1), *_BODY_HALF)
    bx, by = (body_half + 1.0 + torch.rand((n, 1, 1), generator=generator) * (IMAGE_SIZE - 2 * body_half - 2.0)
              for _ in range(2))
    # Body: a disc, square or diamond filled with two colours in the label's pattern.
    ox, oy, x, y = _window_at(bx, by, _BODY_WINDOW)
    kind = torch.randint(0, 3, (n,), generator=generator)
    body = _coverage(_body_sdf((x - bx) / body_half, (y - by) / body_half, kind) * body_half)
    fill = _pattern(x, y, pattern, generator)[:, None]  # [N, 1, W, W]
    ink = _contrasting_colour(generator, base)
    paper = torch.where(ink > 0.5, ink - 0.45, ink + 0.45)
    colour = paper[:, :, None, None] + fill * (ink - paper)[:, :, None, None]  # [N, 3, W, W]
    _blend_window(canvas, ox, oy, body, colour)
    windows = [(ox, oy, body)]
    # Tiles: framed squares, each inside a grid cell of its own, away from the body.
    few, lots = _FEW[0], _FEW[1] if boundary else _FEW[1] - 1
    count = torch.where(many.bool(), torch.randint(_MANY[0], _MANY[1] + 1, (n,), generator=generator),
                        torch.randint(few, lots + 1, (n,), generator=generator))
    if boundary:  # most images hold 3 or 4 tiles, next to the class boundary (BOUNDARY_SHARE)
        near = torch.rand((n,), generator=generator) < BOUNDARY_SHARE
        count = torch.where(near, torch.where(many.bool(), _MANY[0], _FEW[1]), count)
    cells = _tile_cells(generator, bx, by, body_half)
    tile_half = _uniform(generator, (n, _MAX_TILES, 1, 1), *_TILE_HALF)
    jitter = _uniform(generator, (n, _MAX_TILES, 2, 1, 1), -_TILE_JITTER, _TILE_JITTER)
    ink = _contrasting_colour(generator, base)
    paper = torch.where(ink > 0.5, ink - 0.45, ink + 0.45)
    for k in range(_MAX_TILES):
        cx = ((cells[:, k] % _GRID).float() * _CELL + _CELL / 2).view(n, 1, 1) + jitter[:, k, 0]
        cy = ((cells[:, k] // _GRID).float() * _CELL + _CELL / 2).view(n, 1, 1) + jitter[:, k, 1]
        tox, toy, x, y = _window_at(cx, cy, _TILE_WINDOW)
        dist = torch.maximum((x - cx).abs(), (y - cy).abs()) - tile_half[:, k]  # square, negative inside
        tile = _coverage(dist) * (k < count).float()[:, None, None]
        frame = _coverage(-(dist + _FRAME_PX))  # 1 on the frame, 0 inside it
        colour = paper[:, :, None, None] + frame[:, None] * (ink - paper)[:, :, None, None]
        _blend_window(canvas, tox, toy, tile, colour)
        windows.append((tox, toy, tile))
    return windows


def make_images(num_images: int, generator: torch.Generator, *, return_mask: bool = False,
                clutter: float = 1.0, boundary: bool = True) -> tuple[Tensor, ...]:
    """Generate ``num_images`` images and labels from ``generator`` (consumed in a fixed order).

    Returns ``(images uint8 [N, 3, 64, 64], labels long [N])``, plus the objects' masks
    ``bool [N, 2, 64, 64]`` (body, all tiles; coverage >= 0.5) with ``return_mask=True`` (the
    images are the same either way). ``clutter`` in ``[0, 1]`` scales the number of distractors (a
    training curriculum; the splits always use 1). ``boundary=False`` draws no "few" image with
    3 tiles, so the two count classes are two tiles apart (the count curriculum; the splits always
    use True). Labels are a random permutation of ``arange(N) % NUM_CLASSES``, so
    classes are balanced to within one.
    """
    if num_images < 0 or not 0.0 <= clutter <= 1.0:
        raise ValueError(f"need num_images >= 0 and 0 <= clutter <= 1, got {num_images}, {clutter}")
    n = num_images
    labels = torch.randperm(n, generator=generator) % NUM_CLASSES
    canvas, base = _background(generator, n)  # [N, 3, _CANVAS, _CANVAS]
    for mark, (low, high), window in ((_stroke, _NUM_STROKES, _STROKE_WINDOW), (_blob, _NUM_BLOBS, _BLOB_WINDOW)):
        count = (torch.randint(low, high + 1, (n,), generator=generator) * clutter).round().long()
        _distractors(generator, canvas, base, count, mark, window)
    windows = _objects(generator, canvas, base, labels, boundary)  # on top of the clutter
    crop = (slice(None), slice(None), slice(_PAD, _PAD + IMAGE_SIZE), slice(_PAD, _PAD + IMAGE_SIZE))
    image = canvas[crop]
    image = image + torch.randn(image.shape, generator=generator).mul_(0.02)  # sensor noise
    out = (image.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8), labels.long())
    if not return_mask:
        return out
    masks = []
    for group in (windows[:1], windows[1:]):  # the body, then all tiles
        mask = torch.zeros(n, 1, _CANVAS, _CANVAS)
        for ox, oy, alpha in group:
            _blend_window(mask, ox, oy, alpha, torch.ones(n, 1))
        masks.append(mask[crop][:, 0] >= 0.5)
    return (*out, torch.stack(masks, dim=1))


def tile_patches(masks: Tensor) -> Tensor:
    """``bool [N, 64]``: the patches (raster order, the model's token order) that hold a tile,
    from ``make_images(..., return_mask=True)``'s masks."""
    cells = masks[:, 1].view(-1, _GRID, _CELL, _GRID, _CELL)
    return cells.any(dim=4).any(dim=2).view(-1, _GRID * _GRID)


def tiles_per_image(masks: Tensor) -> Tensor:
    """``long [N]``: how many tiles each image holds, from ``make_images(..., return_mask=True)``'s
    masks; the patches the tile mask touches, since every tile sits in a cell of its own."""
    return tile_patches(masks).sum(dim=1)
