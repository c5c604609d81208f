"""Adaptive prune-or-pool per image (PPT).

Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision Transformers", 2024. PPT
measures redundancy by the variance of the token significance scores: a peaked distribution
(high variance) means many inattentive tokens, which are pruned; a flat one (low variance)
means duplicative tokens, which are pooled (merged) like ToMe. Both paths remove r tokens.
"""

from __future__ import annotations

from torch import Tensor

from .common import descending_by_score, safe_denominator
from .merge import merge

__all__ = ["DEFAULT_THRESHOLD", "adaptive", "significance"]

# Variance threshold of the official PPT code for DeiT-S (r_tokens 50 at blocks 3, 6, 9):
# `--threshold 7e-5` in the evaluation command of github.com/xjwu1024/PPT README.md, also the
# default of their MindSpore ViT; their fine-tuning command uses 6e-5. It was set for 196 patch
# tokens; the official code has no rule for other counts (spaces.presets.ppt_threshold scales it).
DEFAULT_THRESHOLD: float = 7e-5


def significance(cls_attn: Tensor, value_norm: Tensor, *, num_prefix: int) -> Tensor:
    """PPT's significance score: CLS attention times value norm, normalised per image.

    cls_attn [B, N], value_norm [B, N] (prefix entries ignored) -> [B, n], each row sums to 1.
    """
    score = cls_attn[:, num_prefix:] * value_norm[:, num_prefix:]  # (B, n)
    return score / safe_denominator(score.sum(dim=-1, keepdim=True))


def adaptive(
    x: Tensor,
    size: Tensor,
    cls_attn: Tensor,
    value_norm: Tensor,
    metric: Tensor,
    *,
    num_prefix: int,
    r: int,
    threshold: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Remove r patch tokens per image, by pruning or by merging.

    x [B, N, C], size [B, N, 1], cls_attn [B, N], value_norm [B, N], metric [B, N, d].
    Images whose significance variance is at least ``threshold`` keep their n - r most
    significant patch tokens (no fused token; kept in descending significance with their
    sizes, as PPT's code does); the others are merged exactly as ``merge(..., r=r)``. Returns
    x' [B, N - r, C], size' [B, N - r, 1] and pruned_mask [B] bool (True where the image was
    pruned). Requires 0 <= r <= n // 2.
    """
    batch, n_total, channels = x.shape
    n = n_total - num_prefix
    if not 0 <= r <= n // 2:
        raise ValueError(f"adaptive: r must be in [0, {n // 2}] (n // 2 for n={n} patch tokens), got {r}")
    sig = significance(cls_attn, value_norm, num_prefix=num_prefix)  # (B, n)
    # PPT Sec. 3.4 redundancy criterion; torch.var's default (unbiased) sample variance, and the
    # official code prunes when it is >= the threshold.
    pruned_mask = sig.var(dim=-1) >= threshold  # (B,)
    if r == 0:
        return x, size, pruned_mask

    def prune_path(rows: Tensor) -> tuple[Tensor, Tensor]:
        # PPT's pruning path: the n - r most significant tokens, in descending significance.
        return descending_by_score(x.index_select(0, rows), size.index_select(0, rows), sig.index_select(0, rows),
                                   num_prefix=num_prefix, keep=n - r)

    def merge_path(rows: Tensor) -> tuple[Tensor, Tensor]:
        return merge(
            x.index_select(0, rows),
            size.index_select(0, rows),
            metric.index_select(0, rows),
            num_prefix=num_prefix,
            r=r,
        )

    out_x = x.new_empty(batch, n_total - r, channels)
    out_s = size.new_empty(batch, n_total - r, 1)
    for rows, path in (
        (pruned_mask.nonzero().squeeze(1), prune_path),
        ((~pruned_mask).nonzero().squeeze(1), merge_path),
    ):
        if rows.numel() == 0:  # skip an empty sub-batch
            continue
        sub_x, sub_s = path(rows)
        out_x = out_x.index_copy(0, rows, sub_x)
        out_s = out_s.index_copy(0, rows, sub_s)
    return out_x, out_s, pruned_mask
