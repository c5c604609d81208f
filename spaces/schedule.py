"""Schedules: which reduction runs in each block, as frozen, validated, serialisable data.

Counting rule (one rule for every method, so GMACs are deterministic): with n patch tokens
entering a block and a keep ratio k, the block keeps ``ceil(k * n)`` of them (at least 1).
Bipartite methods (merge, adaptive) remove at most ``n // 2``; they may instead be given
an absolute ``r`` (ToMe, PPT). See `patch_tokens_after` for the whole table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from spaces.model_spec import ModelSpec

SCHEMA_VERSION = 2  # 2: prune's fuse_weights and idle's rank (schema 1 files load as what they computed)
METHODS = ("none", "prune", "merge", "idle", "condense", "adaptive", "diffrate")
CLS_METHODS = ("prune", "idle", "condense", "adaptive", "diffrate")  # rank tokens by the class token's attention
AFTER_ATTENTION = ("prune", "merge", "condense", "adaptive", "diffrate")  # reduce between attention and MLP
WEIGHTINGS = ("size", "size_relevance")
FUSE_WEIGHTS = ("raw", "normalized")  # prune: EViT's raw CLS-attention-weighted sum, or our normalised one
IDLE_RANKS = ("logits", "softmax")  # idle: IdleViT's raw q_cls k logits and int(k n), or our softmax and ceil
# PPT's variance threshold between pruning and pooling; see reducers/adaptive.py for its source.
DEFAULT_PPT_THRESHOLD = 7e-5
PPT_THRESHOLD_PATCHES = 196  # the patch count that threshold was set for (DeiT-S at 224 px)


def ppt_threshold(num_patches: int, base: float = DEFAULT_PPT_THRESHOLD) -> float:
    """PPT's threshold for a model with `num_patches` patch tokens (the official code has no rule).

    The significance scores are normalised to sum to 1 over n tokens, so their mean is 1/n and,
    for the same relative spread (coefficient of variation), their variance scales as 1/n^2.
    Scaling the threshold by (196 / n)^2 aims at the same share of images on each path; at
    n = 196 it is the official 7e-5 exactly.
    """
    if num_patches == PPT_THRESHOLD_PATCHES:
        return base
    return base * (PPT_THRESHOLD_PATCHES / num_patches) ** 2
_EPS = 1e-9  # guards ceil() against 0.7 * 140 = 98.00000000000001


def kept_count(n: int, keep: float) -> int:
    """Patch tokens kept out of `n` at keep ratio `keep`: ceil(keep * n), clamped to [1, n]."""
    if n <= 0:
        return 0
    return max(1, min(n, math.ceil(keep * n - _EPS)))


@dataclass(frozen=True)
class LayerPlan:
    """What one block does. Only the fields its method uses matter (see the table in DESIGN.md).

    keep:      fraction of the incoming patch tokens kept (idle: fraction active), in (0, 1].
    r:         merge/adaptive only: remove exactly r tokens instead of using `keep` (ToMe, PPT).
    fuse:      prune only: fuse the removed tokens into one extra token (EViT).
    fuse_weights: prune only: "raw" weights the removed tokens by their CLS attention as EViT's
               code does; "normalized" (our variant) makes them sum to 1 over the removed set.
    rank:      idle only: "logits" ranks by the head-mean of the raw CLS-query logits q_cls k and
               keeps int(k n) active, as IdleViT's code does; "softmax" (our variant) ranks by the
               head-mean CLS attention and keeps ceil(k n).
    order:     condense only: connectivity order K (paths of length 1..K).
    alpha:     condense only: weight of connectivity against CLS dominance.
    weighting: condense only: fusion weights, "size" or "size_relevance".
    threshold: adaptive only: variance of significance at or above which an image prunes.
    merge_keep: diffrate only: fraction of the pruned block's patch tokens kept by its merge
               (`keep` is the fraction the prune keeps).
    kept:      diffrate only: absolute patch-token counts (after the prune, after the merge;
               the class token not counted) instead of keep and merge_keep, as DiffRate's
               published schedules give them. Counts above what enters the block keep all.
    """

    method: str = "none"
    keep: float = 1.0
    r: int | None = None
    fuse: bool = True
    fuse_weights: str = "raw"
    rank: str = "logits"
    order: int = 2
    alpha: float = 0.5
    weighting: str = "size_relevance"
    threshold: float = DEFAULT_PPT_THRESHOLD
    merge_keep: float = 1.0
    kept: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep!r} ({self.method})")
        if self.r is not None:
            if self.method not in ("merge", "adaptive"):
                raise ValueError(f"r is only for merge and adaptive, not {self.method!r}")
            if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
                raise ValueError(f"r must be a non-negative integer, got {self.r!r}")
        if isinstance(self.merge_keep, bool) or not isinstance(self.merge_keep, (int, float)) \
                or not 0.0 < self.merge_keep <= 1.0:
            raise ValueError(f"merge_keep must be in (0, 1], got {self.merge_keep!r}")
        if self.kept is not None:
            if self.method != "diffrate":
                raise ValueError(f"kept is only for diffrate, not {self.method!r}")
            kept = tuple(self.kept) if isinstance(self.kept, (list, tuple)) else None
            if kept is None or len(kept) != 2 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1
                                                         for c in kept):
                raise ValueError(f"kept must be two positive integers [after prune, after merge], got {self.kept!r}")
            object.__setattr__(self, "kept", kept)
        if not isinstance(self.order, int) or not 1 <= self.order <= 8:
            raise ValueError(f"order must be an integer in [1, 8], got {self.order!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.fuse_weights not in FUSE_WEIGHTS:
            raise ValueError(f"unknown fuse_weights {self.fuse_weights!r}; valid: {', '.join(FUSE_WEIGHTS)}")
        if self.rank not in IDLE_RANKS:
            raise ValueError(f"unknown rank {self.rank!r}; valid: {', '.join(IDLE_RANKS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        if not self.threshold >= 0.0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")

    def to_dict(self) -> dict[str, Any]:
        """Only the fields this method reads, so files stay short and readable."""
        used = {"none": (), "prune": ("keep", "fuse", "fuse_weights"), "merge": ("keep", "r"), "idle": ("keep", "rank"),
                "condense": ("keep", "order", "alpha", "weighting"), "adaptive": ("keep", "r", "threshold"),
                "diffrate": ("keep", "merge_keep", "kept")}
        out: dict[str, Any] = {"method": self.method}
        for name in used[self.method]:
            if (name == "keep" and self.r is not None) or (name == "r" and self.r is None):
                continue  # an absolute r replaces the keep ratio
            if name == "fuse_weights" and not self.fuse:
                continue
            if self.method == "diffrate" and (name == "kept") == (self.kept is None):
                continue  # absolute counts replace the two ratios
            if name == "kept":
                out[name] = list(self.kept)
                continue
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerPlan:
        if not isinstance(data, dict):
            raise ValueError(f"a layer plan must be a mapping, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"layer plan: unknown keys {unknown}; valid: {sorted(known)}")
        return cls(**data)

    def patch_tokens_after(self, n: int) -> int:
        """Patch tokens leaving the block when `n` enter it (idle blocks keep all of them)."""
        if self.method in ("none", "idle"):
            return n
        if self.method in ("merge", "adaptive"):
            return n - self.removed(n)
        if self.method == "diffrate":
            return self.diffrate_counts(n)[1]
        kept = kept_count(n, self.keep)
        if self.method == "prune":
            return kept + (1 if self.fuse and kept < n else 0)
        return kept  # condense

    def removed(self, n: int) -> int:
        """Tokens removed by a bipartite method (merge, adaptive): capped at n // 2."""
        wanted = self.r if self.r is not None else n - kept_count(n, self.keep)
        return min(wanted, n // 2)

    def diffrate_counts(self, n: int) -> tuple[int, int]:
        """Diffrate only: patch tokens left after the prune and after the merge, `n` entering."""
        if self.kept is not None:
            pruned = max(1, min(n, self.kept[0]))
            return pruned, max(1, min(pruned, self.kept[1]))
        pruned = kept_count(n, self.keep)
        return pruned, kept_count(pruned, self.merge_keep)

    def active(self, n: int) -> int:
        """Idle only: patch tokens that run the block.

        rank "logits" (IdleViT's code): int(k * n), at least 1; "softmax": ceil(k * n).
        """
        if self.rank == "logits":
            return max(1, min(n, int(self.keep * n)))  # the official int(), no guard
        return kept_count(n, self.keep)

    def is_identity(self, n: int) -> bool:
        """True when this plan changes nothing for `n` incoming patch tokens."""
        if self.method == "idle":
            return self.active(n) == n
        if self.method == "prune":
            return kept_count(n, self.keep) == n
        return self.patch_tokens_after(n) == n

    def short(self) -> str:
        if self.method == "none":
            return "-"
        if self.method == "diffrate":
            amount = f"{self.kept[0]},{self.kept[1]}" if self.kept else f"{self.keep:.2f},{self.merge_keep:.2f}"
            return f"{self.method}:{amount}"
        amount = f"r{self.r}" if self.r is not None else f"{self.keep:.2f}"
        return f"{self.method}:{amount}"


def _upgrade_layer(data: Any, version: int) -> Any:
    """A schema-1 layer plan as schema 2: the rules schema 1 computed become explicit options.

    Schema 1 fused pruned tokens with normalised weights and ranked idle tokens by softmax
    attention with ceil(k n) active; schema 2 defaults to the official rules. (Schema 1's merge
    alternated A/B over the patch tokens only; that rule is not kept, merges load as ToMe's.)
    """
    if version != 1 or not isinstance(data, dict):
        return data
    if data.get("method") == "prune" and data.get("fuse", True):
        return {"fuse_weights": "normalized", **data}
    if data.get("method") == "idle":
        return {"rank": "softmax", **data}
    return data


@dataclass(frozen=True)
class Schedule:
    """One LayerPlan per block of the model it was made for."""

    model: ModelSpec
    layers: tuple[LayerPlan, ...]
    prop_attn: bool = True  # proportional attention (log size as an additive bias) once tokens carry size
    name: str = "custom"
    schema_version: int = field(default=SCHEMA_VERSION, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(self.layers) != self.model.depth:
            raise ValueError(
                f"schedule has {len(self.layers)} layer plans but model {self.model.name} has depth {self.model.depth}"
            )
        if not all(isinstance(p, LayerPlan) for p in self.layers):
            raise ValueError("schedule layers must be LayerPlan objects")

    @classmethod
    def empty(cls, model: ModelSpec) -> Schedule:
        return cls(model=model, layers=(LayerPlan(),) * model.depth, name="none")

    @property
    def is_identity(self) -> bool:
        return all(p.method == "none" for p in self.layers)

    def patch_tokens_entering(self) -> list[int]:
        """Patch tokens entering each block, then the count leaving the last one."""
        counts = [self.model.num_patches]
        for plan in self.layers:
            counts.append(plan.patch_tokens_after(counts[-1]))
        return counts

    def first_reducing_block(self) -> int:
        """The first block whose plan changes the tokens (the depth when none does): every block
        before it computes what the unreduced model computes."""
        counts = self.patch_tokens_entering()
        return next((i for i, plan in enumerate(self.layers) if not plan.is_identity(counts[i])), self.model.depth)

    def tokens_entering(self) -> list[int]:
        """All tokens (prefix included) entering each block."""
        p = self.model.num_prefix_tokens
        return [n + p for n in self.patch_tokens_entering()[:-1]]

    def cls_methods(self) -> list[str]:
        """The methods of this schedule that read the class token's attention (a model without one
        cannot run them)."""
        return sorted({p.method for p in self.layers} & set(CLS_METHODS))

    def summary(self) -> str:
        return " ".join(f"{i}:{p.short()}" for i, p in enumerate(self.layers) if p.method != "none") or "none"

    def with_name(self, name: str) -> Schedule:
        return replace(self, name=name)

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "prop_attn": self.prop_attn,
            "model": self.model.to_dict(),
            "layers": [p.to_dict() for p in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Schedule:
        if not isinstance(data, dict):
            raise ValueError("a schedule must be a mapping with keys schema_version, model, layers")
        version = data.get("schema_version")
        if version not in (1, SCHEMA_VERSION):
            raise ValueError(f"unsupported schedule schema_version {version!r}; this version reads 1 and {SCHEMA_VERSION}")
        unknown = sorted(set(data) - {"schema_version", "name", "prop_attn", "model", "layers"})
        if unknown:
            raise ValueError(f"schedule: unknown keys {unknown}")
        if not isinstance(data.get("model"), dict) or not isinstance(data.get("layers"), list):
            raise ValueError("schedule needs a 'model' mapping and a 'layers' list")
        return cls(
            model=ModelSpec.from_dict(data["model"]),
            layers=tuple(LayerPlan.from_dict(_upgrade_layer(p, version)) for p in data["layers"]),
            prop_attn=bool(data.get("prop_attn", True)),
            name=str(data.get("name", "custom")),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_text(cls, text: str, *, source: str = "<text>") -> Schedule:
        """Parse JSON, or else YAML (PyYAML reads JSON's 7e-05 as a string, so JSON goes first)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        try:
            data = yaml.safe_load(text) if data is None else data
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"malformed schedule file {source}: {first}") from None
        if isinstance(data, dict) and "schedule" in data and "layers" not in data:
            data = data["schedule"]  # an exported search config wraps the schedule
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"malformed schedule file {source}: {err}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        text = self.to_json() if path.suffix == ".json" else self.to_yaml()
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"schedule file not found: {path}")
        return cls.from_text(path.read_text(), source=str(path))

