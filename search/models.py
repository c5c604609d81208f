"""Model loading: timm names, local checkpoints, and the embedded default."""

from __future__ import annotations

import torch
from torch import nn

from spaces.model_spec import ModelSpec

DEFAULT_MODEL = "tokensched_vit_shapes"  # the embedded default (search/embedded.py)


def _register_embedded() -> None:
    """Importing search.embedded registers the embedded default with timm."""
    try:
        import search.embedded  # noqa: F401
    except ImportError:  # pragma: no cover - the embedded default is part of the package
        pass


def create(name: str, *, pretrained: bool = False, device: str | torch.device = "cpu", **kwargs) -> nn.Module:
    """timm.create_model with a one-line ValueError for unknown names."""
    import timm

    _register_embedded()
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r} (not in timm's registry)")
    with torch.device(device):
        return timm.create_model(name, pretrained=pretrained, **kwargs)


def model_spec(name: str) -> ModelSpec:
    """The shape of a timm model, built on the meta device: no weights, no memory, no network."""
    model = create(name, device="meta")
    return ModelSpec.from_model(model, name=name)
