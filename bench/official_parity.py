"""Every preset against its paper's official code: the same weights, the same images, the logits compared.

    python bench/official_parity.py --official-src DIR [--models deit_small_patch16_224,tokensched_vit_shapes]
                                    [--presets tome:8,tome:8,-1,evit:0.7,...] [--images N] [--seed 0]
                                    [--attention explicit|fused] [--device cpu] [--json OUT]

DIR holds one tree per official repository (never vendored here; imported from DIR at run time):
ToMe (facebookresearch/ToMe), evit (youweiliang/evit), PPT (xjwu1024/PPT), IdleViT (Ackesnal/IdleViT),
DiffRate (OpenGVLab/DiffRate), e.g. ``git --git-dir=<clone> archive HEAD | tar -x -C DIR/ToMe``.

For every model and preset: our schedule applied to a copy of the timm model (reducers.apply_schedule)
and the official implementation on the same weights (bench/official_adapters.py), both in float32,
eval mode, torch.inference_mode, on the same images: DeiT-S random-init with ``--seed`` and random-normal
images; the embedded ``tokensched_vit_shapes`` with its shipped weights and held-out images
(search.embedded.synthetic.make_split("heldout")). A row prints the max |logit difference|, top-1 agreement
(k/N) and PASS when the difference is below 1e-4 and every top-1 agrees. First, per model and family,
the official model with its reduction switched off (ToMe r=0, EViT keep 1, PPT r=0, IdleViT k=1,
DiffRate keeping all tokens) against the plain timm model: PASS below 1e-5, which shows the official
model holds the same weights and runs the same network. Optional, offline, never run in CI.

``--attention``: the backend of the plain timm model and of ours. ``explicit`` (default) is the
official code's own softmax(q k^T) path, so a difference is a difference of rule; ``fused`` runs ours
on scaled_dot_product_attention, whose float noise (about 1e-6) can flip a near-tie in a ranking or
a ToMe match and so move an image's logits by more than 1e-4 with the same rule.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

# Run as `python bench/official_parity.py`, this folder comes first on sys.path: put the repository
# root there instead (as bench/reducers.py does), and keep this folder for official_adapters.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import timm  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import search.embedded  # noqa: E402, F401  (registers tokensched_vit_shapes)
from bench import official_adapters as oa  # noqa: E402
from reducers import apply_schedule  # noqa: E402
from search.embedded.synthetic import make_split, normalize  # noqa: E402
from spaces import from_preset  # noqa: E402

TOL = 1e-4  # preset vs official (DESIGN.md: "max difference below 1e-4")
TOL_OFF = 1e-5  # official with reduction off vs plain timm
EMBEDDED = search.embedded.NAME
DEFAULT_MODELS = f"deit_small_patch16_224,{EMBEDDED}"
DIFFRATE_ALL = ",".join(f"diffrate:{g}" for g in ("2.3", "2.5", "2.7", "2.9", "3.1"))
DEFAULT_PRESETS = {
    "deit_small_patch16_224": "tome:8,tome:13,tome:8,-1,evit:0.7,evit:0.5,ppt,idlevit:0.7,idlevit-code:0.7,"
    + DIFFRATE_ALL,
    EMBEDDED: "tome:4,tome:6,tome:4,-1,evit:0.7,evit:0.5,ppt,idlevit:0.7,idlevit-code:0.7",
}
DEFAULT_IMAGES = {"deit_small_patch16_224": 16, EMBEDDED: 48}


@dataclass(frozen=True)
class Row:
    model: str
    preset: str  # "<family> off" for the reduction-off rows
    official: str  # the official settings, in words
    max_abs_diff: float | None
    top1_agree: int | None
    reduced_diff: float | None  # max |official - plain timm|: > 0 shows the reduction took effect
    images: int
    tol: float
    verdict: str  # PASS, FAIL, ERROR (one side could not run) or SKIP (no official schedule)
    note: str = ""


def split_presets(text: str) -> list[str]:
    """``tome:8,tome:8,-1,ppt`` -> ``["tome:8", "tome:8,-1", "ppt"]``: a bare number continues the
    preset before it (ToMe's ``<r>,<inflect>``)."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if re.fullmatch(r"[-+]?\d+(\.\d*)?", part) and out:
            out[-1] += f",{part}"
        elif part:
            out.append(part)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official-src", type=Path, required=True, help="folder holding ToMe/ evit/ PPT/ IdleViT/ DiffRate/")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list of timm names (default {DEFAULT_MODELS})")
    p.add_argument("--presets", help="comma list for every model; a bare number continues the preset before it "
                   "(tome:8,-1); default: every family, with r that fits each model")
    p.add_argument("--images", type=int, help="images per model (default 16 on DeiT-S, 48 on the embedded model)")
    p.add_argument("--seed", type=int, default=0, help="random init, random images, held-out split seed")
    p.add_argument("--attention", choices=("explicit", "fused"), default="explicit",
                   help="attention backend of timm and ours (default explicit, as the official code)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="write the rows and the settings to this new file")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> dict[str, list[str]]:
    """Validate the arguments; the presets to run per model. ValueError on bad input."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in models:
        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}")
    plan = {m: split_presets(args.presets or DEFAULT_PRESETS.get(m, DEFAULT_PRESETS["deit_small_patch16_224"])) for m in models}
    families = set()
    for preset in (p for presets in plan.values() for p in presets):
        family = preset.partition(":")[0]
        if family not in oa.FAMILY_OF:
            raise ValueError(f"no official implementation for preset {preset!r}; families: {', '.join(oa.FAMILY_OF)}")
        families.add(oa.FAMILY_OF[family])
    if not args.official_src.is_dir():
        raise ValueError(f"--official-src {args.official_src} is not a folder")
    for family in sorted(families):
        folder, repo = oa.FOLDERS[family]
        if not (args.official_src / folder).is_dir():
            raise ValueError(f"{args.official_src / folder} missing: put a copy of github.com/{repo} there")
    if args.images is not None and args.images < 1:
        raise ValueError(f"--images must be >= 1, got {args.images}")
    if args.json is not None and args.json.exists():
        raise ValueError(f"--json {args.json} exists; not overwriting it")
    try:
        torch.device(args.device)
    except RuntimeError as err:
        raise ValueError(f"--device {args.device!r}: {err}") from None
    return plan


def load(name: str, seed: int, n: int, fused: bool, device: torch.device) -> tuple[nn.Module, Tensor]:
    """The timm model (eval, float32, the chosen attention backend) and its images: held-out ones for
    the embedded model, else random-normal ones at the model's input size, both seeded."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=name == EMBEDDED).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    if name == EMBEDDED:
        images = normalize(make_split("heldout", n, seed=seed)[0])
    else:
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(n, 3, *model.patch_embed.img_size, generator=gen)
    return model.to(device), images.to(device)


def compare(a: Tensor, b: Tensor) -> tuple[float, int]:
    """Max |a - b| and how many rows have the same argmax."""
    return (a - b).abs().max().item(), int((a.argmax(-1) == b.argmax(-1)).sum())


def verdict(diff: float, agree: int, n: int, tol: float) -> str:
    return "PASS" if diff < tol and agree == n else "FAIL"


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:160]


