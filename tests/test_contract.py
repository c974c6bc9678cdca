"""The torch.optim contract, point by point: what a user swapping torch.optim.AdamW relies on."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lowrank_optim as lro
from conftest import batches, lm_loss, make_model, roundtrip, train

RANK = 8


def galore(model, **kw):
    kw.setdefault("lr", 3e-3)
    groups = lro.param_groups(model, rank=RANK, update_proj_gap=kw.pop("gap", 3), scale=0.25)
    return lro.GaLoreAdamW(groups, **kw)


def tensors_and_plain_values(obj) -> bool:
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(tensors_and_plain_values(x) for x in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, (int, str)) and tensors_and_plain_values(v) for k, v in obj.items())
    return False


def test_state_dict_is_tensors_and_plain_values_and_loads_weights_only():
    model = make_model()
    opt = galore(model)
    train(model, opt, batches(2))
    sd = opt.state_dict()
    assert tensors_and_plain_values(sd)
    loaded = roundtrip(sd)
    low = [s for s in loaded["state"].values() if "projector" in s]
    assert low and all(isinstance(s["projector"]["P"], torch.Tensor) for s in low)


@pytest.mark.parametrize("stop_at", [2, 3, 4])
def test_resume_is_bit_identical(stop_at):
    """N steps, checkpoint (through torch.save/load weights_only), fresh model and optimizer,
    M more steps == N+M uninterrupted steps, bit for bit. Refreshes at steps 0, 3, 6."""
    data = batches(8)
    model = make_model()
    opt = galore(model, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    train(model, opt, data, sched)

    model_a = make_model()
    opt_a = galore(model_a, weight_decay=0.1)
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=8)
    train(model_a, opt_a, data[:stop_at], sched_a)
    ckpt = roundtrip({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()})

    model_b = make_model(seed=123)  # different init: everything must come from the checkpoint
    opt_b = galore(model_b, weight_decay=0.1)
    sched_b = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=8)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    train(model_b, opt_b, data[stop_at:], sched_b)

    for (name, a), b in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), model_b.parameters()):
        sa, sb = opt.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            if key == "projector":
                assert torch.equal(sa[key]["P"], sb[key]["P"]) and sa[key]["side"] == sb[key]["side"]
            else:
                assert torch.equal(sa[key], sb[key]), key


def test_load_keeps_state_dtypes_and_moves_nothing_it_should_not():
    """torch.optim.Optimizer.load_state_dict casts every floating state tensor to the parameter's
    dtype; ours keeps the float32 low-rank moments of a bf16 weight in float32."""
    model = make_model(dtype=torch.bfloat16)
    opt = galore(model)
    train(model, opt, batches(2))
    opt2 = galore(model)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    low = [p for p in model.parameters() if "projector" in opt.state[p]]
    assert low
    for p in model.parameters():
        want = torch.float32 if any(p is q for q in low) else torch.bfloat16
        assert opt2.state[p]["exp_avg"].dtype == want
        assert torch.equal(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])
        assert opt2.state[p]["step"].dtype == torch.float32


def test_lr_scheduler_drives_both_kinds_of_parameter():
    model = make_model()
    opt = galore(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    train(model, opt, batches(1), sched)
    before = copy.deepcopy(model.state_dict())
    train(model, opt, batches(2, seed=9), sched)  # lr is 0 now: nothing may move
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.0]


def test_step_with_closure_evaluates_with_grad_enabled_and_returns_loss():
    model = make_model()
    opt = galore(model)
    tokens = batches(1)[0]
    seen = {}

    def closure():
        seen["grad_enabled"] = torch.is_grad_enabled()
        opt.zero_grad()
        loss = lm_loss(model, tokens)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert seen["grad_enabled"] is True
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert opt.step(closure).item() < loss.item() + 1.0  # runs again from the saved state


def test_zero_grad_and_parameters_without_grad_are_skipped():
    model = make_model()
    opt = galore(model)
    train(model, opt, batches(1))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # only the first block gets gradients: the second block and its state stay untouched
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps_before = {p: int(s["step"]) for p, s in opt.state.items()}
    frozen = list(model.layers[1].parameters())
    for p in frozen:
        p.requires_grad_(False)
    loss = lm_loss(model, batches(1, seed=4)[0])
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if any(p is q for q in frozen):
            assert torch.equal(p, before[n]), n
            assert int(opt.state[p]["step"]) == steps_before[p]
        else:
            assert not torch.equal(p, before[n]), n


def test_add_param_group_projects_the_new_group():
    model = make_model()
    extra = torch.nn.Linear(32, 24, bias=False)
    opt = galore(model)
    opt.add_param_group({"params": [("extra.weight", extra.weight)], "rank": 4, "update_proj_gap": 5})
    g = opt.param_groups[-1]
    assert g["rank"] == 4 and g["scale"] == 0.25 and g["projector"] == "svd"  # defaults filled in
    extra.weight.grad = torch.randn(24, 32)
    opt.step()
    assert opt.state[extra.weight]["exp_avg"].shape == (4, 32)  # 24×32 under std: left side
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [("extra.weight", extra.weight)]})


@pytest.mark.parametrize("foreach", [False, True])
def test_plain_parameters_equal_torch_adamw_bitwise(foreach):
    """Groups without rank, and 1-D or scalar parameters inside a rank group, are torch's AdamW."""
    data = batches(5)
    torch_model, our_model = make_model(), make_model()
    ref = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        ours = lro.LowRankAdamW(our_model.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
    train(torch_model, ref, data)
    train(our_model, ours, data)
    for a, b in zip(torch_model.parameters(), our_model.parameters()):
        assert torch.equal(a, b)

    # a rank group holding only 1-D parameters and a scalar
    vec = torch.nn.Parameter(torch.randn(7))
    scalar = torch.nn.Parameter(torch.tensor(0.3))
    twins = [torch.nn.Parameter(vec.detach().clone()), torch.nn.Parameter(scalar.detach().clone())]
    ours = lro.GaLoreAdamW([{"params": [vec, scalar], "rank": 2}], lr=1e-2, foreach=foreach)
    ref = torch.optim.AdamW(twins, lr=1e-2, foreach=foreach)
    for t in range(4):
        for p, q in zip([vec, scalar], twins):
            p.grad = torch.full_like(p, 0.1 * (t + 1)) + p.detach()
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    assert torch.equal(vec, twins[0]) and torch.equal(scalar, twins[1])


def _tiled_against_torch(shapes, dtype, weight_decay, threads, steps=5):
    torch.manual_seed(0)
    ours_p = [torch.nn.Parameter((torch.randn(s) * 0.02).to(dtype)) for s in shapes]
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = lro.LowRankAdamW(ours_p, lr=1e-2, weight_decay=weight_decay)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=weight_decay)  # torch's CPU default: single-tensor
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(steps):
            for p, q in zip(ours_p, ref_p):
                p.grad = (torch.randn(p.shape) * 1e-3).to(dtype)
                q.grad = p.grad.clone()
            ours.step()
            ref.step()
    finally:
        torch.set_num_threads(before)
    for p, q in zip(ours_p, ref_p):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[p][key], ref.state[q][key]), key


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_tiled_plain_adamw_equals_torch_adamw_bitwise(monkeypatch, threads, dtype, weight_decay):
    """Large CPU parameters take the tiled AdamW (lowrank_optim.rules.adam._adamw_tiled): the same
    element-wise ops tile by tile, so torch's numbers to the bit, weights and both moments, whatever the
    thread count (torch splits a pass over threads at other points than our tiles). Small thresholds
    here so that many tiles, a short last tile and a tensor below the threshold are all exercised."""
    from lowrank_optim.rules import adam

    monkeypatch.setattr(adam, "TILED_MIN", 1000)
    monkeypatch.setattr(adam, "TILE", 256)
    _tiled_against_torch([(40, 25), (3001,), (37, 81), (999,)], dtype, weight_decay, threads)


