"""Index helpers shared by the token reducers.

Everything here is a pure tensor function. Index selection (``topk``/``sort``) is naturally
non-differentiable; gradients flow through the gathered and merged token values.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_keep",
    "complement_indices",
    "descending_by_score",
    "gather_tokens",
    "safe_denominator",
    "scatter_sum",
    "scatter_tokens",
    "topk_sorted",
    "weighted_mean_merge",
]


def check_keep(keep: int, n: int, method: str) -> None:
    """Raise ValueError unless 1 <= keep <= n (n = number of patch tokens)."""
    if not 1 <= keep <= n:
        raise ValueError(f"{method}: keep must be in [1, {n}] (the patch tokens), got {keep}")


def _expand_idx(idx: Tensor, channels: int) -> Tensor:
    """idx [B, K] -> [B, K, channels], a view usable by gather/scatter along dim 1."""
    return idx.unsqueeze(-1).expand(-1, -1, channels)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` of every image: x [B, N, C], idx [B, K] long -> [B, K, C]."""
    return x.gather(1, _expand_idx(idx, x.shape[-1]))


def scatter_tokens(x: Tensor, idx: Tensor, values: Tensor) -> Tensor:
    """Out-of-place copy of x [B, N, C] with rows idx [B, K] replaced by values [B, K, C]."""
    return x.scatter(1, _expand_idx(idx, x.shape[-1]), values)


def topk_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices [B, k] of the k largest scores [B, n], ascending by index (spatial order kept)."""
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def descending_by_score(x: Tensor, size: Tensor, scores: Tensor, *, num_prefix: int, keep: int) -> tuple[Tensor, Tensor]:
    """The prefix tokens, then the ``keep`` patch tokens of largest score in descending order of score.

    x [B, N, C], size [B, N, 1], scores [B, n] (patch tokens only) -> x' [B, P + keep, C] and
    size' [B, P + keep, 1]. PPT's pruning path and DiffRate's sort keep this order, which the next
    block's A/B split sees; the sort is torch's default (unstable) one, as in their code.
    """
    order = scores.sort(dim=-1, descending=True).indices[:, :keep] + num_prefix
    prefix = torch.arange(num_prefix, device=x.device).expand(x.shape[0], -1)
    idx = torch.cat([prefix, order], dim=1)
    return gather_tokens(x, idx), gather_tokens(size, idx)


def complement_indices(idx: Tensor, n: int) -> Tensor:
    """The indices [B, n - k] in [0, n) that are not in idx [B, k] (distinct), ascending."""
    batch, k = idx.shape
    others = torch.ones(batch, n, dtype=torch.bool, device=idx.device)
    others.scatter_(1, idx, 0)
    # A stable descending sort puts the True ("other") positions first, in index order,
    # without the host synchronisation that ``nonzero`` would need on a GPU.
    order = others.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices
    return order[:, : n - k]


def safe_denominator(t: Tensor) -> Tensor:
    """t clamped away from zero, for normalisations whose total can underflow to 0."""
    return t.clamp_min(torch.finfo(t.dtype).tiny)


def scatter_sum(dst: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """Out-of-place dst [B, M, C] with src [B, S, C] added into rows idx [B, S] (repeats add)."""
    return dst.scatter_reduce(1, _expand_idx(idx, dst.shape[-1]), src, reduce="sum")


def weighted_mean_merge(
    dst: Tensor, dst_w: Tensor, src: Tensor, src_w: Tensor, idx: Tensor
) -> tuple[Tensor, Tensor]:
    """Weighted average of sources into destinations.

    dst [B, M, C] with weights dst_w [B, M, 1]; src [B, S, C] with weights src_w [B, S, 1];
    source s goes into destination idx[b, s]. Destination m becomes
    (w_m x_m + sum_{s -> m} w_s x_s) / (w_m + sum_{s -> m} w_s).
    Returns (merged [B, M, C], summed weights [B, M, 1]).
    """
    # ToMe, Bolya et al. 2023, Sec. 3: sum the weighted tokens, sum the weights, divide.
    num = scatter_sum(dst * dst_w, idx, src * src_w)
    den = scatter_sum(dst_w, idx, src_w)
    return num / safe_denominator(den), den
