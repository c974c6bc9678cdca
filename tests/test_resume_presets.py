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
