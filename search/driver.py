"""The search: Optuna proposes schedules, Ray Tune runs them, the run directory keeps everything.

    run(SearchConfig(...)) -> SearchOutcome

Optuna (NSGA-II by default, pinned) samples define-by-run spaces through Ray Tune's
OptunaSearch; the study lives in a journal file in the run directory (or `--storage`), so
optuna-dashboard can open it and `--resume` continues it. Ray Tune runs each trial in a
reused actor that loaded the model and the screening data once. The paper presets that fit
the budget are enqueued first. Every reported result is appended to trials.jsonl by the
driver (the single writer), which is what the reports and resume read.

This module checks the input and runs the stages in order: the presets and, after the search,
the confirmation (search/fixed_stage.py) and the searched trials (search/tune_stage.py), as
phases of one Ray Tune experiment that share its actors (search/staged.py), the fine-tunes of the
promoted candidates (search/finetune_stage.py), and the front with every output
(search/outcome.py); search/config.py holds the SearchConfig they share.
"""

from __future__ import annotations

import os
import shlex
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from search import run_dir, shared_logits
from search.config import SearchConfig, SearchOutcome
from search.finetune_stage import run_finetunes
from search.fixed_stage import confirm_phase, presets_phase
from search.outcome import finish
from search.shared_logits import CACHE_DIR
from search.speed_stage import ensure_profile, needs_profile, run_retime
from search.staged import run_phases
from search.tune_stage import TunePhase
from spaces import Schedule, gmacs
from spaces.presets import presets_in_range
from spaces.search_space import FRACTION_RANGE, SearchSpace, cheapest_gmacs


def _settings(cfg: SearchConfig) -> dict[str, Any]:
    s, space = cfg.setup, cfg.setup.space
    return {
        "command": cfg.command, "model": space.spec.name, "checkpoint": s.checkpoint, "pretrained": s.pretrained,
        "data": s.data, "num_images": s.num_images, "seed": cfg.seed, "budget": cfg.budget,
        "budget_gmacs": round(space.budget_gmacs or 0.0, 9), "baseline_gmacs": gmacs(Schedule.empty(space.spec)),
        "min_gmacs": None if space.min_gmacs is None else round(space.min_gmacs, 9),
        "confirm_images": s.confirm_images, "presets": cfg.presets, "stop_chunk": s.stop_chunk,
        "space": space.name, "methods": list(space.methods), "objectives": list(s.objectives), "sampler": cfg.sampler,
        "trials": cfg.trials, "device": s.device, "batch_size": s.batch_size, "precision": s.screen_precision,
        "timing": dict(s.timing) if s.timing else None, "concurrency": cfg.concurrency,
        "deterministic": cfg.deterministic,
        "timing_batch": cfg.timing_batch, "latency_batch": cfg.latency_batch, "retime": cfg.retime, "compile": cfg.compile,
        "threads": s.threads,
        "cpus_per_trial": cfg.cpus_per_trial, "gpus_per_trial": cfg.gpus_per_trial,
        "storage": cfg.storage or run_dir.default_storage_url(cfg.out), "study_name": run_dir.study_name(cfg.out),
        "versions": run_dir.versions(),
    }


def check_budget(space: SearchSpace) -> None:
    """A budget below the cheapest schedule of the space is bad input (say what the minimum is)."""
    floor = cheapest_gmacs(space)
    if space.budget_gmacs is not None and space.budget_gmacs < floor:
        raise ValueError(f"budget {space.budget_gmacs:.3f} GMACs is below the cheapest schedule of space "
                         f"{space.name!r} on {space.spec.name} ({floor:.3f} GMACs)")


def default_min_gmacs(space: SearchSpace, presets: bool) -> float | None:
    """Where the front should reach down to: the cheapest preset under the budget (half the budget
    without presets, or when none fits)."""
    if space.budget_gmacs is None:
        return None
    fitting = [gmacs(s) for s in presets_in_range(space.spec, space.budget_gmacs)] if presets else []
    return min(fitting) if fitting else space.budget_gmacs * FRACTION_RANGE[0]


def check_ray_address(address: str | None, timeout: float = 3.0) -> None:
    """Fail fast on an unreachable cluster (ray.init would wait for minutes)."""
    import socket

    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"malformed --ray-address {address!r}; use HOST:PORT (or ray://HOST:PORT)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ValueError(f"cannot reach Ray at {address}: {err.strerror or err}") from None


def ray_auth_mode(address: str | None) -> str | None:
    """The RAY_AUTH_MODE this driver runs with, when the user has not set one.

    Ray 2.60 checks a token when the cluster was started with ``~/.ray/auth_token`` present
    (``ray start --head`` then turns token auth on by itself): a cluster driver sends the token
    if one is there. The local Ray this driver starts runs without (it binds to localhost).
    """
    if "RAY_AUTH_MODE" in os.environ:
        return os.environ["RAY_AUTH_MODE"]
    if address is None:
        return "disabled"
    if os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").is_file():
        return "token"
    return None


