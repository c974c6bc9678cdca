"""Kernels for quantized storage and stochastic rounding, one dispatch per op.

Each op has a plain-torch reference (:mod:`.reference`, the specification) and a Triton kernel
(:mod:`.triton_kernels`). The functions here pick one per call:

* ``LRO_KERNELS=auto`` (the default): Triton when every tensor argument is on CUDA and Triton
  imports, else the reference;
* ``LRO_KERNELS=triton``: Triton always (on the CPU it needs ``TRITON_INTERPRET=1``: that is how
  the tests run the kernels here);
* ``LRO_KERNELS=reference``: the reference always.

All take flat, contiguous tensors; see :mod:`.reference` for the exact semantics.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

from torch import Tensor

from . import reference
from .reference import BLOCK, CODES, GROUP, code_book, code_midpoints

MODES = ("auto", "triton", "reference")


@functools.cache
def _triton_module() -> ModuleType | None:
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def triton_available() -> bool:
    """Whether the Triton kernels import (Triton installed)."""
    return _triton_module() is not None


def backend(*tensors: Tensor) -> ModuleType:
    """The module whose implementation runs for these tensors (see the module docstring)."""
    mode = os.environ.get("LRO_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"LRO_KERNELS={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "reference":
        return reference
    module = _triton_module()
    if mode == "triton":
        if module is None:
            raise RuntimeError("LRO_KERNELS=triton but Triton does not import; pip install triton")
        return module
    if module is not None and tensors and all(t.is_cuda for t in tensors if isinstance(t, Tensor)):
        return module
    return reference


def _dispatch(name: str):
    ref = getattr(reference, name)

    @functools.wraps(ref)
    def call(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in args if isinstance(a, Tensor)]
        impl = backend(*tensors)
        return getattr(impl, name)(*args, **kwargs)

    return call


quantize_blockwise = _dispatch("quantize_blockwise")
dequantize_blockwise = _dispatch("dequantize_blockwise")
adam8bit_direction = _dispatch("adam8bit_direction")
quantize_grouped = _dispatch("quantize_grouped")
dequantize_grouped = _dispatch("dequantize_grouped")
pack_int4 = _dispatch("pack_int4")
unpack_int4 = _dispatch("unpack_int4")
dequantize_int4 = _dispatch("dequantize_int4")
stochastic_round_bf16 = _dispatch("stochastic_round_bf16")

__all__ = [
    "BLOCK",
    "CODES",
    "GROUP",
    "adam8bit_direction",
    "backend",
    "code_book",
    "code_midpoints",
    "dequantize_blockwise",
    "dequantize_grouped",
    "dequantize_int4",
    "pack_int4",
    "quantize_blockwise",
    "quantize_grouped",
    "reference",
    "stochastic_round_bf16",
    "triton_available",
    "unpack_int4",
]
