"""The one module that knows timm: apply a Schedule to a VisionTransformer, and remove it.

Like ToMe's timm patch, it swaps the classes of the model, its `Block`s and their `Attention`
modules for subclasses that override `forward` (plus helpers), so parameters and state_dict
keys stay timm's and a checkpoint loads either way. Unlike it, it keeps LayerScale, q/k
norms, the attention gate and drop-path, keeps one typed state object per forward, lets
every block know its own index and plan, and can be removed so one loaded model serves
many trials.

Attention stays fused (scaled_dot_product_attention) wherever the method allows: the CLS
row (prune, idle, adaptive) is computed on the side from q[:, :, 0] and K at O(N) cost,
proportional attention passes log(size) as the additive mask, and only `condense` blocks
(which need the whole attention matrix) run the explicit softmax(QK^T)V.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from reducers.adaptive import adaptive
from reducers.common import gather_tokens, scatter_tokens
from reducers.condense import condense
from reducers.diffrate import diffrate
from reducers.idle import idle_scores, select_active
from reducers.merge import merge
from reducers.prune import prune
from spaces.model_spec import ModelSpec
from spaces.schedule import AFTER_ATTENTION, LayerPlan, Schedule, kept_count

# The signals each after-attention method reads from its block's attention.
_NEEDS: dict[str, frozenset[str]] = {
    "prune": frozenset({"cls"}),
    "merge": frozenset({"metric"}),
    "condense": frozenset({"attn"}),
    "adaptive": frozenset({"cls", "metric", "value_norm"}),
    "diffrate": frozenset({"cls"}),
}


@dataclass
class ForwardState:
    """Per-forward state shared by the blocks of one patched model."""

    prop_attn: bool = True
    size: Tensor | None = None  # [B, N, 1]; None while every token is one patch
    tokens_in: list[int] = field(default_factory=list)  # tokens entering each block (bookkeeping)
    idle_sets: list[tuple[int, Tensor]] = field(default_factory=list)  # (block, active idx) for the cut loss
    pruned_images: list[tuple[int, Tensor]] = field(default_factory=list)  # (block, [B] bool) adaptive blocks: pruned or pooled
    # Fine-tuning: idle blocks also record their head-mean attention over every token,
    # (block, active idx, attn [B, N, N]), for reducers.losses.cut_loss_of (O(N^2), training only).
    record_idle_attention: bool = False
    idle_attention: list[tuple[int, Tensor, Tensor]] = field(default_factory=list)

    def reset(self) -> None:
        self.size = None
        self.tokens_in = []
        self.idle_sets = []
        self.pruned_images = []
        self.idle_attention = []

    def attn_bias(self, dtype: torch.dtype) -> Tensor | None:
        """log(size) as an additive attention bias [B, 1, 1, N] (ToMe's proportional attention)."""
        if not self.prop_attn or self.size is None:
            return None
        return self.size.log().to(dtype)[:, None, :, 0].unsqueeze(1)

    def sizes_for(self, x: Tensor) -> Tensor:
        return self.size if self.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)


@dataclass
class Signals:
    """What a reducer reads from attention (head means; None when not asked for)."""

    cls_attn: Tensor | None = None  # [B, N] attention of the CLS query to every token
    metric: Tensor | None = None  # [B, N, head_dim] head-mean keys (ToMe)
    value_norm: Tensor | None = None  # [B, N] norm of each token's value vector (PPT)
    attn: Tensor | None = None  # [B, N, N] head-mean attention (TC-ViT)