def off_row(src: Path, family: str, name: str, model: nn.Module, images: Tensor, plain: Tensor) -> Row:
    """The official model with its reduction off against the plain timm model."""
    n = len(images)
    try:
        official = oa.disabled_official(src, family, model)
        diff, agree = compare(official.forward(images).float(), plain)
    except Exception as err:  # noqa: BLE001  (one family's failure must not stop the others)
        return Row(name, f"{family} off", "", None, None, None, n, TOL_OFF, "ERROR", f"official: {_why(err)}")
    return Row(name, f"{family} off", official.settings, diff, agree, diff, n, TOL_OFF,
               verdict(diff, agree, n, TOL_OFF), "compared with plain timm")


def preset_row(src: Path, preset: str, name: str, model: nn.Module, images: Tensor, plain: Tensor) -> Row:
    """Our preset against the official implementation with the same settings."""
    n = len(images)
    schedule, ours_err = None, ""
    try:
        schedule = from_preset(preset, model)
    except Exception as err:  # noqa: BLE001
        ours_err = f"ours: {_why(err)}"
    try:
        official = oa.build_official(src, preset, model, name, schedule)
    except LookupError as err:  # no published official schedule for this model
        return Row(name, preset, "", None, None, None, n, TOL, "SKIP", str(err).strip("'\""))
    except Exception as err:  # noqa: BLE001
        return Row(name, preset, "", None, None, None, n, TOL, "ERROR", f"official: {_why(err)}")
    try:
        theirs = official.forward(images).float()
    except Exception as err:  # noqa: BLE001
        return Row(name, preset, official.settings, None, None, None, n, TOL, "ERROR", f"official: {_why(err)}")
    reduced = compare(theirs, plain)[0]
    if schedule is None:
        return Row(name, preset, official.settings, None, None, reduced, n, TOL, "ERROR", ours_err)
    try:
        ours = apply_schedule(copy.deepcopy(model), schedule)(images).float()
    except Exception as err:  # noqa: BLE001
        return Row(name, preset, official.settings, None, None, reduced, n, TOL, "ERROR", f"ours: {_why(err)}")
    diff, agree = compare(ours, theirs)
    return Row(name, preset, official.settings, diff, agree, reduced, n, TOL, verdict(diff, agree, n, TOL))


