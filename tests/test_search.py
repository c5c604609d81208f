"""The search end to end with a real local Ray (2 CPUs): outputs, front, failures, resume, bad input.

The embedded architecture with random weights and a 48-image screening set keeps each trial
well under a second; every search runs as a separate process, as a user would run it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from search.outcome import latest_records
from search.pareto import non_dominated

ROOT = Path(__file__).resolve().parents[1]
# --timing-batch 8: the latency profile (built once into the test cache) and the re-timing stay short
FAST = ["--model", "tokensched_vit_shapes", "--num-images", "48", "--batch-size", "48", "--timing-batch", "8"]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
       "TOKENSCHED_CACHE": os.path.join(tempfile.gettempdir(), "tokensched-test-cache")}
OUTPUTS = ["trials.csv", "front.csv", "front.json", "front.png", "front.html", "hypervolume.csv", "hypervolume.png",
           "run.json", "study.log", "trials.jsonl"]


def search(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "run_search.py", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def study(out: Path, url: str | None = None) -> optuna.Study:
    """The run's study as optuna-dashboard opens it (the journal by default, or --storage `url`)."""
    from search import run_dir

    return run_dir.load_study(out, url)


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One small search with two injected failures (an exception and a NaN objective). Only prune and
    merge are searched, so the PPT and IdleViT presets lie outside the space; presets from 60 % of
    the GMACs up keep the run short."""
    out = tmp_path_factory.mktemp("runs") / "smoke"
    proc = search("--budget", "65%", *SMOKE, "--trials", "10", "--out", str(out), "--fail-trials", "6:raise,7:nan")
    return out, proc


SMOKE = [*FAST, "--min-gmacs", "60%", "--methods", "prune,merge", "--confirm-images", "40"]


def records_of(out: Path) -> list[dict]:
    """The trial log, one record per Ray trial (the last line written for it)."""
    latest: dict[str, dict] = {}
    for line in (out / "trials.jsonl").read_text().splitlines():
        record = json.loads(line)
        latest[record["ray_trial"]] = record
    return list(latest.values())


def searched_states(out: Path, url: str | None = None) -> list[str]:
    """States of the searched trials that count towards --trials (not presets, not ones a kill interrupted)."""
    from search.run_dir import counts_against_budget

    return [t.state.name for t in study(out, url).trials
            if "preset" not in t.user_attrs and (counts_against_budget(t) or not t.state.is_finished())]


def test_smoke_search_writes_every_output(smoke) -> None:
    out, proc = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plotly" in (out / "front.html").read_text()[:200000]
    configs = sorted((out / "configs").glob("*.yaml"))
    assert configs
    exported = yaml.safe_load(configs[0].read_text())
    assert exported["finetune_command"].startswith("python run_search.py finetune --config ")
    assert exported["schedule"]["schema_version"] == 2
    run = json.loads((out / "run.json").read_text())
    for key in ("versions", "device", "batch_size", "precision", "seed", "sampler", "budget_gmacs", "command"):
        assert key in run
    assert run["sampler"] == "local-nsga2" and "preset" in proc.stdout.lower()
    cache = out / "cache"  # the shared logits stay; the kept tokens are deleted after the confirmation
    assert len(list(cache.glob("logits-*.pt"))) == 2 and not list(cache.glob("tokens-*"))
    # stdout holds the closing table only (header, rule, rows, verdicts); Ray's boxes and hints nowhere
    table = re.compile(r" *id  kind |-+$| *\d*  (search|preset) |preset \S+: |the search dominates \d+ of \d+ presets"
                       r"|s: screening stopped early|unreduced model \(the reference, not a preset\): ")
    assert all(table.match(line) for line in proc.stdout.splitlines()), proc.stdout
    assert "tensorboard" not in (proc.stdout + proc.stderr).lower() and "╭" not in proc.stdout + proc.stderr


def test_presets_searched_trials_and_confirmation_share_one_experiments_workers(smoke) -> None:
    """search.staged: one Tune experiment, whose worker processes serve all three phases (a worker
    whose trial raised is replaced; the others carry on from phase to phase)."""
    out, _ = smoke
    assert sorted(p.name for p in (out / "ray").iterdir() if p.is_dir()) == ["search-1"]
    pids: dict[str, set[int]] = {"presets": set(), "tune": set(), "confirm": set()}
    for path in (out / "ray" / "search-1").glob("*/result.json"):
        for line in path.read_text().splitlines():
            result = json.loads(line)
            items = result["config"].get("items")
            phase = "tune" if items is None else "confirm" if items[0]["images"] == "confirm" else "presets"
            pids[phase].add(result["pid"])
    assert all(pids.values()), pids
    assert pids["presets"] & pids["tune"] and pids["confirm"] <= pids["presets"] | pids["tune"], pids


def test_front_is_non_dominated_and_feasible(smoke) -> None:
    out, _ = smoke
    run = json.loads((out / "run.json").read_text())
    front = pd.read_csv(out / "front.csv")
    assert (front["gmacs"] <= run["budget_gmacs"] + 1e-9).all()
    objectives = json.loads((out / "front.json").read_text())["objectives"]  # the run's: accuracy, GMACs, predicted
    names, directions = [o["name"] for o in objectives], [o["direction"] for o in objectives]
    points = front[names].to_numpy()
    assert non_dominated(points, directions).all()
    trials = pd.read_csv(out / "trials.csv")
    ok = trials[(trials["state"] == "COMPLETE") & trials["feasible"].astype(bool) & (trials["fidelity"] == "confirm")]
    # No completed, feasible, confirmed point dominates a front member.
    everything = np.vstack([points, ok[names].to_numpy()])
    assert non_dominated(everything, directions)[: len(points)].all()


def test_front_and_presets_carry_predicted_and_measured_speed(smoke) -> None:
    """By default the third objective is the speed-up the run's latency profile predicts, and after
    the confirmation every front point and every preset is re-timed: both columns, everywhere."""
    out, proc = smoke
    run = json.loads((out / "run.json").read_text())
    assert run["objectives"] == ["accuracy", "gmacs", "predicted_speedup"]
    assert run["latency_profile"]["key"]["batch"] == 8 and (out / "latency_profile.json").is_file()
    front = pd.read_csv(out / "front.csv")
    trials = pd.read_csv(out / "trials.csv")
    presets = trials[(trials["fidelity"] == "confirm") & trials["preset"].notna()]
    assert len(presets) > 0
    for table in (front, presets):
        for column in ("predicted_speedup", "predicted_images_per_s", "measured_speedup", "measured_images_per_s",
                       "latency_ms", "latency_speedup"):
            assert (table[column] > 0).all(), column  # NaN fails too
    # One point per re-timed record (two schedules may share a summary: a searched one equal to a preset).
    assert run["latency_error"]["points"] == len(set(front["ray_trial"]) | set(presets["ray_trial"]))
    assert {"median_abs_pct_error", "spearman"} <= set(run["latency_error"]["speedup"])
    assert "presets on accuracy vs gmacs" in proc.stdout  # the verdict stays on accuracy against GMACs


def test_failures_are_recorded_and_the_search_goes_on(smoke) -> None:
    out, _ = smoke
    states = searched_states(out)  # --trials counts the searched trials; the presets come on top
    assert len(states) == 10 and states.count("FAIL") == 2 and states.count("COMPLETE") == 8
    trials = pd.read_csv(out / "trials.csv")
    searched = trials[(trials["fidelity"] == "screen") & trials["preset"].isna()]
    assert (searched["state"] == "FAIL").sum() == 2 and len(searched) == 10


def test_every_preset_in_range_is_evaluated_marked_and_judged(smoke) -> None:
    from search.models import model_spec
    from spaces.presets import presets_in_range

    out, proc = smoke
    run = json.loads((out / "run.json").read_text())
    expected = {s.name for s in presets_in_range(model_spec("tokensched_vit_shapes"), run["budget_gmacs"],
                                                 run["min_gmacs"])}
    assert expected == {"tome:4", "tome:3,-1", "ppt", "idlevit-code:0.6"}
    records = records_of(out)
    screened = {r["preset"]: r for r in records if r.get("preset") and r["fidelity"] == "screen"}
    assert set(screened) == expected and all(r["state"] == "COMPLETE" for r in screened.values())
    # Inside the space (prune, merge): told to the study, shown by optuna-dashboard beside the trial.
    by_number = {t.number: t.user_attrs for t in study(out).trials}
    for name in ("tome:4", "tome:3,-1"):
        r = screened[name]
        assert by_number[r["trial"]]["preset"] == name and by_number[r["trial"]]["summary"] == r["summary"]
    # Outside it (adaptive, idle): evaluated as fixed schedules all the same.
    for name in ("ppt", "idlevit-code:0.6"):
        assert screened[name]["trial"] is None and screened[name]["params"] is None
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith("preset ")]
    assert {line.split()[1].rstrip(":") for line in verdicts} == expected  # none left out
    assert all("dominated by search trial" in line or "not beaten" in line for line in verdicts)
    confirmed = {r["preset"] for r in records if r.get("preset") and r["fidelity"] == "confirm"}
    assert confirmed == expected


def test_the_presets_trims_run_first_in_full_and_confirm_their_presets_predictions(smoke) -> None:
    """The first searched trials are the told presets' trimmed tails (tome:4 and tome:3,-1 here):
    screened on every image (never stopped early), confirmed, and right on exactly the confirmation
    images their presets get right, at fewer GMACs."""
    import optuna

    from search import paired
    from spaces import Schedule
    from spaces.presets import effective_key
    from spaces.search_space import trimmed_tail

    out, _ = smoke
    records = records_of(out)
    space = _run_space(out)
    presets = {r["preset"]: r for r in records if r.get("preset") and r["fidelity"] == "screen" and r.get("params")}
    trims = {effective_key(space(optuna.trial.FixedTrial(trimmed_tail(r["params"], space)))): name
             for name, r in presets.items()}
    assert sorted(trims.values()) == ["tome:3,-1", "tome:4"]
    searched = sorted((r for r in records if not r.get("preset") and r["fidelity"] != "confirm"
                       and r["state"] == "COMPLETE"), key=lambda r: r["trial"])
    first = {effective_key(Schedule.from_dict(r["schedule"])): r for r in searched[:2]}
    assert set(first) == set(trims)
    confirmed = {r["of_ray_trial"]: r for r in records if r["fidelity"] == "confirm"}
    for key, name in trims.items():
        trim, preset = first[key], presets[name]
        assert trim["fidelity"] == "screen" and trim["num_images"] == 48 and trim["gmacs"] < preset["gmacs"]
        hits = [paired.decode(confirmed[r["ray_trial"]][paired.KEY], 40) for r in (trim, preset)]
        assert (hits[0] == hits[1]).all()


def _run_space(out: Path):  # type: ignore[no-untyped-def]
    """The search space a run searched, rebuilt from its run.json."""
    from search.models import model_spec
    from spaces.search_space import SearchSpace

    run = json.loads((out / "run.json").read_text())
    return SearchSpace(run["space"], model_spec(run["model"]), tuple(run["methods"]), run["budget_gmacs"],
                       run["min_gmacs"])


def test_front_is_confirmed_on_other_images_and_no_preset_dominates_it(smoke) -> None:
    out, _ = smoke
    front = json.loads((out / "front.json").read_text())["front"]
    assert front and all(r["fidelity"] == "confirm" and r["num_images"] == 40 for r in front)
    assert all(r["accuracy"] == r["confirmed_accuracy"] and r["screen_accuracy"] is not None for r in front)
    presets = [r for r in records_of(out) if r.get("preset") and r["fidelity"] == "confirm"]
    from search import paired

    for r in (r for r in records_of(out) if r["fidelity"] == "confirm"):  # image by image, for the verdict
        assert paired.decode(r[paired.KEY], r["num_images"]).mean() == pytest.approx(r["accuracy"])
    points = np.array([[r["accuracy"], r["gmacs"]] for r in front])
    for p in presets:
        dominated = (p["accuracy"] >= points[:, 0]) & (p["gmacs"] <= points[:, 1]) & (
            (p["accuracy"] > points[:, 0]) | (p["gmacs"] < points[:, 1]))
        assert not dominated.any(), p["preset"]
    assert "selection_optimism" in json.loads((out / "run.json").read_text())


def test_the_unreduced_models_accuracy_is_recorded_on_both_image_sets_and_shown(smoke) -> None:
    """run.json's unreduced reference is what the unreduced model scores on the screening and on the
    confirmation images (recomputed here), and the closing table shows it."""
    import torch

    from search.data import embedded_set, load_confirm_set
    from search.evaluate import predict
    from search.models import load_model

    out, proc = smoke
    run = json.loads((out / "run.json").read_text())
    torch.set_num_threads(1)
    model = load_model(run["model"], pretrained=run["pretrained"], checkpoint=run["checkpoint"])
    screen = embedded_set(48, seed=run["seed"])
    confirm = load_confirm_set(None, {}, num_images=40, screen_images=48, seed=run["seed"])
    expected = [(predict(model, d, batch_size=48).argmax(1) == d.labels).float().mean().item() for d in (screen, confirm)]
    unreduced = run["unreduced"]
    assert [unreduced["screen_accuracy"], unreduced["confirmed_accuracy"]] == pytest.approx(expected)
    assert unreduced["gmacs"] == pytest.approx(run["baseline_gmacs"])
    line = f"unreduced model (the reference, not a preset): accuracy {expected[1]:.4g}, screen {expected[0]:.4g}"
    assert line in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["default", "sqlite"])
def test_resume_after_kill_completes_without_duplicates(tmp_path: Path, storage: str) -> None:
    """Killed during the searched trials, resumed to the end: on the default journal as on SQLite.
    The journal run is moved to another directory before it is resumed: it continues its own study
    (run.json records the study's name), not a new one of another --trials."""
    out = tmp_path / "killed"
    url = f"sqlite:///{tmp_path / 'study.db'}" if storage == "sqlite" else None
    args = ["--budget", "65%", *FAST, "--min-gmacs", "60%", "--confirm-images", "40", "--trials", "12",
            *(["--storage", url] if url else [])]
    proc = subprocess.Popen([sys.executable, "run_search.py", *args,
                             "--out", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    log = out / "trials.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert log.is_file() and len(log.read_text().splitlines()) >= 3
    if url is None:
        out = out.rename(tmp_path / "moved")
        log = out / "trials.jsonl"
    resumed = search(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(searched_states(out, url)) == 12 and "RUNNING" not in [t.state.name for t in study(out, url).trials]
    params = [tuple(sorted(t.params.items())) for t in study(out, url).trials if t.state.name == "COMPLETE"]
    assert len(params) == len(set(params))  # nothing ran twice
    records = records_of(out)
    numbers = [r["trial"] for r in records if r["fidelity"] == "screen" and r["trial"] is not None]
    assert len(numbers) == len(set(numbers))
    presets = [r["preset"] for r in records if r.get("preset") and r["fidelity"] == "screen"]
    assert presets and len(presets) == len(set(presets))  # each preset evaluated once, kill or not
    from search import run_dir

    assert optuna.get_all_study_names(run_dir.storage(url, out)) == ["tokensched-killed"]  # moved or not: one study


@pytest.mark.slow
def test_two_node_local_cluster(tmp_path: Path) -> None:
    port = 6391
    env = ENV
    head = subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                           "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert head.returncode == 0, head.stderr[-2000:]
        worker = subprocess.run(["ray", "start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                                 "--dashboard-agent-listen-port=52366", "--disable-usage-stats"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert worker.returncode == 0, worker.stderr[-2000:]
        out = tmp_path / "cluster"
        proc = search("--budget", "65%", *FAST, "--trials", "4", "--out", str(out), "--no-presets",
                      "--ray-address", f"127.0.0.1:{port}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        trials = pd.read_csv(out / "trials.csv")
        assert (trials["fidelity"] == "screen").sum() == 4 and (trials["state"] == "COMPLETE").all()
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


BAD = {
    "malformed budget": (["--budget", "three"], "malformed budget"),
    "zero budget": (["--budget", "0GMACs"], "must be positive"),
    "negative budget": (["--budget=-5%"], "must be positive"),
    "below cheapest": (["--budget", "0.001GMACs"], "below the cheapest schedule"),
    "unknown space": (["--budget", "65%", "--space", "spiral"], "unknown space"),
    "unknown sampler": (["--budget", "65%", "--sampler", "cmaes2"], "unknown sampler"),
    "unknown method": (["--budget", "65%", "--methods", "prune,shrink"], "unknown method"),
    "unknown objective": (["--budget", "65%", "--objectives", "accuracy,latency"], "unknown objective"),
    "unreachable ray": (["--budget", "65%", "--ray-address", "127.0.0.1:1"], "cannot reach Ray"),
    "negative finetune-top": (["--budget", "65%", "--finetune-top=-1"], "must be >= 0"),
    "zero finetune-steps": (["--budget", "65%", "--finetune-top", "2", "--finetune-steps", "0"], "must be positive"),
    "finetune on screening data": (["--budget", "65%", "--finetune-top", "2", "--data", str(ROOT / "tests")],
                                   "needs --finetune-data"),
    "missing finetune-data": (["--budget", "65%", "--finetune-top", "2", "--finetune-data", "/no/such/dir"],
                              "--finetune-data directory not found"),
    "zero finetune-lr": (["--budget", "65%", "--finetune-top", "2", "--finetune-lr", "0"], "--finetune-lr must be positive"),
    "finetune-data without images": (["--budget", "65%", "--finetune-top", "2", "--finetune-data", str(ROOT / "tests")],
                                     "no images in"),
    "zero finetune-crop-scale": (["--budget", "65%", "--finetune-top", "2", "--finetune-crop-scale", "0"],
                                 "must be in (0, 1]"),
    "missing data": (["--budget", "65%", "--data", "/no/such/dir"], "data directory not found"),
    "data without images": (["--budget", "65%", "--data", str(ROOT / "tests")], "no images in"),
    "missing checkpoint": (["--budget", "65%", "--checkpoint", "no/such.safetensors"], "checkpoint not found"),
    "pretrained offline": (["--budget", "65%", "--model", "deit_tiny_patch16_224", "--pretrained"],
                           "could not load pretrained weights"),
    "zero confirm-images": (["--budget", "65%", "--confirm-images", "0"], "--confirm-images"),
    "negative confirm-images": (["--budget", "65%", "--confirm-images=-5"], "--confirm-images"),
    "confirm-images beyond the data": (["--budget", "65%", "--data", "{data40}",
                                        "--num-images", "30", "--confirm-images", "20"], "--confirm-images 20"),
    "min-gmacs above the budget": (["--budget", "65%", "--min-gmacs", "70%"], "above the budget"),
    "zero min-gmacs": (["--budget", "65%", "--min-gmacs", "0GMACs"], "must be positive"),
    "negative min-gmacs": (["--budget", "65%", "--min-gmacs=-5%"], "must be positive"),
    "malformed min-gmacs": (["--budget", "65%", "--min-gmacs", "lots"], "malformed"),
    "class-token method on a pooled model": (["--budget", "65%", "--model", "vit_wee_patch16_reg1_gap_256",
                                              "--methods", "merge,prune"], "prune rank tokens by the class token"),
    "class-token space on a pooled model": (["--budget", "65%", "--model", "vit_wee_patch16_reg1_gap_256",
                                             "--space", "evit"], "space 'evit' uses method 'prune'"),
    "unsupported ViT": (["--budget", "65%", "--model", "eva02_tiny_patch14_224"], "Eva is not a timm VisionTransformer"),
}


# Runs every BAD case through run_search.main in one fresh interpreter (importing torch, timm and
# Ray once, not once per case); each case's exit code is main's return value, which is what
# `python run_search.py` exits with.
_BAD_RUNNER = """
import contextlib, io, json, sys
import run_search
results = {}
for case, argv in json.load(sys.stdin).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_search.main(argv)
    results[case] = [code, err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    from search.embedded.synthetic import write_folder

    root = tmp_path_factory.mktemp("bad")
    write_folder(root / "data40", "heldout", 40)  # a folder of 40 labelled images
    argvs = {case: [*FAST, *(a.replace("{data40}", str(root / "data40")) for a in args), "--trials", "2",
                    "--out", str(root / str(i) / "new")]  # args last: theirs win
             for i, (case, (args, _)) in enumerate(BAD.items())}
    proc = subprocess.run([sys.executable, "-c", _BAD_RUNNER], input=json.dumps(argvs), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {case: (code, err, Path(argvs[case][-1])) for case, (code, err) in results.items()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exit_2_and_nothing_written(case: str, bad_runs) -> None:
    code, stderr, out = bad_runs[case]
    match = BAD[case][1]
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("warning:")]
    assert code == 2 and lines and lines[-1].startswith("error:") and match in lines[-1], stderr
    assert len([line for line in lines if line.startswith("error:")]) == 1
    assert not out.exists()


@pytest.mark.slow
def test_relative_checkpoint_and_data_paths_reach_the_workers(tmp_path: Path) -> None:
    """Ray Tune runs trials in their own directories; relative paths given on the command line still work."""
    from search.embedded import WEIGHTS
    from search.embedded.synthetic import write_folder

    write_folder(tmp_path / "val", "heldout", 40)
    shutil.copy(WEIGHTS, tmp_path / "weights.safetensors")
    rel = Path(os.path.relpath(tmp_path, ROOT))
    out = tmp_path / "run"
    proc = search("--budget", "65%", *FAST, "--checkpoint", str(rel / "weights.safetensors"), "--data", str(rel / "val"),
                  "--trials", "3", "--no-presets", "--num-images", "20", "--confirm-images", "20", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = pd.read_csv(out / "trials.csv")
    assert (trials["state"] == "COMPLETE").all() and (trials["fidelity"] == "screen").sum() == 3
    assert trials["top1"].min() > 0.3  # the trained weights were loaded, on the folder's labels


def test_existing_run_is_never_overwritten(smoke) -> None:
    out, _ = smoke
    before = tree_digest(out)
    cases = [
        (["--budget", "65%", *FAST], "already exists"),  # no --resume
        (["--budget", "50%", *FAST, "--resume"], "budget_gmacs differs"),
        (["--budget", "65%", *FAST[2:], "--model", "deit_tiny_patch16_224", "--resume"], "differs"),
    ]
    for args, match in cases:
        proc = search(*args, "--trials", "2", "--out", str(out), timeout=120)
        assert proc.returncode == 2 and match in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert tree_digest(out) == before


@pytest.mark.slow
def test_promoted_candidates_are_fine_tuned_and_carry_a_fidelity(tmp_path: Path) -> None:
    """--finetune-top: the best screened candidates get a short fine-tune as Ray trials; the
    final front and configs use the highest fidelity reached; resuming does not repeat them."""
    out = tmp_path / "ft"
    args = ["--budget", "65%", *FAST, "--min-gmacs", "60%", "--confirm-images", "40", "--trials", "6",
            "--out", str(out), "--finetune-top", "2",
            "--finetune-steps", "3", "--finetune-batch", "8"]
    proc = search(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One record per Ray trial: the re-timing appends a fine-tuned point on the front again, measured.
    records = latest_records([json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()])
    tuned = [r for r in records if r["fidelity"] == "finetune:3"]
    assert len(tuned) == 2 and all(r["state"] == "COMPLETE" for r in tuned)
    # scored on the confirmation images like every record the front is built from, the screening beside
    assert all(r["accuracy"] == r["confirmed_accuracy"] and r["screen_accuracy"] is not None for r in tuned)
    screened = {r["trial"]: r for r in records if r["fidelity"] == "screen"}
    for r in tuned:  # same schedule and cost, new accuracy, weights on disk
        assert r["trial"] in screened and r["gmacs"] == screened[r["trial"]]["gmacs"]
        # the predicted speed carries over too: without it a tuned point could not enter the front
        assert r["predicted_speedup"] == screened[r["trial"]]["predicted_speedup"] is not None
        assert Path(r["weights"]).is_file() and Path(r["weights"]).parent.parent == (out / "promoted").resolve()
    assert not (out / "finetune").exists()  # left free for the exported configs' full fine-tunes
    assert set(pd.read_csv(out / "trials.csv")["fidelity"]) == {"screen", "confirm", "finetune:3"}
    front = json.loads((out / "front.json").read_text())["front"]
    tuned_ids = {r["trial"] for r in tuned}
    for r in front:  # a fine-tuned candidate appears with its fine-tuned accuracy, never its screen one
        assert r["fidelity"] == ("finetune:3" if r["trial"] in tuned_ids else "confirm")
    for path in (out / "configs").glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        assert (cfg["finetuned_weights"] is not None) == (cfg["trial"] in tuned_ids)
    again = search(*args[:-6], "--trials", "7", "--resume", "--finetune-top", "2", "--finetune-steps", "3",
                   "--finetune-batch", "8")
    assert again.returncode == 0, again.stderr[-3000:]
    records = latest_records([json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()])
    tuned_after = [r for r in records if r["fidelity"] == "finetune:3"]
    assert len({r["trial"] for r in tuned_after}) == len(tuned_after)  # none fine-tuned twice


def test_ray_auth_mode_follows_the_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from search.driver import ray_auth_mode

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ray_auth_mode(None) == "disabled"  # the local Ray the driver starts
    assert ray_auth_mode("10.0.0.1:6379") is None  # no token anywhere: Ray's own default
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 64)
    assert ray_auth_mode("10.0.0.1:6379") == "token"  # `ray start --head` turned token auth on
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_auth_mode("10.0.0.1:6379") == "disabled"  # the user's choice wins


@pytest.mark.slow
def test_compile_retimes_the_front_compiled_against_compiled(tmp_path: Path) -> None:
    """--compile: after the eager re-timing, every front point (no presets here: each compiles for
    a minute or more on a CPU) is timed under torch.compile against the compiled unreduced model,
    its logits equal to eager; a resume does not compile them again."""
    out = tmp_path / "compiled"
    args = ["--budget", "65%", *FAST, "--min-gmacs", "60%", "--confirm-images", "40", "--no-presets", "--trials", "2",
            "--out", str(out), "--compile"]
    proc = search(*args, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    front = pd.read_csv(out / "front.csv")
    assert (front["compiled_speedup"] > 0).all() and (front["compile_seconds"] > 0).all()
    assert (front["compiled_max_abs_logit_diff"] <= 1e-4).all()
    run = json.loads((out / "run.json").read_text())
    assert run["compile"] is True and run["compiled_runs"][0]["schedules"] == len(front)
    assert "compiled" in proc.stdout.splitlines()[0]  # the closing table's column
    for path in (out / "configs").glob("*.yaml"):
        assert yaml.safe_load(path.read_text())["measured_speed"]["compiled_speedup"] > 0
    again = search(*args, "--resume", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(json.loads((out / "run.json").read_text())["compiled_runs"]) == 1  # nothing compiled twice


def _run_outcome(out: Path) -> dict[str, object]:
    """What a run found, independent of the order its records were written in: every searched trial
    (by number: parameters, schedule, accuracy, fidelity, images seen), every preset's screening and
    confirmation, and the closing verdicts."""
    records = [r for r in records_of(out) if "measured_speedup" not in r]
    searched = {(r["trial"], r["fidelity"]): (json.dumps({k: v for k, v in (r.get("params") or {}).items()}, sort_keys=True),
                                               json.dumps(r.get("schedule"), sort_keys=True), r.get("accuracy"),
                                               r.get("num_images"))
                for r in records if not r.get("preset") and r.get("state") == "COMPLETE"}
    presets = {(r["preset"], r["fidelity"]): (r.get("accuracy"), r.get("num_images"), r.get("trial"))
               for r in records if r.get("preset")}
    return {"searched": searched, "presets": presets}


@pytest.mark.slow
def test_deterministic_runs_give_the_same_trials_whatever_order_ray_finishes_them_in(tmp_path: Path) -> None:
    """--deterministic: two runs whose trials finish in different orders (slow trials injected at
    different suggestions) find the same trials and verdicts. Without presets the local sampler
    moves from a front of searched trials only, so what it has seen at each suggestion matters
    (the same two runs without --deterministic differ). The presets' own-batch bars are tested in
    tests/test_early_stop.py."""
    args = ["--budget", "65%", "--num-images", "96", "--batch-size", "48", "--timing-batch", "8",  # trained weights
            "--confirm-images", "40", "--stop-chunk", "16", "--trials", "14", "--no-retime", "--no-presets",
            "--deterministic"]
    outcomes, verdicts = [], []
    for slow in ("1:slow,5:slow,8:slow", "2:slow,6:slow,9:slow"):
        out = tmp_path / slow.replace(":", "-").replace(",", "_")
        proc = search(*args, "--fail-trials", slow, "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
        outcomes.append(_run_outcome(out))
        verdicts.append([line for line in proc.stdout.splitlines() if not line.startswith(" ")])
    assert len(outcomes[0]["searched"]) >= 14
    assert outcomes[0] == outcomes[1]
    assert verdicts[0] == verdicts[1]
