"""The papers' official implementations, imported from a local checkout and run on a timm model's weights.

Used by ``bench/official_parity.py``. Nothing here is copied from the official repositories: every
builder imports the official module from ``<official-src>/<folder>`` at run time and runs its code
paths unchanged, on the same weights as the timm model (the official patch function applied to a
deep copy of it, or the official model class built with the same architecture and loaded with its
``state_dict``, strictly). The official trees were written for timm 0.4-0.6; the only shims are
for imports and attribute names (see ``_official_modules`` and ``diffrate``), never for the math.

Where the official code has no setting for a model (PPT's ``r`` and threshold on 64 patches), the
preset's own value is used and the settings text says so.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import json
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = ["FOLDERS", "Official", "build_official", "diffrate_published", "disabled_official"]

# preset family -> (folder under --official-src, repository)
FOLDERS: dict[str, tuple[str, str]] = {
    "tome": ("ToMe", "facebookresearch/ToMe"),
    "evit": ("evit", "youweiliang/evit"),
    "ppt": ("PPT", "xjwu1024/PPT"),
    "idlevit": ("IdleViT", "Ackesnal/IdleViT"),
    "diffrate": ("DiffRate", "OpenGVLab/DiffRate"),
}
FAMILY_OF = {"tome": "tome", "evit": "evit", "ppt": "ppt", "idlevit": "idlevit", "idlevit-code": "idlevit",
             "diffrate": "diffrate"}
EVIT_DROP_LOC = (3, 6, 9)  # evit/main.py --drop_loc default
PPT_DEIT = {"r": 50, "threshold": 7e-5, "pp_loc_list": [3, 6, 9]}  # PPT README / eval.sh, DeiT-S
IDLEVIT_LAYOUTS = {  # the two layouts of the official repository for 12-block DeiTs
    "idlevit": ("infer.py", list(range(3, 12))),  # blocks 3-11, stages of 3/3/3
    "idlevit-code": ("main.py", list(range(4, 12))),  # blocks 4-11, stages of 3/3/2 (9 ratios, last unused)
}
DIFFRATE_KEYS = {"deit_small_patch16_224": "ViT-S-DeiT", "deit_tiny_patch16_224": "ViT-T-DeiT",
                 "deit_base_patch16_224": "ViT-B-DeiT"}  # timm name -> compression_rate.json key
DIFFRATE_GRANULARITY = 4  # DiffRate/main.py --granularity default (only shapes the search candidates)


@dataclass(frozen=True)
class Official:
    """An official model ready to run: ``forward(images [B, 3, H, W]) -> logits [B, classes]``."""

    forward: Callable[[Tensor], Tensor]
    settings: str  # the official arguments, in words


# ---------------------------------------------------------------------------------------------
# Importing an official tree
# ---------------------------------------------------------------------------------------------

def _top_level_names(root: Path) -> set[str]:
    """Module and package names an official tree defines at its top level (utils, tome, merge, ...)."""
    names = {p.stem for p in root.glob("*.py")}
    return names | {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}


@contextlib.contextmanager
def _no_timm_registration() -> Iterator[None]:
    """Shim: evit.py registers ``deit_small_patch16_224`` etc. with ``@register_model``; timm 1.x
    would overwrite its own entries with them. The official classes are built directly here, so the
    decorator is made a no-op while the official module is imported."""
    mods = [importlib.import_module(m) for m in ("timm.models", "timm.models._registry")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mods.append(importlib.import_module("timm.models.registry"))  # the deprecated path evit.py uses
    saved = [(m, m.register_model) for m in mods if hasattr(m, "register_model")]
    for m, _ in saved:
        m.register_model = lambda fn: fn
    try:
        yield
    finally:
        for m, fn in saved:
            m.register_model = fn


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # a parent package is missing
        return True


@contextlib.contextmanager
def _official_modules(root: Path, stub_missing: tuple[str, ...] = (),
                      aliases: dict[str, str] | None = None) -> Iterator[None]:
    """Import from ``root`` as the official scripts do (their folder first on sys.path).

    The trees share top-level names (each has a ``utils``; ToMe's package and PPT's file are both
    ``tome``), so clashing entries of ``sys.modules`` are set aside during the import and restored
    afterwards; the imported modules keep their own globals. ``stub_missing``: optional modules an
    official file imports at the top but the compared code never calls (evit/helpers.py imports
    ``torchprofile`` for its FLOP counter); an empty stand-in is used when they are not installed.
    ``aliases``: old timm module paths an official file imports -> where timm 1.x has that module
    (used only where the path is gone from timm 1.x, e.g. ``timm.models.layers.helpers``).
    """
    names = _top_level_names(root)
    clash = lambda mod: mod.split(".")[0] in names  # noqa: E731
    saved_modules = {k: sys.modules.pop(k) for k in list(sys.modules) if clash(k)}
    saved_path = list(sys.path)
    stubs = [m for m in stub_missing if _missing(m)]
    for m in stubs:
        sys.modules[m] = types.ModuleType(m)
        sys.modules[m].profile_macs = None  # type: ignore[attr-defined]
    old_paths = [old for old in (aliases or {}) if _missing(old)]
    for old in old_paths:
        sys.modules[old] = importlib.import_module(aliases[old])
    sys.path.insert(0, str(root))
    try:
        with _no_timm_registration(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths
            yield
    finally:
        sys.path[:] = saved_path
        for k in [k for k in sys.modules if clash(k)] + stubs + old_paths:
            sys.modules.pop(k, None)
        sys.modules.update(saved_modules)


def _import(src: Path, family: str, module: str, stub_missing: tuple[str, ...] = (),
            aliases: dict[str, str] | None = None) -> types.ModuleType:
    with _official_modules(src / FOLDERS[family][0], stub_missing, aliases):
        return importlib.import_module(module)


# ---------------------------------------------------------------------------------------------
# One builder per official repository
# ---------------------------------------------------------------------------------------------

def _arch(model: nn.Module) -> dict[str, Any]:
    """The constructor arguments of the official DeiT-style classes for this timm ViT."""
    blk = model.blocks[0]
    return dict(img_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
                embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=blk.attn.num_heads,
                mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
                num_classes=model.num_classes)


def _load_same_weights(official: nn.Module, model: nn.Module) -> nn.Module:
    official.load_state_dict(model.state_dict(), strict=True)  # same keys: timm's extras hold no weights
    return official.eval()


def tome(src: Path, model: nn.Module, r: int | tuple[int, float]) -> Official:
    """tome.patch.timm on a copy; ``model.r`` as in ToMe's README (an int, or ``(r, inflect)``)."""
    tome_pkg = _import(src, "tome", "tome")
    official = copy.deepcopy(model)
    tome_pkg.patch.timm(official)  # trace_source=False, prop_attn=True: the off-the-shelf setting
    official.r = r
    return Official(official, f"tome.patch.timm, r={r}")


