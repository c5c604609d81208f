"""The run directory: run.json, the trial log, resume checks, Optuna storage and samplers."""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

STUDY_DB = "study.db"  # the SQLite study of runs made before the journal became the default
STUDY_JOURNAL = "study.log"  # the default study: an Optuna journal file (search/journal.py)
TRIALS_LOG = "trials.jsonl"
RUN_JSON = "run.json"
LOCK = ".lock"  # flock'ed by the driver for its whole life (released by the kernel on any exit, kill -9 too)
CONFIGS = "configs"
STUDY_PREFIX = "tokensched"  # a new run's study is named <prefix>-<run directory name>
# Settings a resumed run must share with the run it continues.
MUST_MATCH = ("model", "checkpoint", "budget_gmacs", "min_gmacs", "space", "methods", "objectives", "data",
              "num_images", "seed", "sampler", "confirm_images", "precision")
SAMPLERS = ("nsga2", "tpe", "gp", "random", "local-nsga2", "local-tpe", "local-random")


def study_name(out: Path) -> str:
    """The run's Optuna study name: the one its run.json records (so a run directory moved or
    renamed resumes its own study), else ``tokensched-<directory name>`` (a new run, or one made
    before the name was recorded)."""
    run_json = out / RUN_JSON
    if run_json.is_file():
        try:
            recorded = json.loads(run_json.read_text()).get("study_name")
        except (OSError, json.JSONDecodeError):
            recorded = None
        if recorded:
            return str(recorded)
    return f"{STUDY_PREFIX}-{out.resolve().name}"


def default_out() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def prepare(out: Path, settings: dict[str, Any], *, resume: bool, create: bool = True) -> dict[str, Any]:
    """Create `out` for a new run, or check that a resumed run matches; returns run.json's content.

    With create=False it only checks (nothing is written), so bad input leaves no trace.
    """
    run_json = out / RUN_JSON
    if resume:
        if not run_json.is_file():
            raise ValueError(f"--resume: no run to resume in {out} (no {RUN_JSON})")
        previous = json.loads(run_json.read_text())
        for key in MUST_MATCH:
            if previous.get(key) != settings.get(key):
                raise ValueError(f"--resume: {key} differs from the run in {out} "
                                 f"({previous.get(key)!r} there, {settings.get(key)!r} now)")
        previous.setdefault("resumed", []).append(settings["command"])
        previous["trials"] = settings["trials"]
        previous["storage"] = settings.get("storage", previous.get("storage"))  # where this segment writes
        return previous
    if out.exists() and (not out.is_dir() or any(p.name != LOCK for p in out.iterdir())):
        raise ValueError(f"output directory {out} already exists; pass --resume to continue it or choose another --out")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return dict(settings)


_HELD: list[Any] = []  # the open lock files of this process (the lock lives as long as the file stays open)


def lock(out: Path) -> None:
    """Take the run directory's advisory lock for this process's life (creating `out` if needed):
    a second driver on the same directory, --resume included, gets a ValueError (exit code 2).

    If this process created `out` and leaves it holding nothing but the lock file (a failure
    before run.json was written), the directory is removed again at exit: bad input leaves no trace.
    """
    import atexit
    import fcntl

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    handle = (out / LOCK).open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ValueError(f"{out} is in use by another search (locked); wait for it to finish, then "
                         "--resume it, or choose another --out") from None
    _HELD.append(handle)
    if created:
        atexit.register(_remove_if_unused, out)


def _remove_if_unused(out: Path) -> None:
    if out.is_dir() and [p.name for p in out.iterdir()] == [LOCK]:
        (out / LOCK).unlink()
        out.rmdir()


