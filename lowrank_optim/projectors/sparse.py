"""Sparse row/column selection (Muhamed et al. 2024, "Grass: Compute Efficient Low-Memory LLM Training
with Structured Sparse Gradients", arXiv:2406.17660): R = Pᵀ G with a sparse P, Pᵀ = ρ B.

B (r×d) picks r rows (left side, d = m) or columns (right side, d = n) of G, one per row of B
(B[j, σ_j] = 1), and ρ is an r×r diagonal scale. With idx = (σ_1, ..., σ_r) sorted ascending:

* left  side: R = ρ G[idx] (r×n),      project_back(N) = Bᵀ ρ N: row j of ρN added into row σ_j
* right side: R = G[:, idx] ρ (m×r),   project_back(N) adds column j of Nρ into column σ_j

so ``project_back(project(G)) = P Pᵀ G``, and Grass's update W ← W − lr·scale·P·Adam(Pᵀ G) is the
library's ``drop`` update (ρ in both maps, as the paper writes Pᵀ = ρB for the compression and P for the
update). ``selection`` chooses σ and ρ from the squared norms s_i = ‖G_i‖² of the rows (columns):

============================  =========================================  ==========================
``selection``                 σ                                          ρ_jj
============================  =========================================  ==========================
``"topr"`` (default)          the r largest s_i (Grass's Top-r)          1
``"multinomial"``             r i.i.d. draws, q_i = s_i / Σ s            1/√(r·q_{σ_j})
``"multinomial_norepl"``      r draws without replacement from q         1/√(r·q_{σ_j})
``"uniform"``                 a uniformly random r-subset                √(d/r)  (q_i = 1/d)
============================  =========================================  ==========================

With replacement, E[P Pᵀ] = Σ_j E[e_σ e_σᵀ/(r q_σ)] = I, so E[project_back(project(G))] = G: the paper's
unbiased sparse projection. An index drawn twice keeps both rows of R (each its own Adam state; they
see the same gradient, so they stay equal) and project_back adds both into the weight: exactly P Pᵀ.
``uniform`` draws without replacement (no rank is spent on a repeat); its inclusion probability is r/d,
so ρ² = d/r keeps E[P Pᵀ] = I exactly. ``multinomial_norepl`` keeps the paper's ρ formula, which is
unbiased only to first order (the inclusion probability of row i is r·q_i only while r·q_i ≪ 1): the
paper offers it as the lower-variance variant, not as an unbiased one. Where the sampling distribution
cannot supply the draws (every s_i is 0, or fewer than r are positive without replacement), the draw
is uniform (q_i = 1/d) for that refresh, so ρ stays finite.

Grass's official repository (aashiqmuhamed/GRASS) holds only a README, so these follow the paper's
formulas (its Multi-Norm probabilities, q_i ∝ ‖G_i‖²); the choices it leaves open are the ones above. Draws come from a
``torch.Generator`` seeded with ``mix_seed(seed, refreshes)`` on the CPU, so a run, its resume, and every
FSDP2 rank (which reduce the same scores first) select the same rows.

Only ``topr`` gives an orthonormal basis (ρ = 1, distinct indices), so a method that uses the residual
G − project_back(project(G)) (FRUGAL, Fira) refuses the sampled selections.

State ``{"side", "idx", "dim"}`` for ``topr`` (``nbytes()`` = 8·r, as before), plus ``"scale"`` (ρ, r
float32) and ``"refreshes"`` (an int) for the sampled ones (8·r + 4·r + 8 bytes). Refresh cost: one pass
over G for the norms (float32; float64 for float64 input), then a top-k or a draw of r from d.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Projector, check_index_state
from .random_proj import mix_seed

SELECTIONS = ("topr", "multinomial", "multinomial_norepl", "uniform")


def draw(scores: Tensor, rank: int, selection: str, seed: int) -> tuple[Tensor, Tensor | None]:
    """(idx, ρ) for ``selection`` from the squared norms ``scores`` (d,): idx int64 sorted ascending, ρ
    float32 (None for ``topr``). Sampling runs on the CPU from ``seed``, whatever device the scores are on."""
    if selection == "topr":
        return torch.topk(scores, rank, sorted=False).indices.sort().values, None
    d = scores.numel()
    work = scores.detach().to("cpu", torch.float64)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    positive = int((work > 0).sum())
    need = rank if selection == "multinomial_norepl" else 1
    if selection == "uniform" or positive < need:
        q = torch.full((d,), 1.0 / d, dtype=torch.float64)
        idx = torch.randperm(d, generator=gen)[:rank] if selection != "multinomial" else (
            torch.multinomial(q, rank, replacement=True, generator=gen))
    else:
        q = work / work.sum()
        idx = torch.multinomial(q, rank, replacement=selection == "multinomial", generator=gen)
    idx = idx.sort().values
    rho = (1.0 / torch.sqrt(rank * q[idx])).to(torch.float32)
    return idx.to(scores.device), rho.to(scores.device)


class SparseProjector(Projector):
    name = "sparse"

    def __init__(self, rank: int, proj_type: str = "std", seed: int = 0, selection: str = "topr") -> None:
        super().__init__(rank, proj_type=proj_type, seed=seed)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(map(repr, SELECTIONS))} (Grass's top-r, "
                             f"norm² sampling with or without replacement, uniform sampling), got {selection!r}")
        self.selection = selection
        # basis()'s default dtype: the last gradient's (a loaded projector has seen none: float32)
        self._seen_dtype: torch.dtype | None = None

    @classmethod
    def options_from_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        """A group's ``selection`` key (``lro.Grass`` sets it), so a preset can choose it without
        ``projector_options`` (which would then follow it to any other projector); ``projector_options``
        override it."""
        return {"selection": group["selection"]} if group.get("selection") is not None else {}

    @classmethod
    def orthonormal_with(cls, options: dict[str, Any]) -> bool:
        return options.get("selection", "topr") == "topr"

    @property
    def sampled(self) -> bool:
        return self.selection != "topr"

    def _select(self, scores: Tensor, d: int) -> None:
        refreshes = int(self._state.get("refreshes", 0))
        idx, rho = draw(scores, self.rank, self.selection, mix_seed(self.seed, refreshes))
        self._state["idx"] = idx
        self._state["dim"] = d
        if rho is not None:
            self._state["scale"] = rho
            self._state["refreshes"] = refreshes + 1

    def _check_rank(self, d: int, what: str) -> None:
        if self.rank > d:
            raise ValueError(f"sparse projector of rank {self.rank} cannot select from the {d} {what}; "
                             "use a rank <= that dimension")

    def _refresh(self, grad: Tensor, side: str) -> None:
        m, n = grad.shape
        d = m if side == "left" else n
        self._check_rank(d, f"{'rows' if side == 'left' else 'columns'} of a {m}x{n} matrix")
        norm_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        scores = grad.to(norm_dtype).square().sum(dim=1 if side == "left" else 0)
        self._select(scores, d)
        self._seen_dtype = grad.dtype

    def _refresh_sharded(self, grad: Tensor, side: str) -> None:
        """The same selection from row shards: the squared norms of G's columns (right side) or rows (left,
        each rank filling its own) are summed over the ranks, then every rank draws the same r from the same
        scores and the same seed."""
        m, n = self.comm.shape
        d = m if side == "left" else n
        self._check_rank(d, "rows" if side == "left" else "columns")
        work = grad.double() if grad.dtype == torch.float64 else grad.float()
        if side == "right":
            scores = work.square().sum(dim=0)
        else:
            start, stop = self.comm.local_rows(m)
            scores = work.new_zeros(m)
            scores[start:stop] = work.square().sum(dim=1)
        self.comm.all_reduce_(scores, "refresh")
        self._select(scores, d)
        self._seen_dtype = grad.dtype

    def _check_state(self, state: dict[str, Any]) -> None:
        check_index_state(self.name, state, self.rank, repeats=self.selection == "multinomial")
        if not self.sampled:
            return
        rho, count = state.get("scale"), state.get("refreshes")
        if not isinstance(rho, Tensor) or rho.shape != (self.rank,) or not rho.is_floating_point() or not (
                bool(torch.isfinite(rho).all()) and bool((rho > 0).all())):
            raise ValueError(f"sparse projector state with selection={self.selection!r} needs 'scale', "
                             f"{self.rank} finite positive floats (ρ); was it saved with selection='topr'?")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"sparse projector state needs an integer 'refreshes' >= 0, got {count!r}")

    def _placeholder(self, shape: tuple[int, int], side: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        d = shape[0] if side == "left" else shape[1]
        out: dict[str, Any] = {"idx": torch.arange(self.rank, dtype=torch.int64, device=device), "dim": d}
        if self.sampled:
            out.update(scale=torch.ones(self.rank, dtype=torch.float32, device=device), refreshes=0)
        return out

    def nbytes(self) -> int:
        stored = super().nbytes()
        return stored + 8 if stored and self.sampled else stored

    @property
    def _axis(self) -> int:
        return 0 if self.side == "left" else 1

    def _rho(self, like: Tensor) -> Tensor | None:
        """ρ shaped to scale ``like`` along the selected axis (None for top-r)."""
        rho = self._state.get("scale")
        if rho is None:
            return None
        rho = rho.to(device=like.device, dtype=like.dtype)
        return rho.view(-1, 1) if self._axis == 0 else rho.view(1, -1)

    def basis(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """P (m×r, left side; ρ_jj at (σ_j, j)) or Pᵀ (r×n, right side; ρ_jj at (j, σ_j)), on the indices'
        device and in the last gradient's dtype unless told (float32 if it has seen none)."""
        idx = self._state["idx"] if device is None else self._state["idx"].to(device)
        dtype = dtype or self._seen_dtype or torch.float32
        sel = torch.zeros(self._state["dim"], self.rank, dtype=dtype, device=idx.device)
        rho = self._state.get("scale")
        sel[idx, torch.arange(self.rank, device=idx.device)] = 1 if rho is None else rho.to(idx.device, dtype)
        return sel if self.side == "left" else sel.t().contiguous()

    @property
    def _gathers(self) -> bool:
        """Whether the maps are a gather and a scatter here: always, except for rows spread over FSDP2
        ranks (the left side on shards), where the dense maps of the base class serve."""
        return self.comm.whole or self.side == "right"

    def project(self, grad: Tensor) -> Tensor:
        self._seen_dtype = grad.dtype
        if not self._gathers:
            return super().project(grad)
        low = grad.index_select(self._axis, self._state["idx"].to(grad.device))
        rho = self._rho(low)
        return low if rho is None else low.mul_(rho)

    def _scaled(self, low: Tensor, dtype: torch.dtype) -> Tensor:
        rho = self._rho(low)
        low = low.to(dtype)
        return low if rho is None else low * rho.to(dtype)

    def project_back(self, low: Tensor) -> Tensor:
        if not self._gathers:
            return super().project_back(low)
        shape = list(low.shape)
        shape[self._axis] = self._state["dim"]
        out = low.new_zeros(shape)
        return out.index_add_(self._axis, self._state["idx"].to(low.device), self._scaled(low, low.dtype))

    def residual(self, grad: Tensor, low: Tensor) -> Tensor:
        if not self._gathers:
            return super().residual(grad, low)
        rest = grad.to(low.dtype, copy=True)
        return rest.index_add_(self._axis, self._state["idx"].to(rest.device), self._scaled(low, low.dtype), alpha=-1.0)

    def apply_back(self, weight: Tensor, low: Tensor, alpha: float, beta: float = 1.0) -> None:
        if not self._gathers:
            super().apply_back(weight, low, alpha, beta)
            return
        if beta != 1.0:
            weight.mul_(beta)
        weight.index_add_(self._axis, self._state["idx"].to(weight.device), self._scaled(low, weight.dtype), alpha=alpha)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, proj_type={self.proj_type!r}, side={self.side!r}, "
                f"selection={self.selection!r})")

