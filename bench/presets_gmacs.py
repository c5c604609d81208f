"""The papers' schedules priced by the cost model, beside the GMACs the papers print.

    python bench/presets_gmacs.py [--model deit_small_patch16_224] [--markdown]

Two conventions: "runs" counts what our forward computes (fvcore's convention: LayerNorm at
5 MACs per element and the reducers' own matmuls included); "paper" counts the model's
matrix products only, as the papers do (IdleViT's paper also counts its ranking keys, so its
rows use "paper + ranking").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.models import model_spec  # noqa: E402
from spaces import from_preset, gmacs  # noqa: E402
from spaces.presets import diffrate_presets  # noqa: E402

# REFERENCE.md, DeiT-S
PAPER = {
    "tome:8": 3.4, "tome:13": 2.7, "tome:16": 2.3,
    "evit:0.9": 4.0, "evit:0.8": 3.5, "evit:0.7": 3.0, "evit:0.6": 2.6, "evit:0.5": 2.3,
    "ppt": 2.94,
    "idlevit:0.9": 4.0, "idlevit:0.8": 3.5, "idlevit:0.7": 3.1, "idlevit:0.6": 2.7, "idlevit:0.5": 2.4,
    "idlevit:0.4": 2.1, "idlevit:0.3": 1.9,
    "idlevit-code:0.7": 3.24,
    # DiffRate's compression_rate.json levels; its own formula gives 2.327, 2.505, 2.709, 2.905, 3.108
    "diffrate:2.3": 2.3, "diffrate:2.5": 2.5, "diffrate:2.7": 2.7, "diffrate:2.9": 2.9, "diffrate:3.1": 3.1,
}


def rows(model: str) -> list[tuple[str, float | None, float, float, float]]:
    spec = model_spec(model)
    out = []
    for preset in ["none", *PAPER, "tome:13,-1", "tcvit:0.7", "tcvit:0.5"]:
        if preset.startswith("diffrate") and preset not in diffrate_presets(spec.name):
            continue  # published for DeiT-S only
        s = from_preset(preset, spec)
        idle = preset.startswith("idlevit")
        paper_conv = gmacs(s, norms=False, overhead=idle)
        paper = PAPER.get(preset, 4.6 if preset == "none" else None)
        out.append((preset, paper, gmacs(s), paper_conv, (paper_conv - paper) if paper is not None else float("nan")))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    table = rows(args.model)
    if args.markdown:
        print("| preset | paper | ours (runs) | ours (paper convention) | difference |")
        print("|---|---|---|---|---|")
        for preset, paper, runs, conv, diff in table:
            paper_txt = "" if paper is None else f"{paper:.2f}"
            diff_txt = "" if paper is None else f"{diff:+.3f}"
            print(f"| `{preset}` | {paper_txt} | {runs:.3f} | {conv:.3f} | {diff_txt} |")
        return 0
    print(f"{'preset':18s} {'paper':>6s} {'runs':>7s} {'paper-conv':>10s} {'diff':>7s}")
    for preset, paper, runs, conv, diff in table:
        paper_txt = "" if paper is None else f"{paper:.2f}"
        print(f"{preset:18s} {paper_txt:>6s} {runs:7.3f} {conv:10.3f} {diff:+7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
