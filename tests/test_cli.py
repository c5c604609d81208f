"""The command line (run_search.py, tokensched) and gmacs: output contract and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from run_search import main
from search.models import model_spec
from spaces import LayerPlan, Schedule, from_preset

ROOT = Path(__file__).resolve().parents[1]
DEIT_S = "deit_small_patch16_224"


def test_gmacs_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gmacs", "--model", DEIT_S, "--preset", "evit:0.7", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == DEIT_S
    assert out["gmacs"] == pytest.approx(3.04, abs=0.01)
    assert out["tokens"][3:5] == [197, 140] and len(out["tokens"]) == 12


def test_gmacs_table_and_schedule_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = from_preset("tome:13", model_spec(DEIT_S)).save(tmp_path / "tome.yaml")
    assert main(["gmacs", "--model", DEIT_S, "--schedule", str(path)]) == 0
    out = capsys.readouterr().out
    assert "GMACs     2.712" in out and "tokens leaving the last block: 41" in out


def test_script_runs_as_a_program() -> None:
    proc = subprocess.run([sys.executable, "run_search.py", "gmacs", "--model", DEIT_S, "--preset", "ppt", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["gmacs"] == pytest.approx(2.95, abs=0.01)


def test_the_process_ends_with_its_code_after_the_exit_handlers_and_with_its_output_flushed() -> None:
    """exit_process skips only the interpreter's teardown: atexit handlers run, buffered output is written."""
    code = ("import atexit, sys; from search.cli import exit_process; "
            "atexit.register(lambda: print('handler ran', file=sys.stderr)); "
            "print('buffered', end=''); sys.stderr.write('err'); exit_process(3)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == "buffered" and proc.stderr == "errhandler ran\n"


def test_release_ray_shuts_ray_down_in_a_thread_of_its_own(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import threading

    import ray

    from search.driver import release_ray

    called: list[str] = []
    monkeypatch.setattr(ray, "shutdown", lambda: called.append(threading.current_thread().name))
    thread = release_ray()
    thread.join(timeout=30)
    assert called == ["ray-shutdown"] and thread.name != threading.main_thread().name


def test_tokensched_console_command_is_the_same_command_line() -> None:
    """pyproject installs `tokensched` (search.cli:console); it answers as `python run_search.py` does."""
    import shutil
    from importlib.metadata import entry_points

    import search.cli

    assert '\n[project.scripts]\ntokensched = "search.cli:console"' in (ROOT / "pyproject.toml").read_text()
    installed = entry_points(group="console_scripts", name="tokensched")
    if not installed:
        pytest.skip("tokensched is not installed: pip install -e .")
    assert next(iter(installed)).load() is search.cli.console
    command = shutil.which("tokensched") or str(Path(sys.executable).parent / "tokensched")
    proc = subprocess.run([command, "gmacs", "--model", DEIT_S, "--preset", "ppt", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["gmacs"] == pytest.approx(2.95, abs=0.01)
    usage = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: tokensched ")
    bad = subprocess.run([command, "evall"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown command 'evall'") and bad.stdout == ""


def _schedule_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"s{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(text)
    return str(path)


def _bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    deit_s = model_spec(DEIT_S)
    good = from_preset("evit:0.7", deit_s).to_dict()
    unknown_method = dict(good, layers=[{"method": "drop"}] * 12)
    keep_zero = dict(good, layers=[{"method": "prune", "keep": 0.0}] * 12)
    tiny = from_preset("evit:0.7", model_spec("deit_tiny_patch16_224")).save(tmp_path / "tiny.yaml")
    short = Schedule(model_spec("deit_base_patch16_224"), (LayerPlan(),) * 12).to_dict()
    short["model"]["depth"], short["layers"] = 6, short["layers"][:6]
    unknown_fuse = dict(good, layers=[dict(p, fuse_weights="mean") if p["method"] == "prune" else p
                                      for p in good["layers"]])
    unknown_rank = dict(good, layers=[{"method": "idle", "keep": 0.5, "rank": "attention"}] * 12)
    base = ["gmacs", "--model", DEIT_S]
    return {
        "unknown preset": (base + ["--preset", "magic:3"], "unknown preset"),
        "keep above 1": (base + ["--preset", "evit:1.5"], "keep must be in"),
        "unknown method": (base + ["--schedule", _schedule_file(tmp_path, json.dumps(unknown_method))], "unknown method"),
        "keep zero": (base + ["--schedule", _schedule_file(tmp_path, json.dumps(keep_zero))], "keep must be in"),
        "other model": (base + ["--schedule", str(tiny)], "is for"),
        "other depth": (base + ["--schedule", _schedule_file(tmp_path, json.dumps(short))], "depth 6"),
        "malformed": (base + ["--schedule", _schedule_file(tmp_path, "layers: [")], "malformed"),
        "missing file": (base + ["--schedule", str(tmp_path / "nope.yaml")], "not found"),
        "non-ViT": (["gmacs", "--model", "resnet18", "--preset", "evit:0.7"], "not a timm VisionTransformer"),
        "unknown model": (["gmacs", "--model", "no_such_model", "--preset", "evit:0.7"], "unknown model"),
        "no schedule": (base, "required"),
        "unknown flag": (base + ["--preset", "ppt", "--frobnicate"], "unrecognized"),
        "diffrate level": (base + ["--preset", "diffrate:2.8"], "available: diffrate:2.3, diffrate:2.5"),
        "diffrate model": (["gmacs", "--model", "deit_tiny_patch16_224", "--preset", "diffrate:2.9"],
                           "no schedule for deit_tiny_patch16_224; available: deit_small_patch16_224"),
        "unknown fuse_weights": (base + ["--schedule", _schedule_file(tmp_path, json.dumps(unknown_fuse))],
                                 "unknown fuse_weights 'mean'"),
        "unknown rank": (base + ["--schedule", _schedule_file(tmp_path, json.dumps(unknown_rank))], "unknown rank"),
    }


CASES = ["unknown preset", "keep above 1", "unknown method", "keep zero", "other model", "other depth",
         "malformed", "missing file", "non-ViT", "unknown model", "no schedule", "unknown flag",
         "diffrate level", "diffrate model", "unknown fuse_weights", "unknown rank"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    argv, match = _bad_cases(tmp_path)[case]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], captured.err
    assert captured.out == ""
