"""One evaluation for the schedules that predict the same, shared by every worker of a run.

On a model whose head reads only its prefix tokens, a reduction after the last block's attention
changes no prediction (spaces.presets.output_key): a preset and its trimmed tail
(spaces.search_space.trimmed_tail), or two searched schedules that differ only there, score the
same on every image. The first full evaluation of such a class on an image set is written under
the run's cache; the others read it instead of running the same forwards again, and their record
names the schedule that ran (``output_of``). An evaluation stopped early is not written.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from search.shared_logits import save_atomically
from spaces import Schedule
from spaces.presets import output_key

MEMO_DIR = "outputs"  # under the run's cache directory


@dataclass(frozen=True)
class Known:
    """What an earlier full evaluation measured for the same outputs."""

    accuracy: dict[str, Any]  # search.evaluate.Accuracy as a dict
    hits: Tensor  # [N] bool: each image's outcome (top-1 right, or agreeing without labels)
    output_of: str  # the summary of the schedule that ran


@dataclass(frozen=True)
class OutputMemo:
    """Results on one image set (`images`), keyed by `output_key` and by `context`: everything else
    the outputs depend on (model, checkpoint, data, seed, torch)."""

    directory: Path
    images: str  # "screen" or "confirm"
    context: tuple[Any, ...]

    def path(self, schedule: Schedule, dtype: torch.dtype | None) -> Path:
        text = repr((self.context, self.images, str(dtype), output_key(schedule)))
        return self.directory / MEMO_DIR / f"{self.images}-{hashlib.sha256(text.encode()).hexdigest()[:20]}.pt"

    def get(self, schedule: Schedule, dtype: torch.dtype | None = None) -> Known | None:
        path = self.path(schedule, dtype)
        if not path.is_file():
            return None
        return Known(**torch.load(path))

    def put(self, schedule: Schedule, known: Known, dtype: torch.dtype | None = None) -> None:
        """Write a full evaluation (atomically: a reader sees all of it or nothing)."""
        path = self.path(schedule, dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(asdict(known), path)
