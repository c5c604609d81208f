"""The shape of a ViT that a schedule is made for, and that the cost model prices."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """Everything the cost model needs to know about a plain pre-norm ViT.

    `tokens` counts the prefix tokens (CLS, distillation, registers) plus the patch tokens.
    MACs are per image: one multiply-add counts one.
    """

    name: str
    depth: int
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_patches: int
    num_prefix_tokens: int
    patch_macs: int  # patch embedding (a strided convolution)
    head_macs: int  # classifier head(s)
    class_token: bool = True  # False: pooled by average (or max); no method that reads CLS attention runs

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "class_token":
                if not isinstance(value, bool):
                    raise ValueError(f"ModelSpec.class_token must be a bool, got {value!r}")
            elif f.name != "name" and (not isinstance(value, int) or value < 0):
                raise ValueError(f"ModelSpec.{f.name} must be a non-negative integer, got {value!r}")
        if self.depth < 1 or self.num_patches < 1 or self.embed_dim < 1:
            raise ValueError(f"ModelSpec needs depth, num_patches and embed_dim >= 1, got {self}")

    @property
    def tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(known - set(data) - {"class_token"})  # specs written before it had one
        if unknown or missing:
            raise ValueError(f"model spec: unknown keys {unknown}, missing keys {missing}")
        return cls(**data)

    def same_shape(self, other: ModelSpec) -> bool:
        """True when a schedule for `other` can run on this model (names may differ)."""
        a, b = self.to_dict(), other.to_dict()
        a.pop("name"), b.pop("name")
        return a == b

    @classmethod
    def from_model(cls, model: Any, *, name: str | None = None) -> ModelSpec:
        """Read the spec off a timm VisionTransformer through its public attributes only."""
        required = ("blocks", "patch_embed", "embed_dim", "num_prefix_tokens", "head")
        if not all(hasattr(model, attr) for attr in required):
            raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer (needs {', '.join(required)})")
        blocks = list(model.blocks)
        if not blocks or not all(hasattr(b, "attn") and hasattr(b, "mlp") for b in blocks):
            raise ValueError(f"{type(model).__name__} has no transformer blocks with attn and mlp")
        attn, mlp = blocks[0].attn, blocks[0].mlp
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        if not hasattr(fc1, "out_features") or getattr(fc2, "in_features", None) != fc1.out_features:
            raise ValueError(f"{type(model).__name__}'s MLP ({type(mlp).__name__}) is not fc1 -> fc2 of one hidden "
                             "width; the cost model prices only that")
        if not (hasattr(attn, "num_heads") and hasattr(attn, "head_dim")):
            raise ValueError(f"{type(model).__name__}'s attention ({type(attn).__name__}) has no num_heads and head_dim")
        proj = model.patch_embed.proj
        patch_area = proj.kernel_size[0] * proj.kernel_size[1]
        num_patches = int(model.patch_embed.num_patches)
        heads = [m for m in (model.head, getattr(model, "head_dist", None)) if hasattr(m, "in_features")]
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return cls(
            name=name or cfg.get("architecture") or type(model).__name__,
            depth=len(blocks),
            embed_dim=int(model.embed_dim),
            num_heads=int(attn.num_heads),
            head_dim=int(attn.head_dim),
            mlp_hidden=int(fc1.out_features),
            num_patches=num_patches,
            num_prefix_tokens=int(model.num_prefix_tokens),
            patch_macs=num_patches * proj.in_channels * patch_area * proj.out_channels,
            head_macs=sum(h.in_features * h.out_features for h in heads),
            class_token=getattr(model, "cls_token", None) is not None,
        )
