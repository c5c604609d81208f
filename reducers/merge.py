"""Bipartite soft matching (ToMe).

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, Sec. 3. The patch tokens are
split into alternating sets A (even positions) and B (odd positions); each A token finds its
most similar B token by the cosine similarity of the head-mean keys, and the r most similar
pairs are merged by a size-weighted average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import gather_tokens, weighted_mean_merge

__all__ = ["bipartite_plan", "merge"]


def bipartite_plan(metric_patch: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Which A tokens merge into which B tokens.

    metric_patch [B, n, d] (patch tokens only). A = positions 0, 2, 4, .. (na = ceil(n / 2)
    tokens), B = positions 1, 3, 5, .. (nb = n // 2). Indices are within A and B:
    A index i is patch position 2 i, B index j is patch position 2 j + 1.
    Returns (unmerged_a_idx [B, na - r] ascending, src_a_idx [B, r], dst_b_idx [B, r]):
    A token src_a_idx[:, t] merges into B token dst_b_idx[:, t].
    """
    metric = F.normalize(metric_patch, dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]  # (B, na, d), (B, nb, d)
    sim = a @ b.transpose(-1, -2)  # (B, na, nb) cosine similarity, Eq. in Sec. 3.1
    best_sim, best_b = sim.max(dim=-1)  # (B, na) each A token's best partner
    order = best_sim.argsort(dim=-1, descending=True, stable=True)  # (B, na)
    src = order[:, :r]  # (B, r) the r most similar edges are merged
    unmerged = order[:, r:].sort(dim=-1).values  # (B, na - r) back in spatial order
    dst = best_b.gather(1, src)  # (B, r)
    return unmerged, src, dst


def merge(x: Tensor, size: Tensor, metric: Tensor, *, num_prefix: int, r: int) -> tuple[Tensor, Tensor]:
    """Merge r patch tokens into others by bipartite soft matching.

    x [B, N, C], size [B, N, 1], metric [B, N, d] (head-mean keys; prefix rows ignored).
    Returns x' [B, N - r, C] and size' [B, N - r, 1] ordered as: prefix tokens, unmerged A
    tokens, then all B tokens (each the size-weighted mean of itself and the A tokens merged
    into it; sizes add). Requires 0 <= r <= n // 2 with n = N - num_prefix.
    """
    n = x.shape[1] - num_prefix
    if not 0 <= r <= n // 2:
        raise ValueError(f"merge: r must be in [0, {n // 2}] (n // 2 for n={n} patch tokens), got {r}")
    if r == 0:
        return x, size
    unmerged, src, dst = bipartite_plan(metric[:, num_prefix:], r)
    patches, psize = x[:, num_prefix:], size[:, num_prefix:]  # (B, n, C), (B, n, 1)
    a_x, b_x = patches[:, ::2], patches[:, 1::2]
    a_s, b_s = psize[:, ::2], psize[:, 1::2]
    # Sec. 3.2: the average is weighted by size (patches per token) and the sizes add.
    b_x, b_s = weighted_mean_merge(b_x, b_s, gather_tokens(a_x, src), gather_tokens(a_s, src), dst)
    out_x = torch.cat([x[:, :num_prefix], gather_tokens(a_x, unmerged), b_x], dim=1)
    out_s = torch.cat([size[:, :num_prefix], gather_tokens(a_s, unmerged), b_s], dim=1)
    return out_x, out_s
