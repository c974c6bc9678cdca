"""Where an update is written: the weight itself, or a float32 working copy that is rounded back once.

* a plain tensor (float32, float64, bf16 rounded to nearest): the weight itself;
* an FSDP2 DTensor: this rank's piece of it;
* an INT8 weight (:class:`lowrank_optim.quant.Int8Weight`): dequantized to float32, requantized after
  with stochastic rounding (``stochastic_rounding`` None or True) or to nearest (False);
* a bf16 weight with ``stochastic_rounding=True``: a float32 copy, rounded back stochastically.

Stochastic rounding draws from a seed mixed from the parameter's position and its step count, so a
resumed run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import kernels
from ..distributed import is_sharded
from ..projectors.random_proj import mix_seed
from ..quant.weights import Int8Weight

Write = Callable[[], None] | None


def rounds_stochastically(group: dict[str, Any], p: Tensor) -> bool:
    """Whether ``p``'s updates are written by stochastic rounding: INT8 weights unless the group
    says ``stochastic_rounding=False``; bf16 weights when it says True."""
    flag = group["stochastic_rounding"]
    if isinstance(p, Int8Weight):
        return flag is not False
    return bool(flag) and p.dtype == torch.bfloat16


def through_copy(group: dict[str, Any], p: Tensor) -> bool:
    """Whether ``p`` is stepped through a float32 working copy (INT8 weights, stochastic bf16)."""
    return isinstance(p, Int8Weight) or rounds_stochastically(group, p)


def open_weight(group: dict[str, Any], p: Tensor, seed: Callable[[], int]) -> tuple[Tensor, Write]:
    """The tensor to apply ``p``'s update to, and what writes it back (None: the tensor is ``p``'s own).
    ``seed()`` gives the stochastic-rounding seed when the update is written (after the step is counted)."""
    if is_sharded(p):
        return p.to_local(), None
    if isinstance(p, Int8Weight):
        work = p.dequantize(torch.float32)
        stochastic = rounds_stochastically(group, p)
        return work, lambda: p.requantize_(work, stochastic=stochastic, seed=seed())
    if rounds_stochastically(group, p):
        work = p.detach().float()

        def write() -> None:
            p.detach().copy_(kernels.stochastic_round_bf16(work.view(-1), seed=seed()).view(p.shape))

        return work, write
    return p.detach(), None


def rounding_seed(position: int, step: int) -> int:
    """The seed of a step's stochastic rounding of the parameter at ``position``."""
    return mix_seed(position, step, 0x5EED)
