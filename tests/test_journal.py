"""The default study storage (search/journal.py): an Optuna journal file that Optuna's own file
backend, and so optuna-dashboard, opens; that survives a cut last line; that resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend

from search import run_dir
from search.journal import RunJournal, drop_cut_line

DIRECTIONS = ["maximize", "minimize"]


def _study(out: Path) -> optuna.Study:
    return optuna.create_study(storage=run_dir.storage(None, out), study_name=f"tokensched-{out.name}",
                               directions=DIRECTIONS, load_if_exists=True)


def _run_trials(study: optuna.Study, count: int) -> None:
    for _ in range(count):
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.suggest_categorical("method", ["prune", "merge"])
        trial.set_user_attr("summary", f"x={x:.3f}")
        study.tell(trial, [x, 1.0 - x / 2])


def test_default_storage_is_the_run_journal(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    assert run_dir.default_storage_url(out) == f"journal:{(out / run_dir.STUDY_JOURNAL).resolve()}"
    storage = run_dir.storage(None, out)
    assert isinstance(storage, optuna.storages.JournalStorage) and isinstance(storage._backend, RunJournal)
    (out / run_dir.STUDY_DB).write_bytes(b"")  # a run made when SQLite was the default keeps its study
    old = tmp_path / "old"
    old.mkdir()
    (old / run_dir.STUDY_DB).write_bytes(b"")
    assert run_dir.default_storage_url(old) == f"sqlite:///{(old / run_dir.STUDY_DB).resolve()}"
    assert run_dir.default_storage_url(out).startswith("journal:")  # its journal exists: still the journal


def test_optuna_dashboard_opens_the_default_storage(tmp_path: Path) -> None:
    """optuna-dashboard takes a journal as a file path (dashboard_arg) and, finding a file, opens it
    with Optuna's JournalFileBackend, then lists the studies and their trials: every trial, its
    params, values and user attrs are there, read back while the driver's storage is still open."""
    out = tmp_path / "run"
    out.mkdir()
    _run_trials(_study(out), 5)
    running = _study(out).ask()  # the driver is still running a trial
    running.suggest_float("x", 0.0, 1.0)
    path = run_dir.dashboard_arg(run_dir.default_storage_url(out))
    assert os.path.isfile(path)  # the dashboard's test for a journal file
    dashboard = optuna.storages.JournalStorage(JournalFileBackend(path))
    studies = dashboard.get_all_studies()
    assert [s.study_name for s in studies] == [f"tokensched-{out.name}"]
    trials = dashboard.get_all_trials(studies[0]._study_id)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5 + ["RUNNING"]
    expected = _study(out).trials
    assert [(t.params, t.values, t.user_attrs) for t in trials] == [(t.params, t.values, t.user_attrs) for t in expected]
    assert set(trials[0].params) == {"x", "method"} and trials[0].user_attrs["summary"].startswith("x=")


def test_a_cut_last_line_is_dropped_and_the_study_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    _run_trials(_study(out), 3)
    path = out / run_dir.STUDY_JOURNAL
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code": 4, "worker_id": "x", "tri')  # a write cut by a crash
    study = _study(out)  # reopened as --resume does
    assert path.read_bytes().startswith(whole) and b'"tri' not in path.read_bytes()[len(whole):]
    assert len(study.trials) == 3
    _run_trials(study, 2)
    assert [t.number for t in run_dir.load_study(out).trials] == [0, 1, 2, 3, 4]
    assert drop_cut_line(path) == 0


def test_reads_come_from_memory_and_match_the_file(tmp_path: Path) -> None:
    path = tmp_path / "j.log"
    journal = RunJournal(path)
    journal.append_logs([{"op_code": 0, "n": 1}, {"op_code": 0, "n": 2}])
    assert list(journal.read_logs(0)) == [{"op_code": 0, "n": 1}, {"op_code": 0, "n": 2}]
    journal.append_logs([{"op_code": 0, "n": 3}])
    assert list(journal.read_logs(2)) == [{"op_code": 0, "n": 3}]
    assert list(journal.read_logs(0)) == [{"op_code": 0, "n": i} for i in (1, 2, 3)]  # from the file
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"op_code": 0, "n": i} for i in (1, 2, 3)]
    assert list(JournalFileBackend(str(path)).read_logs(0)) == [{"op_code": 0, "n": i} for i in (1, 2, 3)]


@pytest.mark.parametrize("url", ["journal:{tmp}/j.log", "sqlite:///{tmp}/s.db"])
def test_load_study_reads_a_named_storage(tmp_path: Path, url: str) -> None:
    out = tmp_path / "run"
    out.mkdir()
    url = url.format(tmp=tmp_path)
    study = optuna.create_study(storage=run_dir.storage(url, out), study_name=f"tokensched-{out.name}",
                                directions=DIRECTIONS)
    _run_trials(study, 2)
    assert len(run_dir.load_study(out, url).trials) == 2
