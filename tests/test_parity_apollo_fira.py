"""APOLLO / APOLLO-Mini against apollo-torch 1.0.3 and Fira against the fira package (1.0.2).

Both references are compared where the methods coincide: the same projection (their SVD
projectors, ours with projector="svd"; for APOLLO also the same random matrix injected), a tiny ε
(the packages add ε to √V, torch and we to √V̂), no weight decay (they decay the updated weights).
Where a reference departs from its paper, a test below shows how and says which we follow.
"""

from __future__ import annotations

import pytest
import torch

import lowrank_optim as lro
from conftest import decaying_matrix

#: The packages keep LAPACK's singular-vector signs; across refreshes with kept moments the sign matters,
#: so our side takes the same signs through the explicit option (our default is canonical signs).
LAPACK = {"canonical_signs": False}

apollo_torch = pytest.importorskip("apollo_torch", reason="apollo-torch is not installed (pip install apollo-torch==1.0.3)")


def grads_sequence(shape, steps, seed=0, growth=1.0):
    return [decaying_matrix(*shape, seed=seed + t, dtype=torch.float32) * growth**t for t in range(steps)]


def run(opt, W, grads):
    out = []
    for g in grads:
        W.grad = g.clone()
        opt.step()
        out.append(W.detach().clone())
    return out


def apollo_ref(W, rank, scale, scale_type, proj="svd", limiter=False):
    group = {"params": [W], "rank": rank, "update_proj_gap": 3, "scale": scale, "proj_type": "std",
             "proj": proj, "scale_type": scale_type}
    return apollo_torch.APOLLOAdamW([group], lr=1e-2, eps=1e-12, weight_decay=0.0, disable_nl=not limiter)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
@pytest.mark.parametrize("preset,rank,scale,scale_type", [(lro.APOLLO, 6, 1.0, "channel"), (lro.APOLLOMini, 1, 128.0, "tensor")])
def test_apollo_matches_apollo_torch_with_the_same_projection(shape, preset, rank, scale, scale_type):
    """Same SVD subspace, limiter off on both sides: equal to float32 precision over three refreshes."""
    W0 = decaying_matrix(*shape, seed=1, dtype=torch.float32)
    grads = grads_sequence(shape, 9)
    theirs_W = torch.nn.Parameter(W0.clone())
    theirs = run(apollo_ref(theirs_W, rank, scale, scale_type), theirs_W, grads)
    ours_W = torch.nn.Parameter(W0.clone())
    # scale given: APOLLO-Mini's default below width 512 is 128·d/512, apollo-torch's is a number it is given
    opt = preset([{"params": [ours_W], "rank": rank, "update_proj_gap": 3, "projector": "svd", "limiter": None,
                  "scale": scale, "projector_options": LAPACK}],
                 lr=1e-2, eps=1e-12, weight_decay=0.0)
    ours = run(opt, ours_W, grads)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t}: {m}")


def test_apollo_random_projection_matches_apollo_torch_when_injected(monkeypatch):
    """Our seeded Gaussian projection injected into apollo-torch's random projector: same steps."""
    from apollo_torch import random_projector

    shape, rank = (40, 24), 6
    W0 = decaying_matrix(*shape, seed=2, dtype=torch.float32)
    grads = grads_sequence(shape, 7, seed=50)
    ours_W = torch.nn.Parameter(W0.clone())
    opt = lro.APOLLO([{"params": [ours_W], "rank": rank, "update_proj_gap": 3, "limiter": None}],
                     lr=1e-2, eps=1e-12, weight_decay=0.0)
    bases = []
    ours = []
    for g in grads:
        ours_W.grad = g.clone()
        opt.step()
        ours.append(ours_W.detach().clone())
        bases.append(opt._projectors[ours_W].basis().clone())
    refreshes = iter(bases[0::3])
    monkeypatch.setattr(random_projector.GradientProjector, "get_orthogonal_matrix",
                        lambda self, weights, rank, type, seed: next(refreshes))
    theirs_W = torch.nn.Parameter(W0.clone())
    theirs = run(apollo_ref(theirs_W, rank, 1.0, "channel", proj="random"), theirs_W, grads)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t}: {m}")


