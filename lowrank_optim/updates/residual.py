"""The residual policies: what happens to G − project_back(R), the part of G the subspace misses.

* ``drop`` (GaLore): nothing; W ← (1 − lr·wd)·W − lr·scale·project_back(N);
* ``sign`` (FRUGAL, Zmushko et al. 2025): −lr·residual_lr_scale·sign(residual) on top, state-free;
* ``sgd``: −lr·residual_lr_scale·residual;
* ``fira`` (Chen et al. 2024): the residual scaled per channel by the subspace's Adam ratio
  k = ‖N‖/‖R‖, and both parts times ``scale``: scale·(project_back(N) + k·residual).

With ``limiter=γ`` the residual term of ``sign``, ``sgd`` and ``fira`` may not grow by more than γ per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Context, Update, register
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

    def term(self, ctx: Context, rest: Tensor) -> tuple[Tensor, float]:
        """The residual term (computed in place in ``rest``) and its step size."""
        raise TypeError(f"update {self.name!r} defines no term")

    def apply(self, ctx: Context) -> None:
        rest, alpha = self.term(ctx, ctx.residual())
        ctx.apply_back(ctx.direction, -ctx.lr * ctx.scale, ctx.decay)
        factor = self.limit(ctx, ctx.norm(rest, rows="weight"))
        if factor is None:
            ctx.weight.add_(rest.to(ctx.weight.dtype), alpha=alpha)
        else:
            ctx.weight.addcmul_(rest.to(ctx.weight.dtype), factor.to(ctx.weight.dtype), value=alpha)


@register
class Sign(_Residual):
    """FRUGAL's state-free signSGD on the residual."""

    name = "sign"

    def term(self, ctx: Context, rest: Tensor) -> tuple[Tensor, float]:
        rest.mul_(~self.numerical_zero(ctx, rest)).sign_()
        return rest, -ctx.lr * float(ctx.group["residual_lr_scale"])

    @staticmethod
    def numerical_zero(ctx: Context, rest: Tensor) -> Tensor:
        """The channels whose residual is round-off: ‖rest‖ ≤ (2·ε_G + 64·ε₃₂)·‖G‖ channel by channel
        (columns of G for a left-side projection, rows for a right-side one, the vectors the projection
        acts on). sign() would turn them into full ±lr steps. A channel inside the subspace leaves
        1–13 ε₃₂ of its norm (measured with SVD bases up to 2048×512, rank 256) or 0.4 ε of a bf16
        gradient's; a real residual is orders of magnitude above either."""
        dim = 0 if ctx.side == "left" else 1
        grad = ctx.grad
        tol = ROUNDOFF_GRAD_EPS * torch.finfo(grad.dtype).eps + ROUNDOFF_COMPUTE_EPS * torch.finfo(rest.dtype).eps
        rows = "weight" if dim == 0 else None
        g = ctx.norm(grad, rows=rows, dim=dim, dtype=rest.dtype)
        return ctx.norm(rest, rows=rows, dim=dim) <= tol * g


@register
class SGD(_Residual):
    """Plain SGD on the residual."""

    name = "sgd"

    def term(self, ctx: Context, rest: Tensor) -> tuple[Tensor, float]:
        return rest, -ctx.lr * float(ctx.group["residual_lr_scale"])


@register
class Fira(_Residual):
    """Fira: the residual scaled per channel by ‖N‖/‖R‖ (the paper's scale on the whole update)."""

    name = "fira"

    def term(self, ctx: Context, rest: Tensor) -> tuple[Tensor, float]:
        return rest.mul_(channel_factors(ctx)), -ctx.lr * ctx.scale
