"""Measured speed around the search: before the trials, the latency profile they are priced with
(reused from the cache while its key matches, else built); after the confirmation, every front
point and every preset re-timed against the unreduced model, batched and at the latency batch.

With --compile the re-timing is repeated under torch.compile (inductor), compiled against the
compiled unreduced model (search/compiled.py).

Each runs in one process with the trials' thread count (the device and thread count the profile is
keyed by), on the machine the trials ran on, with nothing else of the run beside it: on the local
Ray this driver started, CPU only, in the driver itself (a Ray task would first start a process and
import torch and the model, each time); on a cluster or with GPUs per trial, as one Ray
task with a trial's resources."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from typing import Any

from search import latency, run_dir
from search.config import SearchConfig
from search.latency import LatencyProfile, ProfileKey
from search.worker import WorkerSetup

PROFILE_FILE = "latency_profile.json"  # the run's copy: a resumed run keeps the profile it started with
# Schedules per pair of unreduced timings in the batched re-timing (evaluate.throughput_many): two
# take 0.73x the time of one with no more spread across passes (`python bench/retime_nest.py --run
# runs/s40-head --passes 4 --nests 1,2`, commit 3c312ed: docs/RESULTS.md §4, "Session 40").
RETIME_NEST = 2


def profile_key(cfg: SearchConfig) -> ProfileKey:
    s = cfg.setup
    return latency.current_key(s.space.spec.name, s.device, batch=cfg.timing_batch, threads=s.threads)


def needs_profile(cfg: SearchConfig) -> bool:
    return "predicted_speedup" in cfg.setup.objectives or cfg.retime


def runs_in_driver(cfg: SearchConfig) -> bool:
    """Whether the timing runs in the driver: the local Ray it started (the same machine), CPU only."""
    return cfg.ray_address is None and cfg.gpus_per_trial == 0 and cfg.setup.device == "cpu"


def _remote(cfg: SearchConfig, fn, *args):  # type: ignore[no-untyped-def]
    """Run fn(*args) where the trials ran, alone, and return its result: in this process with the
    trials' thread count (`runs_in_driver`), else as one Ray task with a trial's resources."""
    if runs_in_driver(cfg):
        import gc

        import torch

        threads, collecting = torch.get_num_threads(), gc.isenabled()
        gc.disable()  # the driver holds the run's objects: no collection pauses inside a timing
        try:
            return fn(*args)  # fn sets the trials' thread count (_model)
        finally:
            torch.set_num_threads(threads)
            if collecting:
                gc.enable()
    import ray

    task = ray.remote(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial, max_retries=0)(fn)
    return ray.get(task.remote(*args))


def _model(setup: WorkerSetup):  # type: ignore[no-untyped-def]
    import torch

    from search.models import load_model

    torch.set_num_threads(max(1, setup.threads))
    return load_model(setup.model, pretrained=setup.pretrained, checkpoint=setup.checkpoint, device=setup.device)


def _build_task(setup: WorkerSetup, key: dict[str, Any]) -> dict[str, Any]:
    return latency.build(_model(setup), ProfileKey(**key)).to_dict()


def ensure_profile(cfg: SearchConfig, run: dict[str, Any]) -> LatencyProfile:
    """The run's profile: its own copy on --resume, else --latency-profile (checked at the command
    line), else the cached one whose key matches, else one built now (and cached)."""
    path, key = cfg.out / PROFILE_FILE, profile_key(cfg)
    start = time.perf_counter()
    if path.is_file():
        profile, source = LatencyProfile.load(path), "run"
    elif cfg.latency_profile:
        profile, source = latency.load_matching(cfg.latency_profile, key), cfg.latency_profile
    elif (hit := latency.cached(key)) is not None:
        profile, source = hit, f"cache {latency.cache_path(key)}"
    else:
        print(f"building the latency profile for {key.model} on {key.device_name} (batch {key.batch}, "
              f"{key.threads} thread(s)); cached in {latency.cache_path(key)}", file=sys.stderr)
        profile = LatencyProfile.from_dict(_remote(cfg, _build_task, cfg.setup, asdict(key)))
        profile.save(latency.cache_path(key))
        source = f"built {profile.build_seconds:.1f} s, cached {latency.cache_path(key)}"
    latency.check_fits(profile, cfg.setup.space.spec, source)
    if not path.is_file():
        profile.save(path)
    run["latency_profile"] = {"file": PROFILE_FILE, "source": source, "key": asdict(profile.key),
                              "build_seconds": round(profile.build_seconds, 3),
                              "seconds_here": round(time.perf_counter() - start, 3)}
    return profile


def _retime_task(setup: WorkerSetup, schedules: list[dict[str, Any]], batch: int, latency_batch: int,
                 on_gpu: bool) -> list[dict[str, Any]]:
    """Throughput at `batch` and latency at `latency_batch` of every schedule, in this one process."""
    from search.evaluate import throughput_many
    from spaces import Schedule

    model = _model(setup)
    items = [Schedule.from_dict(s) for s in schedules]
    warm = 1 if on_gpu else 0  # CUDA kernels are chosen on a first call; a CPU forward needs none
    start = time.perf_counter()
    batched = throughput_many(model, items, batch_size=batch, warmup=2, schedule_warmup=warm, repeats=1, nest=RETIME_NEST)
    mid = time.perf_counter()
    single = throughput_many(model, items, batch_size=latency_batch, warmup=2, schedule_warmup=warm, repeats=2)
    seconds = {"batched": mid - start, "latency": time.perf_counter() - mid}
    return [{"measured_images_per_s": b.images_per_s, "measured_speedup": b.speedup,
             "measured_speedup_min": b.speedup_min, "measured_speedup_max": b.speedup_max,
             "baseline_images_per_s": b.baseline_images_per_s,
             "latency_ms": 1e3 * latency_batch / s.images_per_s, "baseline_latency_ms": 1e3 * latency_batch / s.baseline_images_per_s,
             "latency_speedup": s.speedup, "retime_seconds": seconds} for b, s in zip(batched, single, strict=True)]


def _todo(cfg: SearchConfig, done_key: str) -> list[dict[str, Any]]:
    """Front points and presets (one record each, the latest) that have no `done_key` yet."""
    from search.outcome import final_front, latest_records

    front, presets = final_front(cfg, latest_records(run_dir.read_records(cfg.out)))[:2]
    return list({r["ray_trial"]: r for r in [*front, *presets] if r.get("schedule")
                 and r.get(done_key) is None}.values())


def run_retime(cfg: SearchConfig, run: dict[str, Any]) -> None:
    """Re-time every point of the final front and every preset not yet re-timed (a resumed run keeps
    the timings it has); each gets a new trial-log line with the measured columns beside its own.
    With --compile, then the same schedules compiled against the compiled unreduced model."""
    todo = _todo(cfg, "measured_speedup")
    if todo:
        _retime_eager(cfg, run, todo)
    if cfg.compile and (todo := _todo(cfg, "compiled_speedup")):
        _retime_compiled(cfg, run, todo)


def _retime_eager(cfg: SearchConfig, run: dict[str, Any], todo: list[dict[str, Any]]) -> None:
    """Throughput at --timing-batch and latency at --latency-batch, eager, against the unreduced model."""
    print(f"re-timing {len(todo)} schedules (front and presets) against the unreduced model: batch "
          f"{cfg.timing_batch}, then batch {cfg.latency_batch}", file=sys.stderr)
    start = time.perf_counter()
    results = _remote(cfg, _retime_task, cfg.setup, [r["schedule"] for r in todo], cfg.timing_batch,
                      cfg.latency_batch, cfg.gpus_per_trial > 0)
    for record, measured in zip(todo, results, strict=True):
        seconds = measured.pop("retime_seconds")
        run_dir.append_record(cfg.out, {**record, **measured, "retime_batch": cfg.timing_batch,
                                        "latency_batch": cfg.latency_batch})
    run.setdefault("retime_runs", []).append({"schedules": len(todo), "seconds": round(time.perf_counter() - start, 3),
                                         "timing_seconds": {k: round(v, 3) for k, v in seconds.items()},
                                         "batch": cfg.timing_batch, "latency_batch": cfg.latency_batch,
                                         "threads": cfg.setup.threads, "device": cfg.setup.device,
                                         "protocol": f"evaluate.throughput_many: one pass batched (nest {RETIME_NEST}), two "
                                                     "at the latency batch (nest 1); median of the ratios"})


def _compiled_task(setup: WorkerSetup, schedules: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """Each schedule compiled against the compiled unreduced model at `batch`, in this one process."""
    import torch

    from search.compiled import compiled_run
    from spaces import Schedule

    model = _model(setup)
    images = torch.randn(8, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    found: list[dict[str, Any]] = []
    for s in schedules:  # one at a time: a schedule that fails to compile is recorded, the others go on
        try:
            c = compiled_run(model, Schedule.from_dict(s), images.to(setup.device), batch_size=batch, repeats=3,
                             batches=1)
        except Exception as err:  # noqa: BLE001 - any compiler failure is the schedule's result
            found.append({"compile_error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"})
            continue
        found.append({"compiled_speedup": c.speedup, "compiled_images_per_s": c.images_per_s,
                      "compiled_baseline_images_per_s": c.baseline_images_per_s,
                      "compiled_eager_speedup": c.eager_speedup, "compile_seconds": c.compile_seconds,
                      "compiled_max_abs_logit_diff": c.max_abs_logit_diff, "graph_breaks": c.graph_breaks,
                      "recompiles": c.recompiles})
    return found


def _retime_compiled(cfg: SearchConfig, run: dict[str, Any], todo: list[dict[str, Any]]) -> None:
    """--compile: every front point and preset under torch.compile (inductor), against the compiled
    unreduced model; the outputs are checked against eager (max |logit difference|)."""
    print(f"re-timing {len(todo)} schedules under torch.compile against the compiled unreduced model: batch "
          f"{cfg.timing_batch} (each compiles first: minutes on a CPU)", file=sys.stderr)
    start = time.perf_counter()
    results = _remote(cfg, _compiled_task, cfg.setup, [r["schedule"] for r in todo], cfg.timing_batch)
    for record, compiled in zip(todo, results, strict=True):
        run_dir.append_record(cfg.out, {**record, **compiled})
    run.setdefault("compiled_runs", []).append({
        "schedules": len(todo), "seconds": round(time.perf_counter() - start, 3), "batch": cfg.timing_batch,
        "max_abs_logit_diff": max((c["compiled_max_abs_logit_diff"] for c in results if "compile_error" not in c),
                                  default=None),
        "with_graph_breaks": sum(c.get("graph_breaks", 0) > 0 for c in results),
        "failed": sum("compile_error" in c for c in results),
        "protocol": "search.compiled.compiled_run per schedule (dynamo reset first): 3 ABBA pairs compiled vs "
                    "compiled"})