def test_tiled_plain_adamw_at_its_real_threshold_equals_torch_adamw_bitwise():
    from lowrank_optim.rules import adam

    n = adam.TILED_MIN + adam.TILE // 2 + 3  # above the threshold, a short last tile
    _tiled_against_torch([(n,)], torch.float32, 0.1, torch.get_num_threads(), steps=2)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.95)])
@pytest.mark.parametrize("foreach", [None, False, True])
def test_plain_bf16_parameters_equal_torch_adamw_bitwise(betas, foreach):
    """torch.optim.AdamW with the same ``foreach`` (its default, None, is the single-tensor path on CPU):
    in bf16 torch's two paths differ at betas (0.9, 0.95), nanoGPT's, by up to 1.5e-3 in five steps, so
    our None must be torch's None there, not its multi-tensor path."""
    data = batches(4)
    torch_model, our_model = make_model(dtype=torch.bfloat16), make_model(dtype=torch.bfloat16)
    ref = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, betas=betas, weight_decay=0.1, foreach=foreach)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        ours = lro.LowRankAdamW(our_model.parameters(), lr=1e-2, betas=betas, weight_decay=0.1, foreach=foreach)
    train(torch_model, ref, data)
    train(our_model, ours, data)
    for a, b in zip(torch_model.parameters(), our_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_train(dtype):
    """Low-rank moments are float32; plain parameters keep torch AdamW's moments (bf16 for bf16),
    except fp16 ones, which keep float32 moments (fp16 would flush V = g² to zero)."""
    data = batches(6)
    half_model, full_model = make_model(dtype=dtype), make_model()
    half_opt, full_opt = galore(half_model, lr=1e-2), galore(full_model, lr=1e-2)
    half_losses = train(half_model, half_opt, data)
    full_losses = train(full_model, full_opt, data)
    assert half_losses[-1] < half_losses[0]
    assert half_losses == pytest.approx(full_losses, rel=0.05)
    for p in half_model.parameters():
        state = half_opt.state[p]
        assert p.dtype == dtype
        want = torch.float32 if "projector" in state or dtype == torch.float16 else torch.bfloat16
        assert state["exp_avg"].dtype == want and state["exp_avg_sq"].dtype == want
        if "projector" in state:
            assert state["projector"]["P"].dtype == dtype
    for a, b in zip(half_model.parameters(), full_model.parameters()):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.02)


