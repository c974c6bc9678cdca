"""GaLoreAdamW against galore-torch 1.0, the reference package (an optional test dependency).

Same SVD (float32, full_matrices=False) and the same step counting (refresh when
``step % update_proj_gap == 0`` before the increment), so the trajectories agree to float
precision on both sides. Where galore-torch differs, the tests below say how and which we follow.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import lowrank_optim as lro
from conftest import batches, decaying_matrix, lm_loss, make_model, train

galore_torch = pytest.importorskip(
    "galore_torch", reason="galore-torch is not installed (pip install -e '.[dev]' brings it)"
)
from galore_torch.galore_projector import GaLoreProjector  # noqa: E402


def ref_opt(groups, **kw):
    return galore_torch.GaLoreAdamW(groups, no_deprecation_warning=True, **kw)


#: galore-torch keeps LAPACK's singular-vector signs, which matter across refreshes (the moments are kept):
#: ours take the same through the explicit option (our default is canonical signs), and renew every subspace
#: together (stagger=False; ours spread the refreshes over the gap by default). galore-torch ignores the keys.
LAPACK = {"canonical_signs": False}


def galore_groups(model, rank=8, gap=3, scale=0.25, proj_type="std"):
    groups = lro.param_groups(model, rank=rank, update_proj_gap=gap, scale=scale, proj_type=proj_type,
                              projector_options=LAPACK, stagger=False)
    # galore-torch takes bare tensors, and projects every group that has a "rank" key at all: our plain
    # groups carry rank=None (so a constructor's rank cannot reach them), which galore-torch would project
    return [{**{k: v for k, v in g.items() if not (k == "rank" and v is None)}, "params": [p for _, p in g["params"]]}
            for g in groups]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_trajectory_matches_galore_torch_step_by_step(proj_type):
    """Tall and wide weights plus a plain vector, the same gradient sequence fed to both packages,
    12 steps across three refreshes: equal to float32 precision after every step.

    The gradients do not depend on the weights, so the SVD inputs are identical on both sides; ε is
    small enough that the two packages' ε placements (see below) agree to float precision.
    """
    shapes = [(40, 24), (24, 40), (7,)]
    grads = [
        [decaying_matrix(*s, seed=10 * t + k, dtype=torch.float32) if len(s) == 2
         else torch.randn(s, generator=torch.Generator().manual_seed(t)) for k, s in enumerate(shapes)]
        for t in range(12)
    ]
    init = [decaying_matrix(*s, seed=99 + k, dtype=torch.float32) if len(s) == 2 else torch.ones(s)
            for k, s in enumerate(shapes)]
    trajectories = []
    for make in (lro.GaLoreAdamW, ref_opt):
        params = [torch.nn.Parameter(w.clone()) for w in init]
        opt = make([{"params": params[:2], "rank": 6, "update_proj_gap": 4, "scale": 0.25, "proj_type": proj_type,
                     "projector_options": LAPACK, "stagger": False},
                    {"params": params[2:]}], lr=1e-2, eps=1e-12, weight_decay=0.0)
        steps = []
        for g in grads:
            for p, gt in zip(params, g):
                p.grad = gt.clone()
            opt.step()
            steps.append([p.detach().clone() for p in params])
        trajectories.append(steps)
    for t, (ours, theirs) in enumerate(zip(*trajectories)):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t}: {m}")


def test_model_training_matches_galore_torch():
    """End to end through backprop on a small model (tall, wide and square weights, two refreshes).

    Each step, both optimizers get the gradient of the same weights: galore-torch's model computes it and
    ours steps from a copy of it, then our weights are compared with galore-torch's and set to them. With
    the gradients fed back freely, a last-bit difference (the ε placements below, or another thread
    count's sums) reaches the next SVD, and where two singular values of a real gradient are close
    the top-r basis turns by far more than the difference (seen: 1.7e-5 of the loss after 8 steps): that
    is the SVD's conditioning, not a difference between the methods. Fed the same gradient, the two
    steps agree to float32 rounding: rtol 1e-5, atol 1e-6, on weights of size ~0.1."""
    hp = dict(lr=3e-3, eps=1e-10, weight_decay=0.0)
    data = batches(8)
    ours_model, ref_model = make_model(0), make_model(0)
    ours = lro.GaLoreAdamW(galore_groups(ours_model), **hp)
    ref = ref_opt(galore_groups(ref_model), **hp)
    for t, tokens in enumerate(data):
        ref.zero_grad(set_to_none=True)
        lm_loss(ref_model, tokens).backward()
        for a, b in zip(ours_model.parameters(), ref_model.parameters()):
            a.grad = b.grad.clone()
        ours.step()
        ref.step()
        with torch.no_grad():
            for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t}, {name}: {m}")
                a.copy_(b)
    shapes = {tuple(s["exp_avg"].shape) for p, s in ours.state.items() if "projector" in s}
    assert shapes == {(32, 8), (48, 8), (8, 48)}  # q (square), up (tall): right; down (wide): left


def test_vector_in_a_rank_group_is_plain_adamw_where_galore_torch_crashes():
    """galore-torch projects every parameter of a rank group and fails on a bias or norm weight;
    ours updates 1-D parameters of a rank group as plain AdamW."""
    bias = torch.nn.Parameter(torch.ones(5))
    bias.grad = torch.full((5,), 0.5)
    with pytest.raises(IndexError):
        ref_opt([{"params": [bias], "rank": 2, "update_proj_gap": 4, "scale": 0.25, "proj_type": "std"}]).step()
    lro.GaLoreAdamW([{"params": [bias], "rank": 2}], lr=0.1, weight_decay=0.0).step()
    torch.testing.assert_close(bias.detach(), torch.full((5,), 0.9))  # Adam's first step: lr·sign


def test_checkpoint_loads_with_weights_only_unlike_galore_torch():
    """galore-torch keeps a GaLoreProjector object in the state: its checkpoint needs pickle
    (weights_only=False) to load. Ours holds tensors and plain values only."""
    data = batches(2)
    states = {}
    for key, make in (("ours", lro.GaLoreAdamW), ("ref", ref_opt)):
        model = make_model(0)
        opt = make(galore_groups(model), lr=1e-3)
        train(model, opt, data)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        states[key] = buf.getvalue()
    torch.load(io.BytesIO(states["ours"]), weights_only=True)
    with pytest.raises(Exception, match="GaLoreProjector|weights_only|Unsupported global"):
        torch.load(io.BytesIO(states["ref"]), weights_only=True)


def test_project_back_side_comes_from_the_basis_unlike_galore_torch():
    """galore-torch picks project_back's side from the low-rank tensor's shape; with reverse_std on a
    wide matrix and rank equal to the short side, the low-rank tensor is square and it multiplies
    the wrong way round. Ours stores the side with the basis."""
    G = decaying_matrix(8, 16, seed=1, dtype=torch.float32)
    theirs = GaLoreProjector(rank=8, proj_type="reverse_std")
    low = theirs.project(G, 0)
    with pytest.raises(RuntimeError):
        theirs.project_back(low)
    ours = lro.projectors.make("svd", rank=8, proj_type="reverse_std")
    ours.update(G)
    assert ours.side == "right"
    torch.testing.assert_close(ours.project_back(ours.project(G)), G, rtol=1e-5, atol=1e-5)


def test_epsilon_placement_differs_from_galore_torch_as_documented():
    """galore-torch adds ε to √V and folds both bias corrections into the step size; that is our
    rule (ε added to √V̂, as torch.optim.AdamW) with ε replaced by ε/√(1 − β₂ᵗ). One step shows it."""
    W0 = decaying_matrix(24, 16, seed=2, dtype=torch.float32)
    G = decaying_matrix(24, 16, seed=3, dtype=torch.float32) * 1e-4  # small, so ε matters
    beta2, eps = 0.999, 1e-6

    def one_step(make, eps_value):
        W = torch.nn.Parameter(W0.clone())
        opt = make([{"params": [W], "rank": 4, "update_proj_gap": 10, "scale": 0.25, "proj_type": "std"}],
                   lr=1e-2, betas=(0.9, beta2), eps=eps_value, weight_decay=0.0)
        W.grad = G.clone()
        opt.step()
        return W.detach()

    theirs = one_step(ref_opt, eps)
    ours = one_step(lro.GaLoreAdamW, eps)
    assert (ours - theirs).abs().max() > 1e-5  # ε matters at this gradient scale
    torch.testing.assert_close(one_step(lro.GaLoreAdamW, eps / math.sqrt(1 - beta2)), theirs, rtol=0, atol=1e-7)


def test_weight_decay_uses_pre_update_weights_unlike_galore_torch():
    """Decoupled decay (Loshchilov & Hutter; torch.optim.AdamW) is W ← W − lr·(update + wd·W_old).
    galore-torch decays the weights after the update: W ← (W − lr·update)·(1 − lr·wd).
    The two differ by exactly lr·wd·lr·update."""
    W0 = decaying_matrix(24, 16, seed=4, dtype=torch.float32)
    G = decaying_matrix(24, 16, seed=5, dtype=torch.float32)
    lr, wd = 1e-2, 0.5
    finals = {}
    for key, make in (("ours", lro.GaLoreAdamW), ("ref", ref_opt), ("nowd", lro.GaLoreAdamW)):
        W = torch.nn.Parameter(W0.clone())
        opt = make([{"params": [W], "rank": 4, "update_proj_gap": 10, "scale": 0.25, "proj_type": "std"}],
                   lr=lr, eps=1e-12, weight_decay=0.0 if key == "nowd" else wd)
        W.grad = G.clone()
        opt.step()
        finals[key] = W.detach()
    step_update = W0 - finals["nowd"]  # lr · scale · project_back(N), about 2.5e-3
    torch.testing.assert_close(finals["ours"], W0 * (1 - lr * wd) - step_update, rtol=0, atol=2e-7)
    torch.testing.assert_close(finals["ref"], (W0 - step_update) * (1 - lr * wd), rtol=0, atol=2e-7)
    assert (finals["ours"] - finals["ref"]).abs().max() > 5e-6  # lr·wd·update ≈ 1.2e-5


def test_bf16_moments_stay_float32_unlike_galore_torch():
    """galore-torch allocates the moments like the projected gradient: bf16 for a bf16 weight."""
    W0 = decaying_matrix(24, 16, seed=6, dtype=torch.bfloat16)
    for make, want in ((lro.GaLoreAdamW, torch.float32), (ref_opt, torch.bfloat16)):
        W = torch.nn.Parameter(W0.clone())
        opt = make([{"params": [W], "rank": 4, "update_proj_gap": 10, "scale": 0.25, "proj_type": "std"}], lr=1e-2)
        W.grad = W0.clone()
        opt.step()
        assert opt.state[W]["exp_avg"].dtype == want
