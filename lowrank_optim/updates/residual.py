"""The residual policies: what happens to G − project_back(R), the part of G the subspace misses.

* ``drop`` (GaLore): nothing; W ← (1 − lr·wd)·W − lr·scale·project_back(N);
* ``sign`` (FRUGAL, Zmushko et al. 2025): −lr·residual_lr_scale·sign(residual) on top, state-free;
* ``sgd``: −lr·residual_lr_scale·residual;
* ``fira`` (Chen et al. 2024): the residual scaled per channel by the subspace's Adam ratio
  k = ‖N‖/‖R‖, and both parts times ``scale``: scale·(project_back(N) + k·residual).

With ``limiter=γ`` the residual term of ``sign``, ``sgd`` and ``fira`` may not grow by more than γ per step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..reductions import norms
from ..rules.orthogonal import RMS as ADAMW_RMS
from ..projectors import Projector
from .base import Context, Update, basis_gram_bytes, register
from .scaling import channel_factors

#: A residual channel below this fraction of its gradient channel's norm (in units of the dtypes' epsilon)
#: is round-off, see :meth:`Sign.numerical_zero`.
ROUNDOFF_GRAD_EPS = 2
ROUNDOFF_COMPUTE_EPS = 64


@register
class Drop(Update):
    """GaLore: the residual is dropped."""

    name = "drop"

    def apply(self, ctx: Context) -> None:
        ctx.apply_back(ctx.direction, -ctx.lr * ctx.scale, ctx.decay)


class _Residual(Update):
    """The low-rank step plus a term made from the residual; subclasses say how (``term``)."""

    limited = True
    uses_residual = True

    def term(self, ctx: Context, rest: Tensor) -> tuple[Tensor, float, Tensor | None]:
        """The residual term (computed in place in ``rest``), its step size, and a per-channel 0/1 factor
        of the channels that take it (None: all of them)."""
        raise TypeError(f"update {self.name!r} defines no term")

    def apply(self, ctx: Context) -> None:
        rest, alpha, keep = self.term(ctx, ctx.residual())
        ctx.apply_back(ctx.direction, -ctx.lr * ctx.scale, ctx.decay)
        w = ctx.weight
        if ctx.group["limiter"] is not None:
            if keep is not None:
                rest.mul_(keep)
            factor = self.limit(ctx, ctx.norm(rest, rows="weight"))
            w.addcmul_(rest.to(w.dtype), factor.to(w.dtype), value=alpha)
        elif keep is not None:
            w.addcmul_(rest.to(w.dtype), keep.to(w.dtype), value=alpha)
        else:
            w.add_(rest.to(w.dtype), alpha=alpha)


@register
class Sign(_Residual):
    """FRUGAL's state-free signSGD on the residual."""

    name = "sign"

    def adamw_rms_keys(self, group: dict[str, Any], explicit: frozenset[str]) -> dict[str, Any]:
        """sign() has RMS 1 where AdamW's update has about 0.2 (Moonshot's figure, which the orthogonal
        rule targets too; measured with bench/update_rms.py: 0.19 on nanoGPT, 0.29 on llama_tiny), so the
        residual's lr scale becomes 0.2 unless given. Measured at AdamW's tuned lr (300 steps, held-out loss
        against AdamW's): nanoGPT 1.044 at 1.0 → 0.974 at 0.2, llama_tiny 0.948 → 0.950."""
        return {} if "residual_lr_scale" in explicit else {"residual_lr_scale": ADAMW_RMS}

    def term(self, ctx: Context, rest: Tensor) -> tuple[Tensor, float, Tensor | None]:
        keep = ~self.numerical_zero(ctx, rest)
        return rest.sign_(), -ctx.lr * float(ctx.group["residual_lr_scale"]), keep

    @staticmethod
    def numerical_zero(ctx: Context, rest: Tensor) -> Tensor:
        """The channels whose residual is round-off: ‖rest‖ ≤ (2·ε_G + 64·ε₃₂)·‖G‖ channel by channel
        (columns of G for a left-side projection, rows for a right-side one, the vectors the projection
        acts on). sign() would turn them into full ±lr steps. A channel inside the subspace leaves
        1–13 ε₃₂ of its norm (measured with SVD bases up to 2048×512, rank 256) or 0.4 ε of a bf16
        gradient's; a real residual is orders of magnitude above either. ‖G‖ per channel is
        √(‖R‖² + ‖rest‖²) (the basis is orthonormal; a sum of squares, so no cancellation), which
        spares a pass over G."""
        dim = 0 if ctx.side == "left" else 1
        tol = ROUNDOFF_GRAD_EPS * torch.finfo(ctx.grad.dtype).eps + ROUNDOFF_COMPUTE_EPS * torch.finfo(rest.dtype).eps
        r = ctx.norm(rest, rows="weight" if dim == 0 else None, dim=dim)
        low = norms(ctx.low, dim)
        return r <= tol * torch.sqrt(r.square() + low.square())