def run_model(src: Path, name: str, presets: list[str], n: int, args: argparse.Namespace) -> list[Row]:
    model, images = load(name, args.seed, n, args.attention == "fused", torch.device(args.device))
    backend = "fused SDPA" if args.attention == "fused" else "explicit softmax"
    print(f"attention: timm and ours {backend}, official code explicit softmax"
          f"\nvs-plain: max |official - unreduced timm| logits (nonzero: the official reduction ran)\n{HEADER}")
    rows = []
    with torch.inference_mode():
        plain = model(images).float()
        families = dict.fromkeys(oa.FAMILY_OF[p.partition(":")[0]] for p in presets)
        for family in families:
            if family == "diffrate" and not oa.diffrate_published(src, name):
                continue  # no published schedule to run it on: its preset rows say so
            rows.append(off_row(src, family, name, model, images, plain))
            print_row(rows[-1])
        for preset in presets:
            rows.append(preset_row(src, preset, name, model, images, plain))
            print_row(rows[-1])
    return rows


HEADER = (f"{'preset':<18} {'max|dlogit|':>11} {'top-1':>7} {'tol':>6} {'result':<6} {'vs-plain':>9}"
          "  official settings / note")


def print_row(r: Row) -> None:
    diff = "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e}"
    agree = "-" if r.top1_agree is None else f"{r.top1_agree}/{r.images}"
    reduced = "-" if r.reduced_diff is None else f"{r.reduced_diff:.2e}"
    text = "; ".join(t for t in (r.official, r.note) if t)
    print(f"{r.preset:<18} {diff:>11} {agree:>7} {r.tol:>6.0e} {r.verdict:<6} {reduced:>9}  {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = check_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The official trees use APIs that timm 1.x and torch 2.x deprecate (timm.models.layers,
    # torch.cuda.amp.autocast); they still work, so their warnings would only bury the table.
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    src = args.official_src.resolve()
    print(f"torch {torch.__version__} | timm {timm.__version__} | device {device} | float32, eval, inference_mode"
          f" | seed {args.seed} | official code from {src}")
    rows: list[Row] = []
    for name, presets in plan.items():
        n = args.images or DEFAULT_IMAGES.get(name, 16)
        weights = "shipped weights, held-out images" if name == EMBEDDED else "random init, random-normal images"
        print(f"\n{name} ({weights}, {n} images)")
        rows += run_model(src, name, presets, n, args)
    counts = {v: sum(r.verdict == v for r in rows) for v in ("PASS", "FAIL", "ERROR", "SKIP")}
    print("\n" + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.json:
        meta = {"torch": torch.__version__, "timm": timm.__version__, "device": str(device), "seed": args.seed,
                "attention": args.attention,
                "dtype": "float32", "official_src": str(src), "tol": TOL, "tol_off": TOL_OFF,
                "folders": {f: list(v) for f, v in oa.FOLDERS.items()}}
        args.json.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
