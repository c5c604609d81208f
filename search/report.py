"""Results of a search run from its trial records: CSV/JSON, plots, exported configs, a text table.

A record is a flat dict (see ``COLUMNS``) plus ``"schedule"``, the serialised schedule.
Only records that are COMPLETE, feasible and carry every objective value can be on the front.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from search import paired
from search.pareto import Objective, non_dominated

__all__ = [
    "COLUMNS",
    "export_configs",
    "front_records",
    "front_table",
    "plot_front",
    "plot_hypervolume",
    "preset_verdicts",
    "write_front",
    "write_trials_csv",
]

COLUMNS = (
    "trial", "state", "preset", "fidelity", "feasible", "accuracy", "screen_accuracy", "confirmed_accuracy",
    "num_images", "screen_images", "agreement", "top1", "top5", "gmacs", "speedup", "images_per_s", "predicted_speedup", "measured_speedup",
    "predicted_images_per_s", "measured_images_per_s", "latency_ms", "latency_speedup", "compiled_speedup",
    "compiled_images_per_s", "compile_seconds", "seconds", "summary",
)  # fmt: skip
# Shown beside the objectives in the closing table when the front was re-timed: (column, record key, format).
SPEED_COLUMNS = (("measured", "measured_speedup", "{:.2f}x"), ("img/s", "measured_images_per_s", "{:.0f}"),
                 ("pred img/s", "predicted_images_per_s", "{:.0f}"), ("b1 ms", "latency_ms", "{:.2f}"),
                 ("b1 x", "latency_speedup", "{:.2f}x"))
COMPILED_COLUMNS = (("compiled", "compiled_speedup", "{:.2f}x"),)  # with --compile


def _value(record: dict, name: str) -> float | None:
    v = record.get(name)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _plain(x: Any) -> Any:
    """JSON/YAML-safe copy: numpy scalars to Python, NaN to None, tuples to lists."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _table(records: Sequence[dict]) -> pd.DataFrame:
    extra = sorted({k for r in records for k in r} - set(COLUMNS) - {"schedule"})
    return pd.DataFrame(
        [{k: r.get(k) for k in (*COLUMNS, *extra)} for r in records], columns=[*COLUMNS, *extra]
    )


def write_trials_csv(path: str | Path, records: Sequence[dict]) -> Path:
    """Every trial, one row; the schedule only as its ``summary``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _table(records).to_csv(path, index=False)
    return path


def front_records(
    records: Sequence[dict], objectives: Sequence[Objective], *, search_only: bool = False
) -> list[dict]:
    """Non-dominated feasible COMPLETE records with every objective present, by objectives[0] descending."""
    names = [o.name for o in objectives]
    pool = [
        r for r in records
        if r.get("state") == "COMPLETE" and r.get("feasible") and all(_value(r, n) is not None for n in names)
        and not (search_only and r.get("preset"))
    ]  # fmt: skip
    if not pool:
        return []
    points = np.array([[_value(r, n) for n in names] for r in pool])
    mask = non_dominated(points, [o.direction for o in objectives])
    front = [r for r, keep in zip(pool, mask, strict=True) if keep]
    return sorted(front, key=lambda r: (-_value(r, names[0]), -1 if r.get("trial") is None else r["trial"]))


def write_front(
    out_dir: str | Path, front: Sequence[dict], objectives: Sequence[Objective]
) -> tuple[Path, Path]:
    """front.csv (flat) and front.json (objectives with directions, records with full schedules)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _table(front).to_csv(out / "front.csv", index=False)
    doc = {
        "objectives": [{"name": o.name, "direction": o.direction} for o in objectives],
        "front": _plain(list(front)),
    }
    (out / "front.json").write_text(json.dumps(doc, indent=2) + "\n")
    return out / "front.csv", out / "front.json"


def _y_objective(objectives: Sequence[Objective]) -> Objective:
    for o in objectives:
        if o.name != "gmacs":
            return o
    raise ValueError(f"plot_front needs an objective besides gmacs, got {[o.name for o in objectives]}")


