"""What a search is asked and what it returns: SearchConfig in, SearchOutcome out. The stages read
the config from here, not from the driver (no import cycle)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search.worker import FinetuneJob, WorkerSetup

EXIT_EMPTY_FRONT = 3


@dataclass(frozen=True)
class SearchConfig:
    setup: WorkerSetup
    budget: str
    out: Path
    trials: int = 60
    sampler: str = "local-nsga2"
    resume: bool = False
    storage: str | None = None
    ray_address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    concurrency: int = 2
    presets: bool = True
    seed: int = 0
    command: str = ""
    fault_trials: dict[int, str] = field(default_factory=dict)  # test hook: suggestion index -> "raise" | "nan"
    finetune_top: int = 0  # promote this many screened candidates to a short fine-tune
    finetune: FinetuneJob | None = None  # how (steps, data, batch); needed when finetune_top > 0
    retries: int = 0  # Ray FailureConfig: a failed or killed trial is run again this many times
    fault_finetunes: dict[int, str] = field(default_factory=dict)  # test hook: candidate index -> "raise" | "hang"
    timing_batch: int = 64  # batch of the latency profile and of the re-timed throughput
    latency_batch: int = 1  # batch of the re-timed latency (batch 1: what an online user waits)
    latency_profile: str | None = None  # a profile file given on purpose (its key must match the run's)
    retime: bool = True  # re-time every front point and preset after the confirmation
    compile: bool = False  # also re-time them under torch.compile, compiled against compiled
    deterministic: bool = True  # the same seed gives the same trials, whatever order Ray finishes them in


@dataclass
class SearchOutcome:
    out: Path
    records: list[dict[str, Any]]
    front: list[dict[str, Any]]
    exit_code: int
