"""APOLLO's scaling (Zhu et al. 2025): the raw gradient, rescaled by what Adam did in the subspace.

s = ‖N‖ / (‖R‖ + 1e-8), per channel (``channel``: the dimension the projection keeps, rows of W for a
right-side projection, columns for a left-side one, the norms along the projected dimension) or for
the whole tensor (``tensor``, APOLLO-Mini). The update is W ← (1 − lr·wd)·W − lr·√scale·(s ∘ G), √scale
as apollo-torch applies it, so its settings carry over; with ``limiter=γ`` the scaled gradient's norm
may not grow by more than γ per step. The scaled gradient is never built: its norm comes from G's
channel norms, and the update is one ``addcmul_`` of G with the (limited) factors.

The ratio is float32 (R and N are), and a channel whose R is exactly zero gets s = 0: its G channel
is zero too, and 1/1e-8 would overflow a float16 weight's range into inf, and 0·inf into NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..reductions import norms
from .base import Context, Update, register


def _ratio(n: Tensor, r: Tensor) -> Tensor:
    return torch.where(r > 0, n / (r + 1e-8), torch.zeros_like(n))


def channel_factors(ctx: Context) -> Tensor:
    """‖N‖/(‖R‖ + 1e-8) per channel, broadcasting against the m×n gradient: (m, 1) or (1, n)."""
    dim = 1 if ctx.side == "right" else 0
    return _ratio(norms(ctx.direction, dim), norms(ctx.low, dim))


class _Scaling(Update):
    kind = "scaling"
    limited = True

    def factors(self, ctx: Context) -> Tensor:
        raise TypeError(f"update {self.name!r} defines no factors")

    def scaled_norm(self, ctx: Context, factors: Tensor) -> Tensor:
        """‖s ∘ G‖, from the norms of G's channels."""
        raise TypeError(f"update {self.name!r} defines no scaled_norm")

    def apply(self, ctx: Context) -> None:
        factors = self.factors(ctx)
        limit = self.limit(ctx, self.scaled_norm(ctx, factors)) if ctx.group["limiter"] is not None else None
        if limit is not None:
            factors = factors * limit
        if ctx.decay != 1.0:
            ctx.weight.mul_(ctx.decay)
        w = ctx.weight
        # float16's range cannot hold every ratio; float32 factors make addcmul_ compute in float32
        f = factors if w.dtype == torch.float16 else factors.to(w.dtype)
        w.addcmul_(ctx.grad.to(w.dtype), f, value=-ctx.lr * math.sqrt(ctx.scale))


@register
class Channel(_Scaling):
    """APOLLO: one factor per channel."""

    name = "channel"

    def factors(self, ctx: Context) -> Tensor:
        return channel_factors(ctx)

    def scaled_norm(self, ctx: Context, factors: Tensor) -> Tensor:
        if ctx.side == "right":  # channels are G's rows: their norms are local, the sum is not
            return ctx.norm(factors * ctx.norm(ctx.grad, dim=1, dtype=factors.dtype), rows="weight")
        # channels are G's columns: their norms run over the rows
        return ctx.norm(factors * ctx.norm(ctx.grad, rows="weight", dim=0, dtype=factors.dtype))


@register
class TensorWise(_Scaling):
    """APOLLO-Mini: one factor for the whole tensor."""

    name = "tensor"

    def factors(self, ctx: Context) -> Tensor:
        return _ratio(ctx.norm(ctx.direction, rows="low"), ctx.norm(ctx.low, rows="low"))

    def scaled_norm(self, ctx: Context, factors: Tensor) -> Tensor:
        return factors * ctx.norm(ctx.grad, rows="weight", dtype=factors.dtype)
