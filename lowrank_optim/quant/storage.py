"""How one state entry is kept: a storage type over flat state keys, which no rule branches on.

A rule names its state tensors (``exp_avg``, ...) and works on float tensors. Where and how each is
kept is the storage's business, and is read off the state itself, so a loaded checkpoint needs no
other record:

=================  ==============================================  =====================================
storage            entries for key ``k``                            bytes per element
=================  ==============================================  =====================================
:data:`FLOAT`      ``k``: the tensor                                its dtype's
:data:`INT8`       ``k``: uint8 codes, ``k_absmax``: float32 per    1 + 4/256 (a dynamic code book,
                   block of 256                                     bitsandbytes' 8-bit Adam)
:data:`INT4`       ``k_packed``, ``k_scale``, ``k_zero``,           0.5 + 8/256 (min–max, Q-GaLore's
                   ``k_shape``, ``k_group``, ``k_dtype``            projections)
=================  ==============================================  =====================================

Each storage has ``zeros`` (the entries of a zero tensor), ``load`` (a float tensor to compute with:
the stored tensor itself for :data:`FLOAT`, so in-place updates persist; a dequantized copy otherwise),
``store`` (write a computed value back, in place: on FSDP2 shards the entries are views of DTensors)
and ``nbytes``. ``signed=False`` marks a non-negative quantity (a second moment): INT8 then spends all
256 codes on values ≥ 0 and reads code 0 as half the smallest level, as the fused 8-bit Adam kernel does.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import kernels
from ..kernels import reference


class Storage:
    """Base class: one state entry ``key`` as one or more flat entries of a state dict."""

    name: ClassVar[str] = ""

    def keys(self, key: str) -> tuple[str, ...]:
        """The flat state keys this storage keeps for ``key``."""
        return (key,)

    def holds(self, state: dict[str, Any], key: str) -> bool:
        """Whether ``state`` keeps ``key`` in this storage."""
        raise TypeError(f"{type(self).__name__} does not say which entries it holds")

    def nbytes(self, state: dict[str, Any], key: str) -> int:
        return sum(_bytes(state[k]) for k in self.keys(key) if isinstance(state.get(k), Tensor))


class FloatStorage(Storage):
    """The tensor itself, in the dtype the rule asks for."""

    name = "float"

    def holds(self, state: dict[str, Any], key: str) -> bool:
        return isinstance(state.get(key), Tensor)

    def zeros(self, key: str, like: Tensor, *, signed: bool = True, blocks: int | None = None) -> dict[str, Tensor]:
        return {key: torch.zeros_like(like, memory_format=torch.preserve_format)}

    def load(self, state: dict[str, Any], key: str, *, signed: bool = True) -> Tensor:
        return state[key]

    def store(self, state: dict[str, Any], key: str, value: Tensor, *, signed: bool = True) -> None:
        if value is not state[key]:
            state[key].copy_(value)


class Int8Storage(Storage):
    """uint8 codes of the tensor's shape and a float32 absmax per block of 256 (``kernels.BLOCK``).

    ``blocks`` (in :meth:`zeros`) pads the absmax vector, so that every rank of an FSDP2 run keeps one
    of the same length; only the first ceil(numel / 256) values are used."""

    name = "int8"
    code = "dynamic"

    def keys(self, key: str) -> tuple[str, ...]:
        return (key, f"{key}_absmax")

    def holds(self, state: dict[str, Any], key: str) -> bool:
        codes = state.get(key)
        return isinstance(codes, Tensor) and codes.dtype == torch.uint8 and f"{key}_absmax" in state

    def zeros(self, key: str, like: Tensor, *, signed: bool = True, blocks: int | None = None) -> dict[str, Tensor]:
        count = -(-like.numel() // kernels.BLOCK) if blocks is None else blocks
        return {key: torch.zeros(like.shape, dtype=torch.uint8, device=like.device),
                f"{key}_absmax": torch.zeros(count, dtype=torch.float32, device=like.device)}

    @staticmethod
    def absmax(state: dict[str, Any], key: str) -> Tensor:
        """The absmax values that ``state[key]``'s codes use (the first ones of a padded vector)."""
        return state[f"{key}_absmax"][: -(-state[key].numel() // kernels.BLOCK)]

    def load(self, state: dict[str, Any], key: str, *, signed: bool = True) -> Tensor:
        codes, absmax = state[key], self.absmax(state, key)
        if signed:
            flat = kernels.dequantize_blockwise(codes.reshape(-1), absmax, code=self.code, signed=True)
        else:
            book = reference.second_moment_book(self.code, codes.device)
            flat = book[codes.reshape(-1).long()] * absmax.repeat_interleave(kernels.BLOCK)[: codes.numel()]
        return flat.view(codes.shape)

    def store(self, state: dict[str, Any], key: str, value: Tensor, *, signed: bool = True) -> None:
        codes, absmax = kernels.quantize_blockwise(value.reshape(-1).float().contiguous(), code=self.code, signed=signed)
        state[key].copy_(codes.view(state[key].shape))
        self.absmax(state, key).copy_(absmax)


class Int4Storage(Storage):
    """4-bit min–max codes packed two per byte, a float32 scale and zero point per group of 256
    (:class:`lowrank_optim.quant.Int4Tensor`): a projector's basis under ``proj_bits=4``."""

    name = "int4"
    FIELDS = ("packed", "scale", "zero", "shape", "group", "dtype")

    def keys(self, key: str) -> tuple[str, ...]:
        return tuple(f"{key}_{f}" for f in self.FIELDS)

    def holds(self, state: dict[str, Any], key: str) -> bool:
        return isinstance(state.get(f"{key}_packed"), Tensor)

    def zeros(self, key: str, like: Tensor, *, signed: bool = True, blocks: int | None = None) -> dict[str, Any]:
        """Placeholder entries of a zero tensor shaped like ``like``, built without the quantizer (so on the
        meta device too)."""
        from .tensors import Int4Tensor

        n, group = like.numel(), kernels.GROUP
        groups = -(-n // group)
        stored = Int4Tensor(
            torch.zeros(-(-n // 2), dtype=torch.uint8, device=like.device),
            torch.zeros(groups, dtype=torch.float32, device=like.device),
            torch.zeros(groups, dtype=torch.float32, device=like.device),
            tuple(like.shape), group, like.dtype,
        )
        return stored.state_dict(prefix=f"{key}_")

    def load(self, state: dict[str, Any], key: str, *, signed: bool = True, dtype: torch.dtype | None = None,
             device: Any = None) -> Tensor:
        from .tensors import Int4Tensor

        return Int4Tensor.from_state_dict(state, prefix=f"{key}_").dequantize(dtype, device)

    def store(self, state: dict[str, Any], key: str, value: Tensor, *, signed: bool = True) -> None:
        """Quantize ``value`` into fresh entries (a basis is rebound at every refresh, never written in place)."""
        from .tensors import Int4Tensor

        state.update(Int4Tensor.quantize(value).state_dict(prefix=f"{key}_"))

    def shape(self, state: dict[str, Any], key: str) -> tuple[int, ...]:
        return tuple(state[f"{key}_shape"])


FLOAT = FloatStorage()
INT8 = Int8Storage()
INT4 = Int4Storage()
#: Every storage, the most specific first: :func:`storage_of` asks them in this order.
STORAGES: tuple[Storage, ...] = (INT4, INT8, FLOAT)


def storage_of(state: dict[str, Any], key: str) -> Storage:
    """The storage ``state`` keeps ``key`` in."""
    for storage in STORAGES:
        if storage.holds(state, key):
            return storage
    raise KeyError(key)


def _bytes(t: Tensor) -> int:
    from ..distributed import local

    t = local(t)
    return t.numel() * t.element_size()


def int8_blocks(numel: int) -> int:
    """Absmax values for ``numel`` INT8 elements."""
    return -(-numel // kernels.BLOCK)


def largest_piece_blocks(global_shape: tuple[int, ...], dim: int, world: int) -> int:
    """Absmax values of the largest piece of a tensor split along ``dim`` over ``world`` ranks."""
    largest = list(global_shape)
    largest[dim] = -(-global_shape[dim] // world)
    return int8_blocks(math.prod(largest))
