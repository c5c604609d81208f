"""Multi-fidelity screening (issue 18 item 5): a searched trial is screened in chunks and stopped
once an upper confidence bound of its accuracy falls below the best accuracy already measured at
no more GMACs; stopped trials are tagged and never enter the front."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from search import run_dir
from search.config import SearchConfig
from search.data import TensorSet
from search.evaluate import EarlyStop, accuracy_upper_bound, predict_until
from search.models import model_spec
from search.outcome import STOPPED, finish
from search.tune_stage import stop_bar
from search.worker import WorkerSetup
from spaces import Schedule, from_preset, gmacs
from spaces.search_space import SearchSpace


def test_upper_bound_known_cases() -> None:
    assert accuracy_upper_bound(70, 100, 100, 0.05) == pytest.approx(0.7)  # everything seen: exact
    assert accuracy_upper_bound(0, 10, 1000, 0.05) > 0.0  # nothing right yet is not proof of zero
    assert accuracy_upper_bound(10, 10, 1000, 0.05) == pytest.approx(1.0)
    low, high = accuracy_upper_bound(200, 250, 2000, 0.01), accuracy_upper_bound(200, 250, 2000, 0.1)
    assert 0.8 < high < low < 1.0  # a stricter alpha gives a higher bound
    assert accuracy_upper_bound(400, 500, 2000, 0.05) < accuracy_upper_bound(200, 250, 2000, 0.05)  # more seen: tighter


def test_upper_bound_covers_the_full_set_accuracy() -> None:
    """Over random orders of a fixed set, the bound at any of the checks falls below the set's true
    accuracy at most alpha of the time (it holds over all the checks together)."""
    rng = random.Random(0)
    total, chunk, alpha = 2000, 250, 0.05
    checks = total // chunk - 1
    for rate in (0.6, 0.9, 0.98, 0.995):
        outcomes = [1] * round(rate * total) + [0] * (total - round(rate * total))
        misses = 0
        for _ in range(400):
            rng.shuffle(outcomes)
            seen = correct = 0
            for k in range(1, checks + 1):
                correct += sum(outcomes[seen:k * chunk])
                seen = k * chunk
                if accuracy_upper_bound(correct, seen, total, alpha / checks) < rate:
                    misses += 1
                    break
        assert misses / 400 <= alpha


class _ByFirstPixel(nn.Module):
    """Predicts class 0 when an image's first pixel is bright, else class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        bright = (x[:, 0, 0, 0] > 0).float()
        return torch.stack([bright, 1 - bright], dim=1)


