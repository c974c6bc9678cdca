"""Kernels for quantized storage and stochastic rounding, one dispatch per op.

Each op has a plain-torch reference (:mod:`.reference`, the specification), a Triton kernel
(:mod:`.triton_kernels`), and three of them a CUDA C++ kernel (:mod:`.cuda_ext`: stochastic
rounding to bf16, the grouped min–max quantizer, the fused INT4 dequantize). The functions here
pick one per call:

* ``LRO_KERNELS=auto`` (the default): Triton when every tensor argument is on CUDA and Triton
  imports; on the CPU the C kernel (:mod:`.cpu_ext`, built on first use) for the ops it has (the fused
  8-bit Adam step), else the reference. The CUDA C++ kernels are not picked by ``auto``: they were written
  without a GPU to measure on, and ``auto`` takes them only for ops where bench/kernel_throughput.py shows
  they beat Triton (none yet; see csrc/README.md);
* ``LRO_KERNELS=triton``: Triton always (on the CPU it needs ``TRITON_INTERPRET=1``: that is how
  the tests run the kernels here);
* ``LRO_KERNELS=cuda``: the CUDA C++ kernel for the ops it has (built on first use), Triton for
  the others; an error if the extension cannot be built;
* ``LRO_KERNELS=reference``: the reference always.

All take flat, contiguous tensors; see :mod:`.reference` for the exact semantics.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

from torch import Tensor

from . import cpu_ext, cuda_ext, reference
from .reference import BLOCK, CODES, GROUP, code_book, code_midpoints

MODES = ("auto", "triton", "reference", "cuda")


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


def backend(*tensors: Tensor, op: str | None = None) -> ModuleType:
    """The module whose implementation runs for these tensors (see the module docstring).

    ``op`` names the op: under ``LRO_KERNELS=cuda`` the extension runs those in ``cuda_ext.OPS`` and
    Triton the others (without ``op``, the answer is Triton's module, which has every op)."""
    mode = os.environ.get("LRO_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"LRO_KERNELS={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "reference":
        return reference
    if mode == "cuda" and op in cuda_ext.OPS:
        if cuda_ext.load() is None:
            raise RuntimeError(f"LRO_KERNELS=cuda but the CUDA extension is unavailable: "
                               f"{cuda_ext.unavailable_reason()}")
        return cuda_ext
    module = _triton_module()
    if mode in ("triton", "cuda"):
        if module is None:
            raise RuntimeError(f"LRO_KERNELS={mode} but Triton does not import; pip install triton")
        return module
    if module is not None and tensors and all(t.is_cuda for t in tensors if isinstance(t, Tensor)):
        return module
    if op in cpu_ext.OPS and cpu_ext.usable(*tensors):
        return cpu_ext
    return reference


def _dispatch(name: str):
    ref = getattr(reference, name)

    @functools.wraps(ref)
    def call(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in args if isinstance(a, Tensor)]
        impl = backend(*tensors, op=name)
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
    "cpu_ext",
    "cuda_ext",
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