def check_cluster_resources(cfg: SearchConfig) -> None:
    """Resources per trial must fit one node of the cluster (Ray would wait forever otherwise)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for key, flag, need in (("CPU", "--cpus-per-trial", cfg.cpus_per_trial), ("GPU", "--gpus-per-trial", cfg.gpus_per_trial)):
        most = max((n.get(key, 0.0) for n in nodes), default=0.0)
        if need > most:
            raise ValueError(f"{flag} {need:g}: no node of the Ray cluster has that many ({most:g} at most)")


def _init_ray(cfg: SearchConfig) -> str | None:
    """Connect to `--ray-address`, or start a local Ray with its dashboard; returns the dashboard URL."""
    import ray

    if ray.is_initialized():
        return None
    try:
        if cfg.ray_address:
            ctx = ray.init(address=cfg.ray_address, log_to_driver=False, configure_logging=False)
        else:
            # address="local": always a new local Ray, even when another cluster runs on this host (PITFALLS 14)
            ctx = ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                           log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ValueError(f"cannot reach Ray at {cfg.ray_address or 'local'}: {str(err).splitlines()[0]}") from None
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


def release_ray() -> threading.Thread:
    """Shut Ray down in a thread of its own (its workers, and the local cluster this driver started),
    while the driver writes its reports: for a process that ends right after the search."""
    import ray

    thread = threading.Thread(target=ray.shutdown, name="ray-shutdown")
    thread.start()
    return thread


def run(cfg: SearchConfig, *, exiting: bool = False) -> SearchOutcome:
    """The whole search: prepare the run directory, run the trials, write every output. With
    ``exiting`` (the process ends right after), Ray is shut down while the reports are written."""
    start = time.perf_counter()
    # Tune's new console output prints configuration boxes and a TensorBoard hint on stdout even at
    # verbose=0; the legacy reporter at verbose=0 prints nothing, so stdout keeps the closing table.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    mode = ray_auth_mode(cfg.ray_address)
    if mode is not None:  # before anything imports Ray: it reads RAY_AUTH_MODE once, at import
        os.environ["RAY_AUTH_MODE"] = mode
    space = cfg.setup.space
    check_budget(space)
    settings = _settings(cfg)
    run_dir.prepare(cfg.out, settings, resume=cfg.resume, create=False)  # all checks before anything is written
    check_ray_address(cfg.ray_address)
    run_dir.lock(cfg.out)  # held until this process exits: a second driver on --out gets exit code 2
    dashboard = _init_ray(cfg)
    check_cluster_resources(cfg)
    run = run_dir.prepare(cfg.out, settings, resume=cfg.resume)
    cfg = replace(cfg, setup=replace(cfg.setup, cache_dir=str((cfg.out / CACHE_DIR).resolve())))
    run["dashboard"] = dashboard
    run_dir.write_run_json(cfg.out, run)  # before the study exists, so a kill from here on can be resumed
    storage = run_dir.storage(cfg.storage, cfg.out)
    if dashboard:
        print(f"Ray dashboard: {dashboard}", file=sys.stderr)
    print(f"Optuna study: {run['storage']} (optuna-dashboard {run_dir.dashboard_arg(run['storage'])})", file=sys.stderr)
    tic = time.perf_counter()
    if needs_profile(cfg):  # the trials' predicted speed comes from it
        cfg = replace(cfg, setup=replace(cfg.setup, latency=ensure_profile(cfg, run)))
    profiled = time.perf_counter()
    phases = run_phases(cfg, run, [presets_phase(cfg, storage), TunePhase(cfg, storage), confirm_phase(cfg)], "search")
    presets_done, toc = phases["presets"][1], phases["tune"][1]
    shared_logits.drop_tokens(cfg.setup.cache_dir)  # the kept tokens are large and no later stage reads them
    confirmed = time.perf_counter()
    if cfg.finetune_top > 0:
        run_finetunes(cfg, run)
    shared_logits.drop_images(cfg.setup.cache_dir)  # no stage after the fine-tunes builds a worker
    finetuned = time.perf_counter()
    if cfg.retime:
        run_retime(cfg, run)
    run.setdefault("timing_s", []).append({
        "ray_init_and_setup": round(tic - start, 3), "latency_profile": round(profiled - tic, 3),
        "presets": round(presets_done - profiled, 3), "tune": round(toc - presets_done, 3),
        "confirm": round(confirmed - toc, 3), "finetune": round(finetuned - confirmed, 3),
        "retime": round(time.perf_counter() - finetuned, 3)})
    releasing = release_ray() if exiting else None  # nothing below uses Ray
    try:
        return finish(cfg, run)
    finally:
        if releasing is not None:
            releasing.join()


def command_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["python", "run_search.py", *argv])
