"""``on_refresh="transfer"``: LDAdam's projection-aware moment transfer (Robert et al., ICLR 2025, arXiv:2410.16103;
official code IST-DASLab/LDAdam, ``ldadamw_torch/ldadamw.py``), against its equation in float64.

At a change of basis with T (left: P_newᵀ P_old, applied T X; right: Q_old Q_newᵀ, applied X T) after k Adam
steps, c₁ = 1 − β₁ᵏ, c₂ = 1 − β₂ᵏ: M ← T(M) and V ← c₂ · |T∘T(V/c₂ − M_old²/c₁²) + T(M)²/c₁²|, T∘T the
element-wise square of T: the variance V̂ − M̂² moves as a variance, the mean's square is added back.
"""

from __future__ import annotations

import pytest
import torch

import lowrank_optim as lro

from conftest import decaying_matrix


def ldadam_transfer(m, v, T, side, k, betas):
    c1, c2 = 1 - betas[0] ** k, 1 - betas[1] ** k
    apply = (lambda A, X: A @ X) if side == "left" else (lambda A, X: X @ A)
    new_m = apply(T, m)
    return new_m, (c2 * (apply(T * T, v / c2 - m * m / c1**2) + new_m * new_m / c1**2)).abs()


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])  # std: the right side, then the left
def test_transfer_at_a_refresh_against_the_paper_equation(shape):
    """GaLore with gap 2 (refreshes at steps 0, 2, 4): the moments after step 2 and after step 4 are LDAdam's
    transfer of those after steps 1 and 3, then one Adam update with the new R. Float64: 1e-12."""
    W = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    betas = (0.908, 0.99)  # LDAdam's defaults
    opt = lro.GaLoreAdamW([{"params": [W], "rank": 4}], lr=0.01, betas=betas, update_proj_gap=2, stagger=False,
                          on_refresh="transfer")
    grads = [decaying_matrix(*shape, seed=s, decay=0.8) for s in range(5)]
    for t, g in enumerate(grads):
        old = opt._projectors[W].basis().clone() if t else None
        m, v = (opt.state[W]["exp_avg"].clone(), opt.state[W]["exp_avg_sq"].clone()) if t else (None, None)
        W.grad = g.clone()
        opt.step()
        if t not in (2, 4):
            continue
        proj = opt._projectors[W]
        new = proj.basis()
        T = new.T @ old if proj.side == "left" else old @ new.T
        m, v = ldadam_transfer(m, v, T, proj.side, t, betas)
        r = new.T @ g if proj.side == "left" else g @ new.T
        m, v = betas[0] * m + (1 - betas[0]) * r, betas[1] * v + (1 - betas[1]) * r * r
        torch.testing.assert_close(opt.state[W]["exp_avg"], m, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[W]["exp_avg_sq"], v, rtol=1e-12, atol=1e-16)


def test_transfer_against_the_reference_optimizer():
    """The fast core and the readable reference agree over 6 steps with 3 transfers (float32: 1e-6 on weights
    of size ~1, rounding of two implementations of the same float32 arithmetic)."""
    from lowrank_optim.optim.reference import ReferenceLowRankAdamW

    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(24, 16)), torch.nn.Parameter(torch.randn(16, 24))]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    opt = lro.LowRankAdamW([{"params": ws, "rank": 4}], lr=0.01, update_proj_gap=2, stagger=False,
                           on_refresh="transfer", weight_decay=0.0)
    ref = ReferenceLowRankAdamW([{"params": twins, "rank": 4}], lr=0.01, update_proj_gap=2, on_refresh="transfer",
                                weight_decay=0.0)
    for t in range(6):
        for i, (w, u) in enumerate(zip(ws, twins)):
            g = decaying_matrix(*w.shape, seed=10 * t + i, decay=0.8, dtype=torch.float32)
            w.grad, u.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for w, u in zip(ws, twins):
        torch.testing.assert_close(w.detach(), u.detach(), rtol=1e-6, atol=1e-6)


def test_transfer_needs_a_rule_that_defines_it():
    W = torch.nn.Parameter(torch.zeros(8, 6))
    with pytest.raises(ValueError, match="on_refresh='transfer'.*rule='orthogonal' has no projection-aware transfer"):
        lro.LowRankAdamW([{"params": [W], "rank": 2, "rule": "orthogonal", "on_refresh": "transfer"}])
    assert type(lro.rules.get("adam")).transfers() and not type(lro.rules.get("adafactor")).transfers()


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(24, 16, bias=False))


def _run(net, bits, shard):
    opt = lro.GaLoreAdamW([{"params": list(net.parameters()), "rank": 4}], lr=0.01, update_proj_gap=2,
                          on_refresh="transfer", state_bits=bits, min_8bit_size=0)
    for t in range(6):
        for i, p in enumerate(net.parameters()):
            p.grad = shard(decaying_matrix(*p.shape, seed=10 * t + i, decay=0.8, dtype=torch.float32), p)
        opt.step()
    return opt


@pytest.mark.parametrize("bits", [32, 8])
def test_transfer_with_int8_moments_and_on_fsdp2_shards(bits):
    """INT8 moments are dequantized, transferred and requantized; a world-size-1 FSDP2 run (the sharded code
    path: DTensor state, the change of basis from the Gram-matrix refresh) equals one process. The bases agree
    to float32 rounding (~1e-7 relative); INT8: an element on a code boundary may round to the neighbouring
    code, a few percent of lr (1e-2) on its step, so 5e-4 (as tests/test_matrix.py); float32: 1e-5."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    single = _net()
    opt = _run(single, bits, lambda g, p: g)
    if bits == 8:
        assert all(s["exp_avg"].dtype == torch.uint8 for s in opt.state.values())
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = fully_shard(_net())
        _run(sharded, bits, lambda g, p: distribute_tensor(g, p.device_mesh, p.placements))
        tol = 5e-4 if bits == 8 else 1e-5
        for a, b in zip(sharded.parameters(), single.parameters()):
            torch.testing.assert_close(a.full_tensor(), b.detach(), rtol=tol, atol=tol)
    finally:
        if started:
            dist.destroy_process_group()
