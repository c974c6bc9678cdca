"""The registered parts from outside the package: a rule and an update written here, in a few lines, run
with every projector, store and resume like the built-in ones; and the numerics the parts promise."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank_optim as lro
from conftest import (
    assert_same_parameters,
    batches,
    decaying_matrix,
    make_model,
    projector_keys,
    roundtrip,
    train,
    train_and_resume,
)


class SignMomentum(lro.rules.Rule):
    """signSGD with momentum on R (Lion without its interpolation): a rule defined outside the package."""

    name = "test_sign_momentum"
    keys = ("exp_avg",)

    def init(self, low):  # the one-argument form: no group needed
        return {"exp_avg": torch.zeros_like(low)}

    def direction(self, low, state, group):
        state["exp_avg"].lerp_(low, 1 - group["betas"][0])
        return state["exp_avg"].sign()


class DropWithNormLog(lro.updates.Update):
    """GaLore's update that also keeps the last N's norm: an update with state of its own."""

    name = "test_drop_logged"
    keys = ("last_norm",)

    def init(self, low, group):
        return {"last_norm": torch.zeros((), dtype=low.dtype)}

    def apply(self, ctx):
        ctx.state["last_norm"].copy_(ctx.norm(ctx.direction, rows="low"))
        ctx.apply_back(ctx.direction, -ctx.lr * ctx.scale, ctx.decay)


@pytest.fixture
def outside_parts():
    lro.rules.register(SignMomentum)
    lro.updates.register(DropWithNormLog)
    yield
    del lro.rules.REGISTRY[SignMomentum.name]
    del lro.updates.REGISTRY[DropWithNormLog.name]


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        return fn(*a, **kw)


@pytest.mark.parametrize("projector", lro.projectors.available())
@pytest.mark.parametrize("bits", [32, 8])
def test_a_rule_defined_outside_runs_with_every_projector_and_resumes(outside_parts, projector, bits):
    keys = dict(rank=4, update_proj_gap=2, **projector_keys(projector), rule=SignMomentum.name, on_refresh="rotate",
                state_bits=bits, min_8bit_size=0)
    model, opt, resumed, _ = train_and_resume(lambda m: lro.LowRankAdamW(lro.param_groups(m, **keys), lr=1e-3),
                                              batches(6), 3)
    low = [s for s in opt.state.values() if "projector" in s]
    assert low and all(("exp_avg_absmax" in s) == (bits == 8) for s in low)  # INT8 storage by default
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    eager = lro.LowRankAdamW(lro.param_groups(make_model(), **keys), lr=1e-3)
    eager.init_state()
    assert eager.state_nbytes() == opt.state_nbytes()


def test_the_outside_rule_steps_as_written_and_plain_parameters_stay_adamw(outside_parts):
    W = torch.nn.Parameter(decaying_matrix(24, 16, seed=1, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(16, dtype=torch.float64))
    opt = lro.LowRankAdamW([{"params": [W, b], "rank": 4, "rule": SignMomentum.name}], lr=0.1, weight_decay=0.0,
                           projector_options={"canonical_signs": False})
    W0 = W.detach().clone()
    G = decaying_matrix(24, 16, seed=2, dtype=torch.float64)
    W.grad, b.grad = G, torch.full((16,), 0.5, dtype=torch.float64)
    opt.step()
    Q = torch.linalg.svd(G, full_matrices=False)[2][:4]  # right side: R = G Qᵀ
    torch.testing.assert_close(W.detach(), W0 - 0.1 * torch.sign(G @ Q.T) @ Q, rtol=0, atol=1e-12)
    assert set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW, the rule's plain_rule
    torch.testing.assert_close(b.detach(), torch.full((16,), 0.9, dtype=torch.float64))  # Adam's first step


def test_an_update_defined_outside_keeps_its_state_and_resumes(outside_parts):
    data = batches(5)
    keys = dict(rank=4, update_proj_gap=2, residual=DropWithNormLog.name)
    model = make_model()
    opt = lro.GaLoreAdamW(lro.param_groups(model, **keys), lr=1e-2)
    train(model, opt, data[:2])
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, data[2:])
    low = [s for s in opt.state.values() if "projector" in s]
    assert all(float(s["last_norm"]) > 0 for s in low)
    twin = make_model()
    twin.load_state_dict(ckpt["model"])
    opt2 = lro.GaLoreAdamW(lro.param_groups(twin, **keys), lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    train(twin, opt2, data[2:])
    assert_same_parameters(model, twin)
    galore = make_model()
    train(galore, lro.GaLoreAdamW(lro.param_groups(galore, rank=4, update_proj_gap=2), lr=1e-2), data)
    for a, b in zip(model.parameters(), galore.parameters()):
        assert torch.equal(a, b)  # the same step as drop, and nothing else


def test_registration_is_checked():
    class Nameless(lro.rules.Rule):
        keys = ("x",)

        def direction(self, low, state, group):
            return low

    with pytest.raises(ValueError, match="non-empty class attribute 'name'"):
        lro.rules.register(Nameless)

    class NoDirection(lro.rules.Rule):
        name = "test_no_direction"

    with pytest.raises(TypeError, match="must define direction"):
        lro.rules.register(NoDirection)

    class Adam2(lro.rules.Rule):
        name = "adam"

        def direction(self, low, state, group):
            return low

    with pytest.raises(ValueError, match="already registered"):
        lro.rules.register(Adam2)
    with pytest.raises(ValueError, match="invalid rule='nope'"):
        lro.LowRankAdamW([torch.nn.Parameter(torch.zeros(4, 4))], rule="nope")
    with pytest.raises(TypeError, match="unexpected keyword argument 'nesterv'; did you mean 'nesterov'"):
        lro.LowRankAdamW([torch.nn.Parameter(torch.zeros(4, 4))], nesterv=True)


# ------------------------------------------------------------------ numerics
@pytest.mark.parametrize("cls,rank", [(lro.APOLLO, 4), (lro.APOLLOMini, 1)])
def test_apollo_writes_no_nan_into_float16_weights_when_a_gradient_channel_is_zero(cls, rank):
    """‖N‖/(‖R‖ + 1e-8) of a channel whose gradient is 0 but whose momentum is not was ~1e8: inf in
    float16, and 0·inf = NaN. The ratio is float32 now and a zero channel's is 0."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(32, 16).half())
    opt = quiet(cls, [{"params": [W], "rank": rank, "update_proj_gap": 100}], lr=1e-2)
    for t in range(4):
        g = torch.randn(32, 16).half()
        if t >= 2:
            g[5] = 0  # one channel (a row: right side) without gradient
        if t == 3 and cls is lro.APOLLOMini:
            g.zero_()  # the whole tensor without gradient
        W.grad = g
        before = W.detach().clone()
        opt.step()
        assert torch.isfinite(W).all(), t
    assert torch.equal(W.detach()[5], before[5] * (1 - 1e-2 * 1e-2)) or cls is lro.APOLLOMini


