"""Online PCA projector: Online Subspace Descent's basis, from one SVD and then an optimizer on the PCA loss
(Liang et al. 2024, "Memory-Efficient LLM Training with Online Subspace Descent", arXiv:2408.12857; official
code kyleliang919/Online-Subspace-Descent, ``galore_torch/galore_projector.py``, ``proj_type="continuous"``).

The first update sets P exactly as ``svd`` does (P = U[:, :r], m×r, left; Q = Vh[:r], r×n, right); it is
never recomputed by an SVD again. After every later step has *used* P to project and to project back, P
takes one step of its own optimizer (``pca_optimizer``, :mod:`.pca_optimizers`: ``adamw`` by default, as the
official code; ``adam8bit``, its 7B recipe; ``lion``, ``adafactor``, ``sgd``) on

    L(P) = ‖P Pᵀ Ĝ − Ĝ‖²_F,    Ĝ = G / ‖G‖_F                     (left side)

with the gradient G of the step that just used it; the right side solves the transpose problem,
L(Q) = ‖Ĝ QᵀQ − Ĝ‖²_F, i.e. the left one for Ĝᵀ with P = Qᵀ. The optimizer's lr is
η = ``lr`` · lr_t / lr_0 with ``lr`` = 1/``update_proj_gap`` (``options_from_group``) and lr_t / lr_0 the
weight lr's schedule (``group["lr"] / group["initial_lr"]``, 1 without a scheduler), as the official code
scales it by ``group["lr"] / init_lr``. The step at which P comes from the SVD does not step it (the
official optimizer has no gradient for P then), so at step t ≥ 1 the basis used is P after t − 1 steps.

With A = Ĝ Ĝᵀ and K = PᵀP, expanding L = ‖Ĝ‖² − 2 tr(Pᵀ A P) + tr(Pᵀ A P K) gives

    ∇L = 2 [ A P (K − 2I) + P (Pᵀ A P) ],

which for orthonormal P is Oja's rule, −2 (I − P Pᵀ) A P. It is evaluated without forming A:
W = Gᵀ P (n×r), A P = G W / ‖G‖², Pᵀ A P = Wᵀ W / ‖G‖², so a step costs two m×n×r matmuls and no SVD
(the official code differentiates L with autograd: the same gradient). P is not re-orthonormalized (the
paper and code do not).

The optimizer learns *after* use (``learns_after_use``): the step calls :meth:`learned` once the update
is applied; a direct :meth:`update` of a built projector takes the same step at lr ratio 1. State
``{"side", "P"}`` like ``svd`` plus the P optimizer's (``pca_step`` and its moments, ``pca_*``), all tensors,
counted by ``nbytes()``. Departures from the official code: P and its optimizer state are kept in
float32 (float64 for float64 gradients) whatever the gradient's dtype (the official P takes the model's
dtype, bf16 in its recipes, where η-sized steps mostly round away); singular-vector signs are canonical
(``canonical_signs``) so the basis is the same on every backend.

**Shards** (FSDP2 rows): ∇L from ‖G‖², n×r and r×r all-reduces; the element-wise optimizers step this
rank's piece of P (its rows of P, its columns of Q) as they are, Adafactor completes its row and column
means and its RMS over the ranks. ``adam8bit`` is refused there: its INT8 blocks would be cut from each
rank's piece, not from the whole P, and give another run than one process.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor

from . import pca_optimizers
from .base import Projector
from .svd import SVDProjector

PCA_OPTIMIZERS = tuple(pca_optimizers.STEPS)


class OnlinePCAProjector(SVDProjector):
    name = "online_pca"
    learns_after_use = True
    quantizable = False  # P takes a small step every step: INT4 would round them away

    def __init__(self, rank: int, proj_type: str = "std", seed: int = 0, lr: float = 0.005,
                 pca_optimizer: str = "adamw", canonical_signs: bool = True) -> None:
        super().__init__(rank, proj_type=proj_type, seed=seed, canonical_signs=canonical_signs)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if pca_optimizer not in PCA_OPTIMIZERS:
            raise ValueError(f"pca_optimizer must be one of {', '.join(PCA_OPTIMIZERS)}, got {pca_optimizer!r}")
        self.lr = float(lr)
        self.pca_optimizer = pca_optimizer

    @staticmethod
    def basis_dtype(grad_dtype: torch.dtype) -> torch.dtype:
        """float32 at least: η-sized steps would round away in a half-precision P."""
        return torch.float64 if grad_dtype == torch.float64 else torch.float32

    @classmethod
    def options_from_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        return {"lr": 1.0 / group["update_proj_gap"]}

    @classmethod
    def shard_error(cls, side: str, options: dict[str, Any]) -> str | None:
        if options.get("pca_optimizer") == "adam8bit":
            return ("projector='online_pca' with pca_optimizer='adam8bit' (its INT8 blocks would be cut from each "
                    "rank's piece of P, not from the whole P); use pca_optimizer='adamw' on FSDP2 shards")
        return super().shard_error(side, options)

    # ------------------------------------------------------------------ building and learning
    def _refresh(self, grad: Tensor, side: str) -> None:
        if "P" in self._state:
            self._learn(grad, side, 1.0)
            return
        m, n = grad.shape
        if self.rank > min(m, n):
            raise ValueError(f"online_pca projector of rank {self.rank} cannot start from the SVD of a "
                             f"{m}x{n} matrix: rank exceeds min(m, n) = {min(m, n)}")
        super()._refresh(grad, side)  # keeps P in basis_dtype(grad.dtype)
        self._state.update(pca_optimizers.zeros(self.pca_optimizer, self._state["P"]))

    def _refresh_sharded(self, grad: Tensor, side: str) -> None:
        if "P" in self._state:
            self._learn(grad, side, 1.0)
            return
        super()._refresh_sharded(grad, side)
        self._state.update(pca_optimizers.zeros(self.pca_optimizer, self._state["P"]))

    def learned(self, grad: Tensor, lr_ratio: float = 1.0) -> Projector:
        """A new projector whose P took one ``pca_optimizer`` step on the PCA loss of ``grad`` (the gradient
        this projector was just used on; this rank's rows on shards), at lr η = ``lr`` · ``lr_ratio``."""
        if not self.initialized:
            raise ValueError("online_pca projector has no basis yet: build it with update(grad) first")
        if isinstance(lr_ratio, bool) or not isinstance(lr_ratio, (int, float)) or not (lr_ratio >= 0):
            raise ValueError(f"lr_ratio must be a number >= 0, got {lr_ratio!r}")
        if grad.dim() != 2:
            raise ValueError(f"online_pca projects 2-D matrices, got shape {tuple(grad.shape)}")
        new = copy.copy(self)
        new._state = dict(self._state)
        new._learn(grad, self.side, float(lr_ratio))
        return new

    def _learn(self, grad: Tensor, side: str, lr_ratio: float) -> None:
        self.check_fits(self.comm.global_shape(grad))
        if "pca_step" not in self._state:  # a checkpoint from before P had an optimizer: start it now
            self._state.update(pca_optimizers.zeros(self.pca_optimizer, self._state["P"]))
        g = self.pca_gradient(grad, side)
        p = self._state["P"].to(g.dtype)
        step = pca_optimizers.STEPS[self.pca_optimizer]
        new = step(p, g, self._state, self.lr * lr_ratio, self._seam(side))
        self._state["P"] = new.to(self.basis_dtype(grad.dtype), copy=True, memory_format=torch.contiguous_format)

    def pca_gradient(self, grad: Tensor, side: str) -> Tensor:
        """∇L at the stored basis, shaped as it is stored (m×r P or r×n Q; on shards this rank's piece:
        rows of P, columns of Q). The products over W's rows are all-reduced (‖G‖², then n×r, r×r)."""
        comm = self.comm
        n = comm.global_shape(grad)[1]
        work = grad.double() if grad.dtype == torch.float64 else grad.float()
        stored = self._state["P"].to(work.dtype)
        # Dividing the products by ‖G‖ instead of G itself avoids an m×n copy; the clamp makes a zero
        # gradient a zero step rather than 0/0.
        norm_sq = comm.all_reduce_(work.square().sum(), "refresh")
        inv_norm = 1.0 / norm_sq.sqrt().clamp_min(torch.finfo(work.dtype).tiny)
        eye = torch.eye(self.rank, dtype=work.dtype, device=work.device)
        if side == "left":  # x = G (rows here), p = P (rows here)
            p = stored
            w = comm.all_reduce_(work.t() @ p, "refresh") * inv_norm  # n×r
            ap = (work @ w) * inv_norm  # this rank's rows of A P
            gram = comm.all_reduce_(p.t() @ p, "refresh")
            return 2 * (ap @ (gram - 2 * eye) + p @ (w.t() @ w))
        p = comm.gather(stored, 1, n, "refresh").t()  # x = Gᵀ, p = Qᵀ (n×r, whole)
        w = (work @ p) * inv_norm  # this rank's rows of G Qᵀ / ‖G‖
        ap = comm.all_reduce_(work.t() @ w, "refresh") * inv_norm  # n×r
        wtw = comm.all_reduce_(w.t() @ w, "refresh")
        full = 2 * (ap @ (p.t() @ p - 2 * eye) + p @ wtw)
        start, stop = comm.cols(n)
        return full.t()[:, start:stop]

    def _seam(self, side: str) -> pca_optimizers.Seam:
        """P's whole shape, and sums completed over the ranks along the dimension P is split on."""
        comm, rank = self.comm, self.rank
        if comm.whole:
            return pca_optimizers.whole(self._state["P"])
        m, n = comm.shape
        split = 0 if side == "left" else 1

        def total(x: Tensor, dim: int | None) -> Tensor:
            return comm.all_reduce_(x.clone(), "refresh") if dim is None or dim == split else x

        return pca_optimizers.Seam((m, rank) if side == "left" else (rank, n), total)

    # ------------------------------------------------------------------ state
    def _placeholder(self, shape: tuple[int, int], side: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        out = super()._placeholder(shape, side, dtype, device)
        return {**out, **pca_optimizers.zeros(self.pca_optimizer, out["P"])}

    def _check_state(self, state: dict[str, Any]) -> None:
        super()._check_state(state)
        have = {k for k in state if k.startswith("pca_")}
        want = set(pca_optimizers.zeros(self.pca_optimizer, state["P"]))
        if have and have != want:
            raise ValueError(
                f"online_pca projector state holds the P optimizer entries {sorted(have)}, but "
                f"pca_optimizer={self.pca_optimizer!r} keeps {sorted(want)}: build the projector with the "
                "pca_optimizer the state was saved with")

    def export_state(self) -> dict[str, Any]:
        """On shards: P's optimizer entries split as P is (rows of P, columns of Q; Adafactor's statistic
        along the split dimension), as DTensors beside P's."""
        out = super().export_state()
        comm = self.comm
        if comm.whole or not self.initialized:
            return out
        m, n = comm.shape
        dim, length = (0, m) if self.side == "left" else (1, n)
        piece = self._state["P"].shape
        for key, value in self._state.items():
            if not key.startswith("pca_") or not isinstance(value, Tensor) or value.dim() == 0:
                continue
            if value.shape == piece:
                out[key] = comm.wrap(value, dim, length)
            elif key == ("pca_exp_avg_sq_row" if dim == 0 else "pca_exp_avg_sq_col"):
                out[key] = comm.wrap(value, 0, length)
        return out
