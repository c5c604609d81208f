"""The blocks every schedule shares: run a timm ViT up to block k, and on from block k.

Blocks before a schedule's first reducing block (`Schedule.first_reducing_block`) compute what
the unreduced model computes, so the tokens entering that block are the same for every schedule
that starts reducing there or later. `tokens_entering` computes them with the unreduced model;
`forward_from` finishes a forward from them, patched or not, with the same steps as timm's
`VisionTransformer.forward` (blocks, final norm, head).
"""

from __future__ import annotations

from torch import Tensor, nn

from reducers.patch import current_schedule, last_forward_state


def embed(model: nn.Module, images: Tensor) -> Tensor:
    """The tokens entering block 0: timm's patch embedding, position embedding and pre-norm."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def tokens_entering(model: nn.Module, tokens: Tensor, start: int, block: int) -> Tensor:
    """The unreduced model's tokens entering `block`, from `tokens` entering `start` (<= block)."""
    if current_schedule(model) is not None:
        raise ValueError("the shared prefix is the unreduced model's: remove the schedule first")
    for blk in model.blocks[start:block]:
        tokens = blk(tokens)
    return tokens


def forward_from(model: nn.Module, tokens: Tensor, block: int) -> Tensor:
    """Logits of `model` (patched or not) from the tokens [B, N, C] entering `block`."""
    state = last_forward_state(model)
    if state is not None:
        state.reset()
    for blk in model.blocks[block:]:
        tokens = blk(tokens)
    return model.forward_head(model.norm(tokens))
