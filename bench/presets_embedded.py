"""Off-the-shelf paper presets on the embedded default: top-1 and GMAC share on held-out images.

    python bench/presets_embedded.py [--num-images 2000] [--presets none,ppt,tome:4,...]

Also prints how long the unreduced model takes to evaluate the screening set (eval mode,
inference mode, batch 256, the process's default threads).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.data import embedded_set  # noqa: E402
from search.evaluate import evaluate, predict  # noqa: E402
from search.models import load_model  # noqa: E402
from spaces import ModelSpec, Schedule  # noqa: E402

PRESETS = "none,ppt,tome:4,evit:0.5,idlevit:0.5,tcvit:0.5,evit:0.4,tome:6"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--presets", default=PRESETS)
    args = p.parse_args()
    model, data = load_model(), embedded_set(args.num_images)
    spec = ModelSpec.from_model(model)
    start = time.perf_counter()
    reference = predict(model, data)
    print(f"unreduced: {len(data)} images evaluated in {time.perf_counter() - start:.1f} s")
    print("| preset | GMACs share | top-1 |\n|---|---|---|")
    for name in args.presets.split(","):
        r = evaluate(model, Schedule.from_preset(name, spec), data, reference)
        print(f"| `{name}` | {100 * r['gmacs'] / r['baseline_gmacs']:.0f} % | {100 * r['top1']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