def test_sign_residual_of_a_gradient_inside_the_subspace_is_no_step():
    """A rank-1 gradient at rank 1: G − PPᵀG is round-off (~1e-7 of G), and sign() made it ±lr on most
    entries (the update norm was 2.6x the subspace-only one). A channel whose residual is below the
    round-off bound now gives no step: FRUGAL's update is GaLore's."""
    u = torch.linspace(1, 2, 24)
    v = torch.linspace(-1, 1, 16)
    G = torch.outer(u, v)
    finals = {}
    for name, residual in (("frugal", "sign"), ("galore", "drop")):
        W = torch.nn.Parameter(torch.zeros(24, 16))
        opt = lro.LowRankAdamW([{"params": [W], "rank": 1, "residual": residual}], lr=1e-2, weight_decay=0.0)
        W.grad = G.clone()
        opt.step()
        finals[name] = W.detach().clone()
    assert torch.equal(finals["frugal"], finals["galore"])
    # a real residual still gets its signSGD step
    W = torch.nn.Parameter(torch.zeros(24, 16))
    opt = lro.LowRankAdamW([{"params": [W], "rank": 1, "residual": "sign"}], lr=1e-2, weight_decay=0.0)
    W.grad = G + decaying_matrix(24, 16, seed=3, dtype=torch.float32) * 1e-3
    opt.step()
    assert (W.detach() - finals["galore"]).abs().max() > 0.5e-2
