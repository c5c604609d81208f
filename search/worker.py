"""What a search worker does: load the model and screening data once, evaluate trials.

A Ray Tune function trainable runs in a long-lived actor (`reuse_actors=True`), so the
context below is built once per worker process and reused by every trial it runs. Nothing
here imports Optuna's study machinery: a trial's parameters are replayed through
`optuna.trial.FixedTrial` to rebuild its schedule.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reducers.patch import head_reads_prefix_only
from search import latency, paired, screen_bars, shared_logits
from search.data import TIMM_CROP_SCALE, TensorSet, load_confirm_set, load_eval_set
from search.evaluate import EarlyStop, accuracy, evaluate, predict, predict_keeping
from search.models import data_config, load_model
from search.output_memo import OutputMemo
from search.prefix_cache import PrefixCache, block_bytes, shared_blocks
from spaces import Schedule, gmacs
from spaces.search_space import SearchSpace

FAULT_KEY = "__fault"  # test hook: the driver may mark a trial to raise, return NaN, hang or be slow
SLOW_FAULT_SECONDS = 4.0
STOP_KEY = "__stop_below"  # the driver's bar for early stopping: the best accuracy measured at no more GMACs


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to rebuild the model, data and space (small and picklable)."""

    space: SearchSpace
    model: str | None = None
    pretrained: bool = False
    checkpoint: str | None = None
    data: str | None = None
    num_images: int = 2000
    seed: int = 0
    batch_size: int = 256
    device: str = "cpu"
    threads: int = 1
    timing: tuple[tuple[str, Any], ...] | None = None  # throughput protocol (dict items) when speed is an objective
    objectives: tuple[str, ...] = ("accuracy", "gmacs")
    trial_timeout: float | None = None  # seconds; a trial running longer ends its worker process (a FAIL)
    confirm_images: int = 2000  # images disjoint from the screening set, for re-scoring the front
    stop_chunk: int | None = 250  # screen searched trials in chunks of this many images, stopping early; None: never
    cache_dir: str | None = None  # the run's cache: the unreduced logits, computed once and shared (search.shared_logits)
    screen_precision: str = "fp32"  # "bf16": screening forwards under bf16 autocast (the confirmation stays fp32)
    shared_bars: bool = False  # presets stop only against those before them in their own batch (the same in
    #                             every run); True (--no-deterministic): against every preset screened so far
    prefix_cache_mb: int = 1024  # memory for the tokens entering block k (search.prefix_cache), per image set; 0: off
    latency: Any = None  # the run's search.latency.LatencyProfile: every record gets its predicted speed


@dataclass
class Context:
    model: nn.Module
    data: TensorSet
    reference: Tensor  # unreduced logits on the screening set
    load_seconds: float
    prefix: PrefixCache
    trials: int = field(default=0)
    confirm: tuple[TensorSet, Tensor] | None = None  # confirmation images and their unreduced logits
    confirm_prefix: PrefixCache | None = None
    confirm_data: TensorSet | None = None  # the confirmation images when built or loaded with the screening ones
    confirm_reference: Tensor | None = None  # the confirmation logits when loaded with the screening ones
    confirm_tokens: dict[int, Tensor] = field(default_factory=dict)  # their shared blocks (search.prefix_cache)
    confirm_more_tokens: Any = None  # maps the confirmation set's shared blocks written since (PrefixCache's more_shared)
    unreduced: dict[str, float] = field(default_factory=dict)  # the unreduced model's accuracy, by image set


_CONTEXTS: dict[tuple, Context] = {}


def _context_key(setup: WorkerSetup) -> tuple:
    return (setup.model, setup.pretrained, setup.checkpoint, setup.data, setup.num_images, setup.seed,
            setup.batch_size, setup.device, setup.threads)


