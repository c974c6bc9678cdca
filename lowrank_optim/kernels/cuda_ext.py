"""CUDA C++ kernels (``csrc/`` of this package), built on first use with torch.utils.cpp_extension.

Three ops, with the reference's names, signatures and results (see :mod:`.reference`):
:func:`stochastic_round_bf16`, :func:`quantize_grouped` (nearest and stochastic) and
:func:`dequantize_int4` (fused unpack + dequantize). Their random streams are the Triton kernels'
(Philox keyed by the seed, counted by element index), so on one GPU both give the same bits.

Where the sources live: ``lowrank_optim/kernels/csrc/`` inside the package, shipped as package data
(pyproject.toml), so a wheel install can build them; the repository's top-level ``csrc/README.md``
documents them. ``LRO_CSRC=/path`` builds from another directory instead (to try edits).

:func:`load` compiles once per machine (torch caches the build under ``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``, keyed by the sources' hash) and once per process (cached).
It returns None, and never raises, when CUDA, the toolkit (nvcc, ``CUDA_HOME``) or a C++ compiler
is missing or the build fails; :func:`unavailable_reason` then says why. Importing this module
never builds anything.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from . import reference
from .reference import GROUP, _check_quantized

NAME = "lowrank_optim_cuda"
SOURCES = ("lro_bindings.cpp", "lro_kernels.cu")
HEADERS = ("lro_math.cuh",)
OPS = ("stochastic_round_bf16", "quantize_grouped", "dequantize_int4")  # what the extension implements

_why_not: list[str] = []


def source_dir() -> Path:
    """The directory the extension is built from: ``LRO_CSRC`` if set, else the package's csrc/."""
    override = os.environ.get("LRO_CSRC")
    return Path(override) if override else Path(__file__).resolve().parent / "csrc"


def _missing() -> str | None:
    """Why the extension cannot be built here, or None if it can be tried."""
    if not torch.cuda.is_available():
        return "CUDA is not available (no GPU, or a CPU build of torch)"
    if torch.version.cuda is None:
        return "this torch build has no CUDA (torch.version.cuda is None)"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "the CUDA toolkit (nvcc) was not found: set CUDA_HOME"
    missing = [name for name in SOURCES + HEADERS if not (source_dir() / name).is_file()]
    if missing:
        return f"CUDA sources not found in {source_dir()}: {', '.join(missing)}"
    return None


@functools.cache
def load() -> ModuleType | None:
    """The compiled extension, building it on first call; None when it cannot be built here."""
    reason = _missing()
    if reason is None:
        try:
            from torch.utils import cpp_extension

            directory = source_dir()
            return cpp_extension.load(
                name=NAME,
                sources=[str(directory / name) for name in SOURCES],
                extra_include_paths=[str(directory)],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
                verbose=os.environ.get("LRO_CUDA_VERBOSE") == "1",
            )
        except Exception as exc:  # a compiler missing or failing: fall back, say why
            reason = f"building the extension failed: {type(exc).__name__}: {exc}"
    _why_not[:] = [reason]
    return None


def available() -> bool:
    """Whether the extension is built (building it now if it can be)."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None (None if it did not, or was not called)."""
    return _why_not[0] if _why_not else None


def _ext() -> ModuleType:
    ext = load()
    if ext is None:
        raise RuntimeError(f"the CUDA extension is unavailable: {unavailable_reason()}")
    return ext


def _seed(seed: int) -> int:
    """The seed modulo 2^64 (as Philox keys it) as the signed int64 that C++ takes."""
    s = int(seed) % 2**64
    return s - 2**64 if s >= 2**63 else s


def _check_group(group: int) -> None:
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")


# ---------------------------------------------------------------- the ops
def stochastic_round_bf16(x: Tensor, *, seed: int = 0) -> Tensor:
    """float32 → bfloat16 by stochastic rounding (see :func:`.reference.stochastic_round_bf16`);
    element e adds half e % 2 of word (e % 8) // 2 of Philox(seed, e // 8), as the Triton kernel."""
    return _ext().stochastic_round_bf16(x.float().contiguous(), _seed(seed))


def quantize_grouped(
    x: Tensor, *, bits: int = 8, group: int = GROUP, stochastic: bool = False, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """(codes uint8, scale float32, zero float32): see :func:`.reference.quantize_grouped`; the
    stochastic draw of element e is word e % 4 of Philox(seed, e // 4), as the Triton kernel's."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    _check_group(group)
    codes, scale, zero = _ext().quantize_grouped(x.float().reshape(-1).contiguous(), 2**bits - 1, group,
                                                 bool(stochastic), _seed(seed))
    _check_quantized(x, scale, zero)
    return codes, scale, zero


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, n: int, *, group: int = GROUP,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Unpack and dequantize in one kernel (see :func:`.reference.dequantize_int4`)."""
    _check_group(group)
    if packed.dtype != torch.uint8:  # the kernel reads bytes; anything else as the reference does
        return reference.dequantize_int4(packed, scale, zero, n, group=group, dtype=dtype)
    count = len(range(2 * packed.numel())[: int(n)])
    kernel_dtype = dtype if dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) else torch.float32
    out = _ext().dequantize_int4(packed.reshape(-1).contiguous(), scale.reshape(-1).float().contiguous(),
                                 zero.reshape(-1).float().contiguous(), count, group, kernel_dtype)
    return out if out.dtype == dtype else out.to(dtype)
