"""Small image folders for the data tests: random images of varying size and one corrupt file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(root: Path, *, classes: int, per_class: int, height_step: int, width: int) -> Path:
    """ImageFolder layout under ``root``: class<c>/<i>.png of height 40 + height_step * i, plus
    class1/broken.jpg, which is not an image. Seeded, so the same arguments give the same files."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir()
        for i in range(per_class):
            img = (rng.random((40 + height_step * i, width, 3)) * 255).astype("uint8")
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    (root / "class1" / "broken.jpg").write_bytes(b"not an image")
    return root
