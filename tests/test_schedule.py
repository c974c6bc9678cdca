"""When subspaces renew (staggered over the gap by default) and how the SVD projector renews them (the
Gram matrix of the short side and eigh)."""

from __future__ import annotations

import math

import pytest
import torch

import lowrank_optim as lro
from conftest import batches, decaying_matrix, lm_loss, make_model, roundtrip, train
from lowrank_optim.optim import policies
from lowrank_optim.projectors.svd import top_singular_pairs

GAP = 5


def refresh_log(opt, model, data, **kw):
    """For each step, the names of the weights whose subspace renewed in it."""
    names = {id(p): n for n, p in model.named_parameters()}
    log = []
    for tokens in data:
        before = {id(p): s.get("projector") for p, s in opt.state.items()}
        opt.zero_grad()
        lm_loss(model, tokens).backward()
        opt.step()
        log.append(sorted(names[id(p)] for p, s in opt.state.items()
                          if "projector" in s and s["projector"] is not before.get(id(p))))
    return log


def galore(model, **kw):
    return lro.GaLoreAdamW(lro.param_groups(model, rank=4, update_proj_gap=GAP, **kw), lr=1e-2)


def test_first_step_builds_every_subspace_then_each_renews_once_a_gap_on_its_own_phase():
    model = make_model()  # 6 projected weights: q (32×32), up (48×32), down (32×48) in 2 blocks
    log = refresh_log(galore(model), model, batches(1 + 3 * GAP))
    projected = sorted(n for n, p in model.named_parameters() if p.dim() == 2 and "proj" in n)
    assert log[0] == projected
    later = log[1:]
    for name in projected:
        steps = [t + 1 for t, names in enumerate(later) if name in names]
        assert len(steps) == 3 and all(b - a == GAP for a, b in zip(steps, steps[1:])), (name, steps)
    # 6 weights over 5 phases: no step renews more than ceil(6 / 5) of them, and the two that share a
    # phase are the cheapest (the costliest first, each to the least-loaded phase)
    assert max(len(names) for names in later) == math.ceil(len(projected) / GAP)


def test_stagger_false_renews_every_subspace_together_as_galore_torch():
    model = make_model()
    log = refresh_log(galore(model, stagger=False), model, batches(2 * GAP + 1))
    assert [t for t, names in enumerate(log) if names] == [0, GAP, 2 * GAP]
    assert all(len(names) in (0, 6) for names in log)


def test_phases_spread_refresh_cost_evenly():
    costs = [8.0, 8.0, 4.0, 4.0, 2.0, 2.0, 1.0]
    phases = policies.phases(costs, 4)
    load = [sum(c for c, p in zip(costs, phases) if p == k) for k in range(1, 5)]
    assert max(load) - min(load) <= 2.0  # the optimum for these costs (29 over 4 phases) is 8 / 7
    assert policies.phases([3.0], 200) == [200]  # a lone weight: galore-torch's schedule
    assert sorted(policies.phases([1.0] * 3, 10)) == [8, 9, 10]


def _phases_by_definition(costs, gap):
    """The definition, over every phase of the gap: costliest first, each to the least-loaded phase, ties to
    the latest."""
    load = [0.0] * (gap + 1)
    out = [gap] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        out[i] = min(range(gap, 0, -1), key=lambda k: load[k])
        load[out[i]] += costs[i]
    return out


@pytest.mark.parametrize("gap", [1, 2, 3, 7, 50])
def test_phases_look_at_the_latest_phases_only_and_still_follow_the_definition(gap):
    g = torch.Generator().manual_seed(gap)
    for n in (1, 2, 6, 13):
        costs = [float(c) for c in torch.randint(0, 4, (n,), generator=g)]  # ties and zero costs included
        assert policies.phases(costs, gap) == _phases_by_definition(costs, gap)


