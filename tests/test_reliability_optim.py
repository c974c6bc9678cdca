"""Hostile input to the optimizer: non-finite and misshapen gradients (``nonfinite=``). Each either is
refused before anything changes, or (``skip``) leaves the run as if the step had not been taken."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import lowrank_optim as lro
from conftest import PRESET_CASES, batches, lm_loss, make_model, roundtrip, train

NAN = float("nan")


def build(cls, kw, **extra):
    model = make_model()
    keys = {"rank": 8, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        opt = cls(lro.param_groups(model, rank=keys.pop("rank"), update_proj_gap=3), lr=1e-2, **keys, **extra)
    return model, opt


def frozen(model, opt):
    """Everything a step could change: the weights, the optimizer's whole state dict, bit for bit."""
    return copy.deepcopy((model.state_dict(), opt.state_dict()))


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def backward(model, tokens, poison=None):
    model.zero_grad(set_to_none=True)
    lm_loss(model, tokens).backward()
    if poison is not None:
        model.layers[0].up_proj.weight.grad[0, 0] = poison


# ---------------------------------------------------------------------------- nonfinite=
@pytest.mark.parametrize("name,cls,kw", PRESET_CASES, ids=[c[0] for c in PRESET_CASES])
def test_non_finite_gradient_raise_skip_ignore(name, cls, kw):
    """At step 1 (no refresh: the gap is 3) one NaN in one gradient. ``raise`` (the default) refuses
    with nothing changed; ``skip`` changes nothing but the counter, which a checkpoint keeps, and the
    run then equals one that never took that step, bit for bit; ``ignore`` never raises once something
    changed, and later steps with finite gradients go on (SUMO's SVD of a NaN momentum included)."""
    data = batches(4)
    model, opt = build(cls, kw)
    assert all(g["nonfinite"] == "raise" for g in opt.param_groups)
    train(model, opt, data[:1])
    before = frozen(model, opt)
    backward(model, data[1], NAN)
    with pytest.raises(lro.NonFiniteGradientError, match=r"parameter 'layers.0.up_proj.weight' has a non-finite "
                       r"gradient \(inf or NaN\) at step 1; weights and optimizer state are unchanged"):
        opt.step()
    assert same(frozen(model, opt), before)

    skipping, opt_s = build(cls, kw, nonfinite="skip")
    reference, opt_r = build(cls, kw, nonfinite="skip")
    train(skipping, opt_s, data[:1])
    train(reference, opt_r, data[:1])
    backward(skipping, data[1], float("inf"))
    opt_s.step()
    assert [g["nonfinite_skipped"] for g in opt_s.param_groups] == [1, 1]
    assert same(skipping.state_dict(), reference.state_dict())
    fresh_model, fresh = build(cls, kw, nonfinite="skip")
    fresh_model.load_state_dict(skipping.state_dict())
    fresh.load_state_dict(roundtrip(opt_s.state_dict()))
    assert [g["nonfinite_skipped"] for g in fresh.param_groups] == [1, 1]  # survives a checkpoint
    train(fresh_model, fresh, data[2:4])
    train(reference, opt_r, data[2:4])
    assert same(fresh_model.state_dict(), reference.state_dict())

    model, opt = build(cls, kw, nonfinite="ignore")
    train(model, opt, data[:1])
    before = frozen(model, opt)
    backward(model, data[1], NAN)
    try:
        opt.step()
    except lro.NonFiniteGradientError:  # refresh-every-step projectors and INT8 storage: before any change
        assert same(frozen(model, opt), before)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):  # finite gradients (the weights may be NaN now): no step raises
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        opt.step()


def test_sumo_nan_momentum_does_not_raise_midway():
    """The attack: SUMO, one NaN gradient at a non-refresh step under nonfinite='ignore'. Before, the
    exact SVD of the NaN momentum raised _LinAlgError after the step was counted, on every later step
    too. Now the orthogonal factor of a non-finite matrix is NaN (as Adam's update from a NaN moment is)
    and no step raises; the default refuses the gradient before anything."""
    from lowrank_optim.rules.orthogonal import orthogonalize_svd

    x = torch.randn(8, 20)
    x[2, 3] = NAN
    assert orthogonalize_svd(x).isnan().all()
    assert torch.allclose(orthogonalize_svd(torch.eye(4) * 3), torch.eye(4))
    model, opt = build(lro.SUMO, {}, nonfinite="ignore")
    data = batches(3)
    train(model, opt, data[:1])
    backward(model, data[1], NAN)
    opt.step()
    state = opt.state[model.layers[0].up_proj.weight]
    assert int(state["step"]) == 2 and state["momentum_buffer"].isnan().any()
    backward(model, data[2])
    opt.step()  # raised _LinAlgError before


def test_misshapen_gradient_at_a_refresh_is_refused_before_anything():
    """A gradient of the wrong shape (``p.grad.data`` replaced) at a refresh step was partly applied."""
    model, opt = build(lro.GaLoreAdamW, {})
    data = batches(4)
    train(model, opt, data[:3])  # the next step (3) refreshes
    backward(model, data[3])
    w = model.layers[1].down_proj.weight
    w.grad.data = torch.randn(w.shape[1], w.shape[0])
    before = frozen(model, opt)
    with pytest.raises(ValueError, match=r"parameter 'layers.1.down_proj.weight' has a gradient of shape \(48, 32\), "
                       r"but the parameter is \(32, 48\); nothing was changed"):
        opt.step()
    assert same(frozen(model, opt), before)


def test_nonfinite_option_is_validated():
    model = make_model()
    with pytest.raises(ValueError, match=r"invalid nonfinite='warn': choose 'raise' .* 'skip' .* or 'ignore'"):
        lro.GaLoreAdamW(lro.param_groups(model, rank=8), nonfinite="warn")
