"""Active-token selection for idle blocks (IdleViT).

Xu et al., "IdleViT: Efficient Vision Transformer via Token Idle and Token Cut Loss", 2023.
Before an idle block, the tokens are ranked by the CLS-query logits (or attention); only the active
ones run attention and MLP, the idle ones pass through unchanged and can be selected again by a
later block. Sizes are untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import check_keep, topk_sorted

__all__ = ["idle_scores", "select_active"]


def idle_scores(q_cls: Tensor, k: Tensor, *, rank: str, scale: float, bias: Tensor | None = None) -> Tensor:
    """The score [B, N] each token is ranked by before an idle block.

    q_cls [B, H, 1, hd] (the CLS query), k [B, H, N, hd] (every key). rank "logits" is IdleViT's
    code: the head-mean of the raw logits q_cls k (no scale, no softmax, no size bias).
    "softmax" is our variant: the head-mean CLS attention softmax(scale q_cls k + bias).
    """
    logits = q_cls @ k.transpose(-2, -1)  # [B, H, 1, N]
    if rank == "logits":
        return logits.mean(dim=1)[:, 0]
    if rank != "softmax":
        raise ValueError(f"idle: rank must be 'logits' or 'softmax', got {rank!r}")
    logits = logits * scale
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def select_active(scores: Tensor, *, num_prefix: int, keep: int) -> Tensor:
    """Full-sequence positions [B, num_prefix + keep] of the active tokens.

    scores [B, N] (CLS attention or logits for every token; prefix entries ignored). The
    prefix positions 0..num_prefix-1 come first, then the ``keep`` highest-scoring patch
    positions in ascending order. The caller gathers these rows (``gather_tokens``), runs the
    block on them, and writes them back with ``scatter_tokens``.
    """
    batch, n_total = scores.shape
    check_keep(keep, n_total - num_prefix, "idle")
    prefix = torch.arange(num_prefix, device=scores.device).expand(batch, -1)  # (B, P)
    active = topk_sorted(scores[:, num_prefix:], keep) + num_prefix  # (B, keep)
    return torch.cat([prefix, active], dim=1)