def test_a_gap_of_never_costs_nothing_to_schedule():
    # update_proj_gap=10**9 ("never refresh") once built a list of 10**9 loads and scanned it per weight
    assert policies.phases([2.0, 1.0, 3.0], 10**9) == [10**9 - 1, 10**9 - 2, 10**9]
    opt = lro.GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(8, 6))], "rank": 2,
                            "update_proj_gap": 10**9}], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.randn(8, 6)
    opt.step()  # returned at once; it took minutes and gigabytes


def test_resume_in_the_middle_of_a_gap_keeps_the_schedule_bit_for_bit():
    data = batches(3 * GAP)
    model = make_model()
    opt = galore(model)
    train(model, opt, data)
    model_a = make_model()
    opt_a = galore(model_a)
    train(model_a, opt_a, data[: GAP + 2])
    ckpt = roundtrip({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
    model_b = make_model(seed=5)
    model_b.load_state_dict(ckpt["model"])
    opt_b = galore(model_b)
    opt_b.load_state_dict(ckpt["opt"])
    train(model_b, opt_b, data[GAP + 2:])
    for (name, a), b in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name


def test_a_checkpoint_without_a_schedule_renews_at_multiples_of_the_gap():
    """State saved before the schedule was kept has no next_refresh: it renews as before (t % gap == 0)."""
    W = torch.nn.Parameter(torch.zeros(24, 16))
    opt = lro.GaLoreAdamW([{"params": [W], "rank": 4, "update_proj_gap": GAP}], lr=1e-3)
    W.grad = decaying_matrix(24, 16, seed=1, dtype=torch.float32)
    opt.step()
    sd = opt.state_dict()
    del sd["state"][0]["next_refresh"]
    opt.load_state_dict(sd)
    steps = []
    for t in range(1, 2 * GAP + 1):
        before = opt.state[W]["projector"]
        W.grad = decaying_matrix(24, 16, seed=t, dtype=torch.float32)
        opt.step()
        if opt.state[W]["projector"] is not before:
            steps.append(t)
    assert steps == [GAP, 2 * GAP]


def test_lazy_refresh_keeps_each_weights_phase_as_its_gap_doubles():
    model = make_model()
    opt = galore(model, refresh="lazy")
    W = model.layers[0].up_proj.weight
    phase = next(int(opt.state[W]["next_refresh"]) for _ in [train(model, opt, batches(1))])
    state = {"proj_gap": torch.tensor(4 * GAP), "next_refresh": torch.tensor(0)}
    group = {"update_proj_gap": GAP, "stagger": True, "refresh": "lazy"}
    policies.schedule(state, group, 0, phase)
    assert (int(state["next_refresh"]) + GAP - phase) % (4 * GAP) == 0  # the same place before each multiple


@pytest.mark.parametrize("k", [1, 2])
def test_layerwise_updates_follow_the_same_schedule(k):
    data = batches(2 * GAP)

    def run(layerwise):
        model = make_model()
        opt = galore(model)
        if layerwise:
            handle = lro.layerwise(model, opt, accumulation_steps=k)
            for tokens in data:
                handle.backward(lm_loss(model, tokens) / k)
            handle.remove()
        else:
            for i, tokens in enumerate(data):
                (lm_loss(model, tokens) / k).backward()
                if (i + 1) % k == 0:
                    opt.step()
                    opt.zero_grad()
        return model

    for a, b in zip(run(False).parameters(), run(True).parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------- the refresh
def real_gradients(steps: int = 12) -> list[torch.Tensor]:
    """The gradients of the test model's weights over a few steps of training: their spectra are a real
    network's (a steep head, then a flat tail), unlike a synthetic matrix's."""
    model = make_model(dim=48, hidden=96)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = []
    for tokens in batches(steps, batch=8, seq=16):
        opt.zero_grad()
        lm_loss(model, tokens).backward()
        out += [p.grad.clone() for n, p in model.named_parameters() if p.dim() == 2 and "proj" in n]
        opt.step()
    return out


def test_the_gram_refresh_captures_the_svds_energy_on_real_gradients():
    """≥ 0.999 of the top-r energy of the exact (float64 LAPACK) SVD, for every weight and step: the
    Gram matrix's eigenvectors are the same subspace up to float32 rounding where the spectrum is
    resolved, and wherever two singular values at the rank boundary are too close to resolve, either
    vector of the pair carries the same energy."""
    worst = 1.0
    for g in real_gradients():
        for rank in (4, 16):
            u, v = top_singular_pairs(g, rank)
            s = torch.linalg.svdvals(g.double())
            best = float((s[:rank] ** 2).sum())
            worst = min(worst, float((u.double().t() @ g.double()).square().sum()) / best,
                        float((g.double() @ v.double()).square().sum()) / best)
            eye = torch.eye(rank)
            assert torch.allclose(u.t() @ u, eye, atol=1e-4) and torch.allclose(v.t() @ v, eye, atol=1e-4)
    assert worst >= 0.999, worst


def test_a_steep_spectrum_goes_straight_to_float64_and_a_flat_one_stays_in_float32(monkeypatch):
    """Which precision the Gram refresh tries first is read off the spectrum's steepness: singular values
    falling 0.4 per index (the 8th squared one 2.7e-6 of the first, below float32's resolution of about
    1.2e-4, as real gradients' are) take one float64 eigh and no float32 one, giving bit for bit the
    float64 route's pairs; a Gaussian matrix (flat spectrum) takes one float32 eigh. Both stay the SVD's
    subspace (captured energy to 1e-6 of the exact top-8, float32 rounding)."""
    seen = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a, *args, **kw: seen.append(a.dtype) or eigh(a, *args, **kw))
    steep = decaying_matrix(40, 24, seed=2, decay=0.4, dtype=torch.float32)
    flat = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    for g, want in ((steep, [torch.float64]), (steep.t().contiguous(), [torch.float64]), (flat, [torch.float32])):
        seen.clear()
        u, v = top_singular_pairs(g, 8)
        assert seen == want
        if want == [torch.float64]:
            u64, v64 = top_singular_pairs(g.double(), 8)
            assert torch.equal(u, u64.float()) and torch.equal(v, v64.float())
        s = torch.linalg.svdvals(g.double())
        captured = float((g.double() @ v.double()).square().sum()) / float((s[:8] ** 2).sum())
        assert captured == pytest.approx(1, abs=1e-6)


def test_a_rank_deficient_gradient_gets_its_pairs_and_an_orthonormal_completion_without_an_svd(monkeypatch):
    """A gradient of rank 2 asked for rank 4 (and a zero one): the Gram matrix's last eigenvalues are
    rounding in float32 and float64 alike, so the float64 refresh keeps the two real pairs (equal to
    LAPACK's, canonical signs, to 1e-6: float32 storage of a float64 result) and completes both sides
    orthonormally, as an SVD's vectors for a zero singular value are arbitrary; LAPACK's SVD of the whole
    gradient is not called (it was the fallback, 18-76 ms at LLaMA-60M's shapes against a QR's few)."""
    from lowrank_optim.projectors.svd import _canonical_pairs

    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **kw: pytest.fail("the refresh called LAPACK's SVD"))
    g = torch.outer(torch.linspace(1, 2, 40), torch.linspace(-1, 1, 24))
    g = g + torch.outer(torch.linspace(-1, 1, 40), torch.linspace(0, 1, 24))
    for x in (g, g.t().contiguous(), torch.zeros(40, 24)):
        u, v = top_singular_pairs(x, 4)
        assert torch.isfinite(u).all() and torch.isfinite(v).all()
        torch.testing.assert_close(u.t() @ u, torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(v.t() @ v, torch.eye(4), atol=1e-5, rtol=0)
        if x.any():
            lu, _, lvh = svd(x.double(), full_matrices=False)
            cu, cv = _canonical_pairs(lu[:, :2], lvh[:2].t())
            torch.testing.assert_close(u[:, :2].double(), cu, atol=1e-6, rtol=0)
            torch.testing.assert_close(v[:, :2].double(), cv, atol=1e-6, rtol=0)


def test_the_gram_refresh_and_lapacks_svd_give_the_same_signed_basis():
    """Canonical signs (the largest-magnitude entry of each right singular vector positive) make the basis
    independent of the solver: the Gram matrix's eigenvectors and LAPACK's SVD agree with their signs, to
    float32 rounding (a few 1e-6 here: well-separated singular values, decay 0.7 per index)."""
    from lowrank_optim.projectors.svd import _canonical_pairs

    for g in (decaying_matrix(30, 20, seed=4, dtype=torch.float32), decaying_matrix(20, 30, seed=5, dtype=torch.float32)):
        u, v = top_singular_pairs(g, 5)
        lu, _, lvh = torch.linalg.svd(g, full_matrices=False)
        cu, cv = _canonical_pairs(lu[:, :5], lvh[:5].t())
        torch.testing.assert_close(u, cu, rtol=0, atol=1e-5)
        torch.testing.assert_close(v, cv, rtol=0, atol=1e-5)
        assert (v[v.abs().argmax(dim=0), torch.arange(5)] > 0).all()


def _step_with(opt, weight, grad):
    weight.grad = grad.clone()
    opt.step()


ZERO_GRADIENT_PRESETS = {
    "galore": lambda ps: lro.GaLoreAdamW(ps, lr=1e-2, rank=4, update_proj_gap=GAP),
    "galore-rsvd": lambda ps: lro.GaLoreAdamW(ps, lr=1e-2, rank=4, update_proj_gap=GAP, projector="rsvd"),
    "coap": lambda ps: lro.COAP(ps, lr=1e-2, rank=4, update_proj_gap=GAP),
    "sumo": lambda ps: lro.SUMO(ps, lr=1e-2, rank=4, update_proj_gap=GAP),
    "grass": lambda ps: lro.Grass(ps, lr=1e-2, rank=4, update_proj_gap=GAP),
    "dct": lambda ps: lro.GaLoreAdamW(ps, lr=1e-2, rank=4, update_proj_gap=GAP, projector="dct"),
    "qgalore": lambda ps: lro.QGaLoreAdamW(ps, lr=1e-2, rank=4, update_proj_gap=GAP),
}



def _projector_tensors(opt, w):
    return {k: v for k, v in opt.state[w]["projector"].items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", sorted(ZERO_GRADIENT_PRESETS))
def test_an_all_zero_first_gradient_builds_no_subspace_to_keep(name):
    """A zero-initialised output projection gives the layer before it a zero gradient at step 0 (and torch's
    get_optimizer_state_dict before the first step runs a step on zero gradients). An SVD of zero has
    coordinate vectors for singular vectors (DCT and Grass score every column alike): kept for a gap,
    only r rows of the weight would train. The next step builds the subspace afresh instead, from a new
    projector (COAP's and rsvd's count their refreshes): bit for bit the subspace an optimizer whose first
    step had that gradient builds (the same computation), on the same schedule. A checkpoint taken in
    between resumes (torch.load with weights_only)."""
    build = ZERO_GRADIENT_PRESETS[name]
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(16, 12, generator=g)
    runs = []
    for zero_first in (True, False):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(16, 12))
        start = w.detach().clone()
        opt = build([{"params": [w], "weight_decay": 0.0}])
        if zero_first:
            _step_with(opt, w, torch.zeros(16, 12))
            assert int(opt.state[w]["next_refresh"]) == policies.REBUILD
            assert torch.equal(w, start)  # a zero gradient without decay moves nothing, as in AdamW
            saved = roundtrip(opt.state_dict())
            opt = build([{"params": [w], "weight_decay": 0.0}])
            opt.load_state_dict(saved)
        _step_with(opt, w, grad)
        runs.append((opt, w))
    (opt_zero, w_zero), (opt_plain, w_plain) = runs
    assert int(opt_zero.state[w_zero]["next_refresh"]) == int(opt_plain.state[w_plain]["next_refresh"]) == GAP
    got, want = _projector_tensors(opt_zero, w_zero), _projector_tensors(opt_plain, w_plain)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


def test_an_all_zero_gradient_at_a_later_refresh_keeps_the_subspace_and_renews_at_the_next_step():
    """An established subspace is not replaced by one of a zero gradient's: the step keeps it (a zero R in
    it) and the weight renews at its next step, from that step's gradient, then stays on its phase."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(16, 12, generator=g) for _ in range(GAP + 2)]
    grads[GAP] = torch.zeros(16, 12)
    w = torch.nn.Parameter(torch.randn(16, 12, generator=g))
    opt = ZERO_GRADIENT_PRESETS["galore"]([{"params": [w]}])
    for grad in grads[:GAP]:
        _step_with(opt, w, grad)
    before = opt.state[w]["projector"]["P"].clone()
    _step_with(opt, w, grads[GAP])  # due at step GAP, but nothing to learn from
    assert torch.equal(opt.state[w]["projector"]["P"], before)
    assert int(opt.state[w]["next_refresh"]) == GAP
    _step_with(opt, w, grads[GAP + 1])
    u, v = top_singular_pairs(grads[GAP + 1], 4)
    want = u if opt.state[w]["projector"]["side"] == "left" else v.t()
    assert torch.equal(opt.state[w]["projector"]["P"], want.contiguous())
    assert int(opt.state[w]["next_refresh"]) == 2 * GAP


def test_a_weight_removed_from_its_group_mid_run_still_resumes_bit_identically():
    """Pruning a weight out of its group: the staggered phases stayed those of the group it had left, while an
    optimizer resumed from a checkpoint took the group as it is, so every later refresh fell on other steps
    (a QA pass: next refreshes [16, 14, 17] against [16, 15, 14]). The phases follow the group's size now."""
    def build(seed=0):
        torch.manual_seed(seed)
        return torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(4)])

    def step(model, opt, i):
        torch.manual_seed(100 + i)
        model(torch.randn(8, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    def prune(model, opt):
        p, g = model[1].weight, opt.param_groups[0]
        i = next(i for i, q in enumerate(g["params"]) if q is p)
        g["params"].pop(i)
        g["param_names"].pop(i)
        opt.state.pop(p)
        p.requires_grad_(False)

    def groups(model, pruned=False):
        out = lro.param_groups(model, rank=4, update_proj_gap=4)
        for g in out:
            g["params"] = [(n, p) for n, p in g["params"] if not (pruned and n == "1.weight")]
        return out

    straight = build()
    opt = lro.GaLoreAdamW(groups(straight), lr=1e-3)
    first = build()
    opt1 = lro.GaLoreAdamW(groups(first), lr=1e-3)
    for model, o in ((straight, opt), (first, opt1)):
        for i in range(2):
            step(model, o, i)
        prune(model, o)
    for i in range(2, 14):
        step(straight, opt, i)
    for i in range(2, 5):
        step(first, opt1, i)
    checkpoint = {"model": first.state_dict(), "opt": opt1.state_dict()}
    resumed = build(seed=7)
    resumed.load_state_dict(checkpoint["model"])
    resumed[1].weight.requires_grad_(False)
    opt2 = lro.GaLoreAdamW(groups(resumed, pruned=True), lr=1e-3)
    opt2.load_state_dict(checkpoint["opt"])
    for i in range(5, 14):
        step(resumed, opt2, i)
    assert [int(opt.state[p]["next_refresh"]) for p in opt.param_groups[0]["params"]] == [
        int(opt2.state[p]["next_refresh"]) for p in opt2.param_groups[0]["params"]]
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
