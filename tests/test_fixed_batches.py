"""Fixed schedules (presets, confirmations) run in batches of Ray trials, one report per schedule."""

from __future__ import annotations

from search.fixed_stage import _batches


def test_batches_cover_every_item_once_and_balance() -> None:
    items = list(range(29))
    batches = _batches(items, concurrency=2)
    assert len(batches) == 4 and max(map(len, batches)) <= 8  # at most 8 a batch, at least one per slot
    assert sorted(i for b in batches for i in b) == items
    assert max(map(len, batches)) - min(map(len, batches)) <= 1
    assert _batches(items[:3], concurrency=8) == [[0], [1], [2]]  # never an empty batch
    assert _batches([], concurrency=2) == []
    assert len(_batches(items, concurrency=16)) == 16


def test_batches_balance_their_cost_and_come_costliest_first() -> None:
    costs = [65, 60, 55, 50, 45, 40, 35, 34, 30, 28, 26, 25, 24, 22, 20, 18, 17, 16, 15, 14]
    batches = _batches(costs, concurrency=2, most=4, cost=float)
    assert len(batches) == 6 and sorted(c for b in batches for c in b) == sorted(costs)  # 5 rounded up to 2 x 3
    totals = [sum(b) for b in batches]
    assert totals == sorted(totals, reverse=True) and max(totals) - min(totals) <= 15  # dealt round-robin: 82
    dealt = [costs[i::6] for i in range(6)]
    assert max(map(sum, dealt)) - min(map(sum, dealt)) > max(totals) - min(totals)


def test_a_failing_schedule_is_reported_and_the_batch_goes_on(monkeypatch) -> None:
    import math

    from ray import tune

    from search.models import DEFAULT_MODEL, model_spec
    from search.worker import WorkerSetup, fixed_trainable
    from spaces import Schedule, from_preset, gmacs
    from spaces.search_space import SearchSpace

    spec = model_spec(DEFAULT_MODEL)
    space = SearchSpace("per-layer", spec, budget_gmacs=gmacs(Schedule.empty(spec)))
    setup = WorkerSetup(space=space, model=DEFAULT_MODEL, num_images=48, batch_size=48, confirm_images=48)
    good = from_preset("tome:4", spec).to_dict()
    broken = {**good, "layers": [{"method": "no-such-method"}]}
    reports: list[dict] = []
    monkeypatch.setattr(tune, "report", reports.append)
    fixed_trainable({"items": [{"schedule": good, "images": "screen"}, {"schedule": broken, "images": "screen"},
                               {"schedule": good, "images": "confirm"}]}, setup)
    assert [r["item"] for r in reports] == [0, 1, 2]
    assert math.isfinite(reports[0]["accuracy"]) and math.isfinite(reports[2]["accuracy"])
    assert math.isnan(reports[1]["accuracy"]) and "no-such-method" in reports[1]["error"]


def test_resume_runs_again_the_presets_that_failed_or_were_not_reached() -> None:
    from search.fixed_stage import presets_to_run, run_presets
    from search.models import DEFAULT_MODEL, model_spec
    from spaces import Schedule, gmacs
    from spaces.search_space import SearchSpace

    spec = model_spec(DEFAULT_MODEL)
    space = SearchSpace("per-layer", spec, budget_gmacs=0.65 * gmacs(Schedule.empty(spec)))
    names = [s.name for s in run_presets(space)]
    assert len(names) > 3 and [s.name for s in presets_to_run(space, [])] == names
    records = [{"preset": names[0], "fidelity": "screen", "state": "COMPLETE"},
               {"preset": names[1], "fidelity": "screen", "state": "FAIL"},  # its worker was lost
               {"preset": names[2], "fidelity": "confirm", "state": "COMPLETE"},  # not a screening record
               {"preset": None, "fidelity": "screen", "state": "COMPLETE"}]
    assert [s.name for s in presets_to_run(space, records)] == names[1:]
