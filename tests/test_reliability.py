"""Issue 21, "nothing lost, nothing hung": bad input refused before Ray starts, the run directory
locked, resume from every kill point, interrupted and hung trials recorded.

Bad inputs run through run_search.main in one interpreter (as tests/test_search.py does); the
searches run as separate processes with a real local Ray, on 48 images of the embedded model.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from search.outcome import latest_records

ROOT = Path(__file__).resolve().parents[1]
# --timing-batch 8: the latency profile (built once into the test cache) and the re-timing stay short
FAST = ["--model", "tokensched_vit_shapes", "--num-images", "48", "--batch-size", "48", "--timing-batch", "8"]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
       "TOKENSCHED_CACHE": os.path.join(tempfile.gettempdir(), "tokensched-test-cache")}


def _not_images(root: Path) -> Path:
    """An ImageFolder whose .png files are not images."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            (root / c / f"{i}.png").write_text("not an image")
    return root


def _other_checkpoint(path: Path) -> Path:
    """Weights of a ViT of another shape than the embedded default."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    save_file(model.state_dict(), str(path))
    return path


def _finetune_config(path: Path) -> Path:
    from search.models import DEFAULT_MODEL, model_spec
    from spaces import from_preset

    schedule = from_preset("evit:0.7", model_spec(DEFAULT_MODEL))
    path.write_text(yaml.safe_dump({"schedule": schedule.to_dict(), "source": {"model": DEFAULT_MODEL}}))
    return path


# Bad search flags, by the item of issue 21 they show -> the text the one error line must hold.
# "{tmp}" stands for the fixture's directory of prepared bad files.
SEARCH_CASES: dict[str, tuple[list[str], str]] = {
    "budget above unreduced [13]": (["--budget", "150%"], "above the unreduced"),
    "budget infinite [13]": (["--budget", "1e400%"], "above the unreduced"),
    "budget 1.5x [13]": (["--budget", "1.5x"], "above the unreduced"),
    "budget GMACs above [13]": (["--budget", "100GMACs"], "above the unreduced"),
    "checkpoint of another architecture [3]": (["--checkpoint", "{tmp}/other.safetensors"], "does not fit the model"),
    "data of non-images [3]": (["--data", "{tmp}/junk"], "could be decoded"),
    "finetune-data of non-images [3]": (["--finetune-top", "1", "--finetune-data", "{tmp}/junk"], "could be decoded"),
    "device bogus [4]": (["--device", "bogus"], "--device 'bogus'"),
    "device cuda:99 [4]": (["--device", "cuda:99"], "--device cuda:99"),
    "gpus without a GPU [5]": (["--device", "cpu", "--gpus-per-trial", "1"], "--gpus-per-trial 1"),
    "gpus beyond the machine [5]": (["--gpus-per-trial", "1000"], "--gpus-per-trial 1000"),
    "negative cpus [6]": (["--cpus-per-trial=-1"], "--cpus-per-trial: must be > 0"),
    "zero cpus [6]": (["--cpus-per-trial", "0"], "--cpus-per-trial: must be > 0"),
    "nan cpus [6]": (["--cpus-per-trial", "nan"], "--cpus-per-trial: must be > 0"),
    "cpus beyond the machine [6]": (["--cpus-per-trial", "1000"], "this machine has"),
    "negative gpus [6]": (["--gpus-per-trial=-1"], "--gpus-per-trial: must be >= 0"),
    "storage bogus scheme [9]": (["--storage", "bogus://x"], "--storage bogus://x"),
    "storage not a URL [9]": (["--storage", "notaurl"], "--storage notaurl"),
    "storage sqlite in missing dir [9]": (["--storage", "sqlite:////no/such/dir/s.db"], "not found"),
    "storage journal in missing dir [9]": (["--storage", "journal:/no/such/dir/j.log"], "not found"),
    "out is a file [8]": (["--out", "{tmp}/a_file"], "is a file"),
    "out under a file [8]": (["--out", "{tmp}/a_file/run"], "is a file"),
    "out under /proc [8]": (["--out", "/proc/tokensched/run"], "cannot create a directory"),
    "zero trial-timeout [14]": (["--trial-timeout", "0"], "--trial-timeout: must be > 0"),
    "negative stop-chunk": (["--stop-chunk=-1"], "--stop-chunk: must be >= 0"),
    "stop-chunk not a number": (["--stop-chunk", "half"], "--stop-chunk"),
    "negative prefix cache": (["--prefix-cache-mb", "-5"], "--prefix-cache-mb: must be >= 0"),
    "unknown screen precision": (["--screen-precision", "fp8"], "--screen-precision: invalid choice"),
    "zero finetune-timeout [14]": (["--finetune-top", "1", "--finetune-timeout", "0"],
                                   "--finetune-timeout: must be > 0"),
    "negative finetune-timeout [14]": (["--finetune-top", "1", "--finetune-timeout=-5"],
                                       "--finetune-timeout: must be > 0"),
    "nan finetune-timeout [14]": (["--finetune-top", "1", "--finetune-timeout", "nan"],
                                  "--finetune-timeout: must be > 0"),
    "word finetune-timeout [14]": (["--finetune-top", "1", "--finetune-timeout", "soon"],
                                   "--finetune-timeout: not a number"),
}

# Bad input of the other commands.
OTHER_CASES: dict[str, tuple[list[str], str]] = {
    "preset tome:1000 [13]": (["gmacs", "--preset", "tome:1000"], "can merge at most 32"),
    "preset tome:1000 on DeiT-S [13]": (["gmacs", "--model", "deit_small_patch16_224", "--preset", "tome:1000"],
                                        "can merge at most 98"),
    "binary schedule file [13]": (["gmacs", "--schedule", "{tmp}/binary.yaml"],
                                  "--schedule {tmp}/binary.yaml: not a text file"),
    "unknown subcommand [13]": (["evall", "--preset", "ppt"], "unknown command 'evall'"),
    "eval device bogus [4]": (["eval", "--preset", "ppt", "--device", "bogus"], "--device 'bogus'"),
    "finetune out is a file [7]": (["finetune", "--config", "{tmp}/config.yaml", "--out", "{tmp}/a_file",
                                    "--steps", "1"], "is a file"),
    "finetune out under a file [7]": (["finetune", "--config", "{tmp}/config.yaml", "--out", "{tmp}/a_file/x",
                                       "--steps", "1"], "is a file"),
    "make-data under a file [8]": (["make-data", "{tmp}/a_file/x", "--num-images", "2"], "is a file"),
    "make-data under /proc [8]": (["make-data", "/proc/tokensched-data", "--num-images", "2"],
                                  "cannot create a directory"),
}


def _prepare_bad_files(tmp: Path) -> None:
    (tmp / "a_file").write_text("x")
    (tmp / "binary.yaml").write_bytes(bytes(range(256)))
    _not_images(tmp / "junk")
    _other_checkpoint(tmp / "other.safetensors")
    _finetune_config(tmp / "config.yaml")


_RUNNER = """
import contextlib, io, json, sys
import run_search
results = {}
for case, argv in json.load(sys.stdin).items():
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = run_search.main(argv)
    results[case] = [code, err.getvalue(), out.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]], dict[str, list]]:
    tmp = tmp_path_factory.mktemp("bad21")
    _prepare_bad_files(tmp)
    argvs = {}
    for i, (case, (args, _)) in enumerate(SEARCH_CASES.items()):
        out = [] if "--out" in args else ["--out", str(tmp / str(i) / "new")]
        argvs[case] = [*FAST, "--budget", "65%", "--trials", "2", *out, *args]  # args last: theirs win
    argvs.update({case: args for case, (args, _) in OTHER_CASES.items()})
    argvs = {case: [a.replace("{tmp}", str(tmp)) for a in argv] for case, argv in argvs.items()}
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    proc = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(argvs), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before  # no case wrote anything
    return tmp, argvs, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [*SEARCH_CASES, *OTHER_CASES])