def test_apollo_limiter_follows_the_paper_not_apollo_torch():
    """With a constant gradient Adam's bias-corrected direction is constant, so APOLLO's update is
    too and the limiter (paper: on the scaled gradient G·s with s from M̂/(√V̂+ε)) never engages: every
    step moves W by the same amount. apollo-torch computes s from the uncorrected moments, limits that,
    and applies the bias correction afterwards, so its limiter clips the warm-up of the uncorrected
    ratio (3.2 → 4.2 → ...): its second step is about 25% shorter than its first. We follow the paper."""
    shape = (40, 24)
    W0 = decaying_matrix(*shape, seed=3, dtype=torch.float32)
    grads = [decaying_matrix(*shape, seed=9, dtype=torch.float32)] * 4
    ours_W = torch.nn.Parameter(W0.clone())
    opt = lro.APOLLO([{"params": [ours_W], "rank": 6, "update_proj_gap": 100, "projector": "svd"}],
                     lr=1e-2, eps=1e-12, weight_decay=0.0)
    ours = [W0] + run(opt, ours_W, grads)
    theirs_W = torch.nn.Parameter(W0.clone())
    theirs = [W0] + run(apollo_ref(theirs_W, 6, 1.0, "channel", limiter=True), theirs_W, grads)
    our_steps = [(b - a).norm().item() for a, b in zip(ours, ours[1:])]
    their_steps = [(b - a).norm().item() for a, b in zip(theirs, theirs[1:])]
    assert our_steps == pytest.approx([our_steps[0]] * 4, rel=1e-4)
    assert their_steps[0] == pytest.approx(our_steps[0], rel=1e-4)
    assert their_steps[1] / their_steps[0] == pytest.approx(0.75, abs=0.05)


fira = pytest.importorskip("fira", reason="the fira package is not installed (pip install fira)")


def fira_ref(W, rank, alpha):
    return fira.FiraAdamW([{"params": [W], "rank": rank, "update_proj_gap": 3, "alpha": alpha, "proj_type": "std"}],
                          lr=1e-2, eps=1e-12, weight_decay=0.0)


def run_fira_without_limiter(opt, W, grads):
    """fira has no switch for its limiter; a huge previous norm before each step keeps it at 1."""
    out = []
    for g in grads:
        W.grad = g.clone()
        if "scaling_grad" in opt.state[W]:
            opt.state[W]["scaling_grad"] = torch.tensor(1e30)
        opt.step()
        out.append(W.detach().clone())
    return out


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_fira_matches_the_fira_package(shape):
    """scale = 1, limiters off on both sides: equal to float32 precision over three refreshes."""
    W0 = decaying_matrix(*shape, seed=4, dtype=torch.float32)
    grads = grads_sequence(shape, 9, seed=20)
    theirs_W = torch.nn.Parameter(W0.clone())
    theirs = run_fira_without_limiter(fira_ref(theirs_W, 6, 1.0), theirs_W, grads)
    ours_W = torch.nn.Parameter(W0.clone())
    opt = lro.Fira([{"params": [ours_W], "rank": 6, "update_proj_gap": 3, "limiter": None, "projector_options": LAPACK}],
                   lr=1e-2, eps=1e-12, weight_decay=0.0)
    ours = run(opt, ours_W, grads)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t}: {m}")


def test_fira_residual_with_scale_follows_the_paper_not_the_package():
    """The fira package subtracts alpha·project_back(R) from G, which is the residual only when
    alpha = 1. We use S = G − project_back(R) and scale the whole update, as the paper writes it.
    One step from zero state shows the difference exactly."""
    shape, rank, alpha = (40, 24), 6, 0.25
    W0 = decaying_matrix(*shape, seed=5, dtype=torch.float64)
    G = decaying_matrix(*shape, seed=6, dtype=torch.float64)
    theirs_W = torch.nn.Parameter(W0.clone())
    theirs_W.grad = G.clone()
    fira_ref(theirs_W, rank, alpha).step()
    ours_W = torch.nn.Parameter(W0.clone())
    ours_W.grad = G.clone()
    lro.Fira([{"params": [ours_W], "rank": rank, "scale": alpha}], lr=1e-2, eps=1e-12, weight_decay=0.0).step()

    Vh = torch.linalg.svd(G.float(), full_matrices=False)[2][:rank].double()
    R = G @ Vh.T
    N = torch.sign(R)  # Adam's first step with a tiny ε
    k = N.norm(dim=1, keepdim=True) / (R.norm(dim=1, keepdim=True) + 1e-8)
    paper = W0 - 1e-2 * alpha * (N @ Vh + (G - R @ Vh) * k)
    package = W0 - 1e-2 * (alpha * N @ Vh + (G - alpha * R @ Vh) * k)
    torch.testing.assert_close(ours_W.detach(), paper, rtol=0, atol=1e-6)
    torch.testing.assert_close(theirs_W.detach(), package, rtol=0, atol=1e-6)
    assert (paper - package).abs().max() > 1e-3