def _groups(records: Sequence[dict], y: str) -> dict[str, list[dict]]:
    """Plotted records by kind; each needs gmacs and y values."""
    shown = [r for r in records if _value(r, "gmacs") is not None and _value(r, y) is not None]
    ok = [r.get("state") == "COMPLETE" and bool(r.get("feasible")) for r in shown]
    return {
        "trials": [r for r, good in zip(shown, ok, strict=True) if good and not r.get("preset")],
        "bad": [r for r, good in zip(shown, ok, strict=True) if not good and not r.get("preset")],
        "presets": [r for r in shown if r.get("preset")],
    }


def _staircase(front: Sequence[dict], y: Objective) -> tuple[list[float], list[float]]:
    """Best y reachable at or under each GMACs level: the 2-D attainment line of the front."""
    pts = sorted((_value(r, "gmacs"), _value(r, y.name)) for r in front)
    ys = [v for _, v in pts]
    ys = np.maximum.accumulate(ys) if y.direction == "max" else np.minimum.accumulate(ys)
    return [x for x, _ in pts], [float(v) for v in ys]


def _hover(r: dict, objectives: Sequence[Objective]) -> str:
    names = [o.name for o in objectives] + [k for k in ("measured_speedup", "latency_ms") if _value(r, k) is not None]
    vals = "<br>".join(f"{n}: {_value(r, n):.4g}" for n in dict.fromkeys(names) if _value(r, n) is not None)
    head = f"trial {r.get('trial')}" + (f" ({r['preset']})" if r.get("preset") else "")
    return f"{head}<br>{r.get('summary', '')}<br>{vals}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _layers(records: Sequence[dict], front: Sequence[dict], y: str) -> list[tuple[list[dict], str, dict, dict]]:
    """(records, label, matplotlib kwargs, plotly marker) per layer of the front plot, bottom first."""
    g = _groups(records, y)
    failed = sum(1 for r in records if r.get("state") != "COMPLETE" and _value(r, y) is None)
    bad = "infeasible/failed" + (f" (+{failed} failed, not shown)" if failed else "")
    star = {"size": 14, "color": "gold", "symbol": "star", "line": {"width": 1}}
    return [
        (g["trials"], f"feasible trials ({len(g['trials'])})", {"s": 12, "alpha": 0.3, "color": "tab:blue"},
         {"size": 5, "color": "royalblue", "opacity": 0.35}),
        (g["bad"], bad, {"s": 18, "marker": "x", "color": "grey", "alpha": 0.6},
         {"size": 6, "color": "grey", "symbol": "x"}),
        (list(front), f"Pareto front ({len(front)})", {"s": 36, "color": "tab:red", "edgecolor": "k", "zorder": 3},
         {"size": 9, "color": "crimson", "line": {"width": 1}}),
        (g["presets"], "paper presets", {"s": 150, "marker": "*", "color": "gold", "edgecolor": "k", "zorder": 4},
         star),
    ]  # fmt: skip


