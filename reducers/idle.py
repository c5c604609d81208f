"""Active-token selection for idle blocks (IdleViT).

Xu et al., "IdleViT: Efficient Vision Transformer via Token Idle and Token Cut Loss", 2023.
Before an idle block, the tokens are ranked by the CLS attention (or logits); only the active
ones run attention and MLP, the idle ones pass through unchanged and can be selected again by a
later block. Sizes are untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import check_keep, topk_sorted

__all__ = ["select_active"]


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
