"""The run's default Optuna storage: a journal file in the run directory with one writer.

The file is Optuna's own journal format (one JSON operation per line), so Optuna's
``JournalFileBackend``, ``--resume`` and optuna-dashboard (``optuna-dashboard runs/<run>/study.log``)
read it. Only the driver that holds the run directory's lock (search/run_dir.lock) writes it, so
the backend skips what Optuna's file backend does for several writers on each of the ~70
operations of a trial: a lock file, reopening the file, fsync, and reading its own writes back
from the file. A write is flushed to the operating system at once, so a killed driver (kill -9)
loses nothing it wrote; a line cut by a crash mid-write is dropped when the file is next opened.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from optuna.storages.journal import BaseJournalBackend

__all__ = ["RunJournal", "drop_cut_line"]


def drop_cut_line(path: Path) -> int:
    """Truncate a last line without its newline (a write cut by a crash); returns the bytes dropped.
    Optuna's reader stops at such a line, and a write appended after it would corrupt the journal."""
    if not path.is_file():
        return 0
    size = path.stat().st_size
    with path.open("rb+") as f:
        tail = 0
        while tail < size:
            step = min(65536, size - tail)
            f.seek(size - tail - step)
            chunk = f.read(step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                tail += step - newline - 1
                break
            tail += step
        if tail:
            f.truncate(size - tail)
    return tail


class RunJournal(BaseJournalBackend):
    """Journal backend for a single writer: appends go to the file (flushed, not fsync'ed) and are
    served back from memory; the file's existing operations are read once, when it is opened."""

    def __init__(self, file_path: str | Path) -> None:
        self._path = Path(file_path)
        drop_cut_line(self._path)
        self._pending: list[dict[str, Any]] = []  # operations not yet read back by the storage
        self._first = 0  # log number of _pending[0]
        if self._path.is_file():
            with self._path.open("rb") as f:
                self._pending = [json.loads(line) for line in f if line.strip()]
        self._file = self._path.open("ab")

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        if log_number_from < self._first:  # a reader that starts over (not the storage on this backend)
            with self._path.open("rb") as f:
                for number, line in enumerate(f):
                    if number >= log_number_from and line.strip():
                        yield json.loads(line)
            return
        del self._pending[: log_number_from - self._first]  # the storage has read these
        self._first = log_number_from
        yield from list(self._pending)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self._file.write(b"".join(json.dumps(log, separators=(",", ":")).encode() + b"\n" for log in logs))
        self._file.flush()  # to the operating system: a kill -9 of the driver loses nothing written
        self._pending.extend(logs)

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray Tune pickles its searcher (the study and this storage with it) in its experiment
        # checkpoints: only the path travels, and an unpickled copy reads the file again.
        return RunJournal, (str(self._path),)