def _label_presets(ax, presets: Sequence[dict], y: str, x: str = "gmacs") -> None:
    """Name each star; labels of stars close on screen are stacked instead of overprinted."""
    ax.figure.canvas.draw()  # fixes the limits, so data -> pixel is final
    placed: list[np.ndarray] = []
    for r in sorted(presets, key=lambda r: -_value(r, y)):
        px = ax.transData.transform((_value(r, x), _value(r, y)))
        near = sum(np.abs(px - q).max() < 30 for q in placed)
        placed.append(px)
        ax.annotate(r["preset"], (_value(r, x), _value(r, y)), xytext=(10, 4 - 12 * near),
                    textcoords="offset points", fontsize=8, va="center", zorder=5,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4"} if near else None)  # fmt: skip


def plot_front(
    out_dir: str | Path,
    records: Sequence[dict],
    front: Sequence[dict],
    objectives: Sequence[Objective],
    *,
    title: str,
    budget_gmacs: float | None,
    screen_front: Sequence[dict] | None = None,
) -> tuple[Path, Path]:
    """front.png (matplotlib) and front.html (plotly, self-contained): GMACs against the first
    non-GMACs objective; trials, infeasible/failed, the front, presets and the budget.

    With ``screen_front`` (the front on the screening images, off the shelf, of a run whose final
    front is confirmed on other images or fine-tuned), that front is drawn too, dashed, under the
    final one."""
    import plotly.graph_objects as go

    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y = _y_objective(objectives)
    layers = _layers(records, front, y.name)
    sx, sy = _staircase(front, y)
    budget = f"budget {budget_gmacs:g} GMACs" if budget_gmacs is not None else ""
    better = "higher" if y.direction == "max" else "lower"

    timed = [r for r in records if _value(r, "measured_speedup") is not None and _value(r, y.name) is not None]
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(15 if timed else 8, 5.5), dpi=120, squeeze=False)
    ax = axes[0][0]
    if screen_front:
        ox, oy = _staircase(screen_front, y)
        ax.step(ox, oy, where="post", color="tab:purple", lw=1.2, ls="--")
        ax.scatter([_value(r, "gmacs") for r in screen_front], [_value(r, y.name) for r in screen_front],
                   s=30, facecolors="none", edgecolors="tab:purple", label=f"screening front, off the shelf ({len(screen_front)})")
    ax.step(sx, sy, where="post", color="tab:red", lw=1.5)
    for rs, label, kw, _ in layers:
        ax.scatter([_value(r, "gmacs") for r in rs], [_value(r, y.name) for r in rs], label=label, **kw)
    _label_presets(ax, layers[-1][0], y.name)
    if budget:
        ax.axvline(budget_gmacs, ls="--", color="k", lw=1, label=budget)
    ax.set(xlabel="GMACs (lower is better)", ylabel=f"{y.name} ({better} is better)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if timed:
        _plot_measured(axes[0][1], timed, front, y)
    fig.tight_layout()
    fig.savefig(out / "front.png")
    plt.close(fig)

    pfig = go.Figure()
    pfig.add_trace(go.Scatter(x=sx, y=sy, mode="lines", line={"shape": "hv", "color": "crimson"},
                              name="front (2-D attainment)", hoverinfo="skip"))  # fmt: skip
    if screen_front:
        ox, oy = _staircase(screen_front, y)
        pfig.add_trace(go.Scatter(x=ox, y=oy, mode="lines+markers", line={"shape": "hv", "color": "purple", "dash": "dash"},
                                  name="screening front, off the shelf", hovertext=[_hover(r, objectives) for r in screen_front]))
    for rs, label, _, marker in layers:
        pfig.add_trace(go.Scatter(
            x=[_value(r, "gmacs") for r in rs], y=[_value(r, y.name) for r in rs], name=label, marker=marker,
            mode="markers+text" if marker is layers[-1][3] else "markers", text=[r.get("preset") or "" for r in rs],
            textposition="top right", hovertext=[_hover(r, objectives) for r in rs], hoverinfo="text",
        ))  # fmt: skip
    if budget:
        pfig.add_vline(x=budget_gmacs, line_dash="dash", annotation_text=budget)
    pfig.update_layout(title=title, xaxis_title="GMACs", yaxis_title=f"{y.name} ({better} is better)",
                       template="plotly_white")  # fmt: skip
    html = pfig.to_html(full_html=False, include_plotlyjs=True)
    if any(o.name == "predicted_speedup" for o in objectives) or timed:
        html += _three_d(records, front, objectives, y).to_html(full_html=False, include_plotlyjs=False)
    (out / "front.html").write_text(f"<html><head><meta charset='utf-8'><title>{title}</title></head><body>{html}"
                                    "</body></html>\n")
    return out / "front.png", out / "front.html"


def _plot_measured(ax, timed: Sequence[dict], front: Sequence[dict], y: Objective) -> None:  # type: ignore[no-untyped-def]
    """Accuracy against the measured speed-up (the re-timing: front points and presets), the min-max of
    the timed pairs as a bar, and a thin line to where the latency profile predicted each point."""
    in_front = {id(r) for r in front}
    groups = [([r for r in timed if id(r) in in_front and not r.get("preset")], "searched front",
               {"s": 36, "color": "tab:red", "edgecolor": "k", "zorder": 3}),
              ([r for r in timed if r.get("preset")], "paper presets",
               {"s": 150, "marker": "*", "color": "gold", "edgecolor": "k", "zorder": 4})]
    for r in timed:
        if _value(r, "predicted_speedup") is not None:
            ax.plot([_value(r, "predicted_speedup"), _value(r, "measured_speedup")], [_value(r, y.name)] * 2,
                    color="0.6", lw=0.8, zorder=1)
        lo, hi = _value(r, "measured_speedup_min"), _value(r, "measured_speedup_max")
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [_value(r, y.name)] * 2, color="k", lw=1.5, alpha=0.5, zorder=2)
    for rs, label, kw in groups:
        ax.scatter([_value(r, "measured_speedup") for r in rs], [_value(r, y.name) for r in rs], label=label, **kw)
    predicted = [r for r in timed if _value(r, "predicted_speedup") is not None]
    ax.scatter([_value(r, "predicted_speedup") for r in predicted], [_value(r, y.name) for r in predicted], s=14,
               facecolors="none", edgecolors="0.4", label="predicted by the latency profile")
    _label_presets(ax, groups[1][0], y.name, x="measured_speedup")
    batch = next((r.get("retime_batch") for r in timed if r.get("retime_batch")), None)
    ax.set(xlabel=f"measured speed-up over the unreduced model (batch {batch}, higher is better)",
           ylabel=f"{y.name} (higher is better)", title="accuracy against measured speed-up")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)


