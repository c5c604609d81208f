"""The embedded default model, registered with timm so `pretrained=True` loads the shipped weights.

    import search.embedded
    model = timm.create_model("tokensched_vit_shapes", pretrained=True)   # offline

A plain timm VisionTransformer (pre-norm Block, fused attention, class token): 12 blocks,
width 128, 4 heads, 64x64 images in 8x8 patches (64 patch tokens + CLS), 10 classes of the
shapes-on-clutter set in search/synthetic.py. Trained by `python -m search.train_embedded`.
"""

from __future__ import annotations

from pathlib import Path

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from search import synthetic

NAME = "tokensched_vit_shapes"
WEIGHTS = Path(__file__).resolve().parent / "weights" / f"{NAME}.safetensors"
ARCH = {"img_size": synthetic.IMAGE_SIZE, "patch_size": 8, "embed_dim": 128, "depth": 12, "num_heads": 4,
        "mlp_ratio": 4.0, "num_classes": synthetic.NUM_CLASSES, "class_token": True, "global_pool": "token"}

default_cfgs = generate_default_cfgs({
    f"{NAME}.synthetic": {
        "file": str(WEIGHTS),
        "num_classes": synthetic.NUM_CLASSES,
        "input_size": (3, synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE),
        "fixed_input_size": True,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": synthetic.MEAN,
        "std": synthetic.STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
    },
})


@register_model
def tokensched_vit_shapes(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The embedded default: a 12-block, 128-wide ViT on 64 px shapes-on-clutter images."""
    return build_model_with_cfg(VisionTransformer, NAME, pretrained, **{**ARCH, **kwargs})
