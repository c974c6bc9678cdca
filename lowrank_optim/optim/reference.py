"""A short, readable reference for LowRankAdamW: the whole algorithm, one tensor at a time.

It is the independent statement the fast core (``lowrank_optim.optim.lowrank``) is tested against,
so it uses only torch and the projectors: no foreach, no INT8, no FSDP, float32 (float64 for
float64 parameters), one process. The projector object lives in ``state[p]``, so this optimizer is
not for checkpoints. For a weight W (m×n) in a group with ``rank`` r < min(m, n), step t = 0, 1, ...::

    G = W.grad
    if residual = error_feedback:  G = G + E                   # E = 0 at t = 0; the refresh sees it too
    if t % update_proj_gap == 0 (haar, online_pca: t = 0 only):                   # refresh the subspace
        old, proj = proj, proj.refreshed(G, M)                  # make(seed=W's position) at t = 0; M for COAP
        keep:   M, V as they are
        reset:  M = V = 0 and k = 0: a fresh Adam in the new subspace (FRUGAL's code sets step = 0)
        rotate: M = T(M), V = |T(V)|,  T(X) = (P_newᵀ P_old) X (left) or X (Q_old Q_newᵀ) (right)
        transfer (LDAdam): M = T(M), V = c₂ |T²(V/c₂ − M_old²/c₁²) + M²/c₁²|, T² with T squared element-wise
    R = proj.project(G)                                         # r×n (left) or m×r (right)
    k += 1;  M = β₁M + (1 − β₁)R;  V = β₂V + (1 − β₂)R²
    N = (M / (1 − β₁ᵏ)) / (√(V / (1 − β₂ᵏ)) + ε)                  # as torch.optim.AdamW
    B = proj.project_back;  S = G − B(R)                        # the residual
    U = √scale · lim(G ∘ s(N, R))                  if scaling (APOLLO: channel or tensor)
        scale · B(N)                               residual = drop (GaLore), error_feedback (DCT-AdamW),
                                                   then E = G − Π(G), Π the orthogonal projection onto span(B):
                                                   B(R), or B(Γ⁺R) / B(RΓ⁺) for a basis that is not orthonormal
        scale · B(N) + rls · lim(sign(S))          residual = sign (FRUGAL)
        scale · B(N) + rls · lim(S)                residual = sgd
        scale · (B(N) + lim(S ∘ s(N, R)))          residual = fira (s per channel)
        scale · f · (B(N) + S ⊘ (c₁ · spread(√V̂ + ε)))   residual = gwt (haar's blocks; c₁ = 1 − β₁ᵏ)
    W = W − lr · (U + wd · W)                                   # decay from the pre-update W
    if online_pca and t > 0: proj = proj.learned(G, lr / lr₀)   # P learns from G after this step used it

    s(N, R) = ‖N‖ / (‖R‖ + 1e-8) per channel (the norms run along the projected dimension: per
              row of W on the right side, per column on the left) or for the whole tensor;
    lim(X)  = the norm-growth limiter γ (None: off): if ‖X‖ > γ(‖X_prev‖ + 1e-8), rescale X to
              that norm; ‖X_prev‖ is the last step's limited norm (the 1e-8 as apollo-torch and fira);
    f       = the factor lim applies to X = N · c₁/√c₂ (GWT's official code limits that uncorrected norm).

Every other parameter (not 2-D, short side ≤ rank, a side ≥ ``max_dim``, or a group without ``rank``) is AdamW:
W = W − lr · (N(G) + wd · W), with the same Adam on G itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lowrank_optim import projectors


def adam(state: dict[str, Any], x: Tensor, betas: tuple[float, float], eps: float) -> Tensor:
    """Update Adam's moments with ``x`` and return N = M̂ / (√V̂ + ε); missing moments start at 0."""
    if "exp_avg" not in state:
        state["exp_avg"], state["exp_avg_sq"], state["adam_steps"] = torch.zeros_like(x), torch.zeros_like(x), 0
    beta1, beta2 = betas
    state["adam_steps"] += 1
    k = state["adam_steps"]
    m = state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * x
    v = state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * x * x
    return (m / (1 - beta1**k)) / ((v / (1 - beta2**k)).sqrt() + eps)


def ratio(n: Tensor, r: Tensor, side: str, mode: str) -> Tensor:
    """‖N‖ / (‖R‖ + 1e-8): one scalar (``tensor``), or one per channel, shaped to broadcast over G."""
    if mode == "tensor":
        return n.norm() / (r.norm() + 1e-8)
    dim = 1 if side == "right" else 0  # right: R is m×r, a factor per row; left: r×n, per column
    return n.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)


