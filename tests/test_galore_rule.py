"""GaLoreAdamW against a float64 reference written here from the paper (DESIGN.md section 4).

Reference, for W (m×n) with gradient G_t at step t = 0, 1, ...:
    if t % gap == 0:  U, S, Vh = svd(G_t);  P = U[:, :r] (left side) or Q = Vh[:r] (right side)
    R = Pᵀ G (left) or G Qᵀ (right)
    M = β₁M + (1−β₁)R;   V = β₂V + (1−β₂)R²
    N = (M / (1−β₁^(t+1))) / (sqrt(V / (1−β₂^(t+1))) + ε)
    W = W − lr·(scale·(P N or N Q) + wd·W)
"""

from __future__ import annotations

import pytest
import torch

import lowrank_optim as lro
from conftest import decaying_matrix


def gradient(t: int, W: torch.Tensor) -> torch.Tensor:
    """A gradient that depends on the weights and on the step (so refreshes see new subspaces)."""
    m, n = W.shape
    return decaying_matrix(m, n, seed=100 + t, dtype=W.dtype) + 0.5 * W


def reference_galore(W0, steps, rank, gap, scale, lr, betas, eps, wd, side):
    W = W0.clone().double()
    b1, b2 = betas
    M = V = basis = None
    for t in range(steps):
        G = gradient(t, W)
        if t % gap == 0:
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            basis = U[:, :rank] if side == "left" else Vh[:rank]
        R = basis.T @ G if side == "left" else G @ basis.T
        if M is None:
            M, V = torch.zeros_like(R), torch.zeros_like(R)
        M = b1 * M + (1 - b1) * R
        V = b2 * V + (1 - b2) * R * R
        N = (M / (1 - b1 ** (t + 1))) / (torch.sqrt(V / (1 - b2 ** (t + 1))) + eps)
        back = basis @ N if side == "left" else N @ basis
        W = W - lr * (scale * back + wd * W)
    return W


def run_ours(W0, steps, dtype=torch.float64, **kw):
    W = torch.nn.Parameter(W0.clone().to(dtype))
    opt_kw = {k: kw.pop(k) for k in ("lr", "betas", "eps", "weight_decay")}
    # the float64 reference takes LAPACK's singular vectors as they come: ours too, by the explicit option
    kw.setdefault("projector_options", {"canonical_signs": False})
    opt = lro.GaLoreAdamW([{"params": [W], **kw}], **opt_kw)
    for t in range(steps):
        W.grad = gradient(t, W.detach().double()).to(dtype)
        opt.step()
    return W.detach(), opt


# (shape, proj_type, side the rule must pick)
SIDES = [
    ((24, 16), "std", "right"),
    ((16, 24), "std", "left"),
    ((24, 16), "reverse_std", "left"),
    ((16, 24), "reverse_std", "right"),
    ((24, 16), "left", "left"),
    ((16, 24), "right", "right"),
]


@pytest.mark.parametrize("shape,proj_type,side", SIDES)
def test_matches_float64_reference_across_refreshes(shape, proj_type, side):
    W0 = decaying_matrix(*shape, seed=7)
    hp = dict(rank=4, update_proj_gap=3, scale=0.25)
    opt_hp = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    steps = 8  # refreshes at steps 0, 3 and 6
    ours, opt = run_ours(W0, steps, proj_type=proj_type, **hp, **opt_hp)
    ref = reference_galore(W0, steps, 4, 3, 0.25, 0.01, (0.9, 0.999), 1e-8, 0.1, side)
    assert opt._projectors[next(iter(opt.state))].side == side
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    state = next(iter(opt.state.values()))
    m, n = shape
    assert state["exp_avg"].shape == ((4, n) if side == "left" else (m, 4))


@pytest.mark.parametrize("shape,proj_type,side", SIDES[:2])
def test_float32_follows_the_reference(shape, proj_type, side):
    """Within one refresh period: float32 and float64 LAPACK may pick opposite signs for a singular
    vector, and kept moments are not sign-invariant across a refresh (a property of GaLore itself)."""
    W0 = decaying_matrix(*shape, seed=3)
    ours, _ = run_ours(W0, 3, dtype=torch.float32, proj_type=proj_type, rank=4, update_proj_gap=3,
                       scale=0.25, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ref = reference_galore(W0, 3, 4, 3, 0.25, 0.01, (0.9, 0.999), 1e-8, 0.0, side)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-6)


def test_moments_are_kept_across_a_refresh():
    """GaLore keeps M and V when the basis changes (they are not reset or rotated)."""
    W0 = decaying_matrix(24, 16, seed=1)
    _, opt = run_ours(W0, 3, rank=4, update_proj_gap=3, scale=0.25, lr=0.01, betas=(0.9, 0.999),
                      eps=1e-8, weight_decay=0.0)
    state = next(iter(opt.state.values()))
    before = state["exp_avg"].clone()
    basis_before = state["projector"]["P"].clone()
    W = next(iter(opt.state))
    W.grad = gradient(3, W.detach())
    opt.step()  # step index 3: a refresh
    assert not torch.equal(state["projector"]["P"], basis_before)
    R = W.grad @ state["projector"]["P"].T
    torch.testing.assert_close(state["exp_avg"], 0.9 * before + 0.1 * R)


def test_scale_multiplies_the_low_rank_update_only():
    W0 = decaying_matrix(24, 16, seed=2)
    kw = dict(rank=4, update_proj_gap=10, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    a, _ = run_ours(W0, 1, scale=0.25, **kw)
    b, _ = run_ours(W0, 1, scale=1.0, **kw)
    torch.testing.assert_close(W0 - a, 0.25 * (W0 - b), rtol=1e-12, atol=1e-14)