def context(setup: WorkerSetup) -> Context:
    """The model, screening data and reference logits of this process (built once)."""
    key = _context_key(setup)
    if key not in _CONTEXTS:
        start = time.perf_counter()
        torch.set_num_threads(max(1, setup.threads))
        model = load_model(setup.model, pretrained=setup.pretrained, checkpoint=setup.checkpoint, device=setup.device)
        (data, reference, tokens, more), (confirm_data, confirm_reference, confirm_tokens, confirm_more) = \
            _references(setup, model)
        prefix = PrefixCache(model, data, batch_size=setup.batch_size, budget_bytes=setup.prefix_cache_mb << 20,
                             shared=tokens, more_shared=more)
        _CONTEXTS[key] = Context(model, data, reference, time.perf_counter() - start, prefix,
                                 confirm_data=confirm_data, confirm_reference=confirm_reference,
                                 confirm_tokens=confirm_tokens, confirm_more_tokens=confirm_more)
    return _CONTEXTS[key]


def _confirm_set(setup: WorkerSetup, model: nn.Module) -> TensorSet:
    return load_confirm_set(setup.data, data_config(model), num_images=setup.confirm_images,
                            screen_images=setup.num_images, seed=setup.seed, num_classes=model.num_classes)


def _outputs_key(setup: WorkerSetup) -> tuple:
    """Everything but the schedule that a forward's outputs depend on (files shared through the run cache)."""
    stamp = Path(setup.checkpoint).stat() if setup.checkpoint and Path(setup.checkpoint).is_file() else None
    return (*_context_key(setup), stamp and (stamp.st_size, stamp.st_mtime_ns), torch.__version__)


def output_memo(setup: WorkerSetup, model: nn.Module, images: str) -> OutputMemo | None:
    """The run's shared results for `images` ("screen" or "confirm"): None without a run cache, or
    when the model's head reads more than its prefix tokens (then no two schedules are known to
    predict the same)."""
    if setup.cache_dir is None or not head_reads_prefix_only(model):
        return None
    return OutputMemo(Path(setup.cache_dir), images,
                      (*_outputs_key(setup), setup.confirm_images if images == "confirm" else None))


def _screen_set(setup: WorkerSetup, model: nn.Module) -> TensorSet:
    return load_eval_set(setup.data, data_config(model), num_images=setup.num_images, seed=setup.seed,
                         num_classes=model.num_classes)


SetOutputs = tuple[TensorSet | None, Tensor | None, dict[int, Tensor], Any]  # images, logits, kept tokens, more


def _references(setup: WorkerSetup, model: nn.Module) -> tuple[SetOutputs, SetOutputs]:
    """The screening images with their unreduced logits and, with a run cache, the confirmation
    images with theirs, each with the tokens entering the blocks the run shares (search.prefix_cache)
    and how to map those written later: built by the first worker to need them, loaded by the others
    (the images too: search.shared_logits.save_images)."""
    if setup.cache_dir is None:
        data = _screen_set(setup, model)
        return (data, predict(model, data, batch_size=setup.batch_size), {}, None), (None, None, {}, None)
    key = _outputs_key(setup)
    screen, confirm = (shared_logits.cache_path(setup.cache_dir, name, (*key, extra))
                       for name, extra in (("screen", None), ("confirm", setup.confirm_images)))
    built: dict[Path, TensorSet] = {}

    def keeping(path: Path, build):  # type: ignore[no-untyped-def]
        def compute():  # type: ignore[no-untyped-def]
            images = built[path] = build()
            shared_logits.save_images(images, path)  # before the logits: whoever loads those finds these
            blocks = shared_blocks(len(model.blocks), block_bytes(model, len(images)), setup.prefix_cache_mb << 20)
            return predict_keeping(model, images, batch_size=setup.batch_size, blocks=blocks)
        return compute

    def images(path: Path) -> TensorSet | None:  # built here, else written by the worker that built them
        return built[path] if path in built else shared_logits.load_images(path)

    found = shared_logits.shared_outputs([(screen, keeping(screen, lambda: _screen_set(setup, model))),
                                          (confirm, keeping(confirm, lambda: _confirm_set(setup, model)))])
    data = images(screen)
    return ((data if data is not None else _screen_set(setup, model), *found[0],
             partial(shared_logits.load_tokens, screen)),
            (images(confirm), *found[1], partial(shared_logits.load_tokens, confirm)))


