"""Fine-tuning losses: distillation from the unreduced teacher and IdleViT's token cut loss.

Pure functions of tensors. The cut loss reads the attention an idle block records during a
training forward (``ForwardState.record_idle_attention``); see ``cut_loss_of``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cut_loss_of", "distillation_kl", "feature_mse", "token_cut_loss"]


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) of the softened class distributions, mean over the batch, times T^2."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (t * t)


def feature_mse(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared error between student and teacher features of equal shape (pre-logits)."""
    return F.mse_loss(student_features.float(), teacher_features.float())


def token_cut_loss(attn: Tensor, active: Tensor) -> Tensor:
    """IdleViT's L_intra + L_inter for one idle block, mean over the batch.

    attn [B, N, N]: head-mean attention of the block over every token (rows sum to 1).
    active [B, K]: positions of the active set S (CLS at 0 included); the idle set I is the
    rest. With A = attn:

        L_inter = 1/K sum_{i in S} (sum_{j in I} A_ij)^2 + 1/(N-K) sum_{i in I} (sum_{j in S, j != 0} A_ij)^2
        L_intra = 1/K sum_{i in S} (1 - sum_{j in S} A_ij)^2

    Both vanish when active and idle tokens do not attend to each other (a graph cut).
    """
    b, n, _ = attn.shape
    is_active = torch.zeros(b, n, dtype=attn.dtype, device=attn.device).scatter_(1, active, 1.0)
    is_idle = 1.0 - is_active
    k = is_active.sum(dim=1)
    to_idle = (attn * is_idle[:, None, :]).sum(dim=-1)  # [B, N]: attention each row pays to I
    to_active = (attn * is_active[:, None, :]).sum(dim=-1)  # [B, N]: ... to S (CLS included)
    to_active_no_cls = to_active - attn[:, :, 0]
    inter = (to_idle.square() * is_active).sum(dim=1) / k
    inter = inter + (to_active_no_cls.square() * is_idle).sum(dim=1) / (n - k).clamp(min=1)
    intra = ((1.0 - to_active).square() * is_active).sum(dim=1) / k
    return (inter + intra).mean()


def cut_loss_of(records: Sequence[tuple[int, Tensor, Tensor]]) -> Tensor | None:
    """Sum of ``token_cut_loss`` over the idle blocks of one forward: records of (block, active, attn).

    None when the forward had no idle block (nothing to cut).
    """
    if not records:
        return None
    return torch.stack([token_cut_loss(attn, active) for _, active, attn in records]).sum()