def _set(correct: int, total: int, seed: int = 0) -> TensorSet:
    """`total` images of class 0, the first pixel bright on `correct` of them, in a seeded order."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    images = torch.zeros(total, 3, 2, 2, dtype=torch.uint8)
    images[order[:correct], 0, 0, 0] = 255
    return TensorSet(images, torch.zeros(total, dtype=torch.long), (0.5,) * 3, (0.5,) * 3, "test")


def test_predict_until_stops_a_hopeless_trial_after_one_chunk() -> None:
    data = _set(600, 1000)
    logits = predict_until(_ByFirstPixel(), data, data.labels, EarlyStop(0.95, chunk=250), batch_size=50)
    assert logits.shape == (250, 2)


def test_predict_until_never_stops_a_trial_that_can_reach_the_bar() -> None:
    data = _set(960, 1000)
    for bar in (0.5, 0.95, 0.96):  # 0.96 is what it scores: it must be allowed to show it
        logits = predict_until(_ByFirstPixel(), data, data.labels, EarlyStop(bar, chunk=250), batch_size=50)
        assert logits.shape == (1000, 2)


def test_stop_bar_is_the_best_screened_accuracy_at_no_more_gmacs() -> None:
    records = [
        {"fidelity": "screen", "state": "COMPLETE", "feasible": True, "accuracy": 0.9, "gmacs": 0.10},
        {"fidelity": "screen", "state": "COMPLETE", "feasible": True, "accuracy": 0.95, "gmacs": 0.20},
        {"fidelity": "screen", "state": "FAIL", "feasible": True, "accuracy": None, "gmacs": 0.05},
        {"fidelity": STOPPED, "state": "COMPLETE", "feasible": True, "accuracy": 0.99, "gmacs": 0.05},
        {"fidelity": "confirm", "state": "COMPLETE", "feasible": True, "accuracy": 0.99, "gmacs": 0.05},
        {"fidelity": "screen", "state": "COMPLETE", "feasible": False, "accuracy": 0.99, "gmacs": 0.05},
    ]
    assert stop_bar(records, 0.05) is None
    assert stop_bar(records, 0.15) == 0.9
    assert stop_bar(records, 0.20) == 0.95


def test_a_stopped_trial_never_enters_the_front(tmp_path: Path) -> None:
    """finish() on a trial log where a stopped trial scored best on its first images at the fewest
    GMACs: it is in trials.csv, tagged, and not on the front (with and without confirmation)."""
    spec = model_spec("tokensched_vit_shapes")
    budget = 0.65 * gmacs(Schedule.empty(spec))
    space = SearchSpace("per-layer", spec, budget_gmacs=budget)
    setup = WorkerSetup(space=space, model="tokensched_vit_shapes")

    def record(n: int, fidelity: str, acc: float, g: float) -> dict:
        return {"trial": n, "ray_trial": f"t{n}-{fidelity}", "state": "COMPLETE", "preset": None, "fidelity": fidelity,
                "params": {}, "accuracy": acc, "gmacs": g, "feasible": True, "summary": f"s{n}",
                "schedule": from_preset("tome:4", spec).to_dict()}

    for confirm in (False, True):
        out = tmp_path / f"confirm-{confirm}"
        out.mkdir()
        lines = [record(0, "screen", 0.90, 0.5 * budget), record(1, STOPPED, 0.99, 0.3 * budget)]
        if confirm:
            lines.append({**record(0, "confirm", 0.89, 0.5 * budget), "of_ray_trial": "t0-screen"})
        (out / run_dir.TRIALS_LOG).write_text("".join(json.dumps(r) + "\n" for r in lines))
        cfg = SearchConfig(setup=setup, budget="65%", out=out, presets=False)
        outcome = finish(cfg, {"model": spec.name, "checkpoint": None, "data": None, "budget_gmacs": budget})
        assert [r["trial"] for r in outcome.front] == [0]
        front = json.loads((out / "front.json").read_text())
        assert [r["trial"] for r in front["front"]] == [0]
        assert STOPPED in (out / "trials.csv").read_text()


def test_a_bar_that_rises_while_it_runs_stops_the_screening() -> None:
    """Presets stop against each other: the bar is read again at every check (EarlyStop.refresh)."""
    data = _set(600, 1000)
    bars = iter([None, 0.95, 0.95, 0.95])  # nothing measured yet at the first check, then 95 %
    stop = EarlyStop(-float("inf"), chunk=250, refresh=lambda: next(bars))
    assert predict_until(_ByFirstPixel(), data, data.labels, stop, batch_size=50).shape == (500, 2)
    never = EarlyStop(-float("inf"), chunk=250, refresh=lambda: None)
    assert predict_until(_ByFirstPixel(), data, data.labels, never, batch_size=50).shape == (1000, 2)


def test_shared_bars_are_the_best_full_screening_at_no_more_gmacs(tmp_path: Path) -> None:
    from search import screen_bars

    path = screen_bars.path_in(tmp_path / "cache")
    assert screen_bars.best_at_most(path, 1.0) is None  # no file yet: no bar
    screen_bars.add(path, 0.10, 0.90)
    screen_bars.add(path, 0.20, 0.95)
    screen_bars.add(path, 0.05, float("nan"))  # a failed one is no bar
    with open(path, "a") as handle:
        handle.write('{"gmacs": 0.01, "accu')  # a line cut short by a concurrent write
    assert screen_bars.best_at_most(path, 0.05) is None
    assert screen_bars.best_at_most(path, 0.10) == 0.90 and screen_bars.best_at_most(path, 0.15) == 0.90
    assert screen_bars.best_at_most(path, 0.20) == 0.95
    screen_bars.seed(path, [(0.30, 0.80)])  # a new (or resumed) presets stage starts from its records only
    assert screen_bars.best_at_most(path, 0.20) is None and screen_bars.best_at_most(path, 0.30) == 0.80


def test_a_preset_stops_against_a_better_cheaper_preset_and_is_still_confirmed(tmp_path: Path) -> None:
    """On the embedded model: with a better preset at fewer GMACs on file, a weak preset's screening
    stops after one chunk and is tagged; a preset nothing beats is screened in full and shared. The
    confirmation candidates keep every preset, stopped or not; a stopped preset counts as screened
    on --resume."""
    from search import screen_bars
    from search.fixed_stage import _confirm_candidates, presets_to_run
    from search.worker import evaluate_fixed

    spec = model_spec("tokensched_vit_shapes")
    space = SearchSpace("per-layer", spec, budget_gmacs=0.65 * gmacs(Schedule.empty(spec)))
    setup = WorkerSetup(space=space, model="tokensched_vit_shapes", num_images=500, confirm_images=100,
                        batch_size=50, stop_chunk=100, cache_dir=str(tmp_path / "cache"), shared_bars=True)
    bars = screen_bars.path_in(setup.cache_dir)
    weak, strong = from_preset("idlevit:0.3", spec), from_preset("tome:4", spec)
    screen_bars.seed(bars, [(0.5 * gmacs(weak), 0.99)])
    stopped = evaluate_fixed(setup, weak, "screen", stop=True)
    assert stopped["stopped"] and stopped["num_images"] == 100 and stopped["accuracy"] < 0.9
    screen_bars.seed(bars, [])
    full = evaluate_fixed(setup, strong, "screen", stop=True)
    assert not full["stopped"] and full["num_images"] == 500
    assert screen_bars.best_at_most(bars, gmacs(strong)) == pytest.approx(full["accuracy"])
    assert evaluate_fixed(setup, weak, "screen")["num_images"] == 500  # stop=False: never stops

    def record(name: str, fidelity: str) -> dict:
        return {"ray_trial": name, "preset": name, "fidelity": fidelity, "state": "COMPLETE", "accuracy": 0.5,
                "gmacs": 0.05, "feasible": True, "schedule": from_preset(name, spec).to_dict()}

    records = [record("idlevit:0.3", STOPPED), record("tome:4", "screen")]
    cfg = SearchConfig(setup=setup, budget="65%", out=tmp_path, presets=True)
    assert {r["preset"] for r in _confirm_candidates(cfg, records)} == {"idlevit:0.3", "tome:4"}
    assert {"idlevit:0.3", "tome:4"}.isdisjoint(s.name for s in presets_to_run(space, records))


def test_without_shared_bars_a_preset_stops_only_against_its_own_batch(tmp_path: Path) -> None:
    """--deterministic, the default (shared_bars=False): the bars file, whatever the other workers
    wrote, is ignored; a batch's earlier full screenings at no more GMACs are the bar."""
    import dataclasses

    from search import screen_bars
    from search.output_memo import MEMO_DIR
    from search.worker import evaluate_fixed

    spec = model_spec("tokensched_vit_shapes")
    space = SearchSpace("per-layer", spec, budget_gmacs=0.65 * gmacs(Schedule.empty(spec)))
    setup = WorkerSetup(space=space, model="tokensched_vit_shapes", num_images=500, confirm_images=100,
                        batch_size=50, stop_chunk=100, cache_dir=str(tmp_path / "cache"), shared_bars=False)
    weak = from_preset("idlevit:0.3", spec)
    screen_bars.seed(screen_bars.path_in(setup.cache_dir), [(0.5 * gmacs(weak), 0.99)])  # another worker's

    def screened(setup: WorkerSetup, **bars) -> dict:  # type: ignore[no-untyped-def]
        shutil.rmtree(Path(setup.cache_dir) / MEMO_DIR, ignore_errors=True)  # else its first full screening is known
        return evaluate_fixed(setup, weak, "screen", stop=True, **bars)

    assert screened(setup)["num_images"] == 500
    assert screened(setup, batch_bars=[(2 * gmacs(weak), 0.99)])["num_images"] == 500
    stopped = screened(setup, batch_bars=[(0.5 * gmacs(weak), 0.99)])
    assert stopped["stopped"] and stopped["num_images"] == 100
    shared = dataclasses.replace(setup, shared_bars=True)  # --no-deterministic reads the file
    assert screened(shared)["num_images"] == 100


