"""Top-k pruning by CLS attention with optional inattentive-token fusion (EViT).

Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import check_keep, complement_indices, gather_tokens, safe_denominator, topk_sorted

__all__ = ["FUSE_WEIGHTS", "prune"]


FUSE_WEIGHTS = ("raw", "normalized")


def prune(
    x: Tensor, size: Tensor, cls_attn: Tensor, *, num_prefix: int, keep: int, fuse: bool, fuse_weights: str = "raw"
) -> tuple[Tensor, Tensor]:
    """Keep the ``keep`` patch tokens with the largest CLS attention.

    x [B, N, C], size [B, N, 1], cls_attn [B, N] (head-mean attention of the CLS query; prefix
    entries ignored). Returns x' [B, P + keep (+1), C] and size' [B, P + keep (+1), 1], with
    P = num_prefix: prefix tokens, the kept patch tokens in their original order and, if
    ``fuse`` and something was removed, one fused token for the removed ones.

    ``fuse_weights="raw"`` is EViT's Eq. (2) as its official code computes it: the sum of the
    removed tokens weighted by their raw CLS attention, so the fused token shrinks with the
    attention mass it collects. ``"normalized"`` is our variant: the weights are normalised over
    the removed set, so the fused token is a convex combination at token scale.
    """
    if fuse_weights not in FUSE_WEIGHTS:
        raise ValueError(f"prune: fuse_weights must be one of {FUSE_WEIGHTS}, got {fuse_weights!r}")
    n = x.shape[1] - num_prefix
    check_keep(keep, n, "prune")
    if keep == n:
        return x, size
    patches, psize = x[:, num_prefix:], size[:, num_prefix:]  # (B, n, C), (B, n, 1)
    scores = cls_attn[:, num_prefix:]  # (B, n)
    kept = topk_sorted(scores, keep)  # (B, keep)  EViT Eq. (1): attentive tokens
    parts_x = [x[:, :num_prefix], gather_tokens(patches, kept)]
    parts_s = [size[:, :num_prefix], gather_tokens(psize, kept)]
    if fuse:
        dropped = complement_indices(kept, n)  # (B, n - keep)
        w = scores.gather(1, dropped).unsqueeze(-1)  # (B, n - keep, 1)
        if fuse_weights == "normalized":
            w = w / safe_denominator(w.sum(dim=1, keepdim=True))
        parts_x.append((gather_tokens(patches, dropped) * w).sum(dim=1, keepdim=True))
        parts_s.append(gather_tokens(psize, dropped).sum(dim=1, keepdim=True))
    return torch.cat(parts_x, dim=1), torch.cat(parts_s, dim=1)
