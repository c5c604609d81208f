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

SCHEMA_VERSION = 1
METHODS = ("none", "prune", "merge", "idle", "condense", "adaptive")
AFTER_ATTENTION = ("prune", "merge", "condense", "adaptive")  # reduce between attention and MLP
WEIGHTINGS = ("size", "size_relevance")
# PPT's variance threshold between pruning and pooling; see reducers/adaptive.py for its source.
DEFAULT_PPT_THRESHOLD = 7e-5
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
    order:     condense only: connectivity order K (paths of length 1..K).
    alpha:     condense only: weight of connectivity against CLS dominance.
    weighting: condense only: fusion weights, "size" or "size_relevance".
    threshold: adaptive only: variance of significance above which an image prunes.
    """

    method: str = "none"
    keep: float = 1.0
    r: int | None = None
    fuse: bool = True
    order: int = 2
    alpha: float = 0.5
    weighting: str = "size_relevance"
    threshold: float = DEFAULT_PPT_THRESHOLD

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
        if not isinstance(self.order, int) or not 1 <= self.order <= 8:
            raise ValueError(f"order must be an integer in [1, 8], got {self.order!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        if not self.threshold >= 0.0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")

    def to_dict(self) -> dict[str, Any]:
        """Only the fields this method reads, so files stay short and readable."""
        used = {"none": (), "prune": ("keep", "fuse"), "merge": ("keep", "r"), "idle": ("keep",),
                "condense": ("keep", "order", "alpha", "weighting"), "adaptive": ("keep", "r", "threshold")}
        out: dict[str, Any] = {"method": self.method}
        for name in used[self.method]:
            if (name == "keep" and self.r is not None) or (name == "r" and self.r is None):
                continue  # an absolute r replaces the keep ratio
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
        kept = kept_count(n, self.keep)
        if self.method == "prune":
            return kept + (1 if self.fuse and kept < n else 0)
        return kept  # condense

    def removed(self, n: int) -> int:
        """Tokens removed by a bipartite method (merge, adaptive): capped at n // 2."""
        wanted = self.r if self.r is not None else n - kept_count(n, self.keep)
        return min(wanted, n // 2)

    def active(self, n: int) -> int:
        """Idle only: patch tokens that run the block."""
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
        amount = f"r{self.r}" if self.r is not None else f"{self.keep:.2f}"
        return f"{self.method}:{amount}"


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

    @classmethod
    def from_preset(cls, name: str, model: Any) -> Schedule:
        """A paper's own schedule by name, e.g. ``tome:13``, ``evit:0.7``, ``idlevit:0.7``, ``ppt``."""
        from spaces.presets import build_preset

        spec = model if isinstance(model, ModelSpec) else ModelSpec.from_model(model)
        return build_preset(name, spec)

    @property
    def is_identity(self) -> bool:
        return all(p.method == "none" for p in self.layers)

    def patch_tokens_entering(self) -> list[int]:
        """Patch tokens entering each block, then the count leaving the last one."""
        counts = [self.model.num_patches]
        for plan in self.layers:
            counts.append(plan.patch_tokens_after(counts[-1]))
        return counts

    def tokens_entering(self) -> list[int]:
        """All tokens (prefix included) entering each block."""
        p = self.model.num_prefix_tokens
        return [n + p for n in self.patch_tokens_entering()[:-1]]

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
        if version != SCHEMA_VERSION:
            raise ValueError(f"unsupported schedule schema_version {version!r}; this version reads {SCHEMA_VERSION}")
        unknown = sorted(set(data) - {"schema_version", "name", "prop_attn", "model", "layers"})
        if unknown:
            raise ValueError(f"schedule: unknown keys {unknown}")
        if not isinstance(data.get("model"), dict) or not isinstance(data.get("layers"), list):
            raise ValueError("schedule needs a 'model' mapping and a 'layers' list")
        return cls(
            model=ModelSpec.from_dict(data["model"]),
            layers=tuple(LayerPlan.from_dict(p) for p in data["layers"]),
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

