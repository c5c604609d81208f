"""bench/eval_seconds.py pairs the same evaluations of two runs and splits them by where they start."""

from __future__ import annotations

import json
from pathlib import Path

from bench.eval_seconds import compare
from search.models import model_spec
from spaces import LayerPlan, Schedule

SPEC = model_spec("tokensched_vit_shapes")


def _run(path: Path, records: list[dict]) -> Path:
    path.mkdir()
    (path / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _record(trial: int | None, preset: str | None, fidelity: str, first: int, seconds: float) -> dict:
    layers = [LayerPlan()] * first + [LayerPlan("prune", keep=0.5)] + [LayerPlan()] * (SPEC.depth - first - 1)
    schedule = Schedule(SPEC, tuple(layers))
    return {"trial": trial, "preset": preset, "fidelity": fidelity, "summary": schedule.summary(),
            "schedule": schedule.to_dict(), "eval_seconds": seconds}


def test_the_same_evaluations_are_paired_and_split_by_their_first_reducing_block(tmp_path: Path) -> None:
    before = _run(tmp_path / "a", [_record(1, None, "screen", 0, 4.0), _record(2, None, "stopped", 3, 2.0),
                                   _record(None, "evit", "confirm", 3, 3.0), _record(5, None, "screen", 0, 9.0),
                                   _record(6, None, "screen", 4, 0.0)])  # 0 s: another's result reused
    after = _run(tmp_path / "b", [_record(1, None, "screen", 0, 5.0), _record(2, None, "stopped", 3, 0.5),
                                  _record(None, "evit", "confirm", 3, 1.5), _record(6, None, "screen", 4, 1.0)])
    rows = {(r["fidelity"], r["reduces from"]): r for r in compare(before, after)}
    assert set(rows) == {("screen", "block 0"), ("stopped", "later"), ("confirm", "later")}  # trial 5: in one run only
    assert rows[("screen", "block 0")]["ratio"] == 1.25 and rows[("stopped", "later")]["ratio"] == 0.25
    assert rows[("confirm", "later")]["before_s"] == 3.0 and rows[("confirm", "later")]["after_s"] == 1.5
