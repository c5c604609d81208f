"""The latency model: predictions from a hand-made profile, the file and its key, the cache (reused
while the key matches, rebuilt when it does not), the re-timing chain, and bad input at the boundary."""

from __future__ import annotations

import gc
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from run_search import main
from search import latency, speed_stage
from search.config import SearchConfig
from search.latency import LatencyProfile, ProfileKey
from search.models import DEFAULT_MODEL, load_model, model_spec
from search.worker import WorkerSetup
from spaces import LayerPlan, Schedule
from spaces.search_space import SearchSpace

SPEC = model_spec(DEFAULT_MODEL)  # 12 blocks, 64 patches + CLS
GRID = (1, 16, 32, 48, 64)
KEY = ProfileKey(model=DEFAULT_MODEL, device="cpu", device_name="Test CPU", torch="2.15.0", dtype="float32", batch=8,
                 threads=1)


def line(a: float, b: float) -> tuple[float, ...]:
    """a + b n at every grid point (a straight line: the fitted quadratic is the line itself)."""
    return tuple(a + b * n for n in GRID)


def hand_made(key: ProfileKey = KEY) -> LatencyProfile:
    tables = {"none": line(100, 10), "none~sized": line(130, 11), "mlp": line(0, 4), "prune": line(60, 9),
              "merge": line(70, 12), "condense": line(90, 13), "adaptive": line(80, 12), "diffrate": line(75, 12),
              "idle": line(50, 8)}
    return LatencyProfile(key=key, spec=SPEC.to_dict(), grid=GRID, tables=tables, rest_us=500.0, base_block_us=740.0)


def schedule(*plans: LayerPlan) -> Schedule:
    return Schedule(model=SPEC, layers=plans + (LayerPlan(),) * (SPEC.depth - len(plans)))


def test_unreduced_prediction_is_the_rest_plus_every_block() -> None:
    assert latency.predict_us(hand_made(), Schedule.empty(SPEC)) == pytest.approx(500 + 12 * (100 + 10 * 64))


def test_prune_then_plain_blocks_sum_as_they_should() -> None:
    # Block 0 prunes 64 -> 32 without fusing (no sizes): its table entry at 64 was timed at the
    # reference keep 0.5 with fusing (64 -> 33), so the MLP on 33 comes off and the MLP on 32 on;
    # the 11 blocks after it run 32 tokens unsized.
    got = latency.predict_us(hand_made(), schedule(LayerPlan("prune", keep=0.5, fuse=False)))
    block0 = (60 + 9 * 64) - 4 * 33 + 4 * 32
    assert got == pytest.approx(500 + block0 + 11 * (100 + 10 * 32))


def test_merge_gives_sizes_and_the_blocks_after_it_pay_the_bias() -> None:
    got = latency.predict_us(hand_made(), schedule(LayerPlan("merge", keep=0.75)))  # 64 -> 48, sizes from here
    block0 = (70 + 12 * 64) - 4 * 32 + 4 * 48  # reference: keep 0.5, 64 -> 32
    assert got == pytest.approx(500 + block0 + 11 * (130 + 11 * 48))
    unsized = latency.predict_us(hand_made(), replace(schedule(LayerPlan("merge", keep=0.75)), prop_attn=False))
    assert unsized == pytest.approx(500 + block0 + 11 * (100 + 10 * 48))


def test_idle_block_ranks_every_token_and_runs_the_active_ones() -> None:
    got = latency.predict_us(hand_made(), schedule(LayerPlan("idle", keep=0.25)))  # 16 of 64 active
    block0 = (50 + 8 * 64) - (100 + 10 * 32) + (100 + 10 * 16)  # reference: 32 of 64 active
    assert got == pytest.approx(500 + block0 + 11 * (100 + 10 * 64))
    pred = latency.prediction(hand_made(), schedule(LayerPlan("idle", keep=0.25)))
    assert pred["predicted_speedup"] == pytest.approx((500 + 12 * 740) / got)
    assert pred["predicted_images_per_s"] == pytest.approx(8 / (got * 1e-6))


