"""Sort, prune, then merge in one block (DiffRate).

Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision Transformers",
ICCV 2023. Its inference path (OpenGVLab/DiffRate, ``DiffRate/patch/deit.py`` and ``merge.py``),
after the attention residual and before the MLP:

1. sort the patch tokens by the head-mean CLS attention (the size-biased softmax), descending;
2. prune: keep the ``prune_to`` most important;
3. merge: the first ``merge_to`` kept tokens are destinations, every token after them is a
   source and joins the destination with the largest cosine similarity of the token features
   themselves (not keys; prefix tokens are never destinations). A destination becomes the
   plain mean of itself and its sources, and its size grows by each source's size times that
   source's similarity (DiffRate's similarity-weighted proportional attention).

The tokens leave in descending importance, prefix tokens first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import check_keep, descending_by_score

__all__ = ["diffrate"]


def _merge_tail(x: Tensor, size: Tensor, *, num_prefix: int, dst_count: int) -> tuple[Tensor, Tensor]:
    """Merge every token after the first ``dst_count`` (prefix included) into its most similar
    non-prefix destination: plain mean of values, sizes add source size x similarity."""
    with torch.no_grad():  # indices and similarities only, as the official code does on x.detach()
        metric = x / x.norm(dim=-1, keepdim=True)
        sim = metric[:, dst_count:] @ metric[:, :dst_count].transpose(-1, -2)  # (B, S, D)
        sim[:, :, :num_prefix] = -torch.inf
        best_sim, best_dst = sim.max(dim=-1)  # (B, S)
    channels = x.shape[-1]
    dst_x = x[:, :dst_count].scatter_reduce(
        1, best_dst.unsqueeze(-1).expand(-1, -1, channels), x[:, dst_count:], reduce="mean", include_self=True
    )
    dst_s = size[:, :dst_count].scatter_reduce(
        1, best_dst.unsqueeze(-1), size[:, dst_count:] * best_sim.unsqueeze(-1), reduce="sum", include_self=True
    )
    return dst_x, dst_s


def diffrate(
    x: Tensor, size: Tensor, cls_attn: Tensor, *, num_prefix: int, prune_to: int, merge_to: int
) -> tuple[Tensor, Tensor]:
    """DiffRate's block reduction: sort by CLS attention, prune to ``prune_to`` patch tokens,
    merge to ``merge_to``.

    x [B, N, C] (after the attention residual), size [B, N, 1], cls_attn [B, N] (head-mean
    attention of the CLS query; prefix entries ignored). Requires 1 <= merge_to <= prune_to
    <= n (patch tokens). Returns x' [B, P + merge_to, C] and size' [B, P + merge_to, 1].
    """
    n = x.shape[1] - num_prefix
    check_keep(prune_to, n, "diffrate prune")
    check_keep(merge_to, prune_to, "diffrate merge")
    if merge_to == n:
        return x, size
    x, size = descending_by_score(x, size, cls_attn[:, num_prefix:], num_prefix=num_prefix, keep=prune_to)
    if merge_to < prune_to:
        x, size = _merge_tail(x, size, num_prefix=num_prefix, dst_count=num_prefix + merge_to)
    return x, size
