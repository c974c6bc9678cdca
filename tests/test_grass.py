"""Grass (Muhamed et al. 2024, arXiv:2406.17660): the sparse projector's selections, the Grass preset and
the sparse backward (``lro.sparse_grad``), against float64 references written from the paper's formulas:
Pᵀ = ρB, R = Pᵀ G, update P·N, and E[P Pᵀ] = I for the sampled selections."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowrank_optim as lro
from lowrank_optim.allocations import Allocations
from conftest import assert_same_parameters, batches, lm_loss, make_model, roundtrip, train_and_resume

SAMPLED = ("multinomial", "multinomial_norepl", "uniform")


def grad_matrix(m: int = 12, n: int = 7, seed: int = 0) -> torch.Tensor:
    """Rows of very different norms, so norm² sampling is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, m, dtype=torch.float64)[:, None]


def selector(selection: str, rank: int = 4, seed: int = 3, proj_type: str = "left"):
    return lro.projectors.make("sparse", rank, proj_type=proj_type, seed=seed, selection=selection)


def reference_maps(G: torch.Tensor, idx: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's P (m×r, P[σ_j, j] = ρ_jj) and P Pᵀ G, built densely in float64."""
    P = torch.zeros(G.shape[0], idx.numel(), dtype=torch.float64)
    P[idx, torch.arange(idx.numel())] = rho.double()
    return P, P @ P.t() @ G


# ------------------------------------------------------------------------------------ the selections
@pytest.mark.parametrize("selection", SAMPLED)
def test_each_draw_is_the_papers_P_with_rho_from_q(selection):
    """Every draw: project = Pᵀ G and project_back = P N for the paper's P, ρ_jj = 1/√(r q_σj) with q ∝ ‖G_i‖²
    (uniform: q = 1/m), indices sorted (distinct without replacement). Float32 ρ against float64: 1e-6 relative."""
    G = grad_matrix()
    m, r = G.shape[0], 4
    proj = selector(selection, rank=r)
    q = G.square().sum(1) / G.square().sum() if selection != "uniform" else torch.full((m,), 1.0 / m, dtype=torch.float64)
    for _ in range(20):
        proj.update(G)
        st = proj.state_dict()
        idx, rho = st["idx"], st["scale"]
        assert torch.all(idx[1:] >= idx[:-1])
        if selection != "multinomial":
            assert idx.unique().numel() == r
        torch.testing.assert_close(rho.double(), 1.0 / torch.sqrt(r * q[idx]), rtol=1e-6, atol=0)
        P, ppg = reference_maps(G, idx, rho)
        torch.testing.assert_close(proj.project(G), P.t() @ G, rtol=1e-6, atol=1e-12)
        N = torch.randn(r, G.shape[1], dtype=torch.float64)
        torch.testing.assert_close(proj.project_back(N), P @ N, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(proj.project_back(proj.project(G)), ppg, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(proj.basis(dtype=torch.float64), P, rtol=1e-6, atol=0)


@pytest.mark.parametrize("selection", ["multinomial", "uniform"])
def test_sampled_projection_is_unbiased(selection):
    """E[P Pᵀ G] = G (the paper's unbiasedness, with replacement; uniform: inclusion probability r/m, ρ² = m/r).
    Mean of N = 4000 draws; entry (i, k) of one draw has variance G_ik²(1/(r q_i) − 1/r) with replacement
    (r i.i.d. draws of e_σ G_σ/q_σ, averaged) and G_ik²(m/r − 1) for a uniform r-subset; every entry must lie
    within 5 standard errors (84 entries: a false alarm has probability < 1e-4)."""
    G = grad_matrix()
    m, r, draws = G.shape[0], 4, 4000
    proj = selector(selection, rank=r)
    total = torch.zeros_like(G)
    for _ in range(draws):
        proj.update(G)
        total += proj.project_back(proj.project(G))
    if selection == "multinomial":
        q = G.square().sum(1, keepdim=True) / G.square().sum()
        var = G.square() * (1.0 / q - 1.0) / r
    else:
        var = G.square() * (m / r - 1.0)
    z = (total / draws - G).abs() / torch.sqrt(var / draws)
    assert z.max() < 5.0, z.max()


def test_without_replacement_follows_successive_sampling():
    """multinomial_norepl draws one row ∝ q, then the next ∝ q among the rest: for r = 2 the inclusion
    probability is π_i = q_i + Σ_{k≠i} q_k q_i / (1 − q_k). Frequencies over 6000 draws within 5 binomial
    standard errors of it; ρ keeps the paper's 1/√(r q_i), which the module docstring says is first-order."""
    G = grad_matrix(m=5, n=3)
    q = G.square().sum(1) / G.square().sum()
    pi = torch.stack([q[i] + sum(q[k] * q[i] / (1 - q[k]) for k in range(5) if k != i) for i in range(5)])
    proj = selector("multinomial_norepl", rank=2)
    counts = torch.zeros(5, dtype=torch.float64)
    draws = 6000
    for _ in range(draws):
        proj.update(G)
        counts[proj.state_dict()["idx"]] += 1
    se = torch.sqrt(pi * (1 - pi) / draws)
    assert ((counts / draws - pi).abs() / se).max() < 5.0


def test_topr_is_unchanged_and_zero_gradients_draw_uniformly():
    """top-r keeps its state (idx, dim: 8·r bytes, ρ = 1); a zero gradient cannot give q ∝ ‖G_i‖², so the draw is
    uniform and ρ = √(m/r), finite."""
    G = grad_matrix()
    top = selector("topr")
    top.update(G)
    assert set(top.state_dict()) == {"side", "idx", "dim"} and top.nbytes() == 8 * 4
    assert torch.equal(top.state_dict()["idx"], torch.topk(G.norm(dim=1), 4).indices.sort().values)
    proj = selector("multinomial")
    proj.update(torch.zeros(12, 7))
    torch.testing.assert_close(proj.state_dict()["scale"], torch.full((4,), math.sqrt(12 / 4)))


def test_draws_are_seeded_by_seed_and_refresh_count_and_memory_is_honest():
    """The same seed and refresh count draw the same rows on any projector; the count moves the stream; nbytes
    is what the state holds: 8·r (idx) + 4·r (ρ) + 8 (the counter)."""
    G = grad_matrix()
    a, b, c = selector("multinomial", seed=5), selector("multinomial", seed=5), selector("multinomial", seed=6)
    seen = []
    for _ in range(3):
        for p in (a, b, c):
            p.update(G)
        assert torch.equal(a.state_dict()["idx"], b.state_dict()["idx"])
        seen.append((a.state_dict()["idx"].tolist(), c.state_dict()["idx"].tolist()))
    assert len({tuple(x) for x, _ in seen}) > 1 and any(x != y for x, y in seen)
    assert a.state_dict()["refreshes"] == 3 and a.nbytes() == 8 * 4 + 4 * 4 + 8
    saved = roundtrip(a.state_dict())  # torch.save / torch.load(weights_only=True)
    d = selector("multinomial", seed=5)
    d.load_state_dict(saved)
    a.update(G)
    d.update(G)
    assert torch.equal(a.state_dict()["idx"], d.state_dict()["idx"])


def test_bad_options_and_states_are_refused_by_name():
    with pytest.raises(ValueError, match="selection must be one of"):
        lro.projectors.make("sparse", 2, selection="top")
    model = make_model()
    with pytest.raises(ValueError, match="residual.*orthonormal"):
        lro.FRUGAL(lro.param_groups(model, rank=4, projector="sparse", projector_options={"selection": "uniform"}))
    repeated = {"side": "left", "idx": torch.tensor([1, 1, 3]), "dim": 6}
    with pytest.raises(ValueError, match="strictly increasing"):
        selector("topr", rank=3).load_state_dict(repeated)
    with pytest.raises(ValueError, match="needs 'scale'"):
        selector("multinomial", rank=3).load_state_dict(repeated)
    ok = {**repeated, "scale": torch.ones(3), "refreshes": 1}
    selector("multinomial", rank=3).load_state_dict(ok)  # repeats are a draw with replacement
    with pytest.raises(ValueError, match="strictly increasing"):
        selector("uniform", rank=3).load_state_dict(ok)


# ------------------------------------------------------------------------------------ the preset
def grass(model, **kw):
    return lro.Grass(lro.param_groups(model, rank=kw.pop("rank", 8), update_proj_gap=kw.pop("gap", 3), **kw),
                     lr=1e-2, weight_decay=0.0)


def test_grass_step_is_the_papers_update_and_resets_at_each_selection():
    """One weight, float64, gap 2: step t is W ← W − lr·scale·P N, N = M̂/(√V̂ + ε) on R = Pᵀ G, with M, V and the
    bias correction restarted at every new P (the reference recomputes P from the optimizer's idx and ρ)."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(10, 16, dtype=torch.float64))
    opt = lro.Grass([{"params": [W], "rank": 3, "update_proj_gap": 2, "stagger": False}], lr=0.01, weight_decay=0.0)
    ref = W.detach().clone()
    b1, b2, eps, lr, scale = 0.9, 0.999, 1e-8, 0.01, 0.25
    for t in range(6):
        G = torch.randn(10, 16, dtype=torch.float64)
        W.grad = G.clone()
        opt.step()
        proj = opt._projectors[W]
        st = proj.state_dict()
        P, _ = reference_maps(G, st["idx"], st["scale"])
        if t % 2 == 0:
            M, V, k = torch.zeros(3, 16, dtype=torch.float64), torch.zeros(3, 16, dtype=torch.float64), 0
        R = P.t() @ G
        k += 1
        M, V = b1 * M + (1 - b1) * R, b2 * V + (1 - b2) * R * R
        N = (M / (1 - b1 ** k)) / ((V / (1 - b2 ** k)).sqrt() + eps)
        ref = ref - lr * scale * (P @ N)
        # ρ is stored in float32: 1e-7 relative on each step's update
        torch.testing.assert_close(W.detach(), ref, rtol=1e-6, atol=1e-9)


def test_grass_takes_its_selection_as_a_key_and_any_other_projector():
    """``selection`` is Grass's group key (projector_options override it); another projector ignores it; a bad
    value is refused by name when the optimizer is built."""
    for kw, want in (({}, "multinomial"), ({"selection": "uniform"}, "uniform"),
                     ({"selection": "uniform", "projector_options": {"selection": "topr"}}, "topr")):
        model = make_model()
        opt = grass(model, **kw)
        lm_loss(model, batches(1)[0]).backward()
        opt.step()
        assert {p.selection for p in opt._projectors.values()} == {want}
    model = make_model()
    opt = grass(model, projector="dct")
    lm_loss(model, batches(1)[0]).backward()
    opt.step()
    assert {type(p).__name__ for p in opt._projectors.values()} == {"DCTProjector"}
    with pytest.raises(ValueError, match="invalid selection='top'.*selection must be one of"):
        grass(make_model(), selection="top")


def test_grass_resumes_bit_identically():
    data = batches(7)
    model, _, twin, _ = train_and_resume(lambda m: grass(m), data, split=4)
    assert_same_parameters(model, twin)


# ------------------------------------------------------------------------------------ the sparse backward
def projected_shapes(opt) -> set[tuple[int, int]]:
    return {tuple(p.shape) for g in opt.param_groups for p in g["params"] if opt.is_low_rank(p, g)}


def run(sparse: bool, selection: str = "multinomial", steps: int = 7, accumulate: int = 1):
    model = make_model()
    opt = grass(model, projector_options={"selection": selection})
    if sparse:
        lro.sparse_grad(model, opt)
    for tokens in batches(steps):
        for part in tokens.chunk(accumulate):
            (lm_loss(model, part) / accumulate).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("selection", ["multinomial", "topr"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_sparse_backward_gives_the_dense_update(selection, accumulate):
    """Dense vs sparse backward, 7 steps at gap 3 (every weight refreshes twice, staggered), with gradient
    accumulation over 2 micro-batches too. The sparse path sums the r selected rows of dYᵀX itself (a
    48-token dot product in another order): float32 rounding of ~1e-7 relative in R, which Adam's
    normalization passes on to N at the same order; after 7 steps of lr 1e-2 the weights agree to 1e-6."""
    dense, _ = run(False, selection, accumulate=accumulate)
    sparse, _ = run(True, selection, accumulate=accumulate)
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_sparse_backward_holds_no_full_gradient_of_a_projected_weight():
    """Measured with a dispatch mode over the backward of a step without a refresh: no op creates a tensor of a
    projected weight's shape (or its transpose), each such weight gets a compact R instead of .grad, and the
    backward's peak of live bytes is below the dense backward's."""
    peaks, created = {}, {}
    for sparse in (False, True):
        model = make_model()
        opt = grass(model, gap=50, stagger=False)
        handle = lro.sparse_grad(model, opt) if sparse else None
        data = batches(2, batch=3, seq=7)  # 21 tokens: no activation shares a weight's shape
        lm_loss(model, data[0]).backward()  # step 1 refreshes from a dense gradient
        opt.step()
        opt.zero_grad()
        loss = lm_loss(model, data[1])
        with Allocations() as log:
            loss.backward()
        peaks[sparse], created[sparse] = log.peak, set(log.shapes)
        shapes = projected_shapes(opt)
        if sparse:
            for module, slot in handle.layers.values():
                assert module.weight.grad is None
                side = opt._projectors[module.weight].side
                m, n = module.weight.shape
                assert tuple(opt.low_rank_grads[module.weight].shape) == ((8, n) if side == "left" else (m, 8))
    full = shapes | {s[::-1] for s in shapes}
    assert full & created[False]  # the measurement sees the dense gradients where they exist
    assert not full & created[True]
    assert peaks[True] < peaks[False]


def test_sparse_backward_clips_and_refuses_what_it_cannot_compute():
    """clip_grad_norm_ scales dense and projected gradients by one factor (checked against the norm of both
    kinds); an update that reads G, a non-lowrank optimizer and a model with nothing to wrap are refused."""
    model = make_model()
    opt = grass(model, gap=50)
    handle = lro.sparse_grad(model, opt)
    data = batches(2)
    lm_loss(model, data[0]).backward()
    opt.step()
    opt.zero_grad()
    lm_loss(model, data[1]).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None] + list(opt.low_rank_grads.values())
    before = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    copies = [g.clone() for g in grads]
    total = handle.clip_grad_norm_(0.1)
    torch.testing.assert_close(total, before)
    for g, c in zip(grads, copies):
        torch.testing.assert_close(g, c * (0.1 / (before + 1e-6)))
    opt.zero_grad()
    assert not opt.low_rank_grads
    handle.remove()
    lm_loss(model, data[1]).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="residual='sign'.*reads the full gradient"):
        other = make_model()
        lro.sparse_grad(other, lro.FRUGAL(lro.param_groups(other, rank=8, projector="sparse")))
    other = make_model()
    other_opt = grass(other)
    with lro.layerwise(other, other_opt), pytest.raises(ValueError, match="post-accumulate-grad hook"):
        lro.sparse_grad(other, other_opt)
    with pytest.raises(TypeError, match="opt must be a lowrank_optim optimizer"):
        lro.sparse_grad(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="found no nn.Linear"):
        lro.sparse_grad(model, lro.GaLoreAdamW(lro.param_groups(model, rank=8)))