def _three_d(records: Sequence[dict], front: Sequence[dict], objectives: Sequence[Objective], y: Objective):  # type: ignore[no-untyped-def]
    """Plotly 3-D scatter of GMACs, speed-up (measured where re-timed, else predicted) and accuracy."""
    import plotly.graph_objects as go

    def speed(r: dict) -> float | None:
        return _value(r, "measured_speedup") if _value(r, "measured_speedup") is not None else _value(r, "predicted_speedup")

    fig = go.Figure()
    for rs, label, marker in [(r_, l_, m_) for r_, l_, _, m_ in _layers(records, front, y.name)]:
        rs = [r for r in rs if speed(r) is not None]
        fig.add_trace(go.Scatter3d(
            x=[_value(r, "gmacs") for r in rs], y=[speed(r) for r in rs], z=[_value(r, y.name) for r in rs],
            mode="markers", name=label, hovertext=[_hover(r, objectives) for r in rs], hoverinfo="text",
            marker={k: v for k, v in marker.items() if k in ("size", "color", "opacity")} | {"size": 4 if "trials" in label else 7},
        ))  # fmt: skip
    fig.update_layout(title="all three objectives: GMACs, speed-up (measured where re-timed, else predicted), "
                            f"{y.name}", template="plotly_white", height=700,
                      scene={"xaxis_title": "GMACs", "yaxis_title": "speed-up", "zaxis_title": y.name})
    return fig


def plot_hypervolume(out_dir: str | Path, histories: dict[str, list[float]]) -> tuple[Path, Path]:
    """hypervolume.png and hypervolume.csv (row per trial count from 1, column per label)."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = max((len(h) for h in histories.values()), default=0)
    series = {k: pd.Series(h, index=range(1, len(h) + 1), dtype=float) for k, h in histories.items()}
    table = pd.DataFrame(series, index=pd.RangeIndex(1, n + 1, name="trials"))
    table.to_csv(out / "hypervolume.csv")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label in table.columns:
        ax.plot(table.index, table[label], drawstyle="steps-post", label=label)
    ax.set(xlabel="trials", ylabel="hypervolume (fixed reference point)", title="Hypervolume of the feasible front")
    ax.grid(alpha=0.3)
    if len(table.columns):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hypervolume.png")
    plt.close(fig)
    return out / "hypervolume.png", out / "hypervolume.csv"


def config_name(record: dict) -> str:
    """A front point's config file name: its trial number, or for a preset outside the search space
    (no trial number) the preset's name, e.g. preset-tome_4_-1."""
    if record.get("trial") is not None:
        return f"{int(record['trial']):04d}"
    return "preset-" + "".join(c if c.isalnum() or c in ".-" else "_" for c in str(record.get("preset")))


