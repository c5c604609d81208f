"""Fine-tune a model under a token-reduction schedule (REFERENCE.md, IdleViT's recipe).

    loss = CE(student, y) + alpha * KL(teacher || student) + beta * MSE(pre-logits) + theta * L_cut

The teacher is a frozen copy of the model before the schedule is applied; L_cut sums IdleViT's
token cut loss over the idle blocks (0 without any). Training data are a step-indexed function
(`train_stream`), so a job resumed from ``checkpoint.pt`` sees exactly the batches it would
have seen. Under torchrun (WORLD_SIZE > 1) each process trains on its own stream
(`rank_seed`) with DistributedDataParallel and only rank 0 writes. Knows nothing of Optuna or Ray.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from reducers import ForwardState, apply_schedule, last_forward_state, remove_schedule
from reducers.losses import cut_loss_of, distillation_kl, feature_mse
from search.data import NO_LABEL, TIMM_CROP_SCALE, FolderStream, TensorSet
from search.evaluate import accuracy, predict
from spaces import Schedule, gmacs

__all__ = ["EMBEDDED_EPOCH", "FinetuneSettings", "finetune", "load_job", "lr_at", "rank_seed", "train_stream"]

Batches = Callable[[int], tuple[Tensor, Tensor]]  # step -> (normalised images [B, 3, H, W], labels [B])
EMBEDDED_EPOCH = 10_000  # images in one "epoch" of the endless embedded training stream (for --epochs)
CHECKPOINT, WEIGHTS, SCHEDULE_FILE, METRICS = "checkpoint.pt", "model.safetensors", "schedule.yaml", "metrics.json"
LOSSES = ("total", "ce", "kl", "mse", "cut")


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that shapes the trajectory; a checkpoint resumes only under equal settings."""

    steps: int
    batch_size: int = 64  # per process
    lr: float = 1e-4  # peak learning rate
    min_lr_ratio: float = 0.01  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int | None = None  # linear warm-up; None: min(50, steps // 10)
    weight_decay: float = 0.05  # AdamW; none on biases, norms, pos_embed, cls_token (DeiT)
    clip_grad: float = 1.0  # max gradient norm; 0 turns clipping off
    alpha: float = 5.0  # KL weight (IdleViT)
    beta: float = 500.0  # feature MSE weight (IdleViT)
    theta: float = 20.0  # token cut loss weight (IdleViT)
    temperature: float = 1.0  # of the distillation KL
    label_smoothing: float = 0.0
    checkpoint_every: int = 50  # steps between checkpoints (and always after the last step)
    amp: bool | None = None  # None: on for CUDA (bf16 where supported, else fp16 with a GradScaler)
    seed: int = 0  # seeds dropout / drop-path per step
    eval_every: int = 0  # steps between evaluations; 0: only before and after

    def __post_init__(self) -> None:
        def need(ok: bool, what: str, value: Any) -> None:
            if not ok:
                raise ValueError(f"{what}, got {value!r}")

        def count(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        need(count(self.steps) and self.steps > 0, "steps must be a positive integer", self.steps)
        if self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", min(50, self.steps // 10))
        need(count(self.batch_size) and self.batch_size > 0, "batch_size must be a positive integer", self.batch_size)
        need(self.lr > 0, "lr must be positive", self.lr)
        need(0 < self.min_lr_ratio <= 1, "min_lr_ratio must be in (0, 1]", self.min_lr_ratio)
        need(count(self.warmup_steps) and 0 <= self.warmup_steps <= self.steps,
             f"warmup_steps must be an integer in [0, steps={self.steps}]", self.warmup_steps)
        for name in ("weight_decay", "clip_grad", "alpha", "beta", "theta"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0", getattr(self, name))
        need(self.temperature > 0, "temperature must be positive", self.temperature)
        need(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)", self.label_smoothing)
        need(count(self.checkpoint_every) and self.checkpoint_every > 0, "checkpoint_every must be a positive integer",
             self.checkpoint_every)
        need(count(self.eval_every) and self.eval_every >= 0, "eval_every must be a non-negative integer", self.eval_every)
        need(self.amp is None or isinstance(self.amp, bool), "amp must be True, False or None", self.amp)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_at(step: int, s: FinetuneSettings) -> float:
    """Linear warm-up to s.lr over s.warmup_steps, then a cosine down to s.lr * s.min_lr_ratio at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    low = s.lr * s.min_lr_ratio
    progress = (step - s.warmup_steps) / max(1, s.steps - 1 - s.warmup_steps)
    return low + 0.5 * (s.lr - low) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def rank_seed(seed: int) -> int:
    """This process's stream seed: seed + rank * 7919 under torchrun, so ranks see different batches."""
    return seed + int(os.environ.get("RANK", "0")) * 7919


def train_stream(data: str | None, data_config: dict, batch_size: int, seed: int, *,
                 num_classes: int | None = None, crop_scale: float = TIMM_CROP_SCALE) -> Batches:
    """Training batches by step: the embedded default's stream, or a directory (`search.data.FolderStream`).

    The embedded stream uses seed 1000 + seed, so it never repeats the stream the default was trained on.
    """
    if data is not None:
        return FolderStream(data, data_config, batch_size=batch_size, seed=seed, num_classes=num_classes,
                            crop_scale=crop_scale)
    from search.embedded import synthetic

    def embedded(step: int) -> tuple[Tensor, Tensor]:
        images, labels = synthetic.stream_batch(step, batch_size, seed=1000 + seed)
        return synthetic.normalize(images), labels

    return embedded


def load_job(config_path: str | Path) -> tuple[Schedule, dict[str, Any]]:
    """(schedule, source) of an exported config (search.report.export_configs); ValueError naming the file."""
    path = Path(config_path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"malformed config file {path}: {first}") from None
    if not isinstance(doc, dict) or "schedule" not in doc:
        raise ValueError(f"config file {path} has no 'schedule' (expected an exported config, runs/<run>/configs/*.yaml)")
    source = doc.get("source") or {}
    if not isinstance(source, dict):
        raise ValueError(f"config file {path}: 'source' must be a mapping, got {type(source).__name__}")
    try:
        schedule = Schedule.from_dict(doc["schedule"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"config file {path} has an invalid schedule: {err}") from None
    return schedule, source


class _Heads(nn.Module):
    """model(x) -> (logits, pooled pre-logits) from one forward_features: the call DDP wraps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.model.forward_features(x)
        return self.model.forward_head(feats), self.model.forward_head(feats, pre_logits=True)


def _losses(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, s: FinetuneSettings,
            state: ForwardState) -> dict[str, Tensor]:
    """The recipe's terms for one batch; `state` is the student's, where its idle blocks record attention."""
    with torch.no_grad():
        t_logits, t_feats = teacher(x)
    logits, feats = student(x)
    labelled = (y != NO_LABEL).sum().clamp(min=1)  # unlabelled images keep only the distillation terms
    ce = F.cross_entropy(logits.float(), y, ignore_index=NO_LABEL, reduction="sum",
                         label_smoothing=s.label_smoothing) / labelled
    kl = distillation_kl(logits, t_logits, s.temperature)
    mse = feature_mse(feats, t_feats)  # pooled features: the student's token count differs from the teacher's
    cut = cut_loss_of(state.idle_attention)  # filled by the forward above
    cut = logits.new_zeros((), dtype=torch.float32) if cut is None else cut.float()
    total = ce + s.alpha * kl + s.beta * mse + s.theta * cut
    return {"total": total, "ce": ce, "kl": kl, "mse": mse, "cut": cut}


def _optimizer(model: nn.Module, s: FinetuneSettings) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms and the model's no_weight_decay() (pos_embed, cls_token)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr)


def _amp_dtype(s: FinetuneSettings, device: torch.device) -> torch.dtype | None:
    if not (device.type == "cuda" if s.amp is None else s.amp):
        return None
    if device.type != "cuda" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _evaluate(model: nn.Module, data: TensorSet, reference: Tensor, batch_size: int) -> dict[str, Any]:
    """Off-the-shelf metrics of the patched model (eval mode, no idle-attention recording); back to training after."""
    state = last_forward_state(model)
    state.record_idle_attention = False
    try:
        return asdict(accuracy(predict(model, data, batch_size=batch_size), data.labels, reference))
    finally:
        model.train()
        state.record_idle_attention = True


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _resume_point(out_dir: Path, schedule: Schedule, s: FinetuneSettings) -> dict[str, Any] | None:
    """The checkpoint in out_dir if there is one; ValueError if it belongs to another schedule or settings."""
    path = out_dir / CHECKPOINT
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is bad input
        raise ValueError(f"cannot read {path}: {type(err).__name__}; move it away to start afresh") from None
    if ckpt.get("schedule") != schedule.to_dict():
        raise ValueError(f"{path} belongs to another schedule ({ckpt.get('schedule', {}).get('name')!r}); "
                         f"use another output directory")
    theirs, ours = ckpt.get("settings", {}), s.to_dict()
    diff = [f"{k} {theirs.get(k)!r} vs {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        raise ValueError(f"{path} was written with other settings ({', '.join(diff)}); "
                         f"repeat the original flags or use another output directory")
    return ckpt


def _init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, torch.device(device)


def finetune(model: nn.Module, schedule: Schedule, batches: Batches, settings: FinetuneSettings, *,
             out_dir: str | Path, eval_set: TensorSet | None = None, device: str = "cpu",
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune `model` in place under `schedule`; write checkpoint.pt, then the finished files, to out_dir.

    Resumes from out_dir/checkpoint.pt when it was written for the same schedule and settings.
    Finished files: model.safetensors (the student's state dict, timm's keys), schedule.yaml and
    metrics.json. Returns the metrics. The model is left patched with the schedule, in eval mode.
    """
    out_dir = Path(out_dir)
    if (out_dir / WEIGHTS).exists():
        raise ValueError(f"{out_dir / WEIGHTS} exists: that fine-tune is finished and nothing is overwritten")
    rank, world, dev = _init_distributed(device)
    try:
        return _train(model, schedule, batches, settings, out_dir, eval_set if rank == 0 else None, dev,
                      log if rank == 0 else (lambda _line: None), rank, world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _restore(student: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             ckpt: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint's states; returns (steps done, the run record)."""
    student.load_state_dict(ckpt["student"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    return ckpt["step"], {**ckpt["run"], "resumed_from": ckpt["step"]}


def _step(net: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, s: FinetuneSettings, state: ForwardState,
          optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, amp: torch.dtype | None) -> dict[str, Tensor]:
    """One optimiser step on the recipe's loss (autocast, gradient scaling and clipping as configured)."""
    with torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
        losses = _losses(net, teacher, x, y, s, state)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["total"]).backward()
    if s.clip_grad > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], s.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return {k: v.detach() for k, v in losses.items()}


def _train(model: nn.Module, schedule: Schedule, batches: Batches, s: FinetuneSettings, out_dir: Path,
           eval_set: TensorSet | None, device: torch.device, log: Callable[[str], None], rank: int,
           world: int) -> dict[str, Any]:
    teacher = _Heads(remove_schedule(copy.deepcopy(model))).to(device).eval().requires_grad_(False)
    student = apply_schedule(model, schedule).to(device)  # ValueError before anything is written
    state, amp = last_forward_state(student), _amp_dtype(s, device)
    optimizer, scaler = _optimizer(student, s), torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    reference = predict(teacher.model, eval_set) if eval_set is not None else None
    ckpt = _resume_point(out_dir, schedule, s)
    if ckpt is not None:
        start, run = _restore(student, optimizer, scaler, ckpt)
        del ckpt  # a second copy of the weights and optimiser state
        log(f"resumed from step {start} ({out_dir / CHECKPOINT})")
    else:
        start = 0
        run = {"before": None, "history": [], "evals": [], "seconds": 0.0, "images": 0, "window": {},
               "resumed_from": None}
        if eval_set is not None:
            run["before"] = _evaluate(student, eval_set, reference, 256)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    net = _Heads(student)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    student.train()
    state.record_idle_attention = True
    window = max(1, min(10, s.steps // 3))  # loss history and log lines every `window` steps
    for step in range(start, s.steps):
        tick = time.perf_counter()
        x, y = batches(step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        torch.manual_seed(s.seed * 1_000_003 + rank * 7919 + step)  # dropout / drop-path: the same on resume
        lr = lr_at(step, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for k, v in _step(net, teacher, x, y, s, state, optimizer, scaler, amp).items():
            run["window"][k] = run["window"].get(k, 0.0) + v
        run["window"]["n"] = run["window"].get("n", 0) + 1
        run["images"] += x.shape[0] * world
        run["seconds"] += time.perf_counter() - tick
        done = step + 1
        if done % window == 0 or done == s.steps:
            _log_window(run, done, s, lr, log)
        if s.eval_every and done % s.eval_every == 0 and done < s.steps and eval_set is not None:
            run["evals"].append({"step": done, **_evaluate(student, eval_set, reference, 256)})
            log(f"step {done}: top-1 {_pct(run['evals'][-1]['top1'])}, agreement {_pct(run['evals'][-1]['agreement'])}")
        if rank == 0 and (done % s.checkpoint_every == 0 or done == s.steps):
            _save_checkpoint(out_dir, student, optimizer, scaler, done, s, schedule, run)
    return _finish(student, schedule, s, out_dir, eval_set, reference, run, rank, world)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _log_window(run: dict[str, Any], done: int, s: FinetuneSettings, lr: float, log: Callable[[str], None]) -> None:
    """Close the loss window: its means go to the history and one log line."""
    w = run["window"]
    means = {k: float(w[k]) / w["n"] for k in LOSSES}
    run["window"] = {}
    if not math.isfinite(means["total"]):
        raise ValueError(f"the loss is not finite at step {done} (lower the learning rate?)")
    run["history"].append({"step": done, **means, "lr": lr})
    speed = run["images"] / max(run["seconds"], 1e-9)
    log(f"step {done}/{s.steps}  loss {means['total']:.4f} (ce {means['ce']:.4f} kl {means['kl']:.4f} "
        f"mse {means['mse']:.5f} cut {means['cut']:.4f})  lr {lr:.2e}  {speed:.1f} img/s")


def _save_checkpoint(out_dir: Path, student: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, done: int, s: FinetuneSettings, schedule: Schedule,
                     run: dict[str, Any]) -> None:
    window = {k: float(v) if k != "n" else v for k, v in run["window"].items()}
    ckpt = {"student": student.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": done, "settings": s.to_dict(), "schedule": schedule.to_dict(), "run": {**run, "window": window}}
    _write_atomic(out_dir / CHECKPOINT, lambda p: torch.save(ckpt, p))


def _finish(student: nn.Module, schedule: Schedule, s: FinetuneSettings, out_dir: Path, eval_set: TensorSet | None,
            reference: Tensor | None, run: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Evaluate after training; write schedule.yaml, metrics.json and, last, model.safetensors (rank 0)."""
    from safetensors.torch import save_file

    after = _evaluate(student, eval_set, reference, 256) if eval_set is not None else None
    student.eval()
    last_forward_state(student).record_idle_attention = False
    idle = any(p.method == "idle" for p in schedule.layers) and bool(run["history"])
    metrics = {
        "steps": s.steps, "seconds": run["seconds"], "images": run["images"], "world_size": world,
        "images_per_s": run["images"] / max(run["seconds"], 1e-9), "resumed_from": run["resumed_from"],
        "schedule": schedule.name, "summary": schedule.summary(), "gmacs": gmacs(schedule),
        "baseline_gmacs": gmacs(Schedule.empty(schedule.model)), "before": run["before"], "after": after,
        "cut_loss_first": run["history"][0]["cut"] if idle else None,
        "cut_loss_last": run["history"][-1]["cut"] if idle else None,
        "history": run["history"], "evals": run["evals"], "settings": s.to_dict(),
        "weights": str(out_dir / WEIGHTS),
    }  # fmt: skip
    if rank == 0:
        _write_atomic(out_dir / SCHEDULE_FILE, lambda p: p.write_text(schedule.to_yaml()))
        _write_atomic(out_dir / METRICS, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
        weights = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
        _write_atomic(out_dir / WEIGHTS, lambda p: save_file(weights, str(p), metadata={"schedule": schedule.name}))
    return metrics
