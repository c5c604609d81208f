"""The run directory: run.json, the trial log, resume checks, Optuna storage and samplers."""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

STUDY_DB = "study.db"
TRIALS_LOG = "trials.jsonl"
RUN_JSON = "run.json"
# Settings a resumed run must share with the run it continues.
MUST_MATCH = ("model", "checkpoint", "budget_gmacs", "space", "methods", "objectives", "data", "num_images", "seed",
              "sampler")
SAMPLERS = ("nsga2", "tpe", "gp", "random")


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
        return previous
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output directory {out} already exists; pass --resume to continue it or choose another --out")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return dict(settings)


def versions() -> dict[str, str]:
    import optuna
    import ray
    import timm
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
            "optuna": optuna.__version__, "ray": ray.__version__, "platform": platform.platform()}


def write_run_json(out: Path, run: dict[str, Any]) -> None:
    (out / RUN_JSON).write_text(json.dumps(run, indent=2, default=str))


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


def storage(url: str | None, out: Path):  # type: ignore[no-untyped-def]
    """An Optuna storage object (OptunaSearch wants an object, not a URL): SQLite in the run dir by default.

    `--storage postgresql://...` (any SQLAlchemy URL) for a cluster, `--storage journal:PATH` for a
    journal file (safe on NFS and with several writers).
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url is None:
        return optuna.storages.RDBStorage(f"sqlite:///{(out / STUDY_DB).resolve()}")
    if url.startswith("journal:"):
        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as err:  # noqa: BLE001 - any bad URL is bad input
        raise ValueError(f"cannot open --storage {url}: {type(err).__name__}: {str(err).splitlines()[0]}") from None


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


def sampler(name: str, seed: int):  # type: ignore[no-untyped-def]
    """Pinned explicitly (PITFALLS 5: Optuna 5 changed the defaults)."""
    import optuna

    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, deterministic_objective=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")


def settle_stale_trials(study, records: list[dict[str, Any]], objectives: list[str]) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Trials a killed run left RUNNING (PITFALLS 15): completed from the trial log when their result
    reached it (killed between the report and Optuna's tell), else marked FAIL. Returns (completed, failed)."""
    import math

    from optuna.trial import TrialState

    logged = {r["trial"]: r for r in records if r.get("state") == "COMPLETE" and r.get("trial") is not None}
    completed = failed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        r = logged.get(t.number)
        values = [r.get(o) for o in objectives] if r else None
        if values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.COMPLETE, values=values)
            completed += 1
        else:
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            failed += 1
    return completed, failed