def test_bad_input_is_one_error_line_exit_2_nothing_written(case: str, bad_runs) -> None:
    tmp, argvs, results = bad_runs
    code, stderr, stdout = results[case]
    match = {**SEARCH_CASES, **OTHER_CASES}[case][1].replace("{tmp}", str(tmp))
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("warning:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert match in lines[0] and stdout == "", (match, stderr)
    assert not Path("/proc/tokensched").exists()


# --- the run directory: lock, resume from any kill point, configs, interrupted trials ------------------

def _search(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "run_search.py", *args], cwd=ROOT, env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)


def _killed_at(point: str, args: list[str]) -> None:
    """Run a search that SIGKILLs itself at `point` (run_dir.kill_point), then end what it left (Ray)."""
    import signal

    proc = subprocess.Popen([sys.executable, "run_search.py", *args], cwd=ROOT, env={**ENV, "TOKENSCHED_KILL_AT": point},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert proc.wait(timeout=300) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def _study_trials(out: Path) -> list:
    from search import run_dir

    return run_dir.load_study(out).trials


def _locked(path: Path) -> bool:
    import fcntl

    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@pytest.mark.slow
def test_kill_before_the_study_exists_lock_sampler_and_configs(tmp_path: Path) -> None:
    """Items 1, 2, 10, 11: killed right after run.json (no study yet), --resume completes it while a
    second driver is locked out; --resume with another sampler is refused; a resume to more trials
    re-exports configs/ with stale ones gone."""
    out = tmp_path / "run"
    args = ["--budget", "65%", *FAST, "--no-presets", "--out", str(out)]
    _killed_at("run.json", [*args, "--trials", "3"])
    assert (out / "run.json").is_file() and not (out / "study.log").exists()

    first = subprocess.Popen([sys.executable, "run_search.py", *args, "--trials", "3", "--resume"], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not _locked(out / ".lock") and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    second = _search(*args, "--trials", "3", "--resume")
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode == 2 and second.stderr.strip().splitlines()[-1].startswith("error: "), second.stderr
    assert "in use by another search" in second.stderr
    searched = [t for t in _study_trials(out) if t.state.name != "RUNNING"]
    assert len([t for t in searched if t.state.name == "COMPLETE"]) == 3
    assert {r["trial"] for r in _records(out)} >= {t.number for t in searched}  # a record for every trial

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = _search(*args, "--trials", "3", "--resume", "--sampler", "tpe")
    assert refused.returncode == 2 and "sampler differs" in refused.stderr.strip().splitlines()[-1], refused.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    (out / "configs" / "9999.yaml").write_text("stale: true\n")
    more = _search(*args, "--trials", "5", "--resume")
    assert more.returncode == 0, more.stderr[-3000:]
    front = json.loads((out / "front.json").read_text())["front"]
    assert sorted(p.name for p in (out / "configs").glob("*.yaml")) == sorted(f"{r['trial']:04d}.yaml" for r in front)
    for path in (out / "configs").glob("*.yaml"):
        assert str(out / "configs" / path.name) in yaml.safe_load(path.read_text())["finetune_command"]
    assert not list(out.glob(".configs-*"))
    complete = [t for t in _study_trials(out) if t.state.name == "COMPLETE"]
    assert len(complete) == 5 and len({tuple(sorted(t.params.items())) for t in complete}) == 5


# --- hung and failing trials: --trial-timeout, the fine-tune stage, kills during fine-tunes and the report ---

SHORT = ["--budget", "65%", *FAST, "--no-presets", "--confirm-images", "40", "--min-gmacs", "60%"]
FINETUNE = ["--finetune-steps", "3", "--finetune-batch", "8"]


def _searched(out: Path) -> list:
    return [t for t in _study_trials(out) if "preset" not in t.user_attrs]


@pytest.mark.slow
def test_hung_trial_ends_at_trial_timeout_as_a_fail(tmp_path: Path) -> None:
    """Item 14: the second suggestion hangs (test hook); --trial-timeout ends its worker, the trial
    is a FAIL in trials.jsonl and in the study, the other trials are evaluated and the run ends."""
    out = tmp_path / "hang"
    proc = _search(*SHORT, "--trials", "3", "--out", str(out), "--fail-trials", "1:hang", "--trial-timeout", "20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    screen = [r for r in _records(out) if r["fidelity"] == "screen"]
    assert sorted(r["state"] for r in screen) == ["COMPLETE", "COMPLETE", "FAIL"]
    hung = next(r for r in screen if r["state"] == "FAIL")
    assert hung.get("accuracy") is None and hung["params"]
    by_number = {t.number: t for t in _searched(out)}
    assert sorted(t.state.name for t in by_number.values()) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert by_number[hung["trial"]].state.name == "FAIL"
    assert {r["trial"] for r in screen if r["state"] == "COMPLETE"} == \
        {n for n, t in by_number.items() if t.state.name == "COMPLETE"}
    assert (out / "front.json").is_file()


def test_finished_finetune_is_scored_again_not_refused(tmp_path: Path) -> None:
    """A kill of the driver after a fine-tune wrote its weights but before its record: the rerun
    on resume scores those weights (finetune refuses to overwrite them); weights of other settings
    are still refused."""
    import optuna

    from search.models import model_spec
    from search.worker import FinetuneJob, WorkerSetup, finetune_params
    from spaces import Schedule, gmacs
    from spaces.search_space import SearchSpace

    spec = model_spec("tokensched_vit_shapes")
    space = SearchSpace("per-layer", spec, budget_gmacs=0.65 * gmacs(Schedule.empty(spec)))
    setup = WorkerSetup(space=space, model="tokensched_vit_shapes", num_images=48, batch_size=48, confirm_images=40)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    space(trial)
    job = FinetuneJob(steps=3, out_root=str(tmp_path), batch_size=8)
    first = finetune_params(setup, job, 7, trial.params)
    weights = tmp_path / "0007" / "model.safetensors"
    written = weights.read_bytes()
    again = finetune_params(setup, job, 7, trial.params)
    assert weights.read_bytes() == written
    for key in ("accuracy", "confirmed_accuracy", "agreement", "kl", "weights"):
        assert again[key] == first[key], key
    with pytest.raises(ValueError, match="nothing is overwritten"):
        finetune_params(setup, FinetuneJob(steps=4, out_root=str(tmp_path), batch_size=8), 7, trial.params)


@pytest.mark.slow
def test_failing_and_hung_finetunes_are_fails_the_others_complete(tmp_path: Path) -> None:
    """Item 14, the fine-tune stage: of three promoted candidates one raises and one hangs (test
    hook); --finetune-timeout ends the hung one's worker; both are FAIL records with their reason,
    the third completes and the report is written."""
    out = tmp_path / "ft"
    proc = _search(*SHORT, "--trials", "4", "--out", str(out), "--finetune-top", "3", *FINETUNE,
                   "--fail-finetunes", "0:raise,1:hang", "--finetune-timeout", "20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned = [r for r in latest_records(_records(out)) if r["fidelity"] == "finetune:3"]  # one per Ray trial
    assert len(tuned) == 3 and len({r["trial"] for r in tuned}) == 3
    failed = sorted(r["error"] for r in tuned if r["state"] == "FAIL")
    assert len(failed) == 2 and "injected failure" in failed[0] and "past --finetune-timeout" in failed[1], failed
    done = [r for r in tuned if r["state"] == "COMPLETE"]
    assert len(done) == 1 and Path(done[0]["weights"]).is_file()
    assert all(r["accuracy"] is None for r in tuned if r["state"] == "FAIL")
    front = json.loads((out / "front.json").read_text())["front"]
    assert front and {r["fidelity"] for r in front} <= {"confirm", "finetune:3"}


def _killed_when(args: list[str], ready, what: str) -> None:  # type: ignore[no-untyped-def]
    """Run a search and SIGKILL its process group as soon as `ready()` holds; it must still run then."""
    import signal

    proc = subprocess.Popen([sys.executable, "run_search.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the search ended (exit {proc.returncode}) before {what}"
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_kill_during_finetunes_then_during_the_report_resumes(tmp_path: Path) -> None:
    """Kill points of issue 21: kill -9 once a promoted candidate's weights are written (before the
    driver records them), resume and kill -9 once the report has begun (trials.csv, written first);
    a last --resume exits 0 with every trial and fine-tune once, nothing lost, every output written."""
    out = tmp_path / "run"
    args = [*SHORT, "--trials", "4", "--out", str(out), "--finetune-top", "2", *FINETUNE]
    _killed_when(args, lambda: any((out / "promoted").glob("*/model.safetensors")), "a fine-tune's weights")
    tuned = [r for r in latest_records(_records(out)) if r["fidelity"] == "finetune:3" and r["state"] == "COMPLETE"]
    assert len(tuned) < 2 and not (out / "trials.csv").exists()  # killed during the fine-tunes

    _killed_when([*args, "--resume"], lambda: (out / "trials.csv").exists(), "the report")
    assert "front_size" not in json.loads((out / "run.json").read_text())  # killed before the report's end
    before = _records(out)

    resumed = _search(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = _records(out)
    assert records == before  # the search, confirmations and fine-tunes were done: only the report ran again
    searched = _searched(out)
    complete = [t for t in searched if t.state.name == "COMPLETE"]
    assert len(complete) == 4 and len(searched) == 4  # nothing interrupted: the kills came after the search
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4
    latest = latest_records(records)  # one per Ray trial: the re-timing appends a front point again, measured
    screen = [r for r in latest if r["fidelity"] == "screen"]
    assert sorted(r["trial"] for r in screen) == sorted(t.number for t in complete)  # none twice, none lost
    tuned = [r for r in latest if r["fidelity"] == "finetune:3"]
    assert [r["state"] for r in tuned] == ["COMPLETE", "COMPLETE"] and len({r["trial"] for r in tuned}) == 2
    assert all(Path(r["weights"]).is_file() for r in tuned)
    assert all(r["predicted_speedup"] is not None for r in tuned)  # so they can enter the front
    for name in ("trials.csv", "front.csv", "front.json", "front.png", "front.html", "hypervolume.csv",
                 "hypervolume.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "run.json").read_text())["front_size"] >= 1
    import pandas as pd

    assert set(pd.read_csv(out / "trials.csv")["ray_trial"]) == {r["ray_trial"] for r in records}
    front = json.loads((out / "front.json").read_text())["front"]
    assert sorted(p.name for p in (out / "configs").glob("*.yaml")) == sorted(f"{r['trial']:04d}.yaml" for r in front)
    assert not list(out.glob(".configs-*"))
