"""Connectivity-based token condensation (TC-ViT).

TC-ViT has no public code; this follows the spec in DESIGN.md. With head-mean attention A
(rows sum to 1), the connectivity of order K is C = sum_{k=1..K} w_k A^k: entry (i, j) sums
the messages along all attention paths of length <= K from token i to token j. The relevance
of a patch token mixes how strongly the others reach it (connectivity) with how much the CLS
token attends to it (dominance); the least relevant tokens are fused into the kept token
they are most connected to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import (
    check_keep,
    complement_indices,
    gather_tokens,
    safe_denominator,
    scatter_sum,
    topk_sorted,
    weighted_mean_merge,
)

__all__ = ["WEIGHTINGS", "condense", "connectivity"]

# Fusion weights: "size" averages by patch count; "size_relevance" also favours relevant tokens.
WEIGHTINGS: tuple[str, ...] = ("size", "size_relevance")


def connectivity(attn: Tensor, *, order: int, weights: Sequence[float] | None = None) -> Tensor:
    """C = sum_{k=1..K} w_k A^k for attn A [B, N, N]; default w_k = 1 / K. Returns [B, N, N]."""
    if order < 1:
        raise ValueError(f"connectivity: order must be >= 1, got {order}")
    if weights is None:
        weights = [1.0 / order] * order
    if len(weights) != order:
        raise ValueError(f"connectivity: need {order} weights (one per power), got {len(weights)}")
    power = attn  # A^1
    conn = weights[0] * power
    for w in weights[1:]:  # K is small (2-3): one batched matmul per power
        power = power @ attn  # (B, N, N)
        conn = conn + w * power
    return conn


def _normalise(t: Tensor) -> Tensor:
    """t [B, n] scaled to sum 1 per image."""
    return t / safe_denominator(t.sum(dim=-1, keepdim=True))


def condense(
    x: Tensor,
    size: Tensor,
    attn: Tensor,
    *,
    num_prefix: int,
    keep: int,
    order: int,
    alpha: float,
    weighting: str,
) -> tuple[Tensor, Tensor]:
    """Keep the ``keep`` most relevant patch tokens and fuse every other token into one of them.

    x [B, N, C], size [B, N, 1], attn [B, N, N] head-mean attention (rows sum to 1).
    relevance = alpha * conn + (1 - alpha) * dom over patch tokens, where conn_j is the column
    sum of C over patch rows and dom_j = attn[:, 0, j], each normalised to sum 1. Unkept token i
    goes to the kept token j maximising C[i, j]; kept j becomes
    (w_j x_j + sum_{i -> j} w_i x_i) / (w_j + sum_{i -> j} w_i) with w = size ("size") or
    size * relevance ("size_relevance"); sizes add. Returns x' [B, P + keep, C], size'
    [B, P + keep, 1] with P = num_prefix, kept tokens in their original order.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"condense: unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"condense: alpha must be in [0, 1], got {alpha}")
    n = x.shape[1] - num_prefix
    check_keep(keep, n, "condense")
    if keep == n:
        return x, size
    conn_all = connectivity(attn, order=order)[:, num_prefix:, num_prefix:]  # (B, n, n)
    conn = _normalise(conn_all.sum(dim=1))  # (B, n) how much the patch tokens reach j
    dom = _normalise(attn[:, 0, num_prefix:])  # (B, n) CLS attention
    relevance = alpha * conn + (1.0 - alpha) * dom  # (B, n)
    kept = topk_sorted(relevance, keep)  # (B, keep)
    dropped = complement_indices(kept, n)  # (B, n - keep)
    # C restricted to rows = dropped tokens, columns = kept tokens; best kept partner per row.
    c_dk = gather_tokens(conn_all, dropped).gather(2, kept.unsqueeze(1).expand(-1, n - keep, -1))
    dst = c_dk.argmax(dim=-1)  # (B, n - keep) index into ``kept``
    patches, psize = x[:, num_prefix:], size[:, num_prefix:]  # (B, n, C), (B, n, 1)
    w = psize
    if weighting == "size_relevance":
        # Clamped so a token with zero relevance cannot make a 0 / 0 average.
        w = psize * safe_denominator(relevance).unsqueeze(-1)
    kept_x, _ = weighted_mean_merge(
        gather_tokens(patches, kept),
        gather_tokens(w, kept),
        gather_tokens(patches, dropped),
        gather_tokens(w, dropped),
        dst,
    )
    kept_s = scatter_sum(gather_tokens(psize, kept), dst, gather_tokens(psize, dropped))
    out_x = torch.cat([x[:, :num_prefix], kept_x], dim=1)
    out_s = torch.cat([size[:, :num_prefix], kept_s], dim=1)
    return out_x, out_s
