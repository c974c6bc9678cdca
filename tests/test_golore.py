"""GoLore (He et al. 2025): the stiefel projector and the switch from GaLore's SVD to it, against float64
references written from the paper and the official code (pkumelon/Golore)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_parameters, batches, make_model, train, train_and_resume

import lowrank_optim as lro
from lowrank_optim.projectors.random_proj import gaussian, mix_seed


def official_stiefel(dim: int, rank: int, seed: int) -> torch.Tensor:
    """get_random_orthogonal_matrix: Z (ZᵀZ)^(-1/2) through the eigen-decomposition of ZᵀZ, in float64."""
    z = gaussian((dim, rank), seed, "cpu", torch.float32).double()
    evals, evecs = torch.linalg.eigh(z.T @ z)
    return z @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


@pytest.mark.parametrize("shape, side", [((30, 12), "right"), ((12, 30), "left")])
def test_stiefel_basis_is_the_official_polar_factor_and_orthonormal(shape, side):
    proj = lro.projectors.make("stiefel", 5, seed=7)
    proj.update(torch.randn(*shape, dtype=torch.float64))
    b = proj.basis(dtype=torch.float64)
    ref = official_stiefel(shape[1] if side == "right" else shape[0], 5, 7)
    ref = ref.T if side == "right" else ref
    # both float64 from the same float32 draw: differences of a few ulps of the SVD/eigh; 1e-10 is far above
    torch.testing.assert_close(b, ref, rtol=1e-10, atol=1e-10)
    gram = b @ b.T if side == "right" else b.T @ b
    torch.testing.assert_close(gram, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert proj.side == side and proj.nbytes() == 8 and lro.projectors.REGISTRY["stiefel"].orthonormal


def test_golore_switches_at_the_first_refresh_at_or_after_switch_step_and_reloads():
    proj = lro.projectors.make("golore", 3, switch_step=5, gap=2)
    phases = []
    for _ in range(5):  # refreshes k = 0..4 at steps 0, 2, 4, 6, 8: the first at >= 5 is step 6
        proj = proj.refreshed(torch.randn(10, 8, dtype=torch.float64))
        phases.append(proj.phase)
    assert phases == [0, 0, 0, 1, 1]
    again = lro.projectors.make("golore", 3, switch_step=5, gap=2)
    again.load_state_dict(proj.state_dict())
    assert torch.equal(again.basis(dtype=torch.float64), proj.basis(dtype=torch.float64))
    with pytest.raises(ValueError, match="switch_step"):
        lro.projectors.make("golore", 3, switch_step=-1)
    with pytest.raises(ValueError, match="before"):
        lro.projectors.make("golore", 3, switch_step=4, before="no_such")


def reference_golore(w0, grads, *, rank, gap, switch, seed, lr=0.01, scale=0.25, betas=(0.9, 0.999), eps=1e-8):
    """GaLore-Adam (moments kept across refreshes) with Q = top-r right singular vectors of G before the
    switch and the official polar-factor Stiefel basis after it; m >= n, so the right side (Q is r×n)."""
    w, m, v, q, chain = w0.clone(), None, None, None, None
    for t, g in enumerate(grads):
        if t % gap == 0:
            if t < switch:  # signs as GaLoreAdamW's default: each row's largest-magnitude entry positive
                q = torch.linalg.svd(g, full_matrices=False)[2][:rank]
                q = q * torch.sign(q.gather(1, q.abs().argmax(1, keepdim=True)))
            else:
                chain = seed if chain is None else mix_seed(chain)
                q = official_stiefel(g.shape[1], rank, chain).T
        r = g @ q.T
        m = (1 - betas[0]) * r if m is None else betas[0] * m + (1 - betas[0]) * r
        v = (1 - betas[1]) * r * r if v is None else betas[1] * v + (1 - betas[1]) * r * r
        mhat, vhat = m / (1 - betas[0] ** (t + 1)), v / (1 - betas[1] ** (t + 1))
        w -= lr * scale * (mhat / (vhat.sqrt() + eps)) @ q
    return w


def test_golore_optimizer_matches_the_float64_reference_across_the_switch():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 16, dtype=torch.float64))
    w0 = w.detach().clone()
    grads = [torch.randn(24, 16, dtype=torch.float64) for _ in range(9)]
    opt = lro.GoLore([{"params": [w], "rank": 4, "update_proj_gap": 2, "projector_options": {"switch_step": 4}}],
                     lr=0.01, weight_decay=0.0)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    ref = reference_golore(w0, grads, rank=4, gap=2, switch=4, seed=opt._position(w))
    # float64 throughout; SVD, polar factor and Adam in another order: ~1e-14 relative. 1e-10 has margin
    torch.testing.assert_close(w.detach(), ref, rtol=1e-10, atol=1e-10)
    assert opt.state[w]["projector"]["phase"] == 1


def test_golore_trains_resumes_bit_identically_and_refuses_a_missing_switch():
    def build(model):
        return lro.GoLore(lro.param_groups(model, rank=4, update_proj_gap=2, projector_options={"switch_step": 4}),
                          lr=0.01)

    model, _, twin, _ = train_and_resume(build, batches(10), 5)  # the switch falls before the checkpoint
    assert_same_parameters(model, twin)
    fresh = make_model()
    losses = train(fresh, build(fresh), batches(30))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    with pytest.raises(ValueError, match="switch_step"):
        lro.GoLore(lro.param_groups(make_model(), rank=4), lr=0.01)


def test_the_training_commands_place_the_switch_at_rand_ratio_of_the_run():
    """``pretrain --optimizer golore`` (build_optimizer with the run's length): every projected group switches at
    rand_ratio (0.8) of max_steps unless told; without a length (memory, compare's checks) never; a bad ratio is
    refused naming it; ``memory`` counts GaLore's state, which GoLore keeps until the switch."""
    from lowrank_optim.train.errors import TrainError
    from lowrank_optim.train.optimizers import build_optimizer

    def switches(opt):
        return {g["projector_options"]["switch_step"] for g in opt.param_groups if g.get("rank")}

    # rank 8: the default 128 is at least every weight's short side of this small model (refused)
    assert switches(build_optimizer("golore", make_model(), max_steps=600, rank=8)) == {480}
    assert switches(build_optimizer("golore", make_model(), max_steps=600, rand_ratio=0.5, rank=8)) == {300}
    assert switches(build_optimizer("golore", make_model(), rank=8)) == {10**9}
    with pytest.raises(TrainError, match="rand_ratio must be a number in"):
        build_optimizer("golore", make_model(), max_steps=600, rand_ratio=1.5, rank=8)
    config = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
              "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 64}
    golore, galore = (lro.memory.estimate(config, optimizer=n, rank=8).ours for n in ("golore", "galore"))
    assert golore == galore


def test_the_svd_bases_are_freed_at_the_switch():
    """After the switch a seed replaces each basis (README: projections 0.00), and state_nbytes() said so, but
    the cached projector kept the before projector's SVD basis alive (a QA pass: 458,752 B on llama_tiny, 1.75
    GiB at 7B). Nothing but the seed state is held once every weight has switched."""
    model = make_model()
    # refreshes at steps 0, 2, 4, ... for every weight (no stagger): the switch is step 4's
    opt = lro.GoLore(lro.param_groups(model, rank=4, update_proj_gap=2, stagger=False,
                                      projector_options={"switch_step": 4}), lr=0.01)
    train(model, opt, batches(4))
    cached = [proj for proj, _ in opt._derived["projectors"].values()]
    assert cached and all(any(isinstance(v, torch.Tensor) for v in p._before._state.values()) for p in cached)
    train(model, opt, batches(1, seed=2))  # step 4
    cached = [proj for proj, _ in opt._derived["projectors"].values()]
    assert cached and all(p.phase == 1 for p in cached)
    held = [k for p in cached for k, v in p._before._state.items() if isinstance(v, torch.Tensor)]
    assert not held, held
