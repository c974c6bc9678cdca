"""What a piece of code allocates, op by op: the measuring tool behind the memory claims of the sparse
backward (``lro.sparse_grad``) and SLTrain (``lro.nn``), in their tests and benchmarks.

>>> with Allocations() as seen:
...     loss.backward()
>>> seen.peak, seen.largest, seen.largest_bytes({(m, n), (n, m)})

A ``TorchDispatchMode`` sees every aten op's outputs. A tensor whose storage is new (neither an input's
nor one already seen: views and in-place results allocate nothing) is recorded with its shape; its bytes
count as live until the storage is freed, and ``peak`` is the most bytes alive at once. A sparse tensor is
recorded by its stored values. Works on any device; it measures what the ops return, not the allocator's
caching (``torch.cuda.max_memory_allocated`` does that on CUDA).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Allocations"]


def _values(t: torch.Tensor) -> torch.Tensor:
    """A tensor's stored values: itself when strided (``_values`` for COO, which may be uncoalesced)."""
    if t.layout == torch.strided:
        return t
    return t._values() if t.layout == torch.sparse_coo else t.values()


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    return _values(t).untyped_storage()


class Allocations(TorchDispatchMode):
    """Tensors the ops inside the ``with`` block allocate: ``shapes``, ``sizes`` (elements, stored values
    for sparse tensors), ``nbytes``, ``dense`` (strided or not), and ``peak``, the most bytes of them alive
    at once."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.sizes: list[int] = []
        self.nbytes: list[int] = []
        self.dense: list[bool] = []
        self._live: dict[int, int] = {}
        self.peak = 0

    @property
    def largest(self) -> int:
        """Elements of the largest tensor allocated (0 if none)."""
        return max(self.sizes, default=0)

    def largest_bytes(self, shapes: Iterable[tuple[int, ...]]) -> int:
        """Bytes of the largest dense (strided) tensor allocated with one of ``shapes`` (0 if none)."""
        wanted = {tuple(s) for s in shapes}
        return max((b for s, b, d in zip(self.shapes, self.nbytes, self.dense) if d and s in wanted), default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t).data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = _storage(t)
            key, size = storage.data_ptr(), storage.nbytes()
            if not size or key in self._live or key in inputs:
                continue
            self.shapes.append(tuple(t.shape))
            self.sizes.append(_values(t).numel())
            self.nbytes.append(size)
            self.dense.append(t.layout == torch.strided)
            self._live[key] = size
            weakref.finalize(storage, self._live.pop, key, None)
            self.peak = max(self.peak, sum(self._live.values()))
        return out