class ReducingAttention(Attention):
    """timm's Attention, able to hand out the signals the reducers need."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.attend(x)[0]

    def _split(self, part: int, h: Tensor) -> Tensor:
        """One of q (0), k (1), v (2) for the tokens h [B, N, C] -> [B, H, N, hd]."""
        d = self.attn_dim
        bias = None if self.qkv.bias is None else self.qkv.bias[part * d:(part + 1) * d]
        out = F.linear(h, self.qkv.weight[part * d:(part + 1) * d], bias)
        return out.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _project(self, out: Tensor, h: Tensor) -> Tensor:
        """Heads [B, H, N, hd] -> output [B, N, C], with timm's norm, gate and projection."""
        out = out.transpose(1, 2).flatten(2)
        out = self.norm(out)
        if self.gate is not None:
            out = out * self.gate(h).sigmoid()
        return self.proj_drop(self.proj(out))

    def _mix(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, want: frozenset[str]) -> tuple[Tensor, Signals]:
        sig = Signals()
        dropout = self.attn_drop.p if self.training else 0.0
        if self.fused_attn and "attn" not in want:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
            if "cls" in want:  # the CLS row on the side: O(N), the fused kernel stays
                logits = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
                if bias is not None:
                    logits = logits + bias
                sig.cls_attn = logits.softmax(dim=-1).mean(dim=1)[:, 0]
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
            if bias is not None:
                attn = attn + bias
            attn = attn.softmax(dim=-1)
            if "attn" in want:
                sig.attn = attn.mean(dim=1)
            if "cls" in want:
                sig.cls_attn = attn[:, :, 0].mean(dim=1)
            out = self.attn_drop(attn) @ v
        if "metric" in want:
            sig.metric = k.mean(dim=1)
        if "value_norm" in want:
            sig.value_norm = v.transpose(1, 2).flatten(2).norm(dim=-1)
        return out, sig

    def attend(self, h: Tensor, *, bias: Tensor | None = None, want: frozenset[str] = frozenset()) -> tuple[Tensor, Signals]:
        """Attention over h [B, N, C] (already normed) -> (output [B, N, C], signals)."""
        B, N, _ = h.shape
        qkv = self.qkv(h).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out, sig = self._mix(q, k, v, bias, want)
        return self._project(out, h), sig

    def rank_scores(self, h: Tensor, bias: Tensor | None, rank: str) -> tuple[Tensor, Tensor]:
        """IdleViT ranking before the block: keys of all tokens and a score per token.

        rank "logits" (IdleViT's code): the head-mean of the raw CLS-query logits q_cls k, no
        scale, no softmax, no size bias; "softmax": the head-mean CLS attention (size bias
        included). Returns (keys [B, H, N, hd], scores [B, N]); the active tokens reuse their keys.
        """
        k = self.k_norm(self._split(1, h))
        q_cls = self.q_norm(self._split(0, h[:, :1]))  # [B, H, 1, hd]
        return k, idle_scores(q_cls, k, rank=rank, scale=self.scale, bias=bias)

    def full_attention(self, h: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
        """Head-mean attention [B, N, N] of every token of h [B, N, C] over keys k (the cut loss's A)."""
        q = self.q_norm(self._split(0, h))
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        return logits.softmax(dim=-1).mean(dim=1)

    def attend_active(self, h: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
        """Attention among the active tokens h [B, K, C] whose keys k [B, H, K, hd] are known."""
        q = self.q_norm(self._split(0, h))
        v = self._split(2, h)
        out, _ = self._mix(q, k, v, bias, frozenset())
        return self._project(out, h)


class ReducingBlock(Block):
    """timm's pre-norm Block running its LayerPlan."""

    _ts_plan: LayerPlan
    _ts_state: ForwardState
    _ts_index: int
    _ts_prefix: int

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        plan, state, p = self._ts_plan, self._ts_state, self._ts_prefix
        state.tokens_in.append(x.shape[1])
        n = x.shape[1] - p
        if plan.method == "idle" and not plan.is_identity(n):
            return self._idle(x, plan, state)
        reduce = plan.method in AFTER_ATTENTION and not plan.is_identity(n)
        h, sig = self.attn.attend(self.norm1(x), bias=state.attn_bias(x.dtype), want=_NEEDS[plan.method] if reduce else frozenset())
        x = x + self.drop_path1(self.ls1(h))
        if reduce:
            x = self._reduce(x, plan, sig, state)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _reduce(self, x: Tensor, plan: LayerPlan, sig: Signals, state: ForwardState) -> Tensor:
        p, n = self._ts_prefix, x.shape[1] - self._ts_prefix
        if plan.method == "prune" and not plan.fuse and state.size is None:
            x, _ = prune(x, state.sizes_for(x), sig.cls_attn, num_prefix=p, keep=kept_count(n, plan.keep), fuse=False)
            return x  # every kept token is still one patch
        size = state.sizes_for(x)
        if plan.method == "prune":
            x, size = prune(x, size, sig.cls_attn, num_prefix=p, keep=kept_count(n, plan.keep), fuse=plan.fuse,
                            fuse_weights=plan.fuse_weights)
        elif plan.method == "merge":
            x, size = merge(x, size, sig.metric, num_prefix=p, r=plan.removed(n))
        elif plan.method == "condense":
            x, size = condense(x, size, sig.attn, num_prefix=p, keep=kept_count(n, plan.keep),
                               order=plan.order, alpha=plan.alpha, weighting=plan.weighting)
        elif plan.method == "diffrate":
            prune_to, merge_to = plan.diffrate_counts(n)
            x, size = diffrate(x, size, sig.cls_attn, num_prefix=p, prune_to=prune_to, merge_to=merge_to)
        else:
            x, size, pruned = adaptive(x, size, sig.cls_attn, sig.value_norm, sig.metric, num_prefix=p,
                                       r=plan.removed(n), threshold=plan.threshold)
            state.pruned_images.append((self._ts_index, pruned))
        state.size = size
        return x

    def _idle(self, x: Tensor, plan: LayerPlan, state: ForwardState) -> Tensor:
        """IdleViT: rank the tokens, run the block on the active ones, pass the rest through."""
        p, n = self._ts_prefix, x.shape[1] - self._ts_prefix
        h = self.norm1(x)
        bias = state.attn_bias(x.dtype)
        keys, scores = self.attn.rank_scores(h, bias, plan.rank)
        idx = select_active(scores, num_prefix=p, keep=plan.active(n))  # [B, K]
        state.idle_sets.append((self._ts_index, idx))
        if state.record_idle_attention:
            state.idle_attention.append((self._ts_index, idx, self.attn.full_attention(h, keys, bias)))
        head_idx = idx[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        bias_a = None if bias is None else bias.gather(-1, idx[:, None, None, :])
        xa = gather_tokens(x, idx)
        xa = xa + self.drop_path1(self.ls1(self.attn.attend_active(gather_tokens(h, idx), keys.gather(2, head_idx), bias_a)))
        xa = xa + self.drop_path2(self.ls2(self.mlp(self.norm2(xa))))
        return scatter_tokens(x, idx, xa)


class _ReducingModelMixin:
    """Resets the per-forward state before the blocks run; average pooling weighs each token
    by the patches it stands for (ToMe's MAE patch: the average of the unmerged patches)."""

    _ts_state: ForwardState

    def forward_features(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._ts_state.reset()
        return super().forward_features(*args, **kwargs)  # type: ignore[misc]

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type  # type: ignore[attr-defined]
        size = self._ts_state.size
        if pool_type not in ("avg", "avgmax") or size is None:
            return super().pool(x, pool_type=pool_type)  # type: ignore[misc]
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens  # type: ignore[attr-defined]
        mean = weighted_mean(x[:, start:], size[:, start:])
        return mean if pool_type == "avg" else 0.5 * (x[:, start:].amax(dim=1) + mean)


def weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    """The mean of tokens x [B, N, C] over N, each counted `size` [B, N, 1] times."""
    return (x * size).sum(dim=1) / size.sum(dim=1)


_MODEL_CLASSES: dict[type, type] = {}


def _reducing_model_class(cls: type) -> type:
    if cls not in _MODEL_CLASSES:
        _MODEL_CLASSES[cls] = type(f"Reducing{cls.__name__}", (_ReducingModelMixin, cls), {})
    return _MODEL_CLASSES[cls]


def check_supported(model: nn.Module) -> None:
    """Raise a one-line ValueError unless `model` is a VisionTransformer this module can patch
    and the cost model prices: timm's pre-norm Block, Attention and Mlp, pooled by a class
    token, an average, a max or nothing (not an attention-pool head)."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer; supported: timm's "
                         "VisionTransformer (ViT, DeiT, DeiT III, DINOv2, ...) with its own Block, Attention and Mlp")
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (Block, ReducingBlock):
            raise ValueError(f"block {i} is a {type(blk).__name__}; only timm's pre-norm Block is supported")
        if type(blk.attn) not in (Attention, ReducingAttention):
            raise ValueError(f"block {i} attention is a {type(blk.attn).__name__}; only timm's Attention is supported")
        if type(blk.mlp) is not Mlp:
            raise ValueError(f"block {i} MLP is a {type(blk.mlp).__name__}; only timm's Mlp is supported "
                             "(the cost model prices fc1 and fc2 of one hidden width)")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"the {model.global_pool!r} head pools by attention, which the cost model does not price; "
                         "supported heads: class token, avg, avgmax, max")


def head_reads_prefix_only(model: nn.Module) -> bool:
    """Whether the head reads the prefix tokens only (timm's "token" pooling: the class token, and
    a distilled model's distillation token), so patch tokens removed after the last block's
    attention change no prediction (spaces.presets.output_key)."""
    return getattr(model, "global_pool", None) == "token" and getattr(model, "attn_pool", None) is None


def apply_schedule(model: nn.Module, schedule: Schedule) -> nn.Module:
    """Patch `model` in place to run `schedule`; returns it. Re-applying replaces the schedule."""
    check_supported(model)
    spec = ModelSpec.from_model(model)
    if not spec.same_shape(schedule.model):
        raise ValueError(
            f"schedule is for {schedule.model.name} (depth {schedule.model.depth}, {schedule.model.tokens} tokens, "
            f"width {schedule.model.embed_dim}); model has depth {spec.depth}, {spec.tokens} tokens, width {spec.embed_dim}"
        )
    uses_cls = schedule.cls_methods()
    if uses_cls and getattr(model, "cls_token", None) is None:
        raise ValueError(f"methods {uses_cls} rank tokens by CLS attention; this model has no class token")
    if not hasattr(model, "_ts_original_class"):
        model._ts_original_class = type(model)
    model.__class__ = _reducing_model_class(model._ts_original_class)
    state = ForwardState(prop_attn=schedule.prop_attn)
    model._ts_state, model._ts_schedule = state, schedule
    for i, (blk, plan) in enumerate(zip(model.blocks, schedule.layers, strict=True)):
        blk.__class__, blk.attn.__class__ = ReducingBlock, ReducingAttention
        blk._ts_plan, blk._ts_state, blk._ts_index, blk._ts_prefix = plan, state, i, model.num_prefix_tokens
    return model


def remove_schedule(model: nn.Module) -> nn.Module:
    """Undo `apply_schedule`: the model is timm's own again. A no-op on an unpatched model."""
    if not hasattr(model, "_ts_original_class"):
        return model
    model.__class__ = model._ts_original_class
    for name in ("_ts_original_class", "_ts_state", "_ts_schedule"):
        delattr(model, name)
    for blk in model.blocks:
        blk.__class__, blk.attn.__class__ = Block, Attention
        for name in ("_ts_plan", "_ts_state", "_ts_index", "_ts_prefix"):
            delattr(blk, name)
    return model


def current_schedule(model: nn.Module) -> Schedule | None:
    """The schedule a model is patched with, if any."""
    return getattr(model, "_ts_schedule", None)


def last_forward_state(model: nn.Module) -> ForwardState | None:
    """Bookkeeping of the last forward pass (token counts entering each block, sizes)."""
    return getattr(model, "_ts_state", None)


def block_call(model: nn.Module, index: int, x: Tensor, *, size: Tensor | None = None):  # type: ignore[no-untyped-def]
    """A no-argument call that runs block `index` of a patched model on tokens x [B, N, C], as if
    they entered it carrying `size` [B, N, 1] (None: every token one patch), resetting the
    per-forward state each time (for timing one block alone: search/latency.py)."""
    blk = model.blocks[index]
    if not isinstance(blk, ReducingBlock):
        raise ValueError("block_call needs a model patched by apply_schedule")

    def run() -> Tensor:
        blk._ts_state.reset()  # read at each call: apply_schedule may have swapped the state object
        blk._ts_state.size = size
        return blk(x)

    return run


def mlp_call(model: nn.Module, index: int, x: Tensor):  # type: ignore[no-untyped-def]
    """A no-argument call that runs the MLP half of block `index` (norm2, MLP, LayerScale, residual)
    on tokens x [B, N, C]: what a block's reduction leaves to the tokens it keeps."""
    blk = model.blocks[index]
    return lambda: x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
