"""GoLore's projectors (He et al. 2025, "Subspace Optimization for Large Language Models with Convergence
Guarantees", ICML 2025; official code pkumelon/Golore).

* ``stiefel``: a random orthonormal basis, drawn from a seed and never stored: the Gaussian Z (d×r,
  d the projected side's length) made orthonormal by its polar factor Z (ZᵀZ)^(-1/2), as the official
  ``get_random_orthogonal_matrix``; uniform on the Stiefel manifold. Left side: P = that d×r matrix;
  right side: Q = its transpose (orthonormal rows). Unlike ``random`` (APOLLO's N(0, 1/r) sketch) it
  is exactly orthonormal, so FRUGAL's and Fira's residual and the ``rotate`` policy accept it.
  Departure: for the right side the official code orthonormalizes the r×n draw through its n×n Gram
  matrix, which has rank r < n (its inverse square root is undefined); we orthonormalize the n×r draw,
  the evident intent. The polar factor is recomputed (a d×r SVD) whenever the basis is used.
* ``golore``: the GoLore schedule: a ``before`` projector (default ``svd``, GaLore, as the official
  code; any registered one) until the first refresh at or after step ``switch_step``, ``stiefel``
  from then on. The official code switches at the first refresh with ``step >= rand_ratio ·
  num_training_steps``; the projector counts its refreshes and, as refresh k falls at step k·gap
  under the default schedule (``stagger=False``, no lazy refresh), switches at the first k with
  k·``update_proj_gap`` >= ``switch_step``. With ``stagger`` the refreshes come up to a gap early,
  and so does the switch.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from .base import Projector
from .random_proj import RandomProjector, gaussian

_PREFIX = "inner."


class StiefelProjector(RandomProjector):
    name = "stiefel"
    orthonormal = True

    def _matrix(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        z = gaussian((self._state["dim"], self.rank), self._state["seed"], device, torch.float32)
        # the draw is float32 whatever the dtype (as random's); its polar factor in float64 for float64
        z = z.double() if dtype == torch.float64 else z
        u, _, vh = torch.linalg.svd(z, full_matrices=False)  # Z (ZᵀZ)^(-1/2) = U Vᵀ
        out = u @ vh
        out = out if self.side == "left" else out.T.contiguous()
        return out if out.dtype == dtype else out.to(dtype)


class GoLoreProjector(Projector):
    """``before`` (default ``svd``) until the first refresh at step >= ``switch_step``, then ``stiefel``.

    ``switch_step`` 0 (the default, GoLore with ``rand_ratio`` 0) projects at random from the start;
    :class:`lowrank_optim.GoLore` asks for it explicitly."""

    name = "golore"

    def __init__(self, rank: int, proj_type: str = "std", seed: int = 0, *, switch_step: int = 0,
                 gap: int = 200, before: str = "svd", before_options: dict[str, Any] | None = None) -> None:
        super().__init__(rank, proj_type=proj_type, seed=seed)
        from . import REGISTRY

        if isinstance(switch_step, bool) or not isinstance(switch_step, int) or switch_step < 0:
            raise ValueError(f"switch_step must be an integer >= 0 (the step from which GoLore projects at random: "
                             f"rand_ratio * total steps), got {switch_step!r}")
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"gap must be an integer >= 1 (update_proj_gap), got {gap!r}")
        if before not in REGISTRY or before == self.name:
            raise ValueError(f"before must be a registered projector other than golore, got {before!r}")
        self.switch_step, self.gap = switch_step, gap
        self._before = REGISTRY[before](rank, proj_type=proj_type, seed=seed, **(before_options or {}))
        self._after = StiefelProjector(rank, proj_type=proj_type, seed=seed)
        if self._before.refresh_every_step or self._before.fixed:
            raise ValueError(f"before={before!r} refreshes every step or never: GoLore switches at a refresh")
        self.orthonormal = self._before.orthonormal  # stiefel is; the residual methods ask of both phases
        self.reads_moment = self._before.reads_moment

    @classmethod
    def options_from_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        return {"gap": group["update_proj_gap"]}

    @classmethod
    def shard_error(cls, side: str, options: dict[str, Any]) -> str | None:
        return "projector='golore' (it has no refresh on row shards)"

    def bind(self, comm: Any) -> "GoLoreProjector":
        super().bind(comm)
        self._before.bind(comm)
        self._after.bind(comm)
        return self

    @property
    def phase(self) -> int:
        """0 while ``before`` projects, 1 once ``stiefel`` does."""
        return int(self._state.get("phase", 0))

    @property
    def active(self) -> Projector:
        return self._after if self.phase else self._before

    def _sync(self) -> None:
        """Give the active inner projector its part of the state."""
        inner = {k[len(_PREFIX):]: v for k, v in self._state.items() if k.startswith(_PREFIX)}
        self.active._state = {**inner, "side": self._state["side"]} if "side" in self._state else inner

    def _refresh(self, grad: Tensor, side: str) -> None:
        refreshes = int(self._state.get("refreshes", 0))
        phase = 1 if refreshes * self.gap >= self.switch_step else 0
        inner = self._after if phase else self._before
        if phase != self.phase:
            inner._state = {}
            if phase:  # the before projector's basis goes with the switch: a seed replaces it
                self._before._state = {}
        inner._refresh(grad, side)
        kept = {_PREFIX + k: v for k, v in inner._state.items() if k != "side"}
        self._state = {"side": side, "phase": phase, "refreshes": refreshes + 1, **kept}

    def update(self, grad: Tensor, moment: Tensor | None = None) -> None:
        self._sync()
        super().update(grad, moment)
        self._sync()

    def refreshed(self, grad: Tensor, moment: Tensor | None = None) -> "GoLoreProjector":
        new = copy.copy(self)
        new._before, new._after = copy.copy(self._before), copy.copy(self._after)
        new._state = dict(self._state)
        new.update(grad, moment)
        return new

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for key in ("phase", "refreshes"):
            if isinstance(self._state.get(key), Tensor):
                self._state[key] = int(self._state[key])
        self._sync()

    def _check_state(self, state: dict[str, Any]) -> None:
        phase, refreshes = state.get("phase"), state.get("refreshes")
        if int(phase) not in (0, 1) or int(refreshes) < 0:
            raise ValueError(f"golore projector state needs phase 0 or 1 and refreshes >= 0, got {phase!r}, {refreshes!r}")
        inner = {k[len(_PREFIX):]: v for k, v in state.items() if k.startswith(_PREFIX)}
        (self._after if int(phase) else self._before)._check_state({**inner, "side": state["side"]})

    def _placeholder(self, shape: tuple[int, int], side: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        # the state of the first refresh: stiefel's when switch_step is 0, else the before projector's
        phase = 1 if self.switch_step == 0 else 0
        inner = (self._after if phase else self._before)._placeholder(shape, side, dtype, device)
        return {"phase": phase, "refreshes": 1, **{_PREFIX + k: v for k, v in inner.items()}}

    def allocate(self, shape: Any, dtype: torch.dtype, device: torch.device | str) -> None:
        super().allocate(shape, dtype, device)
        self._sync()

    def check_fits(self, shape: tuple[int, int] | torch.Size) -> None:
        self.active.check_fits(shape)

    def nbytes(self) -> int:
        return self.active.nbytes()

    def basis(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        return self.active.basis(device=device, dtype=dtype)

    def project(self, grad: Tensor) -> Tensor:
        return self.active.project(grad)

    def project_back(self, low: Tensor) -> Tensor:
        return self.active.project_back(low)

    def residual(self, grad: Tensor, low: Tensor) -> Tensor:
        return self.active.residual(grad, low)

    def apply_back(self, weight: Tensor, low: Tensor, alpha: float, beta: float = 1.0) -> None:
        self.active.apply_back(weight, low, alpha, beta)