def evit(src: Path, model: nn.Module, keep: float) -> Official:
    """evit.EViT with keep_rate ``keep`` at blocks 3, 6, 9 and fuse_token=True."""
    evit_mod = _import(src, "evit", "evit", stub_missing=("torchprofile",))
    arch = _arch(model)
    keep_rate = [1.0] * arch["depth"]
    for i in EVIT_DROP_LOC:
        keep_rate[i] = keep
    official = evit_mod.EViT(**arch, keep_rate=tuple(keep_rate), fuse_token=True)
    return Official(_load_same_weights(official, model), f"EViT keep_rate={keep} @{EVIT_DROP_LOC} fuse_token")


def ppt(src: Path, model: nn.Module, *, r: int, threshold: float, locs: list[int], note: str = "") -> Official:
    """ppt_deit.apply_patch on a copy, as PPT's main.py: prop_attn=True, then ``model.r = r_tokens``."""
    ppt_deit = _import(src, "ppt", "ppt_deit")
    official = copy.deepcopy(model)
    ppt_deit.apply_patch(official, trace_source=False, prop_attn=True, pp_loc_list=locs, threshold=threshold)
    official.r = r
    return Official(official, f"ppt_deit r_tokens={r} threshold={threshold:.3g} @{tuple(locs)}{note}")


def idlevit(src: Path, model: nn.Module, base_rate: float, layout: str) -> Official:
    """vit.IdleVisionTransformer as infer.py / main.py build it; eval mode runs its ``test=True`` path."""
    vit = _import(src, "idlevit", "vit")
    script, idle_layers = IDLEVIT_LAYOUTS[layout]
    keep_ratios = [base_rate ** (i + 1) for i in range(3) for _ in range(3)]  # as both scripts compute them
    with contextlib.redirect_stdout(io.StringIO()):  # the constructor prints a banner
        official = vit.IdleVisionTransformer(**_arch(model), idle_layers=idle_layers, keep_ratios=keep_ratios)
    span = f"{idle_layers[0]}-{idle_layers[-1]}"
    return Official(_load_same_weights(official, model),
                    f"IdleVisionTransformer base_rate={base_rate}, idle blocks {span} ({script} layout)")