def limit(x: Tensor, state: dict[str, Any], gamma: float | None) -> Tensor:
    """The norm-growth limiter: ‖x‖ may grow at most γ-fold over the last step's (limited) norm."""
    if gamma is None:
        return x
    norm, prev = x.norm(), state.get("limiter_norm")
    if prev is not None and norm > gamma * (prev + 1e-8):
        x, norm = x * (gamma * (prev + 1e-8) / norm), gamma * (prev + 1e-8)
    state["limiter_norm"] = norm
    return x


def rotate(state: dict[str, Any], old: projectors.Projector, new: projectors.Projector) -> None:
    """Carry M and V into the new subspace's coordinates: M ← T(M), V ← |T(V)|."""
    m = state["exp_avg"]
    a = old.basis(device=m.device, dtype=m.dtype)
    b = new.basis(device=m.device, dtype=m.dtype)
    if new.side == "left":  # P_old X in full space has new coordinates P_newᵀ P_old X
        t = b.T @ a
        state["exp_avg"], state["exp_avg_sq"] = t @ m, (t @ state["exp_avg_sq"]).abs()
    else:  # X Q_old in full space has new coordinates X Q_old Q_newᵀ
        t = a @ b.T
        state["exp_avg"], state["exp_avg_sq"] = m @ t, (state["exp_avg_sq"] @ t).abs()


def transfer(state: dict[str, Any], old: projectors.Projector, new: projectors.Projector,
             betas: tuple[float, float]) -> None:
    """LDAdam's transfer: M ← T(M), V ← c₂ |T∘T(V/c₂ − M_old²/c₁²) + M²/c₁²| (k = the Adam steps so far)."""
    m, v, k = state["exp_avg"], state["exp_avg_sq"], state["adam_steps"]
    c1, c2 = 1 - betas[0] ** k, 1 - betas[1] ** k
    a = old.basis(device=m.device, dtype=m.dtype)
    b = new.basis(device=m.device, dtype=m.dtype)
    t = b.T @ a if new.side == "left" else a @ b.T
    apply = (lambda t_, x: t_ @ x) if new.side == "left" else (lambda t_, x: x @ t_)
    new_m = apply(t, m)
    state["exp_avg_sq"] = (c2 * (apply(t * t, v / c2 - m * m / c1**2) + new_m * new_m / c1**2)).abs()
    state["exp_avg"] = new_m


def refresh(state: dict[str, Any], old: projectors.Projector, g: Tensor, policy: str,
            betas: tuple[float, float] = (0.9, 0.999)) -> projectors.Projector:
    """A new subspace from ``g``, and the moments carried into it by ``policy``."""
    new = old.refreshed(g, state.get("exp_avg"))  # the first moment, which COAP's refresh reads
    if "exp_avg" in state:  # not the first subspace
        if policy == "reset":
            for key in ("exp_avg", "exp_avg_sq", "adam_steps"):
                del state[key]
        elif policy == "rotate":
            rotate(state, old, new)
        elif policy == "transfer":
            transfer(state, old, new, betas)
    return new


def low_rank_update(group: dict[str, Any], state: dict[str, Any], back: Callable[[Tensor], Tensor], side: str,
                    g: Tensor, r: Tensor, n: Tensor) -> Tensor:
    """U, the method's update before lr and weight decay, from G, R = project(G) and N = Adam(R)."""
    gamma, scale = group["limiter"], group["scale"]
    if group["scaling"] is not None:  # APOLLO: the raw gradient, rescaled by what Adam did to R
        return math.sqrt(scale) * limit(g * ratio(n, r, side, group["scaling"]), state, gamma)
    if group["residual"] in ("drop", "error_feedback"):  # GaLore; DCT-AdamW (E in error_feedback())
        return scale * back(n)
    rest = g - back(r)
    if group["residual"] == "fira":
        return scale * (back(n) + limit(rest * ratio(n, r, side, "channel"), state, gamma))
    if group["residual"] == "sign":  # FRUGAL
        rest = rest.sign()
    return scale * back(n) + group["residual_lr_scale"] * limit(rest, state, gamma)


def gwt(group: dict[str, Any], state: dict[str, Any], proj: projectors.Projector, g: Tensor, r: Tensor,
        n: Tensor) -> Tensor:
    """GWT's U: the details S over the Adam denominator of their block, both parts times the limiter's f."""
    (beta1, beta2), k, gamma = group["betas"], state["adam_steps"], group["limiter"]
    c1, c2 = 1 - beta1**k, 1 - beta2**k
    norm, prev, f = n.norm() * (c1 / math.sqrt(c2)), state.get("limiter_norm"), 1.0
    if gamma is not None and prev is not None and norm > gamma * (prev + 1e-8):
        f = gamma * (prev + 1e-8) / norm
    if gamma is not None:
        state["limiter_norm"] = norm * f
    den = (state["exp_avg_sq"] / c2).sqrt() + group["eps"]
    details = (g - proj.project_back(r)) / (c1 * proj.spread(den))
    return group["scale"] * f * (proj.project_back(n) + details)