def test_the_whole_model_fit_scales_the_blocks_and_adds_the_rest() -> None:
    scaled = replace(hand_made(), rest_us=200.0, scale=0.9)
    plan = schedule(LayerPlan("prune", keep=0.5, fuse=False))
    assert latency.predict_us(scaled, plan) == pytest.approx(200 + 0.9 * latency.blocks_us(hand_made(), plan))
    # measured = 300 + 0.8 * blocks exactly: the fit finds both
    assert latency.fit_whole([300 + 0.8 * b for b in (1e3, 2e3, 5e3)], [1e3, 2e3, 5e3]) == pytest.approx((300, 0.8))
    # a negative rest is not a time: the line through the origin instead
    rest, scale = latency.fit_whole([0.5e3, 1.8e3, 4.8e3], [1e3, 2e3, 5e3])
    assert rest == 0 and scale == pytest.approx((0.5e3 * 1e3 + 1.8e3 * 2e3 + 4.8e3 * 5e3) / (1e6 + 4e6 + 25e6))


def test_calibration_schedules_cover_every_method_once_and_the_unreduced_model() -> None:
    found = latency.calibration_schedules(SPEC)
    assert found[0] == Schedule.empty(SPEC)
    methods = [{p.method for p in s.layers} - {"none"} for s in found[1:]]
    assert all(len(m) == 1 for m in methods) and len({m.pop() for m in methods}) == len(found) - 1


def test_a_model_without_a_class_token_is_timed_and_calibrated_on_merging_only() -> None:
    pooled = replace(SPEC, class_token=False)
    assert latency.timed_kinds(pooled) == ("none", "none~sized", "mlp", "merge")
    assert set(latency.timed_kinds(SPEC)) == set(hand_made().tables)
    found = latency.calibration_schedules(pooled)
    assert [sorted({p.method for p in s.layers}) for s in found] == [["none"], ["merge"]]


def test_profile_round_trips_and_refuses_other_versions(tmp_path: Path) -> None:
    made = replace(hand_made(), scale=0.9, calibration=({"summary": "none", "measured_us": 1.0, "blocks_us": 2.0},))
    path = made.save(tmp_path / "p.json")
    again = LatencyProfile.load(path)
    assert again.tables == hand_made().tables and again.key == KEY
    assert again.scale == 0.9 and again.calibration == made.calibration
    doc = json.loads(path.read_text())
    (tmp_path / "v9.json").write_text(json.dumps({**doc, "version": 9}))
    with pytest.raises(ValueError, match="version 9"):
        LatencyProfile.load(tmp_path / "v9.json")
    (tmp_path / "short.json").write_text(json.dumps({**doc, "tables": {"none": [1, 2, 3, 4, 5]}}))
    with pytest.raises(ValueError, match="missing"):
        LatencyProfile.load(tmp_path / "short.json")


def _config(tmp_path: Path, **kw) -> SearchConfig:  # type: ignore[no-untyped-def]
    space = SearchSpace("per-layer", SPEC, budget_gmacs=0.1)
    return SearchConfig(setup=WorkerSetup(space=space), budget="65%", out=tmp_path / "run", timing_batch=8, **kw)


def test_cached_profile_is_reused_while_its_key_matches_and_rebuilt_when_not(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENSCHED_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path)
    key = speed_stage.profile_key(cfg)
    builds: list[dict] = []

    def fake_remote(cfg, fn, setup, key_dict):  # type: ignore[no-untyped-def]
        builds.append(key_dict)
        return hand_made(ProfileKey(**key_dict)).to_dict()

    monkeypatch.setattr(speed_stage, "_remote", fake_remote)
    first = speed_stage.ensure_profile(cfg, {})
    assert len(builds) == 1 and latency.cache_path(key).is_file() and first.key == key
    run: dict = {}
    speed_stage.ensure_profile(replace(cfg, out=tmp_path / "run2"), run)
    assert len(builds) == 1 and run["latency_profile"]["source"].startswith("cache")  # key matches: reused
    stale = hand_made(replace(key, torch="2.0.0"))
    stale.save(latency.cache_path(key))  # same file, another torch: its key no longer matches
    speed_stage.ensure_profile(replace(cfg, out=tmp_path / "run3"), run)
    assert len(builds) == 2 and run["latency_profile"]["source"].startswith("built")
    assert LatencyProfile.load(latency.cache_path(key)).key == key  # the cache holds the rebuilt one
    resumed: dict = {}
    speed_stage.ensure_profile(replace(cfg, out=tmp_path / "run3"), resumed)  # a resumed run keeps its own copy
    assert len(builds) == 2 and resumed["latency_profile"]["source"] == "run"