def export_configs(out_dir: str | Path, front: Sequence[dict], *, run: dict) -> list[Path]:
    """configs/<trial>.yaml per front record with the command that fine-tunes it. Never overwrites."""
    cfg_dir = Path(out_dir) / "configs"
    paths = [cfg_dir / f"{config_name(r)}.yaml" for r in front]
    for p in paths:  # check all before writing any
        if p.exists():
            raise FileExistsError(f"refusing to overwrite {p}")
    cfg_dir.mkdir(parents=True, exist_ok=True)
    source = {k: run.get(k) for k in ("model", "checkpoint", "data", "finetune_data", "budget_gmacs", "run_dir")}
    objective_keys = ("accuracy", "agreement", "top1", "top5", "gmacs", "speedup", "images_per_s",
                      "predicted_speedup", "predicted_images_per_s")
    speed_keys = ("measured_speedup", "measured_images_per_s", "baseline_images_per_s", "retime_batch", "latency_ms",
                  "baseline_latency_ms", "latency_speedup", "latency_batch", "compiled_speedup", "compiled_images_per_s",
                  "compiled_baseline_images_per_s", "compile_seconds", "compiled_max_abs_logit_diff", "graph_breaks")
    for r, p in zip(front, paths, strict=True):
        cmd = ["python", "run_search.py", "finetune", "--config", str(p)]
        if run.get("finetune_data"):  # training images; the search's --data is the held-out screening set
            cmd += ["--data", str(run["finetune_data"])]
        elif run.get("data"):
            cmd += ["--data", "TRAIN_DIR"]
        doc = {
            "trial": r["trial"], "preset": r.get("preset"), "fidelity": r.get("fidelity"),
            "objectives": {k: r.get(k) for k in objective_keys if k in r},
            "screen_accuracy": r.get("screen_accuracy"), "screen_images": r.get("screen_images"),
            "confirmed_accuracy": r.get("confirmed_accuracy"),
            "measured_speed": {k: r.get(k) for k in speed_keys if r.get(k) is not None} or None,
            "source": source, "finetuned_weights": r.get("weights"), "finetune_command": shlex.join(cmd),
            "schedule": r.get("schedule"),
        }  # fmt: skip
        with open(p, "x") as f:
            yaml.safe_dump(_plain(doc), f, sort_keys=False)
    return paths


def _covers(a: dict, b: dict, objectives: Sequence[Objective]) -> bool:
    """a is at least as good as b on every objective."""
    return all((_value(a, o.name) >= _value(b, o.name)) if o.direction == "max" else (_value(a, o.name) <= _value(b, o.name))
               for o in objectives)


COST_TIE = 1e-3  # costs and speeds within 0.1 % of each other are a tie in a verdict, not a win


def _better(a: dict, b: dict, o: Objective) -> bool:
    """a is strictly better than b on `o`: any accuracy difference counts (the image split says
    whether it is chance); a cost or speed must differ by more than COST_TIE of b's (the cost model
    is no finer: a schedule that differs from a preset in one tiny merge is the preset)."""
    va, vb = _value(a, o.name), _value(b, o.name)
    if o.name == "accuracy":
        return va != vb
    return abs(va - vb) > COST_TIE * abs(vb)


def _dominates(a: dict, b: dict, objectives: Sequence[Objective]) -> bool:
    """a covers b and is strictly better on at least one objective (costs beyond a tie)."""
    return _covers(a, b, objectives) and any(_better(a, b, o) for o in objectives)


def _unreduced_line(unreduced: dict, confirmed: bool) -> tuple[str, float | None]:
    """The unreduced model's line under the table, and its accuracy on the images the table's
    accuracy column is on (the confirmation images when the records were confirmed)."""
    ceiling = unreduced.get("confirmed_accuracy") if confirmed else unreduced.get("screen_accuracy")
    screen = unreduced.get("screen_accuracy") if confirmed else None
    text = "unreduced model (the reference, not a preset):"
    text += "" if ceiling is None else f" accuracy {ceiling:.4g},"
    text += "" if screen is None else f" screen {screen:.4g},"
    return f"{text} gmacs {unreduced['gmacs']:.4g}", ceiling