def confirm_context(setup: WorkerSetup) -> tuple[TensorSet, Tensor]:
    """The confirmation images (disjoint from the screening set) and their unreduced logits, built once."""
    ctx = context(setup)
    if ctx.confirm is None:
        data = ctx.confirm_data if ctx.confirm_data is not None else _confirm_set(setup, ctx.model)
        reference = ctx.confirm_reference
        ctx.confirm = (data, reference if reference is not None else predict(ctx.model, data, batch_size=setup.batch_size))
        ctx.confirm_prefix = PrefixCache(ctx.model, data, batch_size=setup.batch_size,
                                         budget_bytes=setup.prefix_cache_mb << 20, shared=ctx.confirm_tokens,
                                         more_shared=ctx.confirm_more_tokens)
    return ctx.confirm


def screen_dtype(setup: WorkerSetup) -> torch.dtype | None:
    """The autocast dtype of screening forwards: None for fp32."""
    return torch.bfloat16 if setup.screen_precision == "bf16" else None


def _metrics(setup: WorkerSetup, schedule: Schedule, result: dict[str, Any]) -> dict[str, Any]:
    """One evaluation's result as the flat record the driver reads (accuracy: top-1, or agreement
    without labels)."""
    return {
        "accuracy": _accuracy(result), "agreement": result["agreement"], "top1": result["top1"], "top5": result["top5"],
        "kl": result["kl"],
        "gmacs": result["gmacs"], "baseline_gmacs": result["baseline_gmacs"],
        "speedup": result.get("speedup"), "images_per_s": result.get("images_per_s"),
        "feasible": setup.space.budget_gmacs is None or result["gmacs"] <= setup.space.budget_gmacs + 1e-12,
        "summary": schedule.summary(),
        **(latency.prediction(setup.latency, schedule) if setup.latency is not None else {}),
    }


def presets_stop(setup: WorkerSetup) -> bool:
    """Whether presets stop early against each other on the screening images: with a run cache to
    share their results in, --stop-chunk above 0 and accuracy among the objectives."""
    return bool(setup.stop_chunk) and setup.cache_dir is not None and "accuracy" in setup.objectives


def _shared_stop(setup: WorkerSetup, schedule: Schedule,
                 batch_bars: list[tuple[float, float]] | None = None) -> EarlyStop | None:
    """Early stopping for a preset's screening against the other presets already screened: with
    `setup.shared_bars`, every one so far (the run cache's search.screen_bars file, read again at
    every check; what it holds depends on how fast the workers ran), else only those of its own
    batch (`batch_bars`: (gmacs, accuracy) of the batch's earlier full screenings). None where
    `presets_stop` says no."""
    if not presets_stop(setup):
        return None
    cost = gmacs(schedule)
    if setup.shared_bars:
        bars = screen_bars.path_in(setup.cache_dir)
        return EarlyStop(-math.inf, chunk=setup.stop_chunk, refresh=lambda: screen_bars.best_at_most(bars, cost))
    below = screen_bars.best_of(batch_bars or (), cost)
    return EarlyStop(-math.inf if below is None else below, chunk=setup.stop_chunk)


