"""The embedded default: a generated data set and a small ViT trained on it, shipped with tokensched.

- ``search.embedded.synthetic``: the seeded generator (splits, training stream, ImageFolder writer);
- ``search.embedded.model``: ``tokensched_vit_shapes`` registered with timm, weights in ``weights/``;
- ``search.embedded.train``: the training command, ``python -m search.embedded.train --out DIR --steps N``.

Importing the package registers the model with timm. The rest of ``search/`` treats it as any
other timm model and data set; docs/embedded-task.md tells why the task looks the way it does.
"""

from search.embedded.model import (
    ARCH,
    ARCH_GAP,
    NAME,
    NAME_GAP,
    WEIGHTS,
    WEIGHTS_DIR,
    tokensched_vit_shapes,
    tokensched_vit_shapes_gap,
)

__all__ = ["ARCH", "ARCH_GAP", "NAME", "NAME_GAP", "WEIGHTS", "WEIGHTS_DIR", "tokensched_vit_shapes",
           "tokensched_vit_shapes_gap"]