def replace_configs(out: Path, export) -> None:  # type: ignore[no-untyped-def]
    """Re-export configs/ from scratch: ``export(root)`` writes ``root/configs/*.yaml``; it runs on a
    staging root inside `out`, the run's real paths are put back into the files, and the new
    directory then replaces the old one (stale configs of points that left the front go with it).

    A kill at any moment leaves either the old or the new configs/ (plus staging that the next
    finish removes), never a half-written one under that name.
    """
    import shutil

    staging, old = out / ".configs-staging", out / ".configs-old"
    for leftover in (staging, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    export(staging)
    kill_point("configs")
    fresh = staging / CONFIGS
    for path in fresh.glob("*.yaml"):
        path.write_text(path.read_text().replace(str(fresh), str(out / CONFIGS)))
    if (out / CONFIGS).exists():
        (out / CONFIGS).rename(old)
    fresh.rename(out / CONFIGS)
    shutil.rmtree(staging)
    if old.exists():
        shutil.rmtree(old)


def versions() -> dict[str, str]:
    import optuna
    import ray
    import timm
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
            "optuna": optuna.__version__, "ray": ray.__version__, "platform": platform.platform()}


KILL_AT = "TOKENSCHED_KILL_AT"  # fault injection (tests, bench/faults.py): a kill point name


def kill_point(name: str) -> None:
    """SIGKILL this process at the named point when $TOKENSCHED_KILL_AT names it: a reproducible
    `kill -9` at a moment too short to hit from outside (after run.json, before the study exists)."""
    import os
    import signal

    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def write_run_json(out: Path, run: dict[str, Any]) -> None:
    """run.json, replaced atomically (a kill leaves the old or the new one)."""
    tmp = out / f".{RUN_JSON}.tmp"
    tmp.write_text(json.dumps(run, indent=2, default=str))
    tmp.replace(out / RUN_JSON)
    kill_point("run.json")


def append_record(out: Path, record: dict[str, Any]) -> None:
    with (out / TRIALS_LOG).open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def read_records(out: Path) -> list[dict[str, Any]]:
    path = out / TRIALS_LOG
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by kill -9
            continue
    return records


def default_storage_url(out: Path) -> str:
    """The study of a run without --storage: the journal file in `out`, or the SQLite file of a run
    made before the journal was the default (so --resume continues the study it has)."""
    if (out / STUDY_DB).is_file() and not (out / STUDY_JOURNAL).exists():
        return f"sqlite:///{(out / STUDY_DB).resolve()}"
    return f"journal:{(out / STUDY_JOURNAL).resolve()}"


def dashboard_arg(url: str) -> str:
    """What optuna-dashboard takes for a storage URL: a journal's file path, else the URL."""
    return url.removeprefix("journal:")


def storage(url: str | None, out: Path):  # type: ignore[no-untyped-def]
    """An Optuna storage object (OptunaSearch wants an object, not a URL): by default the run's
    journal file, written by this driver alone (search/journal.py; PITFALLS 22: SQLite costs about
    0.5 s a trial).

    `--storage postgresql://...` or `sqlite:///...` (any SQLAlchemy URL), or `--storage journal:PATH`
    for a journal file that several processes may write (Optuna's own backend: locked, fsync'ed).
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url is None:
        url = default_storage_url(out)
        if url.startswith("journal:"):
            from search.journal import RunJournal

            return optuna.storages.JournalStorage(RunJournal(url.removeprefix("journal:")))
    if url.startswith("journal:"):
        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as err:  # noqa: BLE001 - any bad URL is bad input
        raise ValueError(f"cannot open --storage {url}: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def load_study(out: Path, url: str | None = None):  # type: ignore[no-untyped-def]
    """A run's Optuna study opened for reading with Optuna's own backends, as optuna-dashboard opens
    it (a journal file through ``JournalFileBackend``); `url` as --storage, default the run's own."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    url = url or default_storage_url(out)
    opened = optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:"))) \
        if url.startswith("journal:") else url
    return optuna.load_study(study_name=study_name(out), storage=opened)


def check_storage_url(url: str) -> None:
    """`--storage` must be one Optuna can open, checked without connecting or writing anything:
    `journal:PATH` in an existing directory, or an SQLAlchemy URL whose driver is installed."""
    if url.startswith("journal:"):
        parent = Path(url.removeprefix("journal:")).resolve().parent
        if not parent.is_dir():
            raise ValueError(f"--storage {url}: directory {parent} not found")
        return
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()  # the database driver (psycopg2, pymysql...) is installed
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ImportError, ValueError) as err:
        raise ValueError(f"--storage {url}: Optuna cannot open it "
                         f"({type(err).__name__}: {str(err).splitlines()[0]}); use sqlite:///PATH, "
                         "postgresql://... or journal:PATH") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        parent = Path(parsed.database).resolve().parent
        if not parent.is_dir():
            raise ValueError(f"--storage {url}: directory {parent} not found")


