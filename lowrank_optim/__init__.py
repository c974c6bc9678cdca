"""lowrank-optim: memory-efficient low-rank optimizers as drop-in ``torch.optim`` replacements.

>>> import lowrank_optim as lro
>>> opt = lro.GaLoreAdamW(lro.param_groups(model, rank=128, update_proj_gap=200, scale=0.25), lr=1e-2)
"""

from . import kernels, memory, projectors, quant, rules
from . import nn  # SLTrain's sparse plus low-rank layers: lro.nn.to_sltrain
from ._version import __version__
from .groups import param_groups
from .layerwise import layerwise
from .optim import (
    APOLLO,
    COAP,
    GWT,
    FRUGAL,
    APOLLOMini,
    Fira,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    Grass,
    LowRankAdamW,
    OnlineSubspaceDescent,
    QGaLoreAdamW,
    ConstructorRankWarning,
    RankFallbackWarning,
    SUMO,
    DCTAdamW,
)
from .optim import GoLore  # needs projector_options={"switch_step": ...}, so not in PRESETS
from .projectors import NonFiniteGradientError
from .quant import quantize_model_int8
from .sparse_backward import SparseGrad, sparse_grad
from .sampling import LayerSampler, OwLore, owl_ratios


def __getattr__(name: str):
    # lro.hf imports transformers, so it is loaded on first use rather than with the package
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PRESETS = {
    "galore": GaLoreAdamW,
    "galore8bit": GaLoreAdamW8bit,
    "qgalore": QGaLoreAdamW,
    "apollo": APOLLO,
    "apollo_mini": APOLLOMini,
    "frugal": FRUGAL,
    "fira": Fira,
    "galore_adafactor": GaLoreAdafactor,
    "sumo": SUMO,
    "lowrank": LowRankAdamW,
}
# COAP (correlation-aware subspace updates) and GWT (Haar wavelet states)
PRESETS.update({"coap": COAP, "gwt": GWT})
# Grass (sampled sparse rows, unbiased by ρ; its sparse backward is lro.sparse_grad)
PRESETS.update({"grass": Grass})
# Online Subspace Descent (online PCA of the gradient, its own optimizer for P)
PRESETS["osd"] = OnlineSubspaceDescent
# DCT-AdamW (DCT column selection with error feedback)
PRESETS["dct_adamw"] = DCTAdamW
# Trion (Dion's update with DCT column selection and error feedback on the momentum)
from .optim import Trion  # noqa: E402

PRESETS["trion"] = Trion

__all__ = [
    "LayerSampler",
    "OwLore",
    "owl_ratios",
    "APOLLO",
    "COAP",
    "DCTAdamW",
    "GWT",
    "FRUGAL",
    "GoLore",
    "PRESETS",
    "APOLLOMini",
    "Fira",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "Grass",
    "QGaLoreAdamW",
    "LowRankAdamW",
    "NonFiniteGradientError",
    "OnlineSubspaceDescent",
    "ConstructorRankWarning",
    "RankFallbackWarning",
    "SUMO",
    "SparseGrad",
    "__version__",
    "kernels",
    "layerwise",
    "memory",
    "nn",
    "param_groups",
    "projectors",
    "quant",
    "quantize_model_int8",
    "rules",
    "sparse_grad",
]
__all__ += ["Trion"]
