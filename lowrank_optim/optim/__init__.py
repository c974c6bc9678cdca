"""The core optimizer and its named presets."""

from .lowrank import LowRankAdamW, RankFallbackWarning
from .presets import GaLoreAdamW

__all__ = ["GaLoreAdamW", "LowRankAdamW", "RankFallbackWarning"]
