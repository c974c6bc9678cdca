"""GWT's residual: the Haar detail coefficients, divided by the Adam denominator of the approximation
coefficient they belong to, with no state of their own (Wen et al. 2025, "GWT: Scalable Optimizer State
Compression for Large Language Model Training", arXiv:2501.07237; the official ``WaveAdamW`` of
zqOuO/GWT, ``galore_torch/waveadamw.py``).

The official step, for the level-l Haar approximation A of G (m × n/2^l, along G's last axis) and its
details D₁ … D_l, with Adam's moments M, V on A only, t the step count, c₁ = 1 − β₁ᵗ, c₂ = 1 − β₂ᵗ::

    den = √V + ε,   u = M / den                         (no bias correction yet)
    f   = 1 at step 1, else min(1, γ·(‖u_prev‖ + 1e-8) / ‖u‖);  ‖u_prev‖ ← f·‖u‖   (Fira's limiter, γ 1.01)
    D_k ← f · D_k / den repeated 2^(l−k) times          (each detail over its approximation's denominator)
    W  ← W − lr·scale·(√c₂/c₁) · waverec(f·u, D_1..D_l)

The inverse transform is linear and every detail coefficient lives inside one block of 2^l entries, so
waverec(0, D / den) is (G − project_back(A)) divided entry by entry by the denominator of its block
(``projector.spread``): the details are never formed. With our Adam's N = M̂/(√V̂ + ε) that is::

    W ← (1 − lr·wd)·W − lr·scale·f·( project_back(N) + (G − project_back(R)) / (c₁·spread(√V̂ + ε)) )
    with f from ‖u‖ = ‖N‖·c₁/√c₂

which is the official step exactly, except where the core's Adam puts ε (on √V̂, as ``torch.optim.AdamW``;
the official ``√V + ε`` is ours with ε·√c₂) and takes weight decay (from the weights before the update;
the official code decays the updated ones). The official default ε, 1e-6, is the ``GWT`` preset's too
(the core's is torch's 1e-8): it bounds the details' step where an approximation coefficient is near 0.

The paper's equations, as far as we could read them (Ã = M/(√V + ε), D̃ = D/(√V + ε),
W ← W − η·α·[Ã, D̃]H̃, H̃ the inverse transform), show no bias correction and no limiter; the official
code, which the paper's LLaMA scripts run, has both, and we follow the code: the limiter is in the
preset's defaults (``limiter=1.01``), ``limiter=None`` drops it, and the bias correction is Adam's.
Note what the official placement does: the limiter sees the uncorrected u, whose norm grows by about
c₁/√c₂ over the first ~10 steps, so it also damps Adam's bias-correction warm-up (as apollo-torch's does),
and the details are divided by c₁ (larger early steps than Ã's).

It needs a projector with block-structured coefficients (``spread``: ``haar``) and a rule that keeps
Adam's second moment ``exp_avg_sq`` (``adam``); both are checked when the group is built.
"""

from __future__ import annotations

import math
from typing import Any

from .. import projectors as _projectors
from .. import rules as _rules
from ..quant.storage import storage_of
from .base import Context, Update, register

#: The rule state GWT divides the details by.
SECOND_MOMENT = "exp_avg_sq"


def bias_corrections(ctx: Context) -> tuple[float, float]:
    """(1 − β₁ᵗ, 1 − β₂ᵗ) for the step the rule's state has just taken."""
    beta1, beta2 = ctx.group["betas"]
    t = _rules.base.steps(ctx.state)
    return 1.0 - float(beta1) ** t, 1.0 - float(beta2) ** t


@register
class WaveletDetails(Update):
    """GWT: project_back(N) plus the Haar details over the approximation's Adam denominator, limited."""

    name = "gwt"
    limited = True
    uses_residual = True

    def check(self, group: dict[str, Any], fail: Any) -> None:
        if group["residual"] != self.name:
            return
        if not hasattr(_projectors.REGISTRY[group["projector"]], "spread"):
            fail("residual", "gwt divides each detail coefficient by the Adam denominator of the approximation "
                 f"coefficient it belongs to, which needs block-structured coefficients; projector="
                 f"{group['projector']!r} has none: use projector='haar'")
        if SECOND_MOMENT not in _rules.get(group["rule"]).keys:
            fail("residual", f"gwt divides the details by Adam's second moment, which rule={group['rule']!r} "
                 "does not keep: use rule='adam'")
        if group.get("state_bits") == 8:
            # the details are largest where V is smallest, which INT8's dynamic codes resolve worst: the update
            # was 57% (norm) from state_bits=32's on a 512-wide layer, every other preset's ~1% (a QA pass)
            fail("state_bits", "gwt divides its detail coefficients by V read back from its INT8 codes, which is "
                 "coarsest exactly where the details are largest (the update lands ~57% from the 32-bit one); "
                 "use state_bits=32 with residual='gwt'")

    def apply(self, ctx: Context) -> None:
        c1, c2 = bias_corrections(ctx)
        v = storage_of(ctx.state, SECOND_MOMENT).load(ctx.state, SECOND_MOMENT, signed=False)
        denom = (v.to(ctx.low.dtype) / c2).sqrt_().add_(float(ctx.group["eps"])).mul_(c1).reciprocal_()
        details = ctx.residual().mul_(ctx.projector.spread(denom))
        factor = self.limit(ctx, ctx.norm(ctx.direction, rows="low") * (c1 / math.sqrt(c2)))
        alpha = -ctx.lr * ctx.scale
        direction = ctx.direction if factor is None else ctx.direction * factor
        # the details' step in R's dtype before the weight's: a detail over a near-0 denominator may not fit
        # a float16 weight's range before it is times lr
        details.mul_(alpha if factor is None else factor * alpha)
        ctx.apply_back(direction, alpha, ctx.decay)
        ctx.weight.add_(details.to(ctx.weight.dtype))
