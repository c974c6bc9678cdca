"""The core optimizer and its named presets."""

from .lowrank import PRESET_DEFAULT, LowRankAdamW, RankFallbackWarning
from .presets import (
    APOLLO,
    COAP,
    FRUGAL,
    GWT,
    SUMO,
    APOLLOMini,
    Fira,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    OnlineSubspaceDescent,
    QGaLoreAdamW,
)

__all__ = ["APOLLO", "COAP", "FRUGAL", "GWT", "PRESET_DEFAULT", "APOLLOMini", "Fira", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "LowRankAdamW", "OnlineSubspaceDescent", "QGaLoreAdamW", "RankFallbackWarning", "SUMO"]