def _timing_task(setup: WorkerSetup, answer: int) -> dict:
    return {"answer": answer, "threads": torch.get_num_threads(), "gc": gc.isenabled(), "pid": os.getpid()}


def test_timing_runs_in_the_driver_on_its_local_cpu_ray_and_as_a_ray_task_elsewhere(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    local = _config(tmp_path)
    assert speed_stage.runs_in_driver(local)
    assert not speed_stage.runs_in_driver(replace(local, ray_address="10.0.0.1:6379"))
    assert not speed_stage.runs_in_driver(replace(local, gpus_per_trial=1.0))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def task(setup: WorkerSetup, answer: int) -> dict:
            torch.set_num_threads(1)  # as speed_stage._model does: the trials' thread count
            return _timing_task(setup, answer)

        here = speed_stage._remote(local, task, local.setup, 42)
        assert here == {"answer": 42, "threads": 1, "gc": False, "pid": os.getpid()}  # no collection pauses
        assert torch.get_num_threads() == 2 and gc.isenabled()  # the driver's own settings are given back
        calls: list[tuple] = []

        class FakeRay:  # a cluster: one Ray task with a trial's resources
            @staticmethod
            def remote(**resources):  # type: ignore[no-untyped-def]
                def wrap(fn):  # type: ignore[no-untyped-def]
                    calls.append(tuple(sorted(resources.items())))
                    return type("Task", (), {"remote": staticmethod(lambda *a: fn(*a))})
                return wrap

            @staticmethod
            def get(value):  # type: ignore[no-untyped-def]
                return value

        monkeypatch.setitem(sys.modules, "ray", FakeRay)
        remote = speed_stage._remote(replace(local, ray_address="10.0.0.1:6379"), _timing_task, local.setup, 7)
        assert remote["answer"] == 7 and remote["gc"] is True
        assert calls == [(("max_retries", 0), ("num_cpus", 1.0), ("num_gpus", 0.0))]
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # a real profile (46 s on the loaded 2-core machine); the reuse rule itself is tested above
def test_profile_command_builds_reuses_and_refuses_another_key(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "p.json"
    assert main(["profile", "--timing-batch", "2", "--out", str(out)]) == 0
    built = LatencyProfile.load(out)
    assert built.key.batch == 2 and built.key.model == DEFAULT_MODEL
    assert all(v > 0 for values in built.tables.values() for v in values)
    assert len(built.calibration) == 6 and built.scale > 0 and built.rest_us >= 0  # fitted to six whole models
    printed = capsys.readouterr().out
    assert "built in" in printed and "fitted to 6 whole models" in printed
    assert main(["profile", "--timing-batch", "2", "--out", str(out)]) == 0
    assert "reused" in capsys.readouterr().out and LatencyProfile.load(out).created == built.created
    assert main(["profile", "--timing-batch", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "batch: 2 vs 3" in err[0] and "--rebuild" in err[0]


def test_retiming_chain_times_every_schedule_against_the_baseline() -> None:
    from search.evaluate import throughput_many
    from spaces import ModelSpec, from_preset

    torch.manual_seed(0)
    model = load_model(DEFAULT_MODEL)
    spec = ModelSpec.from_model(model)
    items = [from_preset("tome:4", spec), from_preset("evit:0.5", spec)]
    out = throughput_many(model, items, batch_size=2, repeats=2, min_time_s=0.0)
    assert len(out) == 2 and all(t.repeats == 4 and t.images_per_s > 0 and t.baseline_images_per_s > 0 for t in out)
    assert all(t.speedup_min <= t.speedup <= t.speedup_max for t in out)
    assert type(model).__name__ == "VisionTransformer"  # left unpatched


@pytest.mark.parametrize("nest", [1, 2, 3])
def test_retiming_chain_nests_schedules_in_palindromes_between_baselines(nest: int, monkeypatch) -> None:
    """Each group of `nest` schedules runs forwards then backwards between two baseline timings;
    with fake timings (baseline 1 s, schedule i 1 / (i + 2) s) every speed-up is exactly i + 2."""
    from search import evaluate
    from spaces import ModelSpec, from_preset

    model = load_model(DEFAULT_MODEL)
    spec = ModelSpec.from_model(model)
    items = [from_preset(p, spec) for p in ("tome:4", "tome:8", "evit:0.5", "evit:0.7", "tcvit:0.5")]
    current: list[int | None] = [None]
    seen: list[int | None] = []
    monkeypatch.setattr(evaluate, "apply_schedule", lambda m, s: current.__setitem__(0, items.index(s)))
    monkeypatch.setattr(evaluate, "remove_schedule", lambda m: current.__setitem__(0, None))

    def fake_time(run, device, calls=1):  # type: ignore[no-untyped-def]
        seen.append(current[0])
        return 1.0 if current[0] is None else 1.0 / (current[0] + 2)

    monkeypatch.setattr(evaluate, "time_call", fake_time)
    out = evaluate.throughput_many(model, items, batch_size=4, warmup=1, schedule_warmup=0, repeats=1,
                                   min_time_s=0.0, nest=nest)
    groups = [list(range(len(items)))[g:g + nest] for g in range(0, len(items), nest)]
    expected: list[int | None] = [None, None, None]  # warm-up, the calls probe, the first baseline
    for group in groups:
        expected += [*group, *reversed(group), None]
    assert seen == expected
    assert [t.speedup for t in out] == [float(i + 2) for i in range(len(items))]
    assert all(t.repeats == 2 and t.speedup_min == t.speedup_max for t in out)


def test_retiming_chain_rejects_a_nest_below_one() -> None:
    from search.evaluate import throughput_many

    with pytest.raises(ValueError, match="nest must be at least 1"):
        throughput_many(load_model(DEFAULT_MODEL), [], nest=0)


def _bad(argv: list[str], capsys) -> str:  # type: ignore[no-untyped-def]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


SEARCH = ["--budget", "65%", "--trials", "1", "--timing-batch", "8"]


def test_bad_latency_input_is_one_error_line_and_nothing_is_written(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    assert "--latency-batch" in _bad([*SEARCH, "--latency-batch", "0", "--out", str(out)], capsys)
    here = latency.current_key(DEFAULT_MODEL, "cpu", batch=8, threads=1)
    other_device = hand_made(replace(here, device_name="Another CPU")).save(tmp_path / "device.json")
    msg = _bad([*SEARCH, "--latency-profile", str(other_device), "--out", str(out)], capsys)
    assert "device_name" in msg and "Another CPU" in msg
    other_model = hand_made(replace(here, model="deit_tiny_patch16_224")).save(tmp_path / "model.json")
    msg = _bad([*SEARCH, "--latency-profile", str(other_model), "--out", str(out)], capsys)
    assert "model" in msg and "deit_tiny_patch16_224" in msg
    assert "no such file" in _bad([*SEARCH, "--latency-profile", str(tmp_path / "none.json"), "--out", str(out)], capsys)
    assert not out.exists()
    matching = hand_made(here).save(tmp_path / "ok.json")  # the same key passes the check (then Ray would start)
    from search.cli.commands import _check_latency_profile
    from search.cli.parser import build_parser

    args = build_parser().parse_args(["search", *SEARCH, "--latency-profile", str(matching)])
    assert _check_latency_profile(args, SPEC) == str(matching.resolve())


def test_compile_where_unavailable_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from torch._inductor import config

    monkeypatch.setattr(config.cpp, "cxx", ("/nonexistent/c++",))
    msg = _bad(["eval", "--preset", "tome:4", "--compile", "--num-images", "8"], capsys)
    assert "C++ compiler" in msg
    out = tmp_path / "run"
    msg = _bad([*SEARCH, "--compile", "--out", str(out)], capsys)  # the search's re-timing, checked before Ray
    assert "C++ compiler" in msg and "--compile" in msg and not out.exists()


def test_compile_needs_the_retiming(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    msg = _bad([*SEARCH, "--compile", "--no-retime", "--out", str(tmp_path / "run")], capsys)
    assert "--no-retime" in msg and not (tmp_path / "run").exists()
