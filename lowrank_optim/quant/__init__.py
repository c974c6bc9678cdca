"""Quantized storage: blockwise INT8 moments, packed INT4 projections, INT8 weights.

* :class:`Int8Blockwise`: uint8 codes and a float32 absmax per block of 256 (Adam's moments under
  ``state_bits=8``);
* :class:`Int4Tensor`: 4-bit min–max codes packed two per byte, scale and zero point per group of
  256 or per row (Q-GaLore's projections under ``proj_bits=4``);
* :class:`Int8Weight` and :func:`quantize_model_int8`: INT8 linear weights with no master copy,
  updated by stochastic rounding (Q-GaLore);
* :func:`stochastic_round_bf16`: float32 → bfloat16, unbiased.

The arithmetic runs in :mod:`lowrank_optim.kernels` (Triton on CUDA, the torch reference elsewhere).
"""

from ..kernels import stochastic_round_bf16
from .tensors import Int4Tensor, Int8Blockwise
from .weights import Int8Weight, int8_weight_bytes, quantize_model_int8

__all__ = ["Int4Tensor", "Int8Blockwise", "Int8Weight", "int8_weight_bytes", "quantize_model_int8", "stochastic_round_bf16"]