def test_a_presets_trim_is_suggested_without_an_early_stopping_bar(tmp_path: Path) -> None:
    """The searcher gives every suggestion the bar to stop below, except a preset's trim: confirmed
    whatever it scores, it is screened in full (a stopped trial never enters the front)."""
    import optuna

    from search import pareto, run_dir
    from search.running_front import RunningFront
    from search.tune_stage import _searcher, preset_trims, starting_points
    from search.worker import STOP_KEY, schedule_from_params
    from spaces.presets import effective_key
    from spaces.search_space import preset_params

    spec = model_spec("tokensched_vit_shapes")
    baseline = gmacs(Schedule.empty(spec))
    space = SearchSpace("per-layer", spec, budget_gmacs=0.65 * baseline, min_gmacs=0.16 * baseline)
    cfg = SearchConfig(setup=WorkerSetup(space=space, stop_chunk=100), budget="65%", out=tmp_path, presets=True,
                       trials=60)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=run_dir.study_name(tmp_path),
                                directions=["maximize", "minimize", "maximize"])
    study.enqueue_trial(preset_params(from_preset("tome:4", spec), space), user_attrs={"preset": "tome:4"})
    trial = study.ask()
    space(trial)
    study.tell(trial, [0.98, 0.1, 1.6])
    bar = RunningFront([pareto.OBJECTIVES["accuracy"], pareto.OBJECTIVES["gmacs"]])
    bar.add({"accuracy": 0.99, "gmacs": 0.001, "feasible": True, "state": "COMPLETE"})  # a bar for every cost
    trims = frozenset(effective_key(schedule_from_params(space, p)) for p in preset_trims(cfg, study))
    starts = starting_points(cfg, study)
    assert len(trims) == 1 and effective_key(schedule_from_params(space, starts[0])) in trims  # the trim first
    searcher, _ = _searcher(cfg, storage, bar, starts, total=2, unstopped=trims)
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert effective_key(schedule_from_params(space, first)) in trims and STOP_KEY not in first
    assert second[STOP_KEY] == pytest.approx(0.99)
