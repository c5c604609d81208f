"""Known-answer tests for search/pareto.py and file round-trips for search/report.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from search.pareto import (
    OBJECTIVES,
    Objective,
    dominated_count,
    hv_contributions,
    hypervolume,
    hypervolume_history,
    non_dominated,
    nondominated_ranks,
    reference_point,
)
from search.report import (
    export_configs,
    front_records,
    front_table,
    plot_front,
    plot_hypervolume,
    write_front,
    write_trials_csv,
)

MIN2 = ["min", "min"]
ACC_GMACS = [OBJECTIVES["accuracy"], OBJECTIVES["gmacs"]]


# ---- pareto ----------------------------------------------------------------------------------


def test_non_dominated_duplicates_and_mixed_directions():
    # (accuracy max, gmacs min)
    pts = np.array([[0.8, 4.0], [0.8, 4.0], [0.7, 3.0], [0.7, 4.0], [0.9, 5.0], [0.6, 5.0]])
    mask = non_dominated(pts, ["max", "min"])
    # equal points are both kept; (0.7,4) is dominated by (0.8,4); (0.6,5) by everything else
    assert mask.tolist() == [True, True, True, False, True, False]
    # flipping both directions flips the front
    assert non_dominated(pts, ["min", "max"]).tolist() == [False, False, False, False, False, True]


def test_dominated_count_counts_the_strict_dominators_among_the_other_set():
    # (accuracy max, gmacs min): an equal point does not dominate, one better on both or on one does
    points = np.array([[0.8, 4.0], [0.6, 5.0]])
    by = np.array([[0.8, 4.0], [0.9, 3.0], [0.8, 3.5], [0.7, 4.5], [0.5, 6.0]])
    assert dominated_count(points, by, ["max", "min"]).tolist() == [2, 4]
    assert dominated_count(points, by[:0], ["max", "min"]).tolist() == [0, 0]


def test_non_dominated_chunked_matches_bruteforce():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 6, size=(600, 3)).astype(float)  # many ties, > one chunk
    dirs = ["max", "min", "max"]
    sign = np.array([-1, 1, -1])
    loss = pts * sign
    brute = [
        not any((loss[j] <= loss[i]).all() and (loss[j] < loss[i]).any() for j in range(len(pts)))
        for i in range(len(pts))
    ]
    assert non_dominated(pts, dirs).tolist() == brute


def test_nondominated_ranks():
    pts = np.array([[1, 1], [2, 2], [3, 3], [1, 3], [3, 1], [2, 2]], dtype=float)
    assert nondominated_ranks(pts, MIN2).tolist() == [0, 1, 2, 1, 1, 1]
    assert nondominated_ranks(np.empty((0, 2)), MIN2).tolist() == []


def test_hypervolume_2d_known_answer():
    pts = np.array([[1.0, 1.0], [2.0, 0.5]])
    # union of [1,3]x[1,3] (area 4) and [2,3]x[0.5,3] (2.5) overlapping on [2,3]x[1,3] (2) -> 4.5
    assert hypervolume(pts, MIN2, [3, 3]) == pytest.approx(4.5)
    assert hypervolume(pts, MIN2, [3, 3], exact_2d=True) == pytest.approx(4.5)
    # the same set stated as maximisation of the negated values
    assert hypervolume(-pts, ["max", "max"], [-3, -3]) == pytest.approx(4.5)


def test_hypervolume_3d_known_answer():
    pts = np.array([[1.0, 1.0, 1.0], [0.0, 2.0, 2.0]])
    # boxes 2*2*2=8 and 3*1*1=3, overlap [1,3]x[2,3]x[2,3] = 2*1*1=2 -> 9
    assert hypervolume(pts, ["min"] * 3, [3, 3, 3]) == pytest.approx(9.0)
    # mixed directions: accuracy max with reference 0, gmacs min with reference 4
    acc_g = np.array([[0.5, 2.0], [0.8, 3.0]])
    # [0,0.5]x[2,4] = 1.0 plus [0.5,0.8]x[3,4] = 0.3
    assert hypervolume(acc_g, ["max", "min"], [0.0, 4.0]) == pytest.approx(1.3)


def test_hypervolume_drops_points_outside_reference_and_empty():
    assert hypervolume(np.empty((0, 2)), MIN2, [1, 1]) == 0.0
    assert hypervolume(np.array([[1.0, 0.0], [0.5, np.nan]]), MIN2, [1, 1]) == 0.0  # on the boundary / NaN
    assert hypervolume(np.array([[0.5, 0.5], [2.0, 0.0]]), MIN2, [1, 1]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="directions"):
        hypervolume(np.zeros((1, 2)), ["min", "up"], [1, 1])


def test_exact_2d_matches_optuna_on_random_sets():
    rng = np.random.default_rng(1)
    for n in (1, 2, 5, 30, 200):
        pts = rng.random((n, 2))
        dirs = ["max", "min"]
        ref = [0.1, 0.9]
        assert hypervolume(pts, dirs, ref, exact_2d=True) == pytest.approx(hypervolume(pts, dirs, ref), rel=1e-9)


def test_history_monotone_and_matches_final():
    rng = np.random.default_rng(2)
    pts = rng.random((60, 3))
    feasible = rng.random(60) > 0.3
    dirs, ref = ["max", "min", "max"], [0.0, 1.0, 0.0]
    hist = hypervolume_history(pts, feasible, dirs, ref)
    assert len(hist) == 60
    assert all(b >= a - 1e-12 for a, b in zip(hist, hist[1:], strict=False))
    assert hist[-1] == pytest.approx(hypervolume(pts[feasible], dirs, ref))
    assert hist[29] == pytest.approx(hypervolume(pts[:30][feasible[:30]], dirs, ref))


def test_contributions_tiny_set():
    pts = np.array([[1.0, 2.0], [2.0, 1.0], [2.0, 2.0], [1.0, 2.0]])  # last: duplicate of the first
    contrib = hv_contributions(pts, MIN2, [3, 3])
    # total HV = 3; removing (2,1) loses [2,3]x[1,2] = 1; duplicates and dominated lose nothing
    assert contrib.tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    single = hv_contributions(pts[:2], MIN2, [3, 3])
    assert single.tolist() == pytest.approx([1.0, 1.0])
    assert single.sum() <= hypervolume(pts[:2], MIN2, [3, 3])


def test_reference_point_fixed():
    objs = [OBJECTIVES[k] for k in ("accuracy", "gmacs", "speedup", "agreement", "images_per_s")]
    assert reference_point(objs, baseline_gmacs=4.6) == pytest.approx([0.0, 4.83, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="latency"):
        reference_point([Objective("latency", "min")], baseline_gmacs=4.6)
    with pytest.raises(ValueError):
        Objective("x", "up")


# ---- report ----------------------------------------------------------------------------------


def _record(trial, acc, gmacs, *, state="COMPLETE", feasible=True, preset=None):
    return {
        "trial": trial, "state": state, "preset": preset, "fidelity": "screen",
        "accuracy": acc, "agreement": None if acc is None else acc + 0.1, "top1": acc, "top5": None,
        "gmacs": gmacs, "speedup": None if acc is None else 4.6 / gmacs, "images_per_s": None,
        "feasible": feasible, "summary": f"tome r={trial} " + "x" * 60,
        "schedule": {"method": "tome", "layers": [trial, trial + 1], "amount": 0.25},
        "seconds": 1.5,
    }  # fmt: skip


@pytest.fixture
def records():
    return [
        _record(0, 0.79, 4.6, preset="unreduced"),
        _record(1, 0.78, 3.0, preset="ToMe r=8"),
        _record(2, 0.785, 2.9),  # dominates the ToMe preset
        _record(3, 0.70, 2.0),
        _record(4, 0.60, 2.5),  # dominated
        _record(5, 0.90, 1.0, feasible=False),  # infeasible
        _record(6, None, 2.2, state="FAIL", feasible=False),
        _record(7, float("nan"), 1.5),  # NaN accuracy
        _record(8, 0.95, 0.5, state="RUNNING"),
        _record(9, 0.74, 2.4),
    ]


def test_front_records_filters(records):
    front = front_records(records, ACC_GMACS)
    assert [r["trial"] for r in front] == [0, 2, 9, 3]  # by accuracy descending
    search = front_records(records, ACC_GMACS, search_only=True)
    assert [r["trial"] for r in search] == [2, 9, 3]
    assert front_records([records[6]], ACC_GMACS) == []


def test_writers_round_trip(tmp_path, records):
    csv = write_trials_csv(tmp_path / "trials.csv", records)
    df = pd.read_csv(csv)
    assert len(df) == len(records) and "schedule" not in df.columns
    assert list(df.columns[:4]) == ["trial", "state", "preset", "fidelity"]
    front = front_records(records, ACC_GMACS)
    fcsv, fjson = write_front(tmp_path, front, ACC_GMACS)
    assert pd.read_csv(fcsv)["trial"].tolist() == [0, 2, 9, 3]
    doc = json.loads(fjson.read_text())
    assert doc["objectives"] == [{"name": "accuracy", "direction": "max"}, {"name": "gmacs", "direction": "min"}]
    assert doc["front"][1]["schedule"] == records[2]["schedule"]


def test_plots(tmp_path, records):
    front = front_records(records, ACC_GMACS, search_only=True)
    png, html = plot_front(tmp_path, records, front, ACC_GMACS, title="DeiT-S, screen", budget_gmacs=3.2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = html.read_text()
    assert "plotly" in text.lower() and "ToMe r=8" in text
    hist = {"nsga2": [0.0, 0.5, 0.7], "random": [0.1, 0.2]}
    hpng, hcsv = plot_hypervolume(tmp_path, hist)
    assert hpng.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(hcsv, index_col="trials")
    assert table.index.tolist() == [1, 2, 3] and table["nsga2"].tolist() == [0.0, 0.5, 0.7]
    assert math.isnan(table["random"][3])


def test_export_configs(tmp_path, records):
    front = front_records(records, ACC_GMACS, search_only=True)
    run = {"model": "deit_small_patch16_224", "checkpoint": None, "data": "/data/val", "budget_gmacs": 3.2,
           "run_dir": str(tmp_path)}  # fmt: skip
    paths = export_configs(tmp_path, front, run=run)
    assert [p.name for p in paths] == ["0002.yaml", "0009.yaml", "0003.yaml"]
    cfg = yaml.safe_load(paths[0].read_text())
    assert cfg["schedule"] == records[2]["schedule"]
    assert cfg["objectives"]["accuracy"] == pytest.approx(0.785) and cfg["trial"] == 2
    assert cfg["source"]["model"] == "deit_small_patch16_224"
    # The search's --data is the held-out screening set: never trained on; a placeholder asks for training images.
    assert cfg["finetune_command"] == f"python run_search.py finetune --config {paths[0]} --data TRAIN_DIR"
    before = paths[0].read_text()
    with pytest.raises(FileExistsError, match="0002.yaml"):
        export_configs(tmp_path, front, run=run)
    assert paths[0].read_text() == before
    no_data = export_configs(tmp_path / "b", front[:1], run={**run, "data": None})
    assert yaml.safe_load(no_data[0].read_text())["finetune_command"].endswith("0002.yaml")


def test_front_table(records):
    front = front_records(records, ACC_GMACS, search_only=True)
    presets = [r for r in records if r["preset"]]
    table = front_table(front, presets, ACC_GMACS)
    lines = table.splitlines()
    assert "accuracy" in lines[0] and "gmacs" in lines[0]
    assert sum("preset " in line and "* " in line for line in lines) == 2
    assert all(len(line) < 150 for line in lines)
    assert "preset ToMe r=8: dominated by search trial(s) 2" in table
    assert "preset unreduced: not beaten" in table
    assert lines[-1] == "the search dominates 1 of 2 presets (most GMACs first above)"
    verdicts = [line for line in lines if line.startswith("preset ")]
    assert verdicts == sorted(verdicts, key=lambda v: "ToMe" in v)  # unreduced (more GMACs) before ToMe r=8


def test_preset_verdicts_name_what_dominates_or_matches() -> None:
    from search.report import preset_verdicts

    def rec(trial, acc, g, preset=None):
        return {"trial": trial, "accuracy": acc, "gmacs": g, "preset": preset, "feasible": True, "state": "COMPLETE"}

    presets = [rec(None, 0.90, 0.5, "a"), rec(None, 0.95, 0.4, "b"), rec(None, 0.99, 0.9, "c")]
    searched = [rec(7, 0.92, 0.5), rec(8, 0.95, 0.4), rec(9, 0.80, 0.1)]
    notes = {p["preset"]: note for p, note in preset_verdicts([], presets, ACC_GMACS, searched)}
    assert notes == {"a": "dominated by search trial(s) 7, 8 (most accurate: trial 8, accuracy 0.95 against 0.9 at 20 % "
                          "fewer GMACs)", "b": "matched (not beaten) by search trial(s) 8",
                     "c": "not beaten (best searched at no more cost: trial 8, accuracy 0.95 against 0.99)"}
    cheap = {p["preset"]: note for p, note in preset_verdicts([], [rec(None, 0.5, 0.05, "d")], ACC_GMACS, searched)}
    assert cheap == {"d": "not beaten (no searched schedule at no more cost: gmacs)"}  # nothing searched that cheap


def test_front_table_marks_a_preset_whose_screening_stopped_early(records):
    front = front_records(records, ACC_GMACS, search_only=True)
    presets = [{**r, "screen_accuracy": 0.7, "confirmed_accuracy": r["accuracy"]} for r in records if r["preset"]]
    presets[0]["screen_stopped"] = True
    lines = front_table(front, presets, ACC_GMACS).splitlines()
    marked = [line for line in lines if f"* {presets[0]['preset']}" in line]
    assert len(marked) == 1 and "0.7s" in marked[0]
    assert sum("0.7s" in line for line in lines) == 1  # the other preset screened in full: no mark
    assert any(line.startswith("s: screening stopped early") for line in lines)
    assert not any(line.startswith("s: ") for line in front_table(front, presets[1:], ACC_GMACS).splitlines())


def test_verdict_says_when_a_preset_not_beaten_scores_what_the_unreduced_model_scores() -> None:
    from search.report import preset_verdicts

    def rec(trial, acc, g, preset=None):
        return {"trial": trial, "accuracy": acc, "gmacs": g, "preset": preset, "feasible": True, "state": "COMPLETE"}

    presets = [rec(None, 0.988, 0.4, "lucky"), rec(None, 0.980, 0.3, "below"), rec(None, 0.95, 0.3, "matched")]
    searched = [rec(7, 0.987, 0.39), rec(8, 0.95, 0.3)]
    notes = {p["preset"]: note for p, note in preset_verdicts([], presets, ACC_GMACS, searched, ceiling=0.987)}
    assert notes["lucky"].startswith("not beaten (best searched at no more cost: trial 7")
    assert notes["lucky"].endswith("; it scores at least what the unreduced model scores on these images (0.987)")
    assert "unreduced" not in notes["below"] and notes["below"].startswith("not beaten")  # below the ceiling: no note
    assert notes["matched"] == "matched (not beaten) by search trial(s) 8"
    without = {p["preset"]: note for p, note in preset_verdicts([], presets, ACC_GMACS, searched)}
    assert not any("unreduced" in note for note in without.values())


def test_front_table_shows_the_unreduced_model_on_the_images_of_its_accuracy_column(records):
    front = front_records(records, ACC_GMACS, search_only=True)
    presets = [r for r in records if r["preset"]]
    unreduced = {"gmacs": 4.6, "screen_accuracy": 0.991, "confirmed_accuracy": 0.9855}
    screened = front_table(front, presets, ACC_GMACS, unreduced=unreduced).splitlines()
    assert "unreduced model (the reference, not a preset): accuracy 0.991, gmacs 4.6" in screened
    confirmed = [{**r, "screen_accuracy": 0.97, "confirmed_accuracy": r["accuracy"]} for r in presets]
    lines = front_table(front, confirmed, ACC_GMACS, unreduced=unreduced).splitlines()
    assert "unreduced model (the reference, not a preset): accuracy 0.9855, screen 0.991, gmacs 4.6" in lines
    assert lines[-1] == "the search dominates 1 of 2 presets (most GMACs first above)"  # a line, not a preset
    assert not any(line.startswith("unreduced") for line in front_table(front, presets, ACC_GMACS).splitlines())
