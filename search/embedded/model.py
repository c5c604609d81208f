"""The embedded default model: a small 12-block ViT trained on ``search.embedded.synthetic``.

Importing this module (or ``search.embedded``) registers ``tokensched_vit_shapes`` in timm's
registry, with a pretrained_cfg whose ``file`` is the safetensors shipped in
``search/embedded/weights/``, so

    import search.embedded  # noqa: F401  (registers the model)
    model = timm.create_model("tokensched_vit_shapes", pretrained=True)

loads the trained weights offline. The model is a plain timm ``VisionTransformer``
(``Block``/``Attention``, class token, ``global_pool="token"``): 64x64 images, 8x8 patches
(64 patch tokens + CLS), 12 blocks, width 128, 4 heads, MLP ratio 4. Inputs are float
images in ``[0, 1]`` normalised with the ``mean``/``std`` of the pretrained_cfg
(``search.embedded.synthetic.normalize`` does exactly that).

The shipped weights come from ``python -m search.embedded.train --out search/embedded/weights/
--steps 1500`` (seed 0, batch 128, 2 threads, count curriculum ``--count-gap 0.4``): 47.2
minutes on 2 CPU cores, held-out top-1 99.10 % on ``make_split("heldout", 2000)``, which
evaluates in 9-12 s on 2 cores (batch 256).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from search.embedded.synthetic import IMAGE_SIZE, MEAN, NUM_CLASSES, STD

__all__ = ["ARCH", "ARCH_GAP", "NAME", "NAME_GAP", "WEIGHTS_DIR", "WEIGHTS", "default_cfgs", "tokensched_vit_shapes",
           "tokensched_vit_shapes_gap"]

NAME = "tokensched_vit_shapes"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS = WEIGHTS_DIR / f"{NAME}.safetensors"  # fp32 safetensors, 9.7 MB
ARCH: dict[str, Any] = dict(
    img_size=IMAGE_SIZE,
    patch_size=8,  # 8x8 grid of patch tokens
    embed_dim=128,
    depth=12,
    num_heads=4,
    mlp_ratio=4.0,
    num_classes=NUM_CLASSES,
    class_token=True,
    global_pool="token",
)

# A second model for the same task: no class token, pooled by the average of the patch tokens
# (as timm's *_gap_* ViTs), so only merging applies. Its weights are not shipped; train them with
# python -m search.embedded.train --model tokensched_vit_shapes_gap --out DIR --steps 1500.
NAME_GAP = "tokensched_vit_shapes_gap"
ARCH_GAP: dict[str, Any] = dict(ARCH, class_token=False, global_pool="avg")


def _cfg(name: str) -> dict[str, Any]:
    return dict(
        file=str(WEIGHTS_DIR / f"{name}.safetensors"),
        num_classes=NUM_CLASSES,
        input_size=(3, IMAGE_SIZE, IMAGE_SIZE),
        pool_size=None,
        crop_pct=1.0,
        crop_mode="center",
        interpolation="bilinear",
        mean=MEAN,
        std=STD,
        first_conv="patch_embed.proj",
        classifier="head",
        license="apache-2.0",
        notes=("Trained from scratch on search.embedded.synthetic (shapes on clutter) by python -m search.embedded.train.",),
    )


# Read by timm's @register_model below: the architectures' default pretrained_cfgs.
default_cfgs = generate_default_cfgs({NAME: _cfg(NAME), NAME_GAP: _cfg(NAME_GAP)})


@register_model
def tokensched_vit_shapes(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT 12 x 128, patch 8 on 64 px, 10 classes: the embedded default of tokensched."""
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        VisionTransformer,
        NAME,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(ARCH, **kwargs),
    )


@register_model
def tokensched_vit_shapes_gap(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The embedded default's shape without a class token, average-pooled (merging only)."""
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        VisionTransformer,
        NAME_GAP,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(ARCH_GAP, **kwargs),
    )
