"""The core optimizer and its named presets."""

from .lowrank import PRESET_DEFAULT, LowRankAdamW, RankFallbackWarning
from .presets import (
    APOLLO,
    COAP,
    FRUGAL,
    GWT,
    SUMO,
    DCTAdamW,
    Grass,
    APOLLOMini,
    Fira,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    QGaLoreAdamW,
)

__all__ = ["APOLLO", "COAP", "DCTAdamW", "FRUGAL", "GWT", "PRESET_DEFAULT", "APOLLOMini", "Fira", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "Grass", "LowRankAdamW", "QGaLoreAdamW", "RankFallbackWarning", "SUMO"]
