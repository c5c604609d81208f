"""The unreduced model's logits, computed once per run and shared by every worker through files.

Each stage of a search starts fresh Ray actors, and every worker needs the unreduced model's
logits on the screening images (and, for the confirmation, on the confirmation images): the
most expensive forward of all, once per worker per stage. Here the first worker to need a set
computes it and writes it atomically under the run directory's cache; the others load it. While
one worker holds a set's lock, another computes the next set it will need instead of waiting.

The worker that computes a set's logits also writes the decoded images beside them (before the
logits: whoever finds the logits finds the images), so no other worker generates or decodes that
set again (`save_images`, `load_images`).

The pass that computes a set's logits may also keep the tokens entering some blocks
(search.evaluate.predict_keeping): its worker uses them from memory, and writes them beside the
logits, one file per block, after the logits and in the background; every other worker maps the
files written so far (`load_tokens`) instead of recomputing those blocks.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable, Collection, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from search.data import TensorSet

CACHE_DIR = "cache"  # under the run directory: the shared logits and their locks
_WRITERS: list[threading.Thread] = []  # this process's threads writing kept tokens (`_save_tokens`)


def cache_path(cache_dir: str | Path, name: str, key: Sequence[object]) -> Path:
    """The file of one set's logits: its name and a digest of everything that determines them."""
    digest = hashlib.sha256(json.dumps([str(k) for k in key]).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"logits-{name}-{digest}.pt"


@contextmanager
def _lock(path: Path, *, wait: bool):  # type: ignore[no-untyped-def]
    """An exclusive lock on path's `.lock` file; yields False when `wait` is off and it is taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_atomically(obj: object, path: Path) -> None:
    """torch.save to `path` through a temporary file: a reader sees all of it or nothing."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def tokens_path(path: Path, block: int) -> Path:
    """The file of the tokens entering `block`, kept by the pass that computed the logits at `path`."""
    return path.with_name(f"tokens-{path.stem.removeprefix('logits-')}-block{block}.pt")


def images_path(path: Path) -> Path:
    """The file of the decoded images whose logits are at `path`."""
    return path.with_name(f"images-{path.stem.removeprefix('logits-')}.pt")


def save_images(images: TensorSet, path: Path) -> None:
    """Write a decoded image set beside the logits at `path` (atomically); a failed write is said
    and skipped: the other workers then build the set themselves."""
    try:
        save_atomically(asdict(images), images_path(path))
    except OSError as err:
        print(f"images not written beside {path.name}: {err}", file=sys.stderr)


def load_images(path: Path) -> TensorSet | None:
    """The decoded images written beside the logits at `path` (memory-mapped: the workers share the
    pages), or None when there are none."""
    file = images_path(path)
    if not file.is_file():
        return None
    fields = torch.load(file, mmap=True)
    return TensorSet(**{**fields, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})


def load_tokens(path: Path, skip: Collection[int] = ()) -> dict[int, Tensor]:
    """The tokens kept beside the logits at `path` (those written so far), by block, memory-mapped
    (read-only, shared by every process that maps them), but for the blocks in `skip`."""
    found = {}
    for file in path.parent.glob(tokens_path(path, 0).name.replace("-block0.pt", "-block*.pt")):
        block = file.stem.rpartition("-block")[2]
        if block.isdigit() and int(block) not in skip:
            found[int(block)] = torch.load(file, mmap=True)
    return dict(sorted(found.items()))


def _drop(cache_dir: str | Path | None, prefix: str) -> None:
    """Delete the files of a run cache whose names start with `prefix`, half-written ones included."""
    if cache_dir is not None:
        for file in Path(cache_dir).glob(f"{prefix}*"):
            file.unlink(missing_ok=True)


def drop_tokens(cache_dir: str | Path | None) -> None:
    """Delete the kept tokens of a run cache (large; a later stage that needs them computes its own)."""
    _drop(cache_dir, "tokens-")


def drop_images(cache_dir: str | Path | None) -> None:
    """Delete the decoded image sets of a run cache (large with --data; a later worker builds its own)."""
    _drop(cache_dir, "images-")


Computed = Tensor | tuple[Tensor, dict[int, Tensor]]  # the logits, or the logits and tokens by block


def _save_tokens(path: Path, tokens: dict[int, Tensor]) -> None:
    """Write the kept tokens beside the logits at `path`, one file per block, in a thread of their
    own: the worker goes on with its trials meanwhile (hundreds of MB go to disk), and a worker that
    maps them before they are all written computes the missing ones itself."""
    def write() -> None:
        try:
            for block, kept in tokens.items():
                save_atomically(kept, tokens_path(path, block))
        except OSError as err:  # a full disk, say: the other workers compute what they miss
            print(f"kept tokens not written beside {path.name}: {err}", file=sys.stderr)

    if tokens:
        writer = threading.Thread(target=write, name=f"save-{path.stem}", daemon=True)
        writer.start()
        _WRITERS.append(writer)


def wait_for_tokens() -> None:
    """Block until this process has written every set of tokens it started writing."""
    while _WRITERS:
        _WRITERS.pop().join()


def _compute_and_save(path: Path, compute: Callable[[], Computed]) -> tuple[Tensor, dict[int, Tensor]]:
    found = compute()
    logits, tokens = found if isinstance(found, tuple) else (found, {})
    save_atomically(logits, path)
    _save_tokens(path, tokens)
    return logits, tokens


def _load(path: Path) -> tuple[Tensor, dict[int, Tensor]]:
    return torch.load(path), load_tokens(path)


def shared_outputs(jobs: Sequence[tuple[Path, Callable[[], Computed]]]) -> list[tuple[Tensor, dict[int, Tensor]]]:
    """Each job's logits and kept tokens: loaded from their files (the tokens memory-mapped: those
    written so far), or computed (and saved) by whoever gets there first (the tokens then in memory).

    First pass: every job whose lock is free is computed now (or loaded, if its file appeared);
    second pass: wait for the others' locks, then load (or compute, if their worker died)."""
    found: dict[int, tuple[Tensor, dict[int, Tensor]]] = {}
    for i, (path, compute) in enumerate(jobs):
        with _lock(path, wait=False) as held:
            if held:
                found[i] = _load(path) if path.is_file() else _compute_and_save(path, compute)
    for i, (path, compute) in enumerate(jobs):
        if i not in found:
            with _lock(path, wait=True):
                found[i] = _load(path) if path.is_file() else _compute_and_save(path, compute)
    return [found[i] for i in range(len(jobs))]
