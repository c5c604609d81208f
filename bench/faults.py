"""Fault injection on one search (issue 21): kill the driver at seeded random moments and resume
each time, then kill a worker and hang a trial in the last segment; count what came out.

    python bench/faults.py [--trials 12] [--kills 5] [--seed 0] [--trial-timeout 20] [--out DIR]

Each segment runs `run_search.py` as a user would (its own process group, a fresh local Ray) and
is ended with SIGKILL to the whole group after a delay drawn from the seeded RNG. The last segment
runs to the end with --retries 1 and --trial-timeout: one Ray worker process is SIGKILLed while a
trial runs (the trial is retried), and one suggestion hangs (the worker ends itself at the timeout;
its retry hangs again, so it ends as a FAIL record). Printed: trials requested, evaluated (searched
trials COMPLETE in the study), duplicated (completed twice with the same parameters, or logged
twice), lost (completed in the study without a completed record, or the reverse), the FAIL records
and why, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # search.run_dir reads the run's study
FAST = ["--model", "tokensched_vit_shapes", "--num-images", "48", "--batch-size", "48", "--no-presets"]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "run_search.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _log_lines(out: Path) -> int:
    path = out / "trials.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _trial_workers() -> list[int]:
    """PIDs of Ray worker processes running a Tune function trainable."""
    found = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()
    return [int(line.split(None, 1)[0]) for line in found if "ray::ImplicitFunc" in line]


def _last_segment(args: list[str], out: Path, trial_timeout: float) -> tuple[int, bool]:
    """Run to the end; SIGKILL one trial worker once the segment has logged a trial. Returns
    (exit code, whether a worker was killed)."""
    proc = _start([*args, "--resume", "--retries", "1", "--trial-timeout", f"{trial_timeout:g}",
                   "--fail-trials", "1:hang"])
    start_lines, killed = _log_lines(out), False
    try:
        while proc.poll() is None:
            if not killed and _log_lines(out) > start_lines:
                workers = _trial_workers()
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed = True
            time.sleep(0.5)
        return proc.returncode, killed
    finally:
        _kill_group(proc)


def count(out: Path) -> dict[str, object]:
    from search import run_dir

    study = run_dir.load_study(out)
    trials = [t for t in study.trials if "preset" not in t.user_attrs]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines() if line.strip()]
    screen = [r for r in records if r.get("fidelity", "screen") == "screen" and not r.get("preset")]
    logged = Counter(r["trial"] for r in screen if r.get("state") == "COMPLETE")
    params = Counter(tuple(sorted(t.params.items())) for t in complete)
    numbers = {t.number for t in complete}
    failed = [r for r in screen if r.get("state") == "FAIL"]
    return {
        "evaluated": len(complete),
        "duplicated": sum(n - 1 for n in params.values() if n > 1) + sum(n - 1 for n in logged.values() if n > 1),
        "lost": len(numbers - set(logged)) + len(set(logged) - numbers),
        "running_left": sum(t.state.name == "RUNNING" for t in trials),
        "fail_records": Counter(str(r.get("error") or "error in the worker").split(":")[0] for r in failed),
        "no_record": len({t.number for t in trials} - {r.get("trial") for r in screen}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trial-timeout", type=float, default=20.0)
    parser.add_argument("--window", type=float, nargs=2, default=(8.0, 45.0),
                        help="the kill delay after a segment starts is uniform in this range (s)")
    parser.add_argument("--out", default=None, help="run directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="faults-")) / "run"
    search = ["--budget", "65%", *FAST, "--trials", str(args.trials), "--out", str(out)]
    rng = random.Random(args.seed)
    start = time.perf_counter()
    for k in range(args.kills):
        delay = rng.uniform(*args.window)
        proc = _start(search + (["--resume"] if (out / "run.json").is_file() else []))
        time.sleep(delay)
        exited = proc.poll()
        _kill_group(proc)
        print(f"kill {k + 1}: after {delay:.1f} s ({'already exited ' + str(exited) if exited is not None else 'killed'}),"
              f" {_log_lines(out)} records so far", flush=True)
    code, worker_killed = _last_segment(search, out, args.trial_timeout)
    wall = time.perf_counter() - start
    c = count(out)
    print(f"last segment: exit {code}, a trial worker SIGKILLed: {worker_killed}, one trial hung "
          f"(--trial-timeout {args.trial_timeout:g})")
    print(f"trials requested {args.trials}, evaluated {c['evaluated']}, duplicated {c['duplicated']}, "
          f"lost {c['lost']}, left RUNNING {c['running_left']}, trials without a record {c['no_record']}")
    print(f"FAIL records: {dict(c['fail_records'])}")
    print(f"wall time {wall:.0f} s ({args.kills} driver kills, seed {args.seed}); run directory {out}")
    settled = c["evaluated"] + sum(c["fail_records"].values())  # the hung trial ends as a FAIL that counts
    return 0 if code == 0 and settled == args.trials and not c["duplicated"] and not c["lost"] else 1


if __name__ == "__main__":
    sys.exit(main())