@register
class SGD(_Residual):
    """Plain SGD on the residual."""

    name = "sgd"

    def term(self, ctx: Context, rest: Tensor) -> tuple[Tensor, float, Tensor | None]:
        return rest, -ctx.lr * float(ctx.group["residual_lr_scale"]), None


@register
class Fira(_Residual):
    """Fira: the residual scaled per channel by φ = ‖N‖/‖R‖ (the paper's scale on the whole update).

    The residual is never built. φ scales the channels, the dimension the projection does not act on,
    so it commutes with project_back, and scale·(project_back(N) + f·(G − project_back(R))·φ) is
    scale·(f·φ∘G + project_back(N − f·φ∘R)): one ``addmm_`` and one ``addcmul_``, one m×n×r matmul fewer
    than forming G − project_back(R) (f is the limiter's factor). The limiter's norm comes from the
    channels' norms (:meth:`residual_norms`)."""

    name = "fira"

    def kept_bytes(self, projector: Projector, group: dict[str, Any], p: Tensor) -> int:
        return basis_gram_bytes(projector, p) if group["limiter"] is not None else 0  # residual_norms' Γ

    def term(self, ctx: Context, rest: Tensor) -> tuple[Tensor, float, Tensor | None]:
        return rest.mul_(channel_factors(ctx)), -ctx.lr * ctx.scale, None

    def apply(self, ctx: Context) -> None:
        phi = channel_factors(ctx)
        if ctx.group["limiter"] is not None:
            rows = "weight" if ctx.side == "right" else None  # the channels are split over the ranks, or whole
            phi = phi * self.limit(ctx, ctx.norm(phi * self.residual_norms(ctx, phi.dtype), rows=rows))
        alpha = -ctx.lr * ctx.scale
        ctx.apply_back(ctx.direction - phi * ctx.low, alpha, ctx.decay)
        w = ctx.weight
        # float16's range cannot hold every ratio; float32 factors make addcmul_ compute in float32
        f = phi if w.dtype == torch.float16 else phi.to(w.dtype)
        w.addcmul_(ctx.grad.to(w.dtype), f, value=alpha)

    @staticmethod
    def residual_norms(ctx: Context, dtype: torch.dtype) -> Tensor:
        """‖G_c − project_back(R)_c‖ per channel c without forming it: ‖G_c‖² − 2‖R_c‖² + R_cᵀ Γ R_c, as
        R = project(G), with Γ the Gram matrix of project_back's basis (the formula holds for any basis, an
        INT4 or online-PCA one included). Γ is computed once per basis (:meth:`Projector.basis_gram`), and
        for an orthonormal one (an SVD's, to float32 rounding) R_cᵀ Γ R_c is ‖R_c‖²: r×r×(m or n) work per
        step at most, against the residual's m×n×r. Its error is about ε·‖G_c‖²/‖residual_c‖: large only for
        a channel almost inside the subspace, whose residual term is as small."""
        low = ctx.low.to(dtype)
        gram, orthonormal = ctx.projector.basis_gram(low.device, dtype)
        dim = 1 if ctx.side == "right" else 0  # right: low m×r, channels are rows (local); left: r×n columns
        g = ctx.norm(ctx.grad, rows=None if dim == 1 else "weight", dim=dim, dtype=dtype)
        own = low.square().sum(dim, keepdim=True)
        if orthonormal:  # the limiter's norm tolerates Γ = I to within NEAR_IDENTITY
            return (g.square() - own).clamp_(min=0).sqrt_()
        quad = (low @ gram if dim == 1 else gram @ low).mul_(low).sum(dim, keepdim=True)
        return (g.square() - 2 * own + quad).clamp_(min=0).sqrt_()