def evaluate_fixed(setup: WorkerSetup, schedule: Schedule, images: str, stop: bool = False,
                   batch_bars: list[tuple[float, float]] | None = None) -> dict[str, Any]:
    """Evaluate a fixed schedule (a preset, or a front point to confirm) on the screening
    (``images="screen"``) or the confirmation images. With ``stop`` (presets' screening), it stops
    once it cannot reach the best accuracy another preset measured at no more GMACs (``stopped``);
    a full screening is shared for the others' bars (in the run cache, and appended to ``batch_bars``,
    the batch's own: see _shared_stop)."""
    ctx = context(setup)
    screen = images == "screen"
    data, reference = (ctx.data, ctx.reference) if screen else confirm_context(setup)
    start = time.perf_counter()
    timing = dict(setup.timing) if setup.timing is not None and screen else None
    early_stop = _shared_stop(setup, schedule, batch_bars) if stop and screen else None
    result = evaluate(ctx.model, schedule, data, reference, batch_size=setup.batch_size, timing=timing,
                      early_stop=early_stop, prefix=ctx.prefix if screen else ctx.confirm_prefix,
                      reference_is_model=True, dtype=screen_dtype(setup) if screen else None, hits=not screen,
                      memo=output_memo(setup, ctx.model, images))
    metrics = {**_metrics(setup, schedule, result), "stopped": result["stopped"], "num_images": result["num_images"],
               "output_of": result.get("output_of"), "unreduced_accuracy": unreduced_accuracy(ctx, images, data, reference)}
    if not screen:  # for image-by-image comparisons in the verdict (search.paired)
        metrics[paired.KEY] = paired.encode(result["hits"])
    if early_stop is not None and not result["stopped"]:
        screen_bars.add(screen_bars.path_in(setup.cache_dir), metrics["gmacs"], metrics["accuracy"])
        if batch_bars is not None and math.isfinite(metrics["accuracy"]):
            batch_bars.append((metrics["gmacs"], metrics["accuracy"]))
    return {**metrics, "eval_seconds": time.perf_counter() - start}


def fixed_trainable(config: dict[str, Any], setup: WorkerSetup) -> None:
    """Ray Tune function trainable for a batch of fixed schedules: ``config["items"]`` lists them,
    each with its ``schedule`` (a dict) and ``images`` ("screen" or "confirm"). One report per
    schedule, carrying its index (``item``); a schedule that raises is reported with a NaN accuracy
    and its error, and the batch goes on."""
    from ray import tune

    batch_bars: list[tuple[float, float]] = []  # this batch's full screenings (gmacs, accuracy)
    for index, item in enumerate(config["items"]):
        start = time.perf_counter()
        try:
            with deadline(setup.trial_timeout):
                metrics = evaluate_fixed(setup, Schedule.from_dict(item["schedule"]), item["images"],
                                         stop=bool(item.get("stop")), batch_bars=batch_bars)
        except Exception as exc:  # noqa: BLE001 - recorded as this schedule's FAIL, the others still run
            metrics = {"accuracy": float("nan"), "error": f"{type(exc).__name__}: {exc}"}
        metrics.update({"item": index, "trial_seconds": time.perf_counter() - start})
        tune.report(metrics)


def schedule_from_params(space: SearchSpace, params: dict[str, Any]) -> Schedule:
    import optuna

    clean = {k: v for k, v in params.items() if not k.startswith("__")}
    return space(optuna.trial.FixedTrial(clean))


