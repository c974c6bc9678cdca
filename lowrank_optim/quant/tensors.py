"""Small containers for quantized storage: blockwise INT8 (moments) and packed INT4 (projections).

Each holds plain tensors and exposes ``state_dict()`` / ``from_state_dict()`` with tensors and plain
values only, so a checkpoint that stores them loads with ``torch.load(weights_only=True)``. The
arithmetic is in :mod:`lowrank_optim.kernels` (Triton on CUDA, the torch reference elsewhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import kernels


def _shape(shape: Any, what: str) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise ValueError(f"{what}: shape must be a sequence of non-negative ints, got {shape!r}")
    return tuple(shape)


@dataclass
class Int8Blockwise:
    """A float tensor as uint8 codes (its own shape) and a float32 absmax per block of 256 elements.

    ``code`` is the code book (``dynamic`` or ``linear``, see :mod:`lowrank_optim.kernels.reference`);
    ``signed=False`` spends all 256 codes on non-negative values (Adam's second moment).
    1 byte per element plus 4 per block: 1.016 bytes per element for full blocks.
    """

    codes: Tensor
    absmax: Tensor
    code: str = "dynamic"
    signed: bool = True

    @classmethod
    def quantize(cls, x: Tensor, *, code: str = "dynamic", signed: bool = True) -> "Int8Blockwise":
        if code not in kernels.CODES:
            raise ValueError(f"code must be one of {kernels.CODES}, got {code!r}")
        if not signed and x.numel() and bool((x < 0).any()):
            raise ValueError("an unsigned Int8Blockwise holds values >= 0 only; use signed=True")
        flat = x.detach().reshape(-1).contiguous()
        codes, absmax = kernels.quantize_blockwise(flat, code=code, signed=signed)
        return cls(codes.view(x.shape), absmax, code, signed)

    @classmethod
    def zeros(cls, shape: tuple[int, ...], *, device: Any = None, code: str = "dynamic", signed: bool = True) -> "Int8Blockwise":
        n = math.prod(shape)
        return cls(
            torch.zeros(shape, dtype=torch.uint8, device=device),
            torch.zeros(-(-n // kernels.BLOCK), dtype=torch.float32, device=device),
            code,
            signed,
        )

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        flat = kernels.dequantize_blockwise(
            self.codes.reshape(-1), self.absmax, code=self.code, signed=self.signed, dtype=dtype
        )
        return flat.view(self.codes.shape)

    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.absmax.numel()

    def state_dict(self) -> dict[str, Any]:
        return {"codes": self.codes, "absmax": self.absmax, "code": self.code, "signed": self.signed}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Int8Blockwise":
        codes, absmax = state.get("codes"), state.get("absmax")
        if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
            raise ValueError("Int8Blockwise state needs a uint8 tensor 'codes'")
        if not isinstance(absmax, Tensor) or absmax.dtype != torch.float32 or absmax.dim() != 1:
            raise ValueError("Int8Blockwise state needs a 1-D float32 tensor 'absmax'")
        if absmax.numel() != -(-codes.numel() // kernels.BLOCK):
            raise ValueError(
                f"Int8Blockwise state: {codes.numel()} codes need {-(-codes.numel() // kernels.BLOCK)} "
                f"absmax values (one per block of {kernels.BLOCK}), got {absmax.numel()}"
            )
        code = state.get("code", "dynamic")
        if code not in kernels.CODES:
            raise ValueError(f"Int8Blockwise state: unknown code book {code!r}")
        return cls(codes, absmax, code, bool(state.get("signed", True)))


def resolve_group(group: int | str, shape: tuple[int, ...]) -> int:
    """A group size in elements: an int ≥ 1, or ``"row"`` for one group per row (last dimension)."""
    if group == "row":
        return max(shape[-1] if shape else 1, 1)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be an integer >= 1 or 'row', got {group!r}")
    return group


@dataclass
class Int4Tensor:
    """A float tensor as 4-bit min–max codes packed two per byte, with a float32 scale and zero point
    per group (of 256 elements, or one per row): x ≈ zero + scale·q, q in [0, 15].

    0.5 byte per element plus 8 per group: 0.53 bytes per element with groups of 256, against 4 for
    float32. ``dtype`` is the dtype :meth:`dequantize` returns by default.
    """

    packed: Tensor
    scale: Tensor
    zero: Tensor
    shape: tuple[int, ...]
    group: int
    dtype: torch.dtype = torch.float32

    @classmethod
    def quantize(cls, x: Tensor, *, group: int | str = kernels.GROUP) -> "Int4Tensor":
        size = resolve_group(group, tuple(x.shape))
        flat = x.detach().reshape(-1).contiguous()
        codes, scale, zero = kernels.quantize_grouped(flat, bits=4, group=size)
        return cls(kernels.pack_int4(codes), scale, zero, tuple(x.shape), size, x.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def dequantize(self, dtype: torch.dtype | None = None, device: Any = None) -> Tensor:
        packed, scale, zero = self.packed, self.scale, self.zero
        if device is not None:
            packed, scale, zero = packed.to(device), scale.to(device), zero.to(device)
        flat = kernels.dequantize_int4(packed, scale, zero, self.numel, group=self.group, dtype=dtype or self.dtype)
        return flat.view(self.shape)

    def nbytes(self) -> int:
        return self.packed.numel() + 4 * (self.scale.numel() + self.zero.numel())

    def state_dict(self, prefix: str = "") -> dict[str, Any]:
        """Flat entries (``{prefix}packed``, ``scale``, ``zero``, ``shape``, ``group``, ``dtype``)."""
        return {
            f"{prefix}packed": self.packed,
            f"{prefix}scale": self.scale,
            f"{prefix}zero": self.zero,
            f"{prefix}shape": list(self.shape),
            f"{prefix}group": self.group,
            f"{prefix}dtype": str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], prefix: str = "") -> "Int4Tensor":
        where = f"Int4Tensor state '{prefix}'"
        packed, scale, zero = (state.get(f"{prefix}{k}") for k in ("packed", "scale", "zero"))
        shape = _shape(state.get(f"{prefix}shape"), where)
        group = state.get(f"{prefix}group")
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"{where}: 'group' must be an integer >= 1, got {group!r}")
        n = math.prod(shape)
        if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.numel() != -(-n // 2):
            raise ValueError(f"{where}: 'packed' must be a uint8 tensor of {-(-n // 2)} bytes for shape {shape}")
        groups = -(-n // group)
        for name, t in (("scale", scale), ("zero", zero)):
            if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.numel() != groups:
                raise ValueError(f"{where}: {name!r} must be {groups} float32 values (one per group of {group})")
        dtype = getattr(torch, str(state.get(f"{prefix}dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{where}: unknown dtype {state.get(f'{prefix}dtype')!r}")
        return cls(packed, scale, zero, shape, group, dtype)
