"""Analytic cost model: tokens per block and MACs per image, reducer overhead included.

Pure and fast (microseconds), so the search can use GMACs as an objective and a constraint
without running the model. Conventions (those of fvcore, which a test checks us against):

* one multiply-add is one MAC; "GMACs" is what the papers call "GFLOPs";
* matrix products (linear layers, the patch convolution, attention, the reducers' own
  matmuls) are counted in full; LayerNorm counts 5 per element (fvcore's estimate);
* element-wise work (softmax, GELU, adds, gathers, scatter-sums, sorting) counts zero.

What each reducer adds, per image, with N tokens entering (prefix included), n patch tokens,
K tokens after, C = width, D = heads * head_dim, d = head_dim:

* prune:    the CLS attention row computed beside fused attention:           N * D
* merge:    ToMe's similarity of set A against set B on head-mean keys, over the whole
            sequence as the official code alternates it:                     ceil(N/2) * floor(N/2) * d
* adaptive: the CLS row and the similarity (counted for every image, the upper bound)
* condense: the matrix powers A^2..A^K of the head-mean attention:           (K - 1) * N^3
* diffrate: the CLS row, and the similarity of the S merged tokens against the P + M
            destinations on the token features:                              N * D + S (P + M) C
* idle:     LayerNorm and keys of the idle tokens (the active ones reuse theirs), the CLS
            query and its logits against every key:  5 (N-K) C + (N-K) C D + C D + N D
"""

from __future__ import annotations

from dataclasses import dataclass

from spaces.model_spec import ModelSpec
from spaces.schedule import LayerPlan, Schedule

NORM_MACS_PER_ELEMENT = 5  # fvcore's LayerNorm estimate


@dataclass(frozen=True)
class BlockCost:
    """Token counts (prefix included) and MACs of one block for one image."""

    index: int
    method: str
    tokens_in: int
    tokens_attn: int  # tokens that run attention
    tokens_mlp: int  # tokens that run the MLP
    tokens_out: int
    macs: int  # everything, overhead included
    overhead_macs: int  # what the reducer itself computes


def norm_macs(spec: ModelSpec, n: int) -> int:
    return NORM_MACS_PER_ELEMENT * n * spec.embed_dim


def attention_macs(spec: ModelSpec, n: int) -> int:
    """norm1, qkv, q @ k^T, attn @ v and the output projection on n tokens."""
    c, d = spec.embed_dim, spec.attn_dim
    return norm_macs(spec, n) + 3 * n * c * d + 2 * n * n * d + n * d * c


def mlp_macs(spec: ModelSpec, n: int) -> int:
    """norm2, fc1 and fc2 on n tokens."""
    return norm_macs(spec, n) + 2 * n * spec.embed_dim * spec.mlp_hidden


def similarity_macs(spec: ModelSpec, n_tokens: int) -> int:
    """ToMe's bipartite similarity over all N tokens: set A (ceil(N/2)) against set B (floor(N/2))."""
    return ((n_tokens + 1) // 2) * (n_tokens // 2) * spec.head_dim


def block_cost(spec: ModelSpec, plan: LayerPlan, index: int, n_patch: int) -> BlockCost:
    """Cost of one block when `n_patch` patch tokens (plus the prefix) enter it."""
    p = spec.num_prefix_tokens
    n_in = n_patch + p
    n_out = plan.patch_tokens_after(n_patch) + p
    if plan.method == "idle" and not plan.is_identity(n_patch):
        k = plan.active(n_patch) + p
        c, d = spec.embed_dim, spec.attn_dim
        idle = n_in - k
        overhead = norm_macs(spec, idle) + idle * c * d + c * d + n_in * d
        macs = attention_macs(spec, k) + mlp_macs(spec, k) + overhead
        return BlockCost(index, plan.method, n_in, k, k, n_in, macs, overhead)
    overhead = 0
    if plan.method != "none" and not plan.is_identity(n_patch):
        if plan.method in ("prune", "adaptive", "diffrate"):
            overhead += n_in * spec.attn_dim
        if plan.method == "diffrate":
            pruned, merged = plan.diffrate_counts(n_patch)
            overhead += (pruned - merged) * (p + merged) * spec.embed_dim
        if plan.method in ("merge", "adaptive"):
            overhead += similarity_macs(spec, n_in)
        if plan.method == "condense":
            overhead += (plan.order - 1) * n_in**3
    macs = attention_macs(spec, n_in) + mlp_macs(spec, n_out) + overhead
    return BlockCost(index, plan.method, n_in, n_in, n_out, n_out, macs, overhead)


def breakdown(schedule: Schedule) -> list[BlockCost]:
    """Per-block token counts and MACs."""
    spec, n, rows = schedule.model, schedule.model.num_patches, []
    for i, plan in enumerate(schedule.layers):
        rows.append(block_cost(spec, plan, i, n))
        n = plan.patch_tokens_after(n)
    return rows


def macs(schedule: Schedule, *, norms: bool = True, overhead: bool = True) -> int:
    """MACs per image: patch embedding, blocks, final norm and head(s).

    The defaults count what runs (fvcore's convention). `norms=False, overhead=False` is the
    papers' convention (PITFALLS 2): the model's matrix products only, no LayerNorm, nothing
    the reducer itself computes.
    """
    rows = breakdown(schedule)
    spec = schedule.model
    total = spec.patch_macs + sum(r.macs for r in rows) + norm_macs(spec, rows[-1].tokens_out) + spec.head_macs
    if not overhead:
        total -= sum(r.overhead_macs for r in rows)
    if not norms:
        total -= sum(_block_norm_macs(spec, r) for r in rows) + norm_macs(spec, rows[-1].tokens_out)
    return total


def _block_norm_macs(spec: ModelSpec, row: BlockCost) -> int:
    """norm1 and norm2 of a block (an idle block's norm1 over its idle tokens is overhead)."""
    return norm_macs(spec, row.tokens_attn) + norm_macs(spec, row.tokens_mlp)


def gmacs(schedule: Schedule, *, norms: bool = True, overhead: bool = True) -> float:
    return macs(schedule, norms=norms, overhead=overhead) / 1e9


def baseline_gmacs(spec: ModelSpec) -> float:
    return gmacs(Schedule.empty(spec))


def tokens_entering(schedule: Schedule) -> list[int]:
    """Tokens (prefix included) entering each block: what the forward pass sees."""
    return [r.tokens_in for r in breakdown(schedule)]
