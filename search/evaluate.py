"""Evaluate a schedule on a model: accuracy, agreement with the unreduced model, throughput.

Knows nothing of Optuna or Ray. Throughput follows REFERENCE.md's protocol: eval mode,
inference mode, warm-up, device synchronisation, median of repeats at a fixed batch, and the
speed-up as a ratio to the unreduced model timed in the same process, interleaved with the
candidate so drift cancels. Baseline and candidate always run the same attention backend.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reducers import apply_schedule, remove_schedule
from reducers.prefix import forward_from
from search.data import TensorSet
from search.output_memo import Known, OutputMemo
from search.prefix_cache import PrefixCache
from spaces import Schedule, gmacs


@dataclass(frozen=True)
class Accuracy:
    top1: float | None  # None without labels
    top5: float | None
    agreement: float  # top-1 agreement with the unreduced model
    kl: float  # mean KL(unreduced || reduced) of the softmax outputs
    num_images: int


@dataclass(frozen=True)
class Throughput:
    images_per_s: float  # median over repeats
    baseline_images_per_s: float
    speedup: float  # median of per-repeat ratios
    speedup_min: float
    speedup_max: float
    batch_size: int
    repeats: int
    calls_per_sample: int  # forwards in one timed sample (so it lasts at least min_time_s)


# Evaluation batch per device type for `--batch-size auto`. On CPU a batch of 64 keeps a block's
# activations in cache: bench/batch_size.py measures it (docs/RESULTS.md, "Evaluation batch").
AUTO_BATCH = {"cpu": 64, "cuda": 256}


def eval_batch_size(value: int | str, device: str | torch.device) -> int:
    """`--batch-size`: a number as given, or "auto": the batch AUTO_BATCH names for the device type."""
    if value != "auto":
        return int(value)
    return AUTO_BATCH.get(torch.device(device).type, AUTO_BATCH["cuda"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _logit_batches(model: nn.Module, data: TensorSet, batch_size: int, start: tuple[int, Tensor] | None,
                   dtype: torch.dtype | None = None):  # type: ignore[no-untyped-def]
    """The model's logits batch by batch, in data order: from the images, or with ``start = (k,
    tokens)`` from the tokens entering block k (search.prefix_cache); under autocast to ``dtype``
    when given (bf16 screening)."""
    device = next(model.parameters()).device
    model.eval()
    cast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    if start is None:
        for x, _ in data.batches(batch_size, device):
            with cast:
                yield model(x)
        return
    block, tokens = start
    for i in range(0, tokens.shape[0], batch_size):
        with cast:
            yield forward_from(model, tokens[i:i + batch_size].to(device), block)


@torch.inference_mode()
def predict(model: nn.Module, data: TensorSet, *, batch_size: int = 256, start: tuple[int, Tensor] | None = None,
            dtype: torch.dtype | None = None) -> Tensor:
    """Logits [N, classes] on CPU, in data order (``start``, ``dtype``: see `_logit_batches`)."""
    return torch.cat([out.float().cpu() for out in _logit_batches(model, data, batch_size, start, dtype)])


@torch.inference_mode()
def predict_keeping(model: nn.Module, data: TensorSet, *, batch_size: int,
                    blocks: tuple[int, ...]) -> tuple[Tensor, dict[int, Tensor]]:
    """The unreduced model's logits on `data` (`predict`'s forward, unchanged) and the tokens entering
    each of `blocks` (on the CPU), copied on the way by forward pre-hooks into one tensor per block
    (search.prefix_cache)."""
    kept: dict[int, Tensor] = {}
    filled = dict.fromkeys(blocks, 0)

    def keep(k: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0]
            if k not in kept:
                kept[k] = torch.empty((len(data), *x.shape[1:]), dtype=x.dtype)
            kept[k][filled[k]:filled[k] + x.shape[0]].copy_(x)
            filled[k] += x.shape[0]
        return hook

    hooks = [model.blocks[k].register_forward_pre_hook(keep(k)) for k in blocks]
    try:
        logits = predict(model, data, batch_size=batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, kept


def accuracy(logits: Tensor, labels: Tensor, reference: Tensor) -> Accuracy:
    """Top-1/top-5 against labels (if any) and agreement/KL against the reference logits."""
    has_labels = bool((labels >= 0).all())
    top1 = top5 = None
    if has_labels:
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 = (top[:, 0] == labels).float().mean().item()
        top5 = (top == labels[:, None]).any(dim=1).float().mean().item()
    agreement = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    kl = F.kl_div(logits.log_softmax(1), reference.log_softmax(1), log_target=True, reduction="batchmean").item()
    return Accuracy(top1, top5, agreement, max(kl, 0.0), logits.shape[0])


def time_call(fn: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Seconds per call of `fn`, averaged over `calls` back-to-back calls, synchronised on both ends."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls


def timed_pairs(time_base: Callable[[], float], time_cand: Callable[[], float],
                repeats: int) -> tuple[list[float], list[float]]:
    """`repeats` (baseline, candidate) timings in ABBA order, so a linear drift cancels in each pair."""
    base, cand = [], []
    for i in range(repeats):
        if i % 2 == 0:
            base.append(time_base())
            cand.append(time_cand())
        else:
            cand.append(time_cand())
            base.append(time_base())
    return base, cand


def _timed_forward(model: nn.Module, batch_size: int, image_size: tuple[int, int] | None,
                   dtype: torch.dtype) -> tuple[torch.device, Callable[[], None]]:
    """The model's device and one forward of a random batch (under autocast unless fp32), for timing."""
    device = next(model.parameters()).device
    size = image_size or tuple(model.patch_embed.img_size)
    x = torch.randn(batch_size, 3, *size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    model.eval()

    def run() -> None:
        with autocast:
            model(x)

    return device, run


@torch.inference_mode()
def throughput(model: nn.Module, schedule: Schedule, *, batch_size: int = 64, image_size: tuple[int, int] | None = None,
               warmup: int = 2, repeats: int = 5, min_time_s: float = 0.05,
               dtype: torch.dtype = torch.float32) -> Throughput:
    """Images/s of `schedule` and of the unreduced model, timed alternately in this process.

    The pairs are timed in ABBA order (`timed_pairs`). A timed sample repeats the forward until it
    lasts at least `min_time_s` (counted once, on the unreduced model), so fast forwards are not
    timer noise.
    """
    device, run = _timed_forward(model, batch_size, image_size, dtype)

    def time_base(calls: int = 1) -> float:
        remove_schedule(model)
        return time_call(run, device, calls)

    def time_cand(calls: int = 1) -> float:
        apply_schedule(model, schedule)
        return time_call(run, device, calls)

    for _ in range(warmup):
        time_base()
        time_cand()
    calls = max(1, math.ceil(min_time_s / max(time_base(), 1e-9)))
    base_t, cand_t = timed_pairs(lambda: time_base(calls), lambda: time_cand(calls), repeats)
    ratios = [b / c for b, c in zip(base_t, cand_t, strict=True)]
    return Throughput(
        images_per_s=batch_size / statistics.median(cand_t),
        baseline_images_per_s=batch_size / statistics.median(base_t),
        speedup=statistics.median(ratios), speedup_min=min(ratios), speedup_max=max(ratios),
        batch_size=batch_size, repeats=repeats, calls_per_sample=calls,
    )


@torch.inference_mode()
def throughput_many(model: nn.Module, schedules: list[Schedule], *, batch_size: int = 64,
                    image_size: tuple[int, int] | None = None, warmup: int = 1, schedule_warmup: int = 1,
                    repeats: int = 1, min_time_s: float = 0.02, nest: int = 1,
                    dtype: torch.dtype = torch.float32) -> list[Throughput]:
    """`throughput` of many schedules in one process, cheaper: one chain of palindromes
    B S1 S1 B S2 S2 B ... (nest 1) or B S1 S2 S2 S1 B S3 S4 S4 S3 B ... (nest 2), in which each
    schedule sits symmetrically between two timings of the unreduced model, so a linear drift
    cancels in the mean of its two ratios, and shares those baselines with its neighbours: `nest`
    schedules per pair of baselines (the unreduced model, the costliest forward, is timed
    len/nest + 1 times a pass). Each pass (`repeats`; every other pass runs the chain backwards)
    gives a schedule two ratios: the baseline before its palindrome over its first timing, the one
    after over its second. The unreduced model is warmed up `warmup` calls first, each schedule
    `schedule_warmup` untimed calls before its palindrome."""
    if nest < 1:
        raise ValueError(f"nest must be at least 1, got {nest}")
    device, run = _timed_forward(model, batch_size, image_size, dtype)

    def time_as(schedule: Schedule | None, calls: int) -> float:
        remove_schedule(model) if schedule is None else apply_schedule(model, schedule)
        return time_call(run, device, calls)

    for _ in range(warmup):
        time_as(None, 1)
    calls = max(1, math.ceil(min_time_s / max(time_as(None, 1), 1e-9)))
    base: dict[int, list[float]] = {i: [] for i in range(len(schedules))}
    cand: dict[int, list[float]] = {i: [] for i in range(len(schedules))}
    for p in range(repeats):
        order = list(range(len(schedules)))[:: -1 if p % 2 else 1]
        before = time_as(None, calls)
        for group in (order[g:g + nest] for g in range(0, len(order), nest)):
            for i in group:
                for _ in range(schedule_warmup):
                    time_as(schedules[i], 1)
            first = {i: time_as(schedules[i], calls) for i in group}
            second = {i: time_as(schedules[i], calls) for i in reversed(group)}
            after = time_as(None, calls)
            for i in group:
                base[i] += [before, after]
                cand[i] += [first[i], second[i]]
            before = after
    remove_schedule(model)
    out = []
    for i in range(len(schedules)):
        ratios = [b / c for b, c in zip(base[i], cand[i], strict=True)]
        out.append(Throughput(
            images_per_s=batch_size / statistics.median(cand[i]),
            baseline_images_per_s=batch_size / statistics.median(base[i]),
            speedup=statistics.median(ratios), speedup_min=min(ratios), speedup_max=max(ratios),
            batch_size=batch_size, repeats=len(ratios), calls_per_sample=calls))
    return out


def accuracy_upper_bound(correct: int, seen: int, total: int, alpha: float) -> float:
    """A one-sided (1 - alpha) upper confidence bound on the accuracy over all `total` images, after
    `correct` of the first `seen` (in random order, so a sample drawn without replacement): the
    continuity-corrected Wilson score bound with the finite-population correction, never above what
    the unseen images could add if all were right."""
    if seen >= total:
        return correct / total
    z = statistics.NormalDist().inv_cdf(1.0 - alpha)
    n = seen * (total - 1) / (total - seen)  # the sample size the correction amounts to
    rate = correct / seen
    if rate >= 1.0:
        return 1.0
    root = math.sqrt(max(0.0, z * z + 2 - 1 / n + 4 * rate * (n * (1 - rate) - 1)))
    bound = (2 * n * rate + z * z + 1 + z * root) / (2 * (n + z * z))
    return min(bound, (correct + total - seen) / total)


@dataclass(frozen=True)
class EarlyStop:
    """Stop a screening once it cannot reach `below` (an accuracy in [0, 1]): after each chunk of
    `chunk` images, stop when the upper bound on the full set's accuracy falls under it. `alpha`
    holds over all the checks together (Bonferroni)."""

    below: float
    chunk: int = 250
    alpha: float = 0.05
    refresh: Callable[[], float | None] | None = None  # a bar that may rise while this runs (other workers' results)

    def bar(self) -> float:
        """The bar now: `below`, or what `refresh` reads if that is higher."""
        fresh = self.refresh() if self.refresh is not None else None
        return self.below if fresh is None else max(self.below, fresh)


@torch.inference_mode()
def predict_until(model: nn.Module, data: TensorSet, labels_or_reference: Tensor, stop: EarlyStop, *,
                  batch_size: int = 256, start: tuple[int, Tensor] | None = None,
                  dtype: torch.dtype | None = None) -> Tensor:
    """Logits of the first images of `data`, chunk by chunk, until ``stop`` says the accuracy over
    the whole set cannot reach its bar (counting top-1 against `labels_or_reference`: labels, or
    the reference's predictions). Returns the logits of the images seen (all of them if never stopped)."""
    total = len(data)
    checks = max(1, math.ceil(total / stop.chunk) - 1)
    logits: list[Tensor] = []
    seen = correct = 0
    for out in _logit_batches(model, data, batch_size, start, dtype):
        out = out.float().cpu()
        logits.append(out)
        correct += int((out.argmax(1) == labels_or_reference[seen:seen + out.shape[0]]).sum())
        seen += out.shape[0]
        at_check = seen // stop.chunk > (seen - out.shape[0]) // stop.chunk
        if seen < total and at_check and accuracy_upper_bound(correct, seen, total, stop.alpha / checks) < stop.bar():
            break
    return torch.cat(logits)


def _targets(data: TensorSet, reference: Tensor) -> Tensor:
    """What each image's top-1 is scored against: its label, or without labels the unreduced
    model's prediction (`reference` logits)."""
    return data.labels if data.has_labels else reference.argmax(1)


def evaluate(model: nn.Module, schedule: Schedule, data: TensorSet, reference: Tensor, *, batch_size: int = 256,
             timing: dict | None = None, early_stop: EarlyStop | None = None, prefix: PrefixCache | None = None,
             reference_is_model: bool = False, dtype: torch.dtype | None = None, hits: bool = False,
             memo: OutputMemo | None = None) -> dict:
    """Everything the CLI and the search report for one schedule (one flat dict). With
    ``early_stop``, the accuracy may come from the first images only: ``stopped`` says so and
    ``num_images`` how many. ``prefix`` (the unreduced `model`'s cache for `data`) lets the
    forward start at the schedule's first reducing block (or at a shared block before it). With
    ``reference_is_model`` (`reference` holds this very model's unreduced logits on `data`), a
    schedule that reduces nothing reuses them.
    ``dtype`` (torch.bfloat16): the forward under autocast; `reference` stays what it is (fp32).
    With ``hits``, ``hits`` holds each image's outcome (top-1 right, or agreeing without labels).
    ``memo`` (search.output_memo): a schedule predicting what one evaluated in full before predicts
    reuses its result (``output_of`` names that schedule); a full evaluation is written to it."""
    known = memo.get(schedule, dtype) if memo is not None else None
    if known is not None:
        return _result(schedule, Accuracy(**known.accuracy), known.hits, stopped=False, hits=hits, timing=timing,
                       model=model, output_of=known.output_of)
    start = schedule.first_reducing_block()
    if reference_is_model and start == schedule.model.depth and dtype is None:
        logits = reference
    else:
        begin = prefix.start(start) if prefix is not None else None
        apply_schedule(model, schedule)
        try:
            if early_stop is None:
                logits = predict(model, data, batch_size=batch_size, start=begin, dtype=dtype)
            else:
                logits = predict_until(model, data, _targets(data, reference), early_stop, batch_size=batch_size,
                                       start=begin, dtype=dtype)
        finally:
            remove_schedule(model)
    seen = logits.shape[0]
    acc = accuracy(logits, data.labels[:seen], reference[:seen])
    right = logits.argmax(1) == _targets(data, reference)[:seen]
    if memo is not None and seen == len(data):
        memo.put(schedule, Known(asdict(acc), right, schedule.summary()), dtype)
    return _result(schedule, acc, right, stopped=seen < len(data), hits=hits, timing=timing, model=model)


def _result(schedule: Schedule, acc: Accuracy, right: Tensor, *, stopped: bool, hits: bool, timing: dict | None,
            model: nn.Module, output_of: str | None = None) -> dict:
    """`evaluate`'s flat dict: the accuracy, GMACs, each image's outcome when asked, the timing when asked."""
    out = {"schedule": schedule.name, "summary": schedule.summary(), **asdict(acc), "stopped": stopped,
           "gmacs": gmacs(schedule), "baseline_gmacs": gmacs(Schedule.empty(schedule.model))}
    if output_of is not None:
        out["output_of"] = output_of
    if hits:
        out["hits"] = right
    if timing is not None:
        speed = throughput(model, schedule, **timing)
        remove_schedule(model)
        out.update(asdict(speed))
    return out
