"""Two schedules compared image by image on the same confirmation images: on how many images each
is right where the other is wrong, and whether that difference could be chance (an exact McNemar
test). Each confirmation record carries its per-image hits as a compact hex string."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import Tensor

KEY = "confirm_hits"  # a confirmation record's per-image hits (top-1 right, or agreeing without labels)


def encode(hits: Tensor) -> str:
    """Per-image booleans as hex (8 images a byte)."""
    return np.packbits(hits.cpu().numpy().astype(bool)).tobytes().hex()


def decode(text: str, count: int) -> np.ndarray:
    """The first `count` booleans of an `encode`d string."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:count].astype(bool)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the chance of a split at least this uneven of the
    `only_a + only_b` images on which exactly one of two equally good schedules is right."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[int, int, float] | None:
    """(images only `a` gets right, images only `b` gets right, McNemar p) for two records
    confirmed on the same images; None when either lacks its hits or their counts differ."""
    count = a.get("num_images")
    if not a.get(KEY) or not b.get(KEY) or not count or count != b.get("num_images"):
        return None
    hits_a, hits_b = decode(a[KEY], count), decode(b[KEY], count)
    only_a, only_b = int((hits_a & ~hits_b).sum()), int((hits_b & ~hits_a).sum())
    return only_a, only_b, mcnemar_p(only_a, only_b)