def preset_verdicts(front: Sequence[dict], presets: Sequence[dict], objectives: Sequence[Objective],
                    searched: Sequence[dict] = (), *, ceiling: float | None = None) -> list[tuple[dict, str]]:
    """For every preset, the searched schedules that dominate it (or match it), or "not beaten" with
    the searched point that came nearest.

    ``searched``: every searched point the verdict may use (default: the searched points of the front).
    ``ceiling``: the unreduced model's accuracy on the same images; a preset not beaten that scores
    at least that much is said to (its lead over the search is then the images' luck, not a schedule's).
    """
    pool = sorted((r for r in (searched or front) if not r.get("preset") and r.get("feasible")
                   and all(_value(r, o.name) is not None for o in objectives)),
                  key=lambda r: (r.get("trial") is None, r.get("trial") or 0))  # by trial: the same text every run
    verdicts = []
    for p in presets:
        if any(_value(p, o.name) is None for o in objectives):
            verdicts.append((p, "missing objective values, not compared"))
            continue
        beaters = [r for r in pool if _dominates(r, p, objectives)]
        same = [str(r.get("trial")) for r in pool if _covers(r, p, objectives) and r not in beaters]
        if beaters:
            dom = ", ".join(str(r.get("trial")) for r in beaters)
            verdicts.append((p, f"dominated by search trial(s) {dom}" + _margin(p, beaters, objectives)))
        elif same:
            verdicts.append((p, f"matched (not beaten) by search trial(s) {', '.join(same)}" + _at_ceiling(p, ceiling)))
        else:
            verdicts.append((p, "not beaten" + _closest(p, pool, objectives) + _at_ceiling(p, ceiling)))
    return verdicts


def _at_ceiling(preset: dict, ceiling: float | None) -> str:
    """A note when a preset scores at least what the unreduced model scores on the same images."""
    accuracy = _value(preset, "accuracy")
    if ceiling is None or accuracy is None or accuracy < ceiling:
        return ""
    return f"; it scores at least what the unreduced model scores on these images ({ceiling:.4g})"


def _margin(preset: dict, beaters: Sequence[dict], objectives: Sequence[Objective]) -> str:
    """By how much a preset is beaten: the most accurate of the searched points that dominate it
    (the cheapest among equals), its accuracy and GMACs against the preset's and, when both were
    confirmed on the same images, the split of the images only one of them gets right (a large
    McNemar p: the accuracy difference may be chance); "" when accuracy is not compared."""
    names = [o.name for o in objectives]
    if "accuracy" not in names or not beaters:
        return ""
    cost = (lambda r: _value(r, "gmacs")) if "gmacs" in names else (lambda r: 0.0)
    best = max(beaters, key=lambda r: (_value(r, "accuracy"), -cost(r)))
    text = (f"most accurate: trial {best.get('trial')}, accuracy {_value(best, 'accuracy'):.4g} "
            f"against {_value(preset, 'accuracy'):.4g}")
    if "gmacs" in names and _value(preset, "gmacs") > 0:
        text += f" at {100 * (1 - _value(best, 'gmacs') / _value(preset, 'gmacs')):.3g} % fewer GMACs"
    pair = paired.compare(preset, best)
    if pair is not None:
        text += f"; right on {pair[0]} images it misses, it on {pair[1]}: McNemar p={pair[2]:.2g}"
    return f" ({text})"


def _closest(preset: dict, pool: Sequence[dict], objectives: Sequence[Objective]) -> str:
    """How near the search came to a preset it does not beat: the searched point with the best
    accuracy among those at least as good on every other objective (no more GMACs, ...) and, when
    both were confirmed on the same images, on how many images the preset is right where that
    point is wrong and the reverse, with the exact McNemar p-value of the split (a large p: the
    difference may be chance); "" when accuracy is not compared."""
    if "accuracy" not in [o.name for o in objectives]:
        return ""
    others = [o for o in objectives if o.name != "accuracy"]
    near = [r for r in pool if _covers(r, preset, others)]
    if not near:
        return f" (no searched schedule at no more cost: {', '.join(o.name for o in others)})"
    best = max(near, key=lambda r: _value(r, "accuracy"))
    text = (f"best searched at no more cost: trial {best.get('trial')}, accuracy {_value(best, 'accuracy'):.4g} "
            f"against {_value(preset, 'accuracy'):.4g}")
    pair = paired.compare(preset, best)
    if pair is not None:
        text += f"; right on {pair[0]} images it misses, it on {pair[1]}: McNemar p={pair[2]:.2g}"
    return f" ({text})"


