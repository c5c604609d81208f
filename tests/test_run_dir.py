"""Reading a finished run back (the benches that re-evaluate a run's schedules)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from search.run_dir import model_args, study_name


def test_model_args_give_the_embedded_weights_unless_a_model_was_named() -> None:
    default = {"command": "python run_search.py --budget 65% --out runs/x", "model": "tokensched_vit_shapes",
               "pretrained": False, "checkpoint": None}
    assert model_args(default) == {"model": None, "pretrained": False, "checkpoint": None}  # load_model(None)
    named = {**default, "command": "python run_search.py --budget 65% --model tokensched_vit_shapes"}
    assert model_args(named) == {"model": "tokensched_vit_shapes", "pretrained": False, "checkpoint": None}
    deit = {**default, "command": "python run_search.py --model=deit_small_patch16_224 --pretrained",
            "model": "deit_small_patch16_224", "pretrained": True}
    assert model_args(deit)["pretrained"] is True
    weights = {**default, "checkpoint": "w.safetensors"}
    assert model_args(weights)["checkpoint"] == "w.safetensors"


@pytest.mark.parametrize("url", [None, "sqlite:///{tmp}/study.db", "journal:{tmp}/shared.log"])
def test_settle_stale_trials_after_a_kill_in_the_preset_injection(tmp_path: Path, url: str | None) -> None:
    """A kill between a preset's enqueue and its tell leaves a WAITING or RUNNING trial carrying the
    preset attr: resume marks it interrupted without a trial-log record (the preset has its own and
    is told again); a searched trial left RUNNING gets a FAIL record; a logged one is completed. The
    same on the default journal, SQLite and Optuna's journal backend (settle uses study._storage)."""
    import optuna
    from optuna.trial import TrialState

    from search import run_dir

    storage = run_dir.storage(url and url.format(tmp=tmp_path), tmp_path)
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"])
    study.enqueue_trial({"x": 1.0}, user_attrs={"preset": "tome:4"})
    injected = study.ask()  # RUNNING with the preset attr
    searched = study.ask({"x": optuna.distributions.FloatDistribution(0, 3)})
    logged = study.ask({"x": optuna.distributions.FloatDistribution(0, 3)})
    study.enqueue_trial({"x": 2.0}, user_attrs={"preset": "ppt"})  # left WAITING
    (tmp_path / run_dir.TRIALS_LOG).write_text("")
    records = [{"trial": logged.number, "state": "COMPLETE", "accuracy": 90.0, "gmacs": 0.1}]
    assert run_dir.settle_stale_trials(study, records, ["accuracy", "gmacs"], tmp_path) == (1, 1)
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[logged.number].state == TrialState.COMPLETE
    assert by_number[logged.number].values == [90.0, 0.1]
    for t in (injected, searched):
        assert by_number[t.number].state == TrialState.FAIL
        assert by_number[t.number].user_attrs[run_dir.INTERRUPTED]
    waiting = [t for t in study.get_trials() if t.user_attrs.get("preset") == "ppt"]
    assert [t.state for t in waiting] == [TrialState.FAIL]
    lines = [json.loads(x) for x in (tmp_path / run_dir.TRIALS_LOG).read_text().splitlines()]
    assert [(r["trial"], r["preset"], r["state"]) for r in lines] == [(searched.number, None, "FAIL")]


def test_a_moved_run_keeps_its_study_name(tmp_path: Path) -> None:
    run = tmp_path / "first"
    run.mkdir()
    assert study_name(run) == "tokensched-first"  # a new run: named after its directory
    (run / "run.json").write_text(json.dumps({"study_name": study_name(run)}))
    moved = run.rename(tmp_path / "second")
    assert study_name(moved) == "tokensched-first"  # what run.json recorded
    (moved / "run.json").write_text(json.dumps({"model": "x"}))  # a run from before the name was recorded
    assert study_name(moved) == "tokensched-second"