def diffrate_published(src: Path, model_name: str) -> dict[str, dict[str, list[int]]]:
    """compression_rate.json for this timm model: ``{"2.9": {"prune": [...], "merge": [...]}}``."""
    key = DIFFRATE_KEYS.get(model_name)
    table = json.loads((src / FOLDERS["diffrate"][0] / "compression_rate.json").read_text())
    if key is None or key not in table:
        return {}
    # The json stores the lists as strings; main.py reads them with eval(): parse them as JSON instead.
    return {g: {"prune": json.loads(v["prune_kept_num"]), "merge": json.loads(v["merge_kept_num"])}
            for g, v in table[key].items()}


def _timm1_block_attrs(block_cls: type) -> None:
    """Shim: DiffRateBlock calls ``self.drop_path`` (timm <= 0.6); timm 1.x blocks have ``drop_path1``
    and ``drop_path2`` instead (identities in eval mode and at drop_path_rate 0 alike)."""
    if not hasattr(block_cls, "drop_path"):
        block_cls.drop_path = property(lambda self: self.drop_path1)


def diffrate(src: Path, model: nn.Module, prune: list[int], merge: list[int], label: str) -> Official:
    """DiffRate.patch.deit on a copy, then ``set_kept_num`` as main.py --load_compression_rate does."""
    # DiffRate/__init__ imports its CAFormer patch too, whose caformer.py imports a timm 0.6 path.
    pkg = _import(src, "diffrate", "DiffRate", aliases={"timm.models.layers.helpers": "timm.layers.helpers"})
    _timm1_block_attrs(pkg.patch.deit.__globals__["DiffRateBlock"])
    official = copy.deepcopy(model)
    pkg.patch.deit(official, prune_granularity=DIFFRATE_GRANULARITY, merge_granularity=DIFFRATE_GRANULARITY)
    official.set_kept_num(prune, merge)
    official.eval()
    return Official(lambda x: official(x)[0], f"DiffRate.patch.deit + set_kept_num({label})")


# ---------------------------------------------------------------------------------------------
# Preset -> official model
# ---------------------------------------------------------------------------------------------

def _ppt_setting(arg: str, model: nn.Module, schedule: Any) -> tuple[int, float, list[int], str]:
    """PPT's official arguments: its README's on DeiT-S (196 patches); elsewhere the preset's own,
    since the official code has no rule for other token counts."""
    if model.patch_embed.num_patches == 196:
        return int(arg) if arg else PPT_DEIT["r"], PPT_DEIT["threshold"], PPT_DEIT["pp_loc_list"], ""
    plans = [(i, p) for i, p in enumerate(schedule.layers) if p.method == "adaptive"] if schedule else []
    if not plans:
        raise ValueError("PPT has no official setting for this model and our preset gave none to copy")
    r, threshold = plans[0][1].r, getattr(plans[0][1], "threshold", PPT_DEIT["threshold"])
    return r, threshold, [i for i, _ in plans], " (r, threshold from our preset: no official rule)"


def build_official(src: Path, preset: str, model: nn.Module, model_name: str, schedule: Any = None) -> Official:
    """The official implementation of ``preset`` on ``model``'s weights.

    ``schedule`` (our Schedule for the preset, or None) is read only where the official code has no
    setting of its own: PPT on models other than DeiT-S.
    """
    family, _, arg = preset.partition(":")
    if family == "tome":
        parts = arg.split(",")
        r = int(parts[0]) if len(parts) == 1 else (int(parts[0]), float(parts[1]))
        return tome(src, model, r)
    if family == "evit":
        return evit(src, model, float(arg))
    if family == "ppt":
        r, threshold, locs, note = _ppt_setting(arg, model, schedule)
        return ppt(src, model, r=r, threshold=threshold, locs=locs, note=note)
    if family in IDLEVIT_LAYOUTS:
        return idlevit(src, model, float(arg), family)
    if family == "diffrate":
        published = diffrate_published(src, model_name)
        if arg not in published:
            have = ", ".join(sorted(published)) or "none"
            raise LookupError(f"compression_rate.json has no {arg!r} schedule for {model_name} (published: {have})")
        return diffrate(src, model, published[arg]["prune"], published[arg]["merge"], f"{model_name} {arg}G")
    raise ValueError(f"no official implementation for preset {preset!r}")


def disabled_official(src: Path, family: str, model: nn.Module) -> Official:
    """The official model of ``family`` with its reduction switched off: it must equal plain timm."""
    if family == "tome":
        return tome(src, model, 0)
    if family == "evit":
        return evit(src, model, 1.0)
    if family == "ppt":
        return ppt(src, model, r=0, threshold=PPT_DEIT["threshold"], locs=PPT_DEIT["pp_loc_list"])
    if family == "idlevit":
        return idlevit(src, model, 1.0, "idlevit")
    if family == "diffrate":
        full = [model.patch_embed.num_patches + 1] * len(model.blocks)
        return diffrate(src, model, full, full, "all tokens kept")
    raise ValueError(f"unknown family {family!r}")

