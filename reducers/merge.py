"""Bipartite soft matching (ToMe).

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, Sec. 3. As in the official code
(facebookresearch/ToMe, ``tome/merge.py``), the *whole* sequence alternates between set A
(positions 0, 2, 4, ...) and set B (positions 1, 3, 5, ...); prefix tokens sit in whichever set
their position puts them and are protected: a prefix token in A never merges away, nothing
merges into a prefix token in B. With one class token this gives A = CLS + patches 1, 3, 5, ...
and B = patches 0, 2, 4, .... Each A token finds its most similar B token by the cosine
similarity of the head-mean keys, and the r most similar pairs are merged by a size-weighted
average.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import gather_tokens, weighted_mean_merge

__all__ = ["bipartite_plan", "merge"]


def bipartite_plan(metric: Tensor, r: int, *, num_prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """Which A tokens merge into which B tokens.

    metric [B, N, d] over the whole sequence, prefix tokens included. A = positions 0, 2, 4, ..
    (ceil(N / 2) tokens), B = positions 1, 3, 5, .. (N // 2); indices are within A and B:
    A index i is position 2 i, B index j is position 2 j + 1. Prefix rows of A and prefix
    columns of B are excluded from matching. Returns (unmerged_a_idx [B, na - r], src_a_idx
    [B, r], dst_b_idx [B, r]): A token src_a_idx[:, t] merges into B token dst_b_idx[:, t].
    The unmerged A tokens are in position order when the model has prefix tokens, else in
    descending order of similarity, as in the official code.
    """
    with torch.no_grad():  # indices only, as in the official code
        return _plan(metric, r, num_prefix)


def _plan(metric: Tensor, r: int, num_prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    metric = metric / metric.norm(dim=-1, keepdim=True)  # ToMe's cosine similarity, no eps
    a, b = metric[:, ::2], metric[:, 1::2]  # (B, na, d), (B, nb, d)
    sim = a @ b.transpose(-1, -2)  # (B, na, nb) Sec. 3.1
    protected_a, protected_b = (num_prefix + 1) // 2, num_prefix // 2  # prefix positions in A, in B
    if protected_a or protected_b:
        sim[:, :protected_a, :] = -torch.inf
        sim[:, :, :protected_b] = -torch.inf
    best_sim, best_b = sim.max(dim=-1)  # (B, na) each A token's best partner
    order = best_sim.argsort(dim=-1, descending=True)  # (B, na) the official (unstable) sort
    src = order[:, :r]  # (B, r) the r most similar edges are merged
    unmerged = order[:, r:]
    if num_prefix:
        unmerged = unmerged.sort(dim=-1).values  # prefix tokens back in front, patches in order
    dst = best_b.gather(1, src)  # (B, r)
    return unmerged, src, dst


def merge(x: Tensor, size: Tensor, metric: Tensor, *, num_prefix: int, r: int) -> tuple[Tensor, Tensor]:
    """Merge r patch tokens into others by bipartite soft matching.

    x [B, N, C], size [B, N, 1], metric [B, N, d] (head-mean keys of every token). Returns
    x' [B, N - r, C] and size' [B, N - r, 1] ordered as: prefix tokens, unmerged A patch tokens,
    then all B patch tokens (each the size-weighted mean of itself and the A tokens merged into
    it; sizes add), the official order. Requires 0 <= r <= n // 2 with n = N - num_prefix.
    """
    n = x.shape[1] - num_prefix
    if not 0 <= r <= n // 2:
        raise ValueError(f"merge: r must be in [0, {n // 2}] (n // 2 for n={n} patch tokens), got {r}")
    if r == 0:
        return x, size
    unmerged, src, dst = bipartite_plan(metric, r, num_prefix=num_prefix)
    a_x, b_x = x[:, ::2], x[:, 1::2]
    a_s, b_s = size[:, ::2], size[:, 1::2]
    # Sec. 3.2: the average is weighted by size (patches per token) and the sizes add.
    b_x, b_s = weighted_mean_merge(b_x, b_s, gather_tokens(a_x, src), gather_tokens(a_s, src), dst)
    unm_x, unm_s = gather_tokens(a_x, unmerged), gather_tokens(a_s, unmerged)
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2  # the prefix tokens lead their sets, untouched
    out_x = torch.cat([x[:, :num_prefix], unm_x[:, pa:], b_x[:, pb:]], dim=1)
    out_s = torch.cat([size[:, :num_prefix], unm_s[:, pa:], b_s[:, pb:]], dim=1)
    return out_x, out_s
