"""Known-answer tests for the pure reducer functions in ``reducers``, one rule at a time (the
contracts they all share are in tests/test_reducer_contracts.py)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from reducers.adaptive import DEFAULT_THRESHOLD, adaptive, significance
from reducers.common import (
    complement_indices,
    descending_by_score,
    gather_tokens,
    scatter_tokens,
    topk_sorted,
    weighted_mean_merge,
)
from reducers.condense import condense, connectivity
from reducers.diffrate import diffrate
from reducers.idle import idle_scores, select_active
from reducers.merge import bipartite_plan, merge
from reducers.prune import prune


def t(*rows: object) -> Tensor:
    """Float tensor from nested literals."""
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------- common


def test_gather_tokens_known_answer() -> None:
    x = torch.arange(16.0).view(2, 4, 2)
    idx = torch.tensor([[3, 0], [1, 1]])
    expected = t([[6.0, 7.0], [0.0, 1.0]], [[10.0, 11.0], [10.0, 11.0]])
    assert torch.equal(gather_tokens(x, idx), expected.float())


def test_scatter_tokens_is_out_of_place() -> None:
    x = torch.zeros(1, 4, 2)
    out = scatter_tokens(x, torch.tensor([[2, 0]]), torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))
    assert torch.equal(out, torch.tensor([[[3.0, 4.0], [0.0, 0.0], [1.0, 2.0], [0.0, 0.0]]]))
    assert torch.equal(x, torch.zeros(1, 4, 2))


def test_topk_sorted_and_complement() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [5.0, 4.0, 3.0, 2.0, 1.0]])
    idx = topk_sorted(scores, 3)
    assert idx.tolist() == [[1, 2, 3], [0, 1, 2]]
    assert complement_indices(idx, 5).tolist() == [[0, 4], [3, 4]]
    assert complement_indices(torch.tensor([[3, 0], [4, 2]]), 5).tolist() == [[1, 2, 4], [0, 1, 3]]


def test_weighted_mean_merge_known_answer() -> None:
    dst, dst_w = t([[0.0, 0.0], [10.0, 10.0]]), t([[1.0], [1.0]])
    src, src_w = t([[2.0, 2.0], [4.0, 4.0], [6.0, 6.0]]), t([[1.0], [3.0], [2.0]])
    merged, w = weighted_mean_merge(dst, dst_w, src, src_w, torch.tensor([[0, 0, 1]]))
    # (0*1 + 2*1 + 4*3) / 5 and (10*1 + 6*2) / 3.
    assert torch.allclose(merged, t([[2.8, 2.8], [22 / 3, 22 / 3]]))
    assert torch.equal(w, t([[5.0], [3.0]]))


# --------------------------------------------------------------------------- prune (EViT)


def _prune_case() -> tuple[Tensor, Tensor, Tensor]:
    x = t([[100.0, 100.0], [1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [5.0, 50.0]])
    size = t([[1.0], [1.0], [2.0], [1.0], [3.0], [1.0]])
    cls_attn = t([0.5, 0.1, 0.4, 0.05, 0.3, 0.15])  # prefix entry ignored
    return x, size, cls_attn


def test_prune_known_answer_fused_raw_is_evits_weighted_sum() -> None:
    x, size, cls_attn = _prune_case()
    out, out_size = prune(x, size, cls_attn, num_prefix=1, keep=2, fuse=True)
    # Kept: patches 1 (0.4) and 3 (0.3). Removed 0, 2, 4 with raw weights 0.1, 0.05, 0.15 (EViT's
    # code): 0.1 [1, 10] + 0.05 [3, 30] + 0.15 [5, 50] = [1, 10], not renormalised.
    expected = t([[100.0, 100.0], [2.0, 20.0], [4.0, 40.0], [1.0, 10.0]])
    assert torch.allclose(out, expected)
    assert torch.equal(out_size, t([[1.0], [2.0], [3.0], [3.0]]))


def test_prune_known_answer_fused_normalized_variant() -> None:
    x, size, cls_attn = _prune_case()
    out, out_size = prune(x, size, cls_attn, num_prefix=1, keep=2, fuse=True, fuse_weights="normalized")
    # The same removed tokens with weights 0.1, 0.05, 0.15 / 0.3: a convex combination.
    expected = t([[100.0, 100.0], [2.0, 20.0], [4.0, 40.0], [10 / 3, 100 / 3]])
    assert torch.allclose(out, expected)
    assert torch.equal(out_size, t([[1.0], [2.0], [3.0], [3.0]]))
    with pytest.raises(ValueError, match="fuse_weights"):
        prune(x, size, cls_attn, num_prefix=1, keep=2, fuse=True, fuse_weights="mean")


def test_prune_known_answer_no_fuse() -> None:
    x, size, cls_attn = _prune_case()
    out, out_size = prune(x, size, cls_attn, num_prefix=1, keep=3, fuse=False)
    assert torch.equal(out, t([[100.0, 100.0], [2.0, 20.0], [4.0, 40.0], [5.0, 50.0]]))
    assert torch.equal(out_size, t([[1.0], [2.0], [3.0], [1.0]]))


def test_prune_gradient_reaches_cls_attn_through_fused_token() -> None:
    x, size, cls_attn = _prune_case()
    cls_attn.requires_grad_(True)
    out, _ = prune(x, size, cls_attn, num_prefix=1, keep=2, fuse=True)
    out[:, -1].sum().backward()
    assert cls_attn.grad is not None and bool((cls_attn.grad[0, [1, 3, 5]] != 0).all())


# --------------------------------------------------------------------------- merge (ToMe)


def _merge_case() -> tuple[Tensor, Tensor, Tensor]:
    # Sequence: CLS, p0..p5 with p_i = [i + 1, -(i + 1)], CLS = [9, 9]. ToMe alternates over the
    # whole sequence: A = positions 0, 2, 4, 6 = CLS, p1, p3, p5 (CLS protected); B = p0, p2, p4.
    x = t([9.0, 9.0], *[[i + 1.0, -(i + 1.0)] for i in range(6)]).unsqueeze(0)
    size = t([1.0], [1.0], [2.0], [1.0], [1.0], [3.0], [1.0]).unsqueeze(0)
    # Best partners by cosine: p3->p2 (0.995) > p1->p0 (0.981) > p5->p2 (0.0).
    metric = t([5.0, -5.0], [1.0, 0.0], [10.0, 2.0], [0.0, 1.0], [1.0, 10.0], [3.0, 3.0], [-1.0, 0.0])
    return x, size, metric.unsqueeze(0)


def test_bipartite_plan_alternates_over_the_whole_sequence() -> None:
    _, _, metric = _merge_case()
    unmerged, src, dst = bipartite_plan(metric, 2, num_prefix=1)
    # A indices: 0 CLS, 1 p1, 2 p3, 3 p5; B indices: 0 p0, 1 p2, 2 p4.
    assert unmerged.tolist() == [[0, 3]]  # CLS first, then p5
    assert sorted(zip(src[0].tolist(), dst[0].tolist(), strict=True)) == [(1, 0), (2, 1)]


def test_merge_known_answer_r2() -> None:
    x, size, metric = _merge_case()
    out, out_size = merge(x, size, metric, num_prefix=1, r=2)
    # Order: CLS, unmerged A (p5), B (p0 <- p1, p2 <- p3, p4).
    # p0: (1 [1, -1] + 2 [2, -2]) / 3; p2: ([3, -3] + [4, -4]) / 2.
    expected = t([9.0, 9.0], [6.0, -6.0], [5 / 3, -5 / 3], [3.5, -3.5], [5.0, -5.0]).unsqueeze(0)
    assert torch.allclose(out, expected)
    assert torch.equal(out_size, t([1.0], [1.0], [3.0], [2.0], [3.0]).unsqueeze(0))


def test_merge_known_answer_two_sources_into_one() -> None:
    x, size, metric = _merge_case()
    out, out_size = merge(x, size, metric, num_prefix=1, r=3)
    # p2 <- p3, p5: ([3, -3] + [4, -4] + [6, -6]) / 3 = 13/3.
    expected = t([9.0, 9.0], [5 / 3, -5 / 3], [13 / 3, -13 / 3], [5.0, -5.0]).unsqueeze(0)
    assert torch.allclose(out, expected)
    assert torch.equal(out_size, t([1.0], [3.0], [3.0], [3.0]).unsqueeze(0))


def test_merge_two_prefix_tokens_protects_the_distillation_token() -> None:
    # CLS, DIST, p0..p5: A = CLS, p0, p2, p4; B = DIST, p1, p3, p5. p0's metric equals DIST's,
    # so without the protection p0 would merge into DIST.
    x = t([9.0, 9.0], [8.0, 8.0], *[[i + 1.0, -(i + 1.0)] for i in range(6)]).unsqueeze(0)
    size = t([1.0], [1.0], [3.0], [1.0], [1.0], [1.0], [1.0], [1.0]).unsqueeze(0)
    metric = t([5.0, -5.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 10.0], [10.0, 2.0], [3.0, 3.0], [-1.0, 0.0])
    # Best partners: p2->p1 (0.995) > p0->p3 (0.981) > p4->p3 (0.832).
    out, out_size = merge(x, size, metric.unsqueeze(0), num_prefix=2, r=2)
    # The official order: CLS, DIST, unmerged A (p4), B (p1 <- p2, p3 <- p0, p5).
    # p1: ([2, -2] + [3, -3]) / 2; p3: (1 [4, -4] + 3 [1, -1]) / 4.
    expected = t([9.0, 9.0], [8.0, 8.0], [5.0, -5.0], [2.5, -2.5], [1.75, -1.75], [6.0, -6.0]).unsqueeze(0)
    assert torch.allclose(out, expected)
    assert torch.equal(out_size, t([1.0], [1.0], [1.0], [2.0], [4.0], [1.0]).unsqueeze(0))


def test_merge_without_prefix_keeps_unmerged_in_similarity_order() -> None:
    # t_i = [i + 1, -(i + 1)]; A = t0, t2, t4; B = t1, t3, t5. Best: t2->t3 (0.995) > t4->t1
    # (0.981) > t0->t3 (0.0). With no class token the official code does not re-sort the
    # unmerged A tokens: they stay in descending similarity, t4 before t0.
    x = t(*[[i + 1.0, -(i + 1.0)] for i in range(6)]).unsqueeze(0)
    size = torch.ones(1, 6, 1, dtype=torch.float64)
    metric = t([-1.0, 0.0], [1.0, 0.0], [1.0, 10.0], [0.0, 1.0], [10.0, 2.0], [3.0, 3.0]).unsqueeze(0)
    assert bipartite_plan(metric, 1, num_prefix=0)[0].tolist() == [[2, 0]]
    out, out_size = merge(x, size, metric, num_prefix=0, r=1)
    expected = t([5.0, -5.0], [1.0, -1.0], [2.0, -2.0], [3.5, -3.5], [6.0, -6.0]).unsqueeze(0)
    assert torch.allclose(out, expected)
    assert torch.equal(out_size, t([1.0], [1.0], [1.0], [2.0], [1.0]).unsqueeze(0))


# --------------------------------------------------------------------------- idle (IdleViT)


def test_select_active_known_answer() -> None:
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.9, 0.2], [9.0, 0.8, 0.1, 0.7, 0.2, 0.3]])
    assert select_active(scores, num_prefix=1, keep=2).tolist() == [[0, 2, 4], [0, 1, 3]]
    assert select_active(scores, num_prefix=2, keep=2).tolist() == [[0, 1, 2, 4], [0, 1, 3, 5]]


def test_idle_scores_rank_by_raw_logits_not_attention() -> None:
    # Two heads, head_dim 1, CLS + 2 patches; q_cls = 1 in both heads, so the logits are the keys.
    q_cls = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    k = t([[0.0], [10.0], [0.0]], [[0.0], [-10.0], [1.0]]).unsqueeze(0)  # [1, 2, 3, 1]
    logits = idle_scores(q_cls, k, rank="logits", scale=0.5)
    # IdleViT's code: head-mean of the raw logits (scale unused): patch 1 -> 0, patch 2 -> 0.5.
    assert torch.allclose(logits, t([0.0, 0.0, 0.5]))
    assert select_active(logits, num_prefix=1, keep=1).tolist() == [[0, 2]]
    # Our softmax variant (scale 1): head 0 puts ~1 on patch 1, head 1 0.73 on patch 2 -> patch 1.
    attn = idle_scores(q_cls, k, rank="softmax", scale=1.0)
    assert select_active(attn, num_prefix=1, keep=1).tolist() == [[0, 1]]
    assert attn[0, 1] == pytest.approx(0.5, abs=1e-3) and attn[0, 2] == pytest.approx(0.3655, abs=1e-3)


@pytest.mark.parametrize("num_prefix", [1, 2])
def test_select_active_gather_scatter_round_trip(num_prefix: int) -> None:
    torch.manual_seed(0)
    x, scores = torch.randn(3, 9, 4), torch.rand(3, 9)
    idx = select_active(scores, num_prefix=num_prefix, keep=4)
    assert idx.shape == (3, num_prefix + 4)
    assert torch.equal(idx[:, :num_prefix], torch.arange(num_prefix).expand(3, -1))
    assert bool((idx.diff(dim=1) > 0).all())  # distinct and ascending
    active = gather_tokens(x, idx) + 1.0  # a stand-in "block" on the active tokens
    out = scatter_tokens(x, idx, active)
    changed = (out != x).any(dim=-1)  # (B, N)
    assert changed.sum(dim=1).tolist() == [num_prefix + 4] * 3
    assert torch.equal(changed.nonzero()[:, 1].view(3, -1), idx)


# --------------------------------------------------------------------------- condense (TC-ViT)


def test_connectivity_known_answer() -> None:
    attn = t([[0.5, 0.5], [1.0, 0.0]])  # A^2 = [[0.75, 0.25], [0.5, 0.5]]
    assert torch.allclose(connectivity(attn, order=1), attn)
    assert torch.allclose(connectivity(attn, order=2), t([[0.625, 0.375], [0.75, 0.25]]))
    assert torch.allclose(connectivity(attn, order=2, weights=[0.0, 1.0]), t([[0.75, 0.25], [0.5, 0.5]]))


def _condense_case() -> tuple[Tensor, Tensor, Tensor]:
    x = t([7.0, 7.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]).unsqueeze(0)
    size = t([1.0], [1.0], [3.0], [2.0], [2.0]).unsqueeze(0)
    attn = t(
        [0.2, 0.4, 0.1, 0.2, 0.1],
        [0.1, 0.5, 0.1, 0.2, 0.1],
        [0.1, 0.6, 0.1, 0.1, 0.1],
        [0.2, 0.1, 0.1, 0.5, 0.1],
        [0.2, 0.1, 0.2, 0.4, 0.1],
    ).unsqueeze(0)
    # conn = [13, 5, 12, 4] / 34, dom = [4, 1, 2, 1] / 8; alpha 0.5:
    # relevance = [120, 37, 82, 33] / 272 -> keep patches 0, 2; 1 -> 0 (C 0.6), 3 -> 2 (C 0.4).
    return x, size, attn


def test_condense_known_answer_size() -> None:
    x, size, attn = _condense_case()
    out, out_size = condense(x, size, attn, num_prefix=1, keep=2, order=1, alpha=0.5, weighting="size")
    assert torch.allclose(out, t([7.0, 7.0], [0.25, 0.75], [3.0, 1.0]).unsqueeze(0))
    assert torch.equal(out_size, t([1.0], [4.0], [4.0]).unsqueeze(0))


def test_condense_known_answer_size_relevance() -> None:
    x, size, attn = _condense_case()
    out, out_size = condense(
        x, size, attn, num_prefix=1, keep=2, order=1, alpha=0.5, weighting="size_relevance"
    )
    # Weights size * relevance * 272: [120, 111, 164, 66].
    expected = t([7.0, 7.0], [120 / 231, 111 / 231], [592 / 230, 328 / 230]).unsqueeze(0)
    assert torch.allclose(out, expected)
    assert torch.equal(out_size, t([1.0], [4.0], [4.0]).unsqueeze(0))


def test_condense_rejects_unknown_weighting() -> None:
    x, size, attn = _condense_case()
    with pytest.raises(ValueError, match="size_relevance"):
        condense(x, size, attn, num_prefix=1, keep=2, order=1, alpha=0.5, weighting="mean")


def test_connectivity_rejects_bad_order_and_weights() -> None:
    attn = torch.eye(3).unsqueeze(0)
    with pytest.raises(ValueError):
        connectivity(attn, order=0)
    with pytest.raises(ValueError):
        connectivity(attn, order=2, weights=[1.0])


# --------------------------------------------------------------------------- adaptive (PPT)


def test_significance_known_answer() -> None:
    sig = significance(t([0.9, 0.2, 0.1, 0.3]), t([5.0, 1.0, 4.0, 2.0]), num_prefix=1)
    assert torch.allclose(sig, t([1 / 6, 1 / 3, 1 / 2]))


def test_most_significant_keeps_descending_significance_order() -> None:
    x = t([9.0, 9.0], *[[i + 1.0, -(i + 1.0)] for i in range(4)]).unsqueeze(0)
    size = t([1.0], [1.0], [2.0], [3.0], [4.0]).unsqueeze(0)
    sig = t([0.1, 0.3, 0.2, 0.4])  # [1, 4]
    out, out_size = descending_by_score(x, size, sig, num_prefix=1, keep=2)
    # PPT's code sorts by significance: p3 (0.4) before p1 (0.3), not in position order.
    assert torch.equal(out, t([9.0, 9.0], [4.0, -4.0], [2.0, -2.0]).unsqueeze(0))
    assert torch.equal(out_size, t([1.0], [4.0], [2.0]).unsqueeze(0))


def test_adaptive_prunes_when_variance_equals_threshold() -> None:
    torch.manual_seed(0)
    x, size = torch.randn(1, 7, 3, dtype=torch.float64), torch.ones(1, 7, 1, dtype=torch.float64)
    cls_attn, value_norm = torch.rand(1, 7, dtype=torch.float64), torch.rand(1, 7, dtype=torch.float64) + 0.5
    metric = torch.randn(1, 7, 4, dtype=torch.float64)
    var = float(significance(cls_attn, value_norm, num_prefix=1).var(dim=-1))
    _, _, at = adaptive(x, size, cls_attn, value_norm, metric, num_prefix=1, r=2, threshold=var)
    _, _, above = adaptive(x, size, cls_attn, value_norm, metric, num_prefix=1, r=2, threshold=var * (1 + 1e-9))
    assert at.tolist() == [True] and above.tolist() == [False]  # official: prune when var >= threshold


def test_adaptive_mixed_batch_matches_prune_and_merge_alone() -> None:
    torch.manual_seed(0)
    num_prefix, r = 1, 3
    x, size = torch.randn(2, 9, 4), torch.rand(2, 9, 1) + 0.5
    metric, value_norm = torch.randn(2, 9, 5), torch.rand(2, 9) + 0.5
    cls_attn = torch.full((2, 9), 1 / 9)  # image 1: flat -> variance 0 -> merge
    value_norm[1] = 1.0
    cls_attn[0] = torch.softmax(torch.randn(9) * 4.0, dim=0)  # image 0: peaked -> prune
    out, out_size, pruned = adaptive(
        x, size, cls_attn, value_norm, metric, num_prefix=num_prefix, r=r, threshold=DEFAULT_THRESHOLD
    )
    assert pruned.tolist() == [True, False]
    sig = significance(cls_attn[:1], value_norm[:1], num_prefix=num_prefix)
    p_x, p_s = descending_by_score(x[:1], size[:1], sig, num_prefix=num_prefix, keep=8 - r)
    m_x, m_s = merge(x[1:], size[1:], metric[1:], num_prefix=num_prefix, r=r)
    assert torch.allclose(out[:1], p_x) and torch.allclose(out_size[:1], p_s)
    assert torch.allclose(out[1:], m_x) and torch.allclose(out_size[1:], m_s)


# --------------------------------------------------------------------------- diffrate (DiffRate)


def test_diffrate_known_answer_sort_prune_merge() -> None:
    x = t([5.0, 5.0], [1.0, 2.0], [2.0, 0.0], [0.0, 3.0], [4.0, 1.0], [9.0, 9.0]).unsqueeze(0)
    size = t([1.0], [2.0], [1.0], [1.0], [1.0], [1.0]).unsqueeze(0)
    cls_attn = t([0.9, 0.1, 0.4, 0.3, 0.15, 0.05])  # prefix entry ignored
    out, out_size = diffrate(x, size, cls_attn, num_prefix=1, prune_to=4, merge_to=2)
    # Sorted: p1 0.4, p2 0.3, p3 0.15, p0 0.1, p4 0.05; the prune drops p4. Destinations CLS, p1,
    # p2; sources p3 and p0. Cosine on the features: p3 -> p1 (4/sqrt(17)); p0 -> p2 (2/sqrt(5)),
    # though p0 is closer still to CLS (0.949), which is never a destination.
    # Values: the plain mean of destination and source; sizes add source size x similarity.
    expected = t([5.0, 5.0], [3.0, 0.5], [0.5, 2.5]).unsqueeze(0)
    assert torch.allclose(out, expected)
    assert torch.allclose(out_size, t([1.0], [1 + 4 / 17**0.5], [1 + 2 * 2 / 5**0.5]).unsqueeze(0))


def test_diffrate_prune_only_keeps_descending_importance() -> None:
    x = t([5.0, 5.0], [1.0, 2.0], [2.0, 0.0], [0.0, 3.0], [4.0, 1.0], [9.0, 9.0]).unsqueeze(0)
    size = torch.ones(1, 6, 1, dtype=torch.float64)
    out, out_size = diffrate(x, size, t([0.9, 0.1, 0.4, 0.3, 0.15, 0.05]), num_prefix=1, prune_to=3, merge_to=3)
    assert torch.equal(out, t([5.0, 5.0], [2.0, 0.0], [0.0, 3.0], [4.0, 1.0]).unsqueeze(0))
    assert torch.equal(out_size, torch.ones(1, 4, 1, dtype=torch.float64))