def test_galore_reduces_the_loss_like_adamw():
    data = batches(30) * 2
    losses = {}
    for key in ("galore", "adamw"):
        model = make_model()
        opt = galore(model, lr=1e-2, gap=10) if key == "galore" else torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[key] = train(model, opt, data)
    assert losses["galore"][-1] < 0.8 * losses["galore"][0]
    assert losses["galore"][-1] < losses["adamw"][-1] * 1.25


def test_state_bytes_are_low_rank():
    model = make_model()
    opt = galore(model)
    train(model, opt, batches(1))
    nbytes = opt.state_nbytes()
    full = sum(2 * p.numel() * 4 for p in model.parameters())
    low_rank_params = [p for p in model.parameters() if "projector" in opt.state[p]]
    low_ids = {id(p) for p in low_rank_params}
    expected_moments = 0
    for p in model.parameters():
        n = RANK * max(p.shape) if id(p) in low_ids else p.numel()  # std: max(m, n) × r
        expected_moments += 2 * n * 4
    assert nbytes["moments"] == expected_moments < full
    assert nbytes["projectors"] == sum(RANK * min(p.shape) * 4 for p in low_rank_params)


def test_preset_defaults_and_explicit_arguments():
    model = make_model()
    g = lro.param_groups(model, rank=RANK)
    for group in g:  # let the optimizer's defaults decide
        for key in ("scale", "update_proj_gap", "proj_type"):
            group.pop(key, None)
    assert lro.GaLoreAdamW(g).param_groups[0]["scale"] == 0.25
    assert lro.LowRankAdamW(g).param_groups[0]["scale"] == 1.0
    opt = lro.GaLoreAdamW(g, scale=0.5, update_proj_gap=7, proj_type="reverse_std")
    assert (opt.param_groups[0]["scale"], opt.param_groups[0]["update_proj_gap"]) == (0.5, 7)
    assert opt.param_groups[0]["proj_type"] == "reverse_std"
    defaults = lro.GaLoreAdamW.method_defaults()
    assert {k: defaults[k] for k in ("update_proj_gap", "scale", "proj_type", "projector", "residual", "on_refresh")} == dict(
        update_proj_gap=200, scale=0.25, proj_type="std", projector="svd", residual="drop", on_refresh="keep"
    )


def test_step_parameters_equals_a_full_step():
    """Stepping parameters one at a time (as layer-wise updates do) gives a full step's numbers."""
    data = batches(5)
    full_model, part_model = make_model(), make_model()
    full, part = galore(full_model, weight_decay=0.1), galore(part_model, weight_decay=0.1)
    train(full_model, full, data)
    for tokens in data:
        part.zero_grad()
        lm_loss(part_model, tokens).backward()
        for p in reversed(list(part_model.parameters())):
            part.step_parameters([p])
    for (name, a), b in zip(full_model.named_parameters(), part_model.parameters()):
        assert torch.equal(a, b), name


def test_import_defers_dynamo_and_dtensor_until_they_are_needed():
    """``import lowrank_optim`` stays cheap (a CLI's ``--help``, a script that only builds param groups): it
    imports neither ``torch._dynamo`` nor ``torch.distributed.tensor`` (about a second together), which the first
    step and ``fully_shard`` import when they need them. A fresh interpreter, since this one has both."""
    import subprocess
    import sys

    probe = ("import sys, torch, lowrank_optim as lro\n"
             "early = [m for m in ('torch._dynamo', 'torch.distributed.tensor') if m in sys.modules]\n"
             "w = torch.nn.Parameter(torch.ones(8, 8)); w.grad = torch.ones(8, 8)\n"
             "lro.GaLoreAdamW([{'params': [w], 'rank': 2}], lr=0.1).step()\n"
             "print(early, 'torch._dynamo' in sys.modules, bool(w.abs().sum() < 64))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[-2] == "[] True True", out.stdout + out.stderr
