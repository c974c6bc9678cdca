"""Hostile input to the optimizer: non-finite and misshapen gradients (``nonfinite=``), and state dicts
of another optimizer, method or rank, or with mangled values. Each either is refused before anything
changes, or (``skip``) leaves the run as if the step had not been taken."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lowrank_optim as lro
from conftest import PRESET_CASES, batches, lm_loss, make_model, roundtrip, same, train

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


def backward(model, tokens, poison=None):
    model.zero_grad(set_to_none=True)
    lm_loss(model, tokens).backward()
    if poison is not None:
        model.layers[0].up_proj.weight.grad[0, 0] = poison


# ---------------------------------------------------------------------------- nonfinite=
@pytest.mark.parametrize("name,cls,kw", PRESET_CASES, ids=[c[0] for c in PRESET_CASES])
def test_non_finite_gradient_raise_skip_ignore(name, cls, kw):
    """At step 1 one NaN in one gradient (gap 3, staggered: the weights of phase 1 renew their subspace
    there). ``raise`` (the default) refuses with nothing changed; ``skip`` changes nothing but the
    counter, which a checkpoint keeps, and the run then equals one that never took that step, bit for
    bit; ``ignore`` never raises once something changed, and later steps with finite gradients go on
    (SUMO's SVD of a NaN momentum included)."""
    data = batches(4)
    model, opt = build(cls, kw)
    assert all(g["nonfinite"] == "raise" for g in opt.param_groups)
    train(model, opt, data[:1])
    before = frozen(model, opt)
    backward(model, data[1], NAN)
    with pytest.raises(lro.NonFiniteGradientError, match=r"parameter 'layers.0.up_proj.weight' has a non-finite "
                       r"gradient \(inf or NaN\) at step 2; weights and optimizer state are unchanged"):  # counted from 1
        opt.step()
    assert same(frozen(model, opt), before)

    skipping, opt_s = build(cls, kw, nonfinite="skip")
    reference, opt_r = build(cls, kw, nonfinite="skip")
    train(skipping, opt_s, data[:1])
    train(reference, opt_r, data[:1])
    backward(skipping, data[1], float("inf"))
    opt_s.step()
    # every group counts the skipped step (param_groups gives low-rank, plain and no-decay groups)
    assert [g["nonfinite_skipped"] for g in opt_s.param_groups] == [1] * len(opt_s.param_groups) != []
    assert same(skipping.state_dict(), reference.state_dict())
    fresh_model, fresh = build(cls, kw, nonfinite="skip")
    fresh_model.load_state_dict(skipping.state_dict())
    fresh.load_state_dict(roundtrip(opt_s.state_dict()))
    assert [g["nonfinite_skipped"] for g in fresh.param_groups] == [1] * len(fresh.param_groups)  # survives a checkpoint
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
    # stagger=False: every subspace renews at steps 0, 3, 6 (gap 3), so step 1 is a non-refresh step for all
    model, opt = build(lro.SUMO, {}, nonfinite="ignore", stagger=False)
    data = batches(2)
    train(model, opt, data[:1])
    backward(model, data[1], NAN)
    opt.step()
    state = opt.state[model.layers[0].up_proj.weight]
    assert int(state["step"]) == 2 and state["momentum_buffer"].isnan().any()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # clean gradients at steps 2 and 3 (a refresh): raised _LinAlgError before
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        opt.step()
    assert int(state["step"]) == 4


@pytest.mark.parametrize("stagger", [False, True])
def test_misshapen_gradient_at_a_refresh_is_refused_before_anything(stagger):
    """A gradient of the wrong shape (``p.grad.data`` replaced) at a refresh step was partly applied.
    Step 3 renews every subspace with stagger=False (gap 3), those of phase 3 with the default."""
    model, opt = build(lro.GaLoreAdamW, {}, stagger=stagger)
    data = batches(4)
    train(model, opt, data[:3])
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


# ---------------------------------------------------------------------------- load_state_dict
def trained(cls=lro.GaLoreAdamW, **kw):
    model = make_model()
    opt = cls(lro.param_groups(model, rank=kw.pop("rank", 8), update_proj_gap=3), lr=1e-2, **kw)
    train(model, opt, batches(2))
    return model, opt


def foreign_adamw_state_dict():
    model = make_model()
    named = dict(model.named_parameters())
    opt = lro.GaLoreAdamW(lro.param_groups(model, rank=8))
    groups = [[named[n] for n in g["param_names"]] for g in opt.param_groups]
    adamw = torch.optim.AdamW([{"params": ps} for ps in groups], lr=1e-2)
    train(model, adamw, batches(2))
    return adamw.state_dict()


def mangle(key, value):
    def edit(sd):
        sd["state"][0][key] = value(sd["state"][0][key]) if callable(value) else value
    return edit


def nan_basis(sd):
    sd["state"][0]["projector"]["P"][0, 0] = NAN


LOADS = [
    ("torch-adamw", lambda sd: foreign_adamw_state_dict(),
     (r"param group 0: the state dict has no 'rank' \(it was saved by another optimizer, e.g. torch.optim.AdamW\), "
      r"and this group has rank=8")),
    ("rank-4-into-8", lambda sd: trained(rank=4)[1].state_dict(),
     r"param group 0: the state dict has rank=4, this optimizer rank=8; a state dict of another method or rank"),
    ("apollo-into-galore", lambda sd: trained(lro.APOLLO)[1].state_dict(),
     r"param group 0: the state dict has projector='random', this optimizer projector='svd'"),
    ("8bit-into-32bit", lambda sd: trained(lro.GaLoreAdamW8bit, min_8bit_size=0)[1].state_dict(),
     r"param group 0: the state dict has state_bits=8, this optimizer state_bits=32"),
    ("nan-basis", nan_basis, r"parameter 'layers.0.q_proj.weight': its projector's P holds inf or NaN"),
    ("negative-v", mangle("exp_avg_sq", lambda v: -v - 1), r"exp_avg_sq holds negative values"),
    ("nan-m", mangle("exp_avg", lambda v: v.fill_(NAN)), r"exp_avg holds inf or NaN"),
    ("float64-m", mangle("exp_avg", lambda v: v.double()), r"exp_avg is torch.float64; this optimizer keeps it in torch.float32"),
    ("int64-v", mangle("exp_avg_sq", lambda v: v.long()), r"exp_avg_sq is torch.int64"),
    ("step-negative", mangle("step", torch.tensor(-5.0)), r"step=-5.0; a step count is an integer >= 0"),
    ("step-nan", mangle("step", NAN), r"step=nan; it must be finite"),
    ("step-fraction", mangle("step", torch.tensor(2.5)), r"step=2.5"),
    ("step-vector", mangle("step", torch.ones(3)), r"step must be a real scalar tensor"),
    ("next-refresh-negative", mangle("next_refresh", torch.tensor(-3)), r"next_refresh=-3.0; it must be an integer"),
    ("next-refresh-nan", mangle("next_refresh", torch.tensor(NAN)), r"next_refresh=nan; it must be finite"),
    ("state-not-dict", lambda sd: sd["state"].__setitem__(0, [1, 2]), r"the state of parameter 0 is a list"),
]


@pytest.mark.parametrize("edit,match", [c[1:] for c in LOADS], ids=[c[0] for c in LOADS])
def test_foreign_or_mangled_state_dict_is_refused_and_nothing_changes(edit, match):
    """Before, a torch.optim.AdamW state dict turned GaLoreAdamW into AdamW (rank None), a rank-4 dict made
    a rank-8 optimizer rank 4, and mangled values loaded and broke the next step. Now each is a
    ValueError naming the key, the optimizer keeps its state, and its next step is the one it would
    have taken (against a twin never given the bad dict)."""
    model, opt = trained()
    twin_model, twin = trained()
    sd = copy.deepcopy(opt.state_dict())
    sd = edit(sd) or sd
    before = frozen(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert same(frozen(model, opt), before)
    assert opt.param_groups[0]["rank"] == 8
    data = batches(2, seed=5)
    train(model, opt, data)
    train(twin_model, twin, data)
    assert same(model.state_dict(), twin_model.state_dict())


def test_plain_adamw_state_dict_still_loads_into_an_unprojected_optimizer():
    """A group saved without our keys is torch.optim.AdamW's: it loads where every group is plain, and
    then steps as torch's AdamW goes on (our plain parameters are torch's AdamW, bit for bit)."""
    model = make_model()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, adamw, batches(2))
    twin = copy.deepcopy(model)
    with pytest.warns(lro.RankFallbackWarning):
        ours = lro.GaLoreAdamW(twin.parameters(), lr=1e-2)
    ours.load_state_dict(copy.deepcopy(adamw.state_dict()))
    train(model, adamw, batches(2, seed=3))
    train(twin, ours, batches(2, seed=3))
    assert same(model.state_dict(), twin.state_dict())