def error_feedback(group: dict[str, Any], proj: projectors.Projector, a: Tensor, r: Tensor) -> Tensor:
    """E = A − Π(A), Π the orthogonal projection onto the basis' span: B(R) for an orthonormal basis, else
    B(Γ⁺R) or B(RΓ⁺), Γ its Gram matrix (the pseudo-inverse: a basis with a repeated row has a singular Γ)."""
    cls = type(proj)
    if cls.orthonormal_with({**cls.options_from_group(group), **group["projector_options"]}):
        return a - proj.project_back(r)
    b = proj.basis(device=a.device, dtype=a.dtype)
    if proj.side == "left":
        return a - proj.project_back(torch.linalg.pinv(b.T @ b) @ r)
    return a - proj.project_back(r @ torch.linalg.pinv(b @ b.T))


def new_projector(group: dict[str, Any], seed: int) -> projectors.Projector:
    """The group's projector, seeded with the parameter's position among all parameters."""
    cls = projectors.REGISTRY[group["projector"]]
    if group["residual"] not in ("drop", "error_feedback") and not cls.orthonormal:
        raise ValueError(f"residual={group['residual']!r} needs an orthonormal projector, not {group['projector']!r}")
    if group["scaling"] is not None and group["residual"] != "drop":
        raise ValueError("scaling rescales the whole gradient and leaves no residual: use residual='drop'")
    options = {**cls.options_from_group(group), **group["projector_options"]}
    return projectors.make(group["projector"], group["rank"], proj_type=group["proj_type"], seed=seed, **options)


class ReferenceLowRankAdamW(torch.optim.Optimizer):
    """The algorithm of the module docstring; per-group keys override these defaults."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, rank: int | None = None, update_proj_gap: int = 200,
                 scale: float = 1.0, proj_type: str = "std", projector: str = "svd",
                 projector_options: dict[str, Any] | None = None, residual: str = "drop",
                 residual_lr_scale: float = 1.0, scaling: str | None = None, limiter: float | None = None,
                 on_refresh: str = "keep", max_dim: int | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, projector=projector,
                        projector_options=projector_options or {}, residual=residual,
                        residual_lr_scale=residual_lr_scale, scaling=scaling, limiter=limiter, on_refresh=on_refresh,
                        max_dim=max_dim)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        everyone = [p for group in self.param_groups for p in group["params"]]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.to(torch.float64 if p.dtype == torch.float64 else torch.float32)
                rank = group["rank"]
                small = group["max_dim"] is None or max(p.shape) < group["max_dim"]
                if rank is not None and p.dim() == 2 and min(p.shape) > rank and small:
                    position = next(i for i, q in enumerate(everyone) if q is p)
                    u = self._low_rank(group, self.state[p], g, position)
                else:
                    u = adam(self.state[p], g, group["betas"], group["eps"])
                p.copy_(p - group["lr"] * (u + group["weight_decay"] * p))
        return loss

    def _low_rank(self, group: dict[str, Any], state: dict[str, Any], g: Tensor, position: int) -> Tensor:
        """One step's U for a projected weight; ``state["step"]`` counts its steps (t above)."""
        if "projector" not in state:
            state["projector"], state["step"] = new_projector(group, position), 0
        proj = state["projector"]
        if group["residual"] == "error_feedback":
            g = g + state.get("ef", torch.zeros_like(g))
        once = proj.fixed or proj.learns_after_use
        due = (state["step"] % group["update_proj_gap"] == 0 and not (once and state["step"])) or proj.refresh_every_step
        if due:
            proj = state["projector"] = refresh(state, proj, g, group["on_refresh"], group["betas"])
        state["step"] += 1
        r = proj.project(g)
        n = adam(state, r, group["betas"], group["eps"])
        if group["residual"] == "gwt":
            u = gwt(group, state, proj, g, r, n)
        else:
            u = low_rank_update(group, state, proj.project_back, proj.side, g, r, n)
        if group["residual"] == "error_feedback":
            state["ef"] = error_feedback(group, proj, g, r)
        if proj.learns_after_use and not due:  # online_pca: P learns from G once this step has used it
            start = group.get("osd_lr0", group.get("initial_lr", group["lr"]))
            state["projector"] = proj.learned(g, group["lr"] / start if start > 0 else 1.0)
        return u
