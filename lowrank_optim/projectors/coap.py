"""COAP's projector: P moved by a correlation-aware SGD step per refresh, re-SVD'd every λ-th one.

Xiao et al. 2025, "COAP: Memory-Efficient Training with Correlation-Aware Gradient Projection", CVPR
2025, arXiv:2412.00071; the official code is bytedance/coap, ``coap_torch/projection/coap_matrix.py``
and ``optimizer/adamw.py``.

Write X for the gradient G (right side: P is r×n, R = G Pᵀ, M is m×r) or for Gᵀ (left side: the
official code's A = Pᵀ is m×r, R = Aᵀ G, M is r×n), so that the basis is always an r×b matrix P of X's
row space, and M_X for M (right) or Mᵀ (left). The official code refreshes at every T_u-th step
(``update_proj_gap``, its ``update_interval``, 32 by default), and each refresh is one of:

* **the first** (step 1): a randomized range finder without oversampling or power steps,
  ``Y = X Ω`` (Ω ~ N(0, 1), b×r), ``Q = qr(Y)``, ``P = Vᵀ`` of ``svd(Qᵀ X)`` (its r×b right factor);
* **every λ-th later one** (``reproject_factor`` λ = 5): the same warm-started from the old basis,
  Ω = Pᵀ, i.e. one pass of subspace iteration;
* **the others**: one SGD step on the correlation-aware loss

      L(P) = MSE(X Pᵀ P, X) · (1 − mean cos(M_X P, X)),

  the cosines taken between the rows of G and of the moment in full space (M P on the right side,
  P M on the left: rows of X on the right side, its columns on the left), ``MSE`` the mean over the m·n
  entries, cos as ``torch.nn.functional.cosine_similarity`` (each norm clamped at 1e-8); the gradient
  ∇L is clipped to a 2-norm of ``max_norm`` (1.0) as ``torch.nn.utils.clip_grad_norm_`` does (the
  factor min(1, max_norm / (‖∇L‖ + 1e-6))) and ``P ← P − lr · ∇L`` with ``lr`` 0.1. M is the rule's
  first moment as it stands before this step (in the old basis' coordinates); P is not
  re-orthonormalized (the MSE term pulls PᵀP back towards I on G's span; every λ-th refresh restores it).

With A = X Pᵀ, K = P Pᵀ, C = Aᵀ X, E = A P − X and N = m·n, the MSE term's gradient is
(2/N)(K C + Aᵀ A P − 2C); the cosine term's is −(1/count) M_Xᵀ D, with D the derivative of each cosine
in its full-space moment row, x/(‖y‖‖x‖) − cos · y/‖y‖² (the second part vanishing where ‖y‖ is
clamped). Both are written out here rather than taken from autograd as the official code does (the
test holds them to autograd on the loss itself, in float64): an SGD refresh costs five m×n×r matmuls
and a few m×n temporaries, no SVD; the re-SVD two m×n×r matmuls, an m×r QR and an r×n SVD.

Where we depart from the official code, each deliberately:

* P is kept in float32 (float64 for float64 gradients) whatever the weight's dtype: its steps of at
  most 0.1 in Frobenius norm would round away in a bf16 basis (the official code keeps the weight's).
* Singular vectors get canonical signs (the largest entry of each row of P positive, the library's
  rule: the same basis on every backend); ``canonical_signs=False`` keeps LAPACK's, as the official code.
* Ω is drawn from this projector's seed (each parameter its own, the same on every rank and after a
  resume) rather than one generator seeded 3407 for every layer: the same distribution.
* Which refresh is a re-SVD is counted per weight (every λ-th refresh), not as ``step % (T_u·λ) == 0``:
  the same steps with ``stagger=False``, and it keeps λ under the default staggered schedule.
* A rule without a first moment (Adafactor without ``momentum``) gives no M: the step uses the MSE term
  alone (the official code needs one).

As far as the paper's text shows (the loss, the step, the occasional QR + SVD of G P), the official
update follows it; we know of no place where the two differ.

State ``{"side", "P", "refreshes"}``; ``nbytes()`` = P's bytes + 8 for the counter.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..distributed import canonical_signs
from .random_proj import gaussian, mix_seed
from .svd import CountedSVDProjector

#: torch.nn.functional.cosine_similarity's clamp on each norm, and clip_grad_norm_'s guard.
COS_EPS = 1e-8
CLIP_EPS = 1e-6


def range_basis(x: Tensor, omega: Tensor, canonical: bool) -> Tensor:
    """P (r×b): the right singular vectors of Qᵀ X, Q = qr(X Ω) (one pass of subspace iteration from Ω, b×r)."""
    q = torch.linalg.qr(x @ omega).Q
    vh = torch.linalg.svd(q.t() @ x, full_matrices=False).Vh
    return canonical_signs(vh.t()).t() if canonical else vh


def coap_loss_grad(x: Tensor, p: Tensor, moment: Tensor | None, cos_dim: int) -> Tensor:
    """∇_P of MSE(X PᵀP, X) · (1 − mean cos(M P, X)) (cosines along ``cos_dim``), see the module docstring."""
    count = x.numel()
    a = x @ p.t()
    c = a.t() @ x
    grad_mse = (p @ p.t()) @ c + (a.t() @ a) @ p - 2 * c
    grad_mse.mul_(2.0 / count)
    if moment is None:
        return grad_mse
    mse = (a @ p - x).square_().sum() / count
    y = moment @ p
    ny, nx = y.norm(dim=cos_dim, keepdim=True), x.norm(dim=cos_dim, keepdim=True)
    cy, cx = ny.clamp_min(COS_EPS), nx.clamp_min(COS_EPS)
    cos = (y * x).sum(dim=cos_dim, keepdim=True) / (cy * cx)
    # d cos / d y = x / (|y| |x|) - cos y / |y|^2, built in place in y; the clamp passes no gradient
    along = torch.where(ny > COS_EPS, cos / (ny * cy), torch.zeros_like(cos))
    d = y.mul_(-along).addcmul_(x, 1.0 / (cy * cx))
    grad_cos = (moment.t() @ d).mul_(mse / cos.numel())
    return grad_mse.mul_(1.0 - cos.mean()).sub_(grad_cos)


class COAPProjector(CountedSVDProjector):
    name = "coap"
    quantizable = False  # P takes small SGD steps between re-SVDs: INT4 would round them away
    orthonormal = False  # between re-SVDs P drifts off orthonormality by its SGD steps
    reads_moment = True

    def __init__(self, rank: int, proj_type: str = "std", seed: int = 0, reproject_factor: int = 5,
                 lr: float = 0.1, max_norm: float = 1.0, canonical_signs: bool = True) -> None:
        super().__init__(rank, proj_type=proj_type, seed=seed, canonical_signs=canonical_signs)
        if isinstance(reproject_factor, bool) or not isinstance(reproject_factor, int) or reproject_factor < 1:
            raise ValueError(f"reproject_factor must be an integer >= 1 (every how many refreshes P is "
                             f"recomputed by a warm-started randomized SVD), got {reproject_factor!r}")
        for option, value in (("lr", lr), ("max_norm", max_norm)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{option} must be a finite number > 0, got {value!r}")
        self.reproject_factor = reproject_factor
        self.lr = float(lr)
        self.max_norm = float(max_norm)

    @staticmethod
    def basis_dtype(grad_dtype: torch.dtype) -> torch.dtype:
        """float32 at least: lr-sized steps would round away in a half-precision P."""
        return torch.float64 if grad_dtype == torch.float64 else torch.float32

    @classmethod
    def shard_error(cls, side: str, options: dict[str, Any]) -> str | None:
        return f"projector={cls.name!r} (its SGD step and warm-started SVD are not built for row shards)"

    def _refresh_sharded(self, grad: Tensor, side: str) -> None:
        raise TypeError(self.shard_error(side, {}))

    def _refresh(self, grad: Tensor, side: str) -> None:
        self._refresh_from(grad, side, None)

    def _refresh_from(self, grad: Tensor, side: str, moment: Tensor | None) -> None:
        m, n = grad.shape
        if self.rank > min(m, n):
            raise ValueError(f"coap projector of rank {self.rank} cannot refresh from a {m}x{n} matrix: "
                             f"rank exceeds min(m, n) = {min(m, n)}")
        work = grad if grad.dtype == torch.float64 else grad.float()
        x = work if side == "right" else work.t()
        count = self._state.get("refreshes", 0)
        if "P" not in self._state:
            omega = gaussian((x.shape[1], self.rank), mix_seed(self.seed, count), work.device, work.dtype)
            p = range_basis(x, omega, self.canonical_signs)
        else:
            self.check_fits(grad.shape)
            old = self._state["P"].to(work.dtype)
            old = old if side == "right" else old.t()
            if count % self.reproject_factor == 0:
                p = range_basis(x, old.t(), self.canonical_signs)
            else:
                p = self._sgd_step(x, old, moment, side)
        basis = p if side == "right" else p.t()
        self._state["P"] = basis.to(self.basis_dtype(grad.dtype), copy=True, memory_format=torch.contiguous_format)
        self._state["refreshes"] = count + 1

    def _sgd_step(self, x: Tensor, p: Tensor, moment: Tensor | None, side: str) -> Tensor:
        """One clipped SGD step on the correlation-aware loss (X frame: P is r×b)."""
        m_x = None if moment is None else (moment if side == "right" else moment.t()).to(x.dtype)
        grad = coap_loss_grad(x, p, m_x, cos_dim=1 if side == "right" else 0)
        clip = torch.clamp(self.max_norm / (grad.norm() + CLIP_EPS), max=1.0)
        return p - grad.mul_(clip * self.lr)

