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


FLATTENED = {
    "galore": lambda ps: lro.GaLoreAdamW(ps, lr=3e-3),
    "qgalore": lambda ps: lro.QGaLoreAdamW(ps, lr=3e-3, min_8bit_size=0),  # INT4 basis: its dtype and shape
    "dct_adamw-ef4": lambda ps: lro.DCTAdamW(ps, lr=3e-3, ef_bits=4),  # the DCT's variant, an INT4 buffer E
    "trion": lambda ps: lro.Trion(ps, lr=3e-3),
}


@pytest.mark.parametrize("name", sorted(FLATTENED))
def test_flattened_distributed_state_dicts_save_and_resume(name, tmp_path):
    """StateDictOptions(flatten_optimizer_state_dict=True) (torchtitan's default) takes tensors, ints, floats
    and dicts only; a projector's side, the DCT's variant and an INT4 tensor's dtype and shape were strings
    and lists, so get_optimizer_state_dict raised for every preset (found by a QA pass). state_dict() now
    writes them as codes, load_state_dict reads codes and the old strings alike, and a flattened
    checkpoint resumes bit for bit (through dcp.save / dcp.load, into an init_state() template)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

    flat = StateDictOptions(flatten_optimizer_state_dict=True)

    def build(seed=0):
        model = make_model(seed=seed)
        return model, FLATTENED[name](lro.param_groups(model, rank=8, update_proj_gap=2))

    data = batches(6)
    model, opt = build()
    train(model, opt, data)
    model_a, opt_a = build()
    train(model_a, opt_a, data[:3])
    dcp.save({"model": model_a.state_dict(), "optim": get_optimizer_state_dict(model_a, opt_a, options=flat)},
             checkpoint_id=str(tmp_path))
    twin, twin_opt = build(seed=5)
    twin_opt.init_state()
    state = {"model": twin.state_dict(), "optim": get_optimizer_state_dict(twin, twin_opt, options=flat)}
    dcp.load(state, checkpoint_id=str(tmp_path))
    twin.load_state_dict(state["model"])
    set_optimizer_state_dict(twin, twin_opt, state["optim"], options=flat)
    train(twin, twin_opt, data[3:])
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n


def test_a_state_dict_of_before_the_codes_still_loads():
    """Checkpoints written before state_dict() coded its strings hold them as strings: they load as before."""
    from lowrank_optim.optim import codes

    model = make_model()
    opt = lro.QGaLoreAdamW(lro.param_groups(model, rank=8, update_proj_gap=2), lr=3e-3)
    train(model, opt, batches(2))
    coded = opt.state_dict()
    old = roundtrip(codes.decoded(coded))
    assert {s["projector"]["side"] for s in old["state"].values() if "projector" in s} <= {"left", "right"}
    assert all(isinstance(s["projector"]["side"], int) for s in coded["state"].values() if "projector" in s)
    fresh = lro.QGaLoreAdamW(lro.param_groups(make_model(), rank=8, update_proj_gap=2), lr=3e-3)
    fresh.load_state_dict(old)
    assert fresh.state_dict()["state"].keys() == coded["state"].keys()
