"""Schedules (data), their cost model, and the search spaces."""

from spaces.cost import BlockCost, breakdown, gmacs, macs, tokens_entering
from spaces.model_spec import ModelSpec
from spaces.presets import from_preset
from spaces.schedule import METHODS, SCHEMA_VERSION, LayerPlan, Schedule, kept_count

__all__ = [
    "METHODS", "SCHEMA_VERSION", "BlockCost", "LayerPlan", "ModelSpec", "Schedule",
    "breakdown", "from_preset", "gmacs", "kept_count", "macs", "tokens_entering",
]