def front_table(front: Sequence[dict], presets: Sequence[dict], objectives: Sequence[Objective],
                searched: Sequence[dict] = (), *, verdict_on: Sequence[Objective] | None = None,
                unreduced: dict | None = None) -> str:
    """Fixed-width table of the front beside every preset, with a verdict per preset (on the
    objectives ``verdict_on``, default all).

    ``unreduced`` (search.outcome.unreduced_reference: ``gmacs``, ``screen_accuracy``,
    ``confirmed_accuracy``): the unreduced model's line under the table, and the ceiling of the verdicts.

    When the records were confirmed on disjoint images, ``accuracy`` is the confirmed accuracy and a
    ``screen`` column shows the screening accuracy beside it (marked "s" where the screening
    stopped early). When they were re-timed, the measured
    speed-up and images/s, the predicted images/s and the latency at the latency batch follow, and
    with --compile the compiled speed-up.
    """
    confirmed = any(r.get("screen_accuracy") is not None for r in [*front, *presets])
    timed = any(r.get("measured_speedup") is not None for r in [*front, *presets])
    speed = [*(SPEED_COLUMNS if timed else ()),
             *(COMPILED_COLUMNS if any(r.get("compiled_speedup") is not None for r in [*front, *presets]) else ())]
    extra = f"{'screen':>9}" if confirmed else ""
    extra += "".join(f"{name:>11}" for name, _, _ in speed)
    width = [max(13, len(o.name) + 1) for o in objectives]
    head = f"{'id':>6}  {'kind':<7}" + "".join(f"{o.name:>{w}}" for o, w in zip(objectives, width, strict=True)) \
        + extra + "  summary"
    lines = [head, "-" * len(head)]
    in_front = {id(r) for r in front}
    by_cost = sorted(presets, key=lambda p: (-(_value(p, "gmacs") or 0.0), str(p.get("preset"))))
    for r in [*front, *(p for p in by_cost if id(p) not in in_front)]:
        kind = "preset" if r.get("preset") else "search"
        vals = "".join(f"{'-' if (v := _value(r, o.name)) is None else f'{v:.4g}':>{w}}"
                       for o, w in zip(objectives, width, strict=True))
        if confirmed:
            mark = "s" if r.get("screen_stopped") else ""
            vals += f"{'-' if (v := _value(r, 'screen_accuracy')) is None else f'{v:.4g}{mark}':>9}"
        vals += "".join(f"{'-' if (v := _value(r, key)) is None else fmt.format(v):>11}" for _, key, fmt in speed)
        label = f"{r.get('preset')}: {r.get('summary')}" if kind == "preset" else str(r.get("summary") or "")
        label = label if len(label) <= 60 else label[:57] + "..."
        trial = "" if r.get("trial") is None else r.get("trial")
        lines.append(f"{trial:>6}  {kind:<7}{vals}  {'* ' if kind == 'preset' else ''}{label}")
    if any(r.get("screen_stopped") for r in [*front, *presets]):
        lines.append("s: screening stopped early against a preset at no more GMACs (on its first images; "
                     "the accuracy is confirmed on all)")
    ceiling = None
    if unreduced is not None:
        line, ceiling = _unreduced_line(unreduced, confirmed)
        lines.append(line)
    verdicts = preset_verdicts(front, by_cost, verdict_on or objectives, searched, ceiling=ceiling)
    for p, note in verdicts:
        lines.append(f"preset {p.get('preset')}: {note}")
    if verdicts:
        beaten = sum(note.startswith("dominated") for _, note in verdicts)
        on = "" if verdict_on is None else " on " + " vs ".join(o.name for o in verdict_on)
        lines.append(f"the search dominates {beaten} of {len(verdicts)} presets{on} (most GMACs first above)")
    return "\n".join(lines)