def segment_seed(seed: int, out: Path) -> int:
    """The sampler's seed for this segment of a run: `seed`, plus one per --resume so far. A resumed
    sampler with the first segment's seed replays its random draws (NSGA-II's first generation,
    TPE's start-up trials, random): the same parameters again, duplicates."""
    run_json = out / RUN_JSON
    resumed = json.loads(run_json.read_text()).get("resumed", []) if run_json.is_file() else []
    return seed + len(resumed)


def sampler(name: str, seed: int, space=None):  # type: ignore[no-untyped-def]
    """Pinned explicitly (PITFALLS 5: Optuna 5 changed the defaults). With the search `space`, the
    local moves never repeat a schedule and move along its budget share."""
    import optuna

    if name.startswith("local-"):  # local moves around the front, the rest from the named sampler
        from search.samplers import LocalMoveSampler, ScheduleKey
        from spaces.search_space import BUDGET_PARAM

        key = ScheduleKey(space) if space is not None else None
        return LocalMoveSampler(sampler(name.removeprefix("local-"), seed), seed=seed, key=key, axis=BUDGET_PARAM)
    if name == "nsga2":
        from search.samplers import PicklableNSGAIISampler

        return PicklableNSGAIISampler(seed=seed, population_size=20)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, deterministic_objective=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")


def settle_stale_trials(study, records: list[dict[str, Any]], objectives: list[str], out: Path) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Trials a killed run left RUNNING (PITFALLS 15): completed from the trial log when their result
    reached it (killed between the report and Optuna's tell), else marked FAIL as interrupted, with a
    FAIL record in the trial log. A preset's injection left RUNNING or WAITING (killed between its
    enqueue and its tell) is marked FAIL without a record: the preset keeps its own record and is
    told again. Returns (completed, failed)."""
    import math

    from optuna.trial import TrialState

    logged = {r["trial"]: r for r in records if r.get("state") == "COMPLETE" and r.get("trial") is not None}
    completed = failed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        r = logged.get(t.number)
        values = [r.get(o) for o in objectives] if r else None
        if t.state == TrialState.RUNNING and values and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.COMPLETE, values=values)
            completed += 1
            continue
        is_injection = "preset" in t.user_attrs
        if t.state == TrialState.WAITING and not is_injection:
            continue  # a user's own enqueue_trial: the sampler runs it next
        # Interrupted, not failed: it does not count against --trials.
        study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        if not is_injection:
            append_record(out, {"trial": t.number, "ray_trial": f"interrupted-{t.number}", "state": "FAIL",
                                "preset": None, "fidelity": "screen", "params": t.params,
                                "error": "interrupted: the driver stopped while it ran"})
            failed += 1
    return completed, failed


INTERRUPTED = "interrupted"  # user attr of a trial the driver was killed during (marked FAIL on resume)


def counts_against_budget(trial) -> bool:  # type: ignore[no-untyped-def]
    """Whether a finished Optuna trial counts towards --trials: not one that was only interrupted."""
    return trial.state.is_finished() and not trial.user_attrs.get(INTERRUPTED)


def model_args(run: dict[str, Any]) -> dict[str, Any]:
    """The worker's model arguments of a finished run (run.json): the embedded default's trained
    weights when the command named no --model (run.json names the model either way)."""
    import shlex

    named = any(a == "--model" or a.startswith("--model=") for a in shlex.split(run.get("command") or ""))
    if not named and not run.get("checkpoint"):
        return {"model": None, "pretrained": False, "checkpoint": None}
    return {"model": run["model"], "pretrained": bool(run.get("pretrained")), "checkpoint": run.get("checkpoint")}
