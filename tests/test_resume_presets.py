"""Bit-identical resume for every preset and every projector (CPU): N steps, checkpoint through
torch.save/torch.load(weights_only=True), a fresh model and optimizer, M more steps, equal to N+M
uninterrupted steps. Refreshes every 3 steps, the stop falls between two refreshes."""

from __future__ import annotations

import pytest
import torch

import lowrank_optim as lro
from conftest import PRESET_CASES, batches, make_model, roundtrip, train

CASES = PRESET_CASES[:5] + [("galore-rotate-lazy", lro.GaLoreAdamW, {"on_refresh": "rotate", "refresh": "lazy"})] + PRESET_CASES[5:]


def build(cls, keys):
    model = make_model()
    keys = {"rank": 8, "update_proj_gap": 3, **keys}
    return model, cls(lro.param_groups(model, **keys), lr=3e-3)


@pytest.mark.parametrize("name,cls,keys", CASES, ids=[c[0] for c in CASES])
def test_resume_is_bit_identical(name, cls, keys):
    data = batches(7)
    model, opt = build(cls, keys)
    train(model, opt, data)

    model_a, opt_a = build(cls, keys)
    train(model_a, opt_a, data[:4])
    ckpt = roundtrip({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
    model_b, opt_b = build(cls, keys)
    torch.manual_seed(1234)  # nothing may depend on the global RNG
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    train(model_b, opt_b, data[4:])

    for (pname, a), b in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), pname
    low = [s for s in opt_b.state.values() if "projector" in s]
    assert low, "nothing was projected"


def _dcp_resume(tmp_path, build, data, split):
    """The README's distributed-checkpoint recipe in one process: dcp.save of get_optimizer_state_dict, then a
    fresh model and optimizer, init_state() as the template, dcp.load, set_optimizer_state_dict, train on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt = build()
    train(model, opt, data[:split])
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    twin, twin_opt = build(seed=5)
    twin_opt.init_state()
    state = {"model": twin.state_dict(), "optim": get_optimizer_state_dict(twin, twin_opt)}
    dcp.load(state, checkpoint_id=str(tmp_path))
    twin.load_state_dict(state["model"])
    set_optimizer_state_dict(twin, twin_opt, state["optim"])
    train(twin, twin_opt, data[split:])
    return twin


def test_distributed_checkpoint_resume_keeps_the_lazy_schedule_and_allows_frozen_parameters(tmp_path):
    """Two things the init_state() template lacked (found by a QA pass): Q-GaLore's lazy queue and gap
    appeared at refreshes, so dcp.load (which loads the template's keys only) dropped them and the resumed
    run refreshed on another schedule; and a frozen parameter got state in the template but never in
    training, so dcp.load failed on its missing keys (torch's AdamW: no state for it either way)."""

    def build(seed=0):
        model = make_model(seed=seed)
        model.embed_tokens.weight.requires_grad_(False)
        keys = {"rank": 8, "update_proj_gap": 1, "stagger": False}
        return model, lro.QGaLoreAdamW(lro.param_groups(model, **keys), lr=3e-3)

    data = batches(1) * 14  # one batch again and again: the subspace keeps still, the gap doubles
    model, opt = build()
    train(model, opt, data)
    assert any(int(s["proj_gap"]) > 1 for s in opt.state.values() if "proj_gap" in s)  # the schedule moved
    twin = _dcp_resume(tmp_path, build, data, 8)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
