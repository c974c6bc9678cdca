"""The core optimizer and its named presets."""

from .groups import ConstructorRankWarning
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
    OnlineSubspaceDescent,
    QGaLoreAdamW,
)

__all__ = ["APOLLO", "COAP", "DCTAdamW", "FRUGAL", "GWT", "PRESET_DEFAULT", "APOLLOMini", "Fira", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "Grass", "LowRankAdamW", "OnlineSubspaceDescent", "QGaLoreAdamW", "ConstructorRankWarning", "RankFallbackWarning", "SUMO"]

# GoLore (projector="golore": the switch to random Stiefel projections); not in lro.PRESETS, it needs switch_step
from .presets import GoLore  # noqa: E402

__all__ += ["GoLore"]

# Trion (DCT column selection, error feedback on the momentum, Newton-Schulz)
from .presets import Trion  # noqa: E402

__all__ += ["Trion"]