def evaluate_params(setup: WorkerSetup, params: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one trial's parameters: every metric the driver may ask for, as one flat dict."""
    ctx = context(setup)
    ctx.trials += 1
    fault = params.get(FAULT_KEY)
    if fault == "raise":
        raise RuntimeError("injected failure (test hook)")
    if fault == "hang":
        time.sleep(1e6)
    if fault == "slow":  # finishes after the trials suggested after it (tests of --deterministic)
        time.sleep(SLOW_FAULT_SECONDS)
    schedule = schedule_from_params(setup.space, params)
    start = time.perf_counter()
    timing = dict(setup.timing) if setup.timing is not None else None
    below = params.get(STOP_KEY)
    stop = EarlyStop(below, chunk=setup.stop_chunk) if setup.stop_chunk and below is not None else None
    result = evaluate(ctx.model, schedule, ctx.data, ctx.reference, batch_size=setup.batch_size, timing=timing,
                      early_stop=stop, prefix=ctx.prefix, reference_is_model=True, dtype=screen_dtype(setup),
                      memo=output_memo(setup, ctx.model, "screen"))
    metrics = {**_metrics(setup, schedule, result), "schedule": schedule.to_dict(), "output_of": result.get("output_of"),
               "stopped": result["stopped"], "num_images": result["num_images"],
               "eval_seconds": time.perf_counter() - start, "load_seconds": ctx.load_seconds if ctx.trials == 1 else 0.0}
    if fault == "nan":
        metrics["accuracy"] = float("nan")
    bad = [k for k in setup.objectives if metrics.get(k) is None or not math.isfinite(metrics[k])]
    if bad:
        raise ValueError(f"objective(s) {bad} are missing or not finite for {schedule.summary()}")
    return metrics


@contextlib.contextmanager
def deadline(seconds: float | None):  # type: ignore[no-untyped-def]
    """End this worker process if the block runs longer than `seconds` (--trial-timeout).

    A hung evaluation cannot be interrupted from Python (it may sit in a C call), so the process
    exits: Ray sees the actor die, the trial errors (or is retried, with --retries) and is
    recorded as FAIL, and Tune starts a fresh actor for the next trial.
    """
    if seconds is None:
        yield
        return
    timer = threading.Timer(seconds, lambda: (print(f"trial timeout: {seconds:g} s", file=sys.stderr, flush=True),
                                              os._exit(TIMEOUT_EXIT)))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


TIMEOUT_EXIT = 124  # the worker's exit code when --trial-timeout ended it (as timeout(1))


def trainable(config: dict[str, Any], setup: WorkerSetup) -> None:
    """Ray Tune function trainable: one evaluation, one report holding every metric."""
    from ray import tune

    start = time.perf_counter()
    with deadline(setup.trial_timeout):
        metrics = evaluate_params(setup, config)
    metrics["trial_seconds"] = time.perf_counter() - start
    metrics["schedule"] = json.dumps(metrics["schedule"])  # text: Tune's TensorBoard logger rejects nested lists
    tune.report(metrics)


def stage_trainable(config: dict[str, Any], setup: WorkerSetup) -> None:
    """Ray Tune function trainable of every phase of the search (search.staged): a batch of fixed
    schedules (``config["items"]``: `fixed_trainable`) or one searched trial (`trainable`)."""
    (fixed_trainable if "items" in config else trainable)(config, setup)


@dataclass(frozen=True)
class FinetuneJob:
    """A short fine-tune of one screened candidate inside the search (small and picklable)."""

    steps: int
    out_root: str  # the candidate's weights go to <out_root>/<trial>/
    data: str | None = None  # training images; None: the embedded default's training stream
    batch_size: int = 64
    lr: float | None = None  # None: FinetuneSettings' default
    crop_scale: float = TIMM_CROP_SCALE  # smallest area of the random-resized crop on `data`
    timeout: float | None = None  # seconds a fine-tune may run; a longer one ends its worker (a FAIL)


def finetune_params(setup: WorkerSetup, job: FinetuneJob, trial: int, params: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune a copy of the worker's model on one candidate's schedule, then re-screen it.
    ``params[FAULT_KEY]`` (test hook): "raise" fails it, "hang" hangs it."""
    fault = params.get(FAULT_KEY)
    if fault == "raise":
        raise RuntimeError("injected failure (test hook)")
    if fault == "hang":
        time.sleep(1e6)
    return finetune_schedule(setup, job, schedule_from_params(setup.space, params), Path(job.out_root) / f"{trial:04d}")


def finetune_schedule(setup: WorkerSetup, job: FinetuneJob, schedule: Schedule, out_dir: Path) -> dict[str, Any]:
    """Fine-tune a copy of the worker's model on `schedule` (weights to `out_dir`), then re-screen it.
    Weights this fine-tune already finished in `out_dir` (the driver was killed before it recorded
    them) are scored again, not trained again."""
    from search import finetune

    ctx = context(setup)
    student = copy.deepcopy(ctx.model)  # the cached model stays the unreduced reference
    extra = {"lr": job.lr} if job.lr is not None else {}
    settings = finetune.FinetuneSettings(steps=job.steps, batch_size=job.batch_size, seed=setup.seed, **extra)
    if (out_dir / finetune.WEIGHTS).is_file():
        train_seconds = _load_finished(student, schedule, settings, out_dir)
    else:
        batches = finetune.train_stream(job.data, data_config(student), job.batch_size, setup.seed,
                                        num_classes=student.num_classes, crop_scale=job.crop_scale)
        start = time.perf_counter()
        finetune.finetune(student, schedule, batches, settings, out_dir=out_dir, device=setup.device,
                          log=lambda *a: None)
        train_seconds = time.perf_counter() - start
    result = evaluate(student, schedule, ctx.data, ctx.reference, batch_size=setup.batch_size, timing=None)
    confirm_data, confirm_reference = confirm_context(setup)
    confirmed = evaluate(student, schedule, confirm_data, confirm_reference, batch_size=setup.batch_size, timing=None)
    return {"accuracy": _accuracy(result), "confirmed_accuracy": _accuracy(confirmed), "agreement": result["agreement"],
            "top1": result["top1"], "top5": result["top5"], "kl": result["kl"], "gmacs": result["gmacs"],
            "finetune_seconds": train_seconds, "weights": str(out_dir / "model.safetensors")}


def _load_finished(student: nn.Module, schedule: Schedule, settings: Any, out_dir: Path) -> float:
    """Load the weights a fine-tune finished in `out_dir` into `student`; returns its training seconds.
    ValueError when they were written for another schedule or other settings (nothing is overwritten)."""
    from safetensors.torch import load_file

    from search import finetune

    written = json.loads((out_dir / finetune.METRICS).read_text())
    if Schedule.load(out_dir / finetune.SCHEDULE_FILE).to_dict() != schedule.to_dict() \
            or written.get("settings") != json.loads(json.dumps(settings.to_dict())):
        raise ValueError(f"{out_dir / finetune.WEIGHTS} exists for another schedule or other settings; "
                         "nothing is overwritten")
    student.load_state_dict(load_file(str(out_dir / finetune.WEIGHTS)))
    return float(written["seconds"])


def unreduced_accuracy(ctx: Context, images: str, data: TensorSet, reference: Tensor) -> float:
    """What the unreduced model scores on all of `data` (its logits: `reference`), scored as a
    schedule is (top-1, or without labels its agreement with itself); once per image set and process."""
    if images not in ctx.unreduced:
        ctx.unreduced[images] = _accuracy(asdict(accuracy(reference, data.labels, reference)))
    return ctx.unreduced[images]


def _accuracy(result: dict[str, Any]) -> float:
    """Top-1, or the agreement with the unreduced model without labels."""
    return result["top1"] if result["top1"] is not None else result["agreement"]


def finetune_trainable(config: dict[str, Any], setup: WorkerSetup, job: FinetuneJob) -> None:
    """Ray Tune function trainable for one promoted candidate: ``config["candidate"]`` holds
    its Optuna trial number and parameters. One that raises is reported with a NaN accuracy and
    its error; one running past ``job.timeout`` ends its worker (Ray records the trial's error)."""
    from ray import tune

    candidate = config["candidate"]
    start = time.perf_counter()
    try:
        with deadline(job.timeout):
            metrics = finetune_params(setup, job, int(candidate["trial"]), candidate["params"])
    except Exception as exc:  # noqa: BLE001 - recorded as this candidate's FAIL, the others still run
        metrics = {"accuracy": float("nan"), "error": f"{type(exc).__name__}: {exc}"}
    metrics["trial_seconds"] = time.perf_counter() - start
    tune.report(metrics)
