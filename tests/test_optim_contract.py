"""Generic optimizer contract tests, after PyTorch's own suite (``test/test_optim.py`` and
``torch/testing/_internal/common_optimizers.py``), for every class in ``lro.PRESETS``.

What a user replacing ``torch.optim.AdamW`` by one of ours relies on without reading our docs:
copying and pickling, ``torch.compile``, hooks, LR schedulers, dtypes and checkpoints, AdamW's own
keyword flags, a tensor learning rate, state dicts with Python-number steps, that a step goes
downhill, and the small print of ``zero_grad``/``add_param_group``/empty parameter lists.

Every comparison is bit for bit (``torch.equal``) unless a comment next to it says why not.

The ``torch.compile`` cases of every preset but GaLore trace the whole step with Dynamo (several
seconds each on CPU); they run with ``LRO_SLOW_TESTS=1`` and are skipped, saying so, otherwise.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import lowrank_optim as lro
from conftest import batches, lm_loss, make_model, roundtrip, same, train

NAMES = list(lro.PRESETS)


# ---------------------------------------------------------------------------------------- helpers
def rank_for(name: str, rank: int) -> int:
    """APOLLO-Mini is a rank-1 method; every other class takes the rank asked for."""
    return 1 if issubclass(lro.PRESETS[name], lro.APOLLOMini) else rank


def make(name: str, groups: list[dict[str, Any]], **kw: Any) -> torch.optim.Optimizer:
    kw.setdefault("lr", 1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        return lro.PRESETS[name](groups, **kw)


def build(name: str, *, dtype: torch.dtype = torch.float32, seed: int = 0, **kw: Any):
    """The tiny LLaMA-shaped model of conftest and an optimizer over it: rank 8 (1 for APOLLO-Mini),
    a refresh every 2 steps (steps 0, 2, 4, ...)."""
    model = make_model(seed=seed, dtype=dtype)
    groups = lro.param_groups(model, rank=rank_for(name, 8), update_proj_gap=2)
    return model, make(name, groups, **kw)


def linear(name: str, rank: int = 4, seed: int = 0, **kw: Any):
    """One 16×12 projected weight and a plain bias: the smallest problem with both kinds of parameter."""
    torch.manual_seed(seed)
    model = nn.Linear(12, 16)
    groups = [{"params": [model.weight], "rank": rank_for(name, rank), "update_proj_gap": 2}, {"params": [model.bias]}]
    return model, make(name, groups, **kw)


def linear_step(model: nn.Module, opt: torch.optim.Optimizer, step_fn=None, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 12, generator=g), torch.randn(8, 16, generator=g)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    (step_fn or opt.step)()


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs (max |Δ| {(p.double() - q.double()).abs().max().item():.3g})"


def assert_projected(opt: torch.optim.Optimizer) -> None:
    """Guards against a vacuous test: something was really stepped in a subspace."""
    assert any("projector" in s for s in opt.state.values() if isinstance(s, dict)), "nothing was projected"


def snapshot(x: Any) -> Any:
    """A deep copy of tensors and plain values, for comparing state before and after."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: snapshot(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(snapshot(v) for v in x)
    return copy.deepcopy(x)


parametrize_names = pytest.mark.parametrize("name", NAMES)


# ------------------------------------------------------------------ 1. deepcopy and pickle
@parametrize_names
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_after_steps_then_step_both(name, how):
    """As torch.optim: a copy of model and optimizer together (the copy's groups hold the copied
    parameters) continues exactly as the original, and neither shares state with the other."""
    model, opt = build(name)
    train(model, opt, batches(3))  # refreshes at steps 0 and 2: the copy holds a refreshed projector
    assert_projected(opt)
    both = {"model": model, "opt": opt}
    twin = copy.deepcopy(both) if how == "deepcopy" else pickle.loads(pickle.dumps(both))
    model2, opt2 = twin["model"], twin["opt"]
    assert type(opt2) is type(opt)
    assert {id(p) for g in opt2.param_groups for p in g["params"]} == {id(p) for p in model2.parameters()}
    data = batches(3, seed=5)  # the next refresh (step 4) happens after the copy
    train(model, opt, data)
    train(model2, opt2, data)
    assert_same_weights(model, model2)


# ------------------------------------------------------------------ 2. torch.compile
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("foreach", [False, None], ids=["foreach_false", "foreach_default"])
def test_compiled_step_equals_eager_or_refuses(name, foreach):
    """``torch.compile(opt.step)`` either gives eager's numbers bit for bit, over steps that include
    the first refresh and a later one, or raises at compile/first call an error of its own that
    names torch.compile. Never silently different numbers, never a Dynamo crash from deep inside.

    Note: torch.optim.AdamW itself, compiled so on CPU, differs from eager by 1-2 float32 ulps (its
    compiled path computes the bias corrections as tensors), so "bit for bit" here means the step
    runs our eager arithmetic under compile (or is refused), not torch's compiled AdamW."""
    torch._dynamo.reset()  # a fresh cache: no earlier test's recompile limit makes this run eager
    eager_model, eager = linear(name, foreach=foreach)
    comp_model, comp = linear(name, foreach=foreach)
    step = torch.compile(comp.step, backend="eager")  # the "eager" backend runs Dynamo's graphs as they are
    for i in range(3):  # refreshes at steps 0 and 2 (update_proj_gap=2)
        linear_step(eager_model, eager, seed=i)
        try:
            linear_step(comp_model, comp, step, seed=i)
        except Exception as err:  # noqa: BLE001  which errors are acceptable is the point of the test
            dynamo_crash = isinstance(err, torch._dynamo.exc.TorchDynamoException)
            if i == 0 and not dynamo_crash and "torch.compile" in str(err):
                return  # a clear refusal at the first call
            raise AssertionError(
                f"compiled step {i} raised {type(err).__name__} (not a clear refusal at the first call "
                f"naming torch.compile): {str(err)[:300]}"
            ) from err
        assert_same_weights(eager_model, comp_model)
    torch._dynamo.reset()


# ------------------------------------------------------------------ 3. hooks
@parametrize_names
def test_step_hooks(name):
    """register_step_pre_hook / register_step_post_hook as torch.optim: called around every step
    (with or without a closure), pre before any weight moves, post after; in the order global pre,
    local pre, local post, global post; a pre hook may replace step's arguments; handles remove."""
    model, opt = build(name)
    tokens = batches(1)[0]
    calls: list[str] = []
    moved: dict[str, bool] = {}
    first = next(iter(opt.param_groups[0]["params"]))
    before: dict[str, torch.Tensor] = {}

    def local_pre(o, args, kwargs):
        assert o is opt
        calls.append("pre")
        before["w"] = first.detach().clone()

    def local_post(o, args, kwargs):
        assert o is opt
        calls.append("post")
        moved["w"] = not torch.equal(first, before["w"])

    glob_pre = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global_pre"))
    glob_post = register_optimizer_step_post_hook(lambda o, a, k: calls.append("global_post"))
    try:
        pre = opt.register_step_pre_hook(local_pre)
        post = opt.register_step_post_hook(local_post)
        train(model, opt, [tokens])
        assert calls == ["global_pre", "pre", "post", "global_post"]
        assert moved["w"], "the post hook ran before the step moved the weights"

        def closure():
            opt.zero_grad()
            loss = lm_loss(model, tokens)
            loss.backward()
            return loss

        calls.clear()
        loss = opt.step(closure)
        assert calls == ["global_pre", "pre", "post", "global_post"] and isinstance(loss, torch.Tensor)
    finally:
        glob_pre.remove()
        glob_post.remove()

    # a pre hook returning (args, kwargs) replaces what step() is called with (args[0] is the optimizer)
    pre.remove()
    post.remove()
    seen = []

    def injected():
        seen.append(True)
        opt.zero_grad()
        loss = lm_loss(model, tokens)
        loss.backward()
        return loss

    replace = opt.register_step_pre_hook(lambda o, args, kwargs: ((o, injected), {}))
    calls.clear()
    out = opt.step()
    assert seen == [True] and isinstance(out, torch.Tensor), "the pre hook's arguments were not used"
    assert calls == [], "removed hooks still ran"
    replace.remove()
    assert opt.step() is None and seen == [True]


@parametrize_names
def test_state_dict_hooks(name):
    """register_state_dict_pre_hook(opt) runs before the dict is built; a post hook (opt, sd) may
    edit it in place or return a replacement; prepend puts a hook first."""
    model, opt = build(name)
    train(model, opt, batches(2))
    order: list[str] = []

    def pre(o):
        order.append("pre")
        o.state["test"] = 1

    def post(o, sd):
        order.append("post")
        assert sd["state"].pop("test") == 1, "the pre hook ran after the dict was built"
        sd["ran_state_dict_pre_hook"] = True  # edited in place, nothing returned

    def post_first(o, sd):
        order.append("post_first")

    def replace(o, sd):
        return {**sd, "replaced": True}

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    opt.register_state_dict_post_hook(post_first, prepend=True)
    sd = opt.state_dict()
    assert order == ["pre", "post_first", "post"]
    assert sd["ran_state_dict_pre_hook"] is True and "test" not in sd["state"]
    assert len(sd["state"]) == sum(len(g["params"]) for g in opt.param_groups)
    opt.state.pop("test")
    handle = opt.register_state_dict_post_hook(replace)
    assert opt.state_dict()["replaced"] is True
    handle.remove()
    assert "replaced" not in opt.state_dict()


@parametrize_names
def test_load_state_dict_hooks(name):
    """register_load_state_dict_pre_hook(opt, sd) may edit the dict or return a replacement (prepend
    runs first); register_load_state_dict_post_hook(opt) runs after everything is loaded."""
    model, opt = build(name)
    train(model, opt, batches(2))
    sd = opt.state_dict()

    def pre1(o, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.002

    def pre2(o, state_dict):
        mine = copy.deepcopy(state_dict)
        mine["param_groups"][0]["lr"] = 0.003
        return mine

    def post(o):
        o.state["ran_load_state_dict_pre_hook2"] = o.param_groups[0]["lr"] == 0.003
        o.state["ran_load_state_dict_post_hook"] = True

    model2, opt2 = build(name)
    opt2.register_load_state_dict_pre_hook(pre1)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.param_groups[0]["lr"] == 0.002
    opt2.register_load_state_dict_pre_hook(pre2, prepend=True)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.param_groups[0]["lr"] == 0.002  # pre2 ran first; pre1 edited its returned dict

    model3, opt3 = build(name)
    opt3.register_load_state_dict_pre_hook(pre2)
    opt3.register_load_state_dict_post_hook(post)
    opt3.load_state_dict(copy.deepcopy(sd))
    assert opt3.state["ran_load_state_dict_pre_hook2"] is True
    assert opt3.state["ran_load_state_dict_post_hook"] is True
    # the post hook sees the loaded state, not the fresh one
    for p, q in zip(chain_params(opt), chain_params(opt3)):
        assert same(opt.state[p], opt3.state[q])


def chain_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


# ------------------------------------------------------------------ 4. LR schedulers
SCHEDULERS = ["StepLR", "LambdaLR", "ReduceLROnPlateau", "OneCycleLR"]


def make_scheduler(kind: str, opt):
    S = torch.optim.lr_scheduler
    if kind == "StepLR":
        return S.StepLR(opt, step_size=2, gamma=0.0)  # lr 0 from the third step on
    if kind == "LambdaLR":
        # one lambda per group: the low-rank group stops after 2 steps, the plain groups (param_groups' plain and
        # no-decay ones) after 3
        rest = len(opt.param_groups) - 1
        return S.LambdaLR(opt, [lambda e: float(e < 2)] + [lambda e: float(e < 3)] * rest)
    if kind == "ReduceLROnPlateau":
        return S.ReduceLROnPlateau(opt, factor=0.0, patience=0)  # a flat metric: lr 0 after 2 steps
    return S.OneCycleLR(opt, max_lr=0.01, total_steps=6, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95)


def sched_step(kind: str, sched) -> None:
    sched.step(1.0) if kind == "ReduceLROnPlateau" else sched.step()


@parametrize_names
@pytest.mark.parametrize("kind", SCHEDULERS)
def test_scheduler_drives_every_group(name, kind):
    """The scheduler sets every group's lr (and, OneCycleLR with cycle_momentum, betas[0]) to the
    values it sets for torch.optim.AdamW, and the optimizer steps with them: a group whose lr has
    reached 0 stays put (weight decay included), the others still move."""
    model, opt = build(name)
    ref_model = make_model()
    named = dict(ref_model.named_parameters())
    ref = torch.optim.AdamW([{"params": [named[n] for n in group_names(g)]} for g in opt.param_groups], lr=1e-2)
    sched, ref_sched = make_scheduler(kind, opt), make_scheduler(kind, ref)
    data = batches(5)
    rest = len(opt.param_groups) - 1  # the low-rank group first, then the plain and no-decay groups
    frozen_from = {"StepLR": [2] * (1 + rest), "LambdaLR": [2] + [3] * rest, "ReduceLROnPlateau": [2] * (1 + rest),
                   "OneCycleLR": [None] * (1 + rest)}[kind]
    betas_seen = {tuple(g["betas"]) for g in opt.param_groups}
    for t, tokens in enumerate(data):
        before = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
        train(model, opt, [tokens])
        train(ref_model, ref, [tokens])
        for k, g in enumerate(opt.param_groups):
            now = [torch.equal(p, b) for p, b in zip(g["params"], before[k])]
            if frozen_from[k] is not None and t >= frozen_from[k]:
                assert all(now), f"step {t}: group {k} has lr {g['lr']} but its weights moved"
            else:
                assert not any(now), f"step {t}: group {k} (lr {g['lr']}) has weights that did not move"
        sched_step(kind, sched)
        sched_step(kind, ref_sched)
        ours = [(g["lr"], tuple(g["betas"])) for g in opt.param_groups]
        theirs = [(g["lr"], tuple(g["betas"])) for g in ref.param_groups]
        assert ours == theirs, f"after step {t}: {ours} != torch.optim.AdamW's {theirs}"
        betas_seen |= {b for _, b in ours}
    if kind == "OneCycleLR":
        assert len(betas_seen) > 2, f"cycle_momentum did not cycle betas: {betas_seen}"
        assert all(isinstance(g["betas"], tuple) and g["betas"][1] == 0.999 for g in opt.param_groups)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def group_names(group) -> list[str]:
    names = group.get("param_names")
    assert names is not None, "lro.param_groups passes (name, tensor) pairs"
    return names


# ------------------------------------------------------------------ 5. dtypes and checkpoints
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@parametrize_names
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_dtype_trains_and_resumes_bit_identically(name, dtype):
    """A model in ``dtype`` trains (finite loss and weights, weights keep their dtype); its state dict,
    through torch.save/torch.load(weights_only=True) into a fresh optimizer over a copy of the
    weights, continues exactly as the uninterrupted run."""
    model, opt = build(name, dtype=dtype)
    losses = train(model, opt, batches(3))  # refreshes at steps 0 and 2
    assert_projected(opt)
    assert all(math.isfinite(x) for x in losses), losses
    for n, p in model.named_parameters():
        assert p.dtype == dtype and torch.isfinite(p).all(), n
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    model2, opt2 = build(name, dtype=dtype, seed=123)  # another init: everything comes from the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    data = batches(3, seed=7)  # steps 3, 4 (a refresh), 5
    more = train(model, opt, data)
    train(model2, opt2, data)
    assert all(math.isfinite(x) for x in more), more
    assert_same_weights(model, model2)


# ------------------------------------------------------------------ 6. AdamW's own flags
ACCEPTED_FLAGS = {"fused": False, "maximize": False, "capturable": False, "differentiable": False, "amsgrad": False}
#: torch.optim.AdamW's own default for fused is None; code that spells the defaults out passes it.
ALSO_ACCEPTED = [("fused", None)]
REFUSED_FLAGS = ["fused", "capturable", "differentiable"]


@parametrize_names
def test_adamw_flags_at_their_defaults_are_accepted(name):
    """Code written for torch.optim.AdamW passes these; at these values they change nothing."""
    rejected = []
    for flag, value in [*ACCEPTED_FLAGS.items(), *ALSO_ACCEPTED]:
        try:
            build(name, **{flag: value})
        except Exception as err:  # noqa: BLE001  collect every flag refused, not only the first
            rejected.append(f"{flag}={value}: {type(err).__name__}: {err}")
    assert not rejected, "\n".join(rejected)
    model, opt = build(name)
    model2, opt2 = build(name, **ACCEPTED_FLAGS)
    train(model, opt, batches(3))
    train(model2, opt2, batches(3))
    assert_same_weights(model, model2)


@parametrize_names
def test_maximize_equals_minimizing_the_negated_loss(name):
    """maximize=True negates the gradient first, as torch.optim.AdamW: maximizing −L is minimizing L
    bit for bit (negation is exact, and so is backpropagating it)."""
    model, opt = build(name)
    model2, opt2 = build(name, maximize=True)
    for tokens in batches(3):  # refreshes at steps 0 and 2: the subspace comes from the negated gradient
        opt.zero_grad()
        lm_loss(model, tokens).backward()
        opt.step()
        opt2.zero_grad()
        (-lm_loss(model2, tokens)).backward()
        opt2.step()
    assert_projected(opt2)
    assert_same_weights(model, model2)


@parametrize_names
@pytest.mark.parametrize("flag", REFUSED_FLAGS)
def test_unsupported_adamw_flag_is_refused_at_construction(name, flag):
    """fused/capturable/differentiable=True have no implementation here: the constructor raises an
    error of its own that names the flag (not Python's "unexpected keyword argument"), and nothing
    of the model (weights, gradients, requires_grad) has changed."""
    model = make_model()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {n: (p.detach().clone(), p.grad, p.grad.clone(), p.requires_grad) for n, p in model.named_parameters()}
    groups = lro.param_groups(model, rank=rank_for(name, 8), update_proj_gap=2)
    with pytest.raises(Exception) as info:  # noqa: PT011  the type is torch's choice; the message is ours
        make(name, groups, **{flag: True})
    msg = str(info.value)
    assert "unexpected keyword argument" not in msg, f"{flag}=True is not a known flag: {msg}"
    assert flag in msg, f"the error does not name {flag!r}: {type(info.value).__name__}: {msg}"
    for n, p in model.named_parameters():
        w, g, g_copy, rg = before[n]
        assert torch.equal(p, w) and p.grad is g and torch.equal(p.grad, g_copy) and p.requires_grad == rg, n


# ------------------------------------------------------------------ 7. a tensor learning rate
@parametrize_names
def test_tensor_lr(name):
    """lr=torch.tensor(0.01), as torch.optim.AdamW (foreach off) takes it: no failure at the first
    step, the float lr's numbers up to rounding, and schedulers update the tensor in place."""
    data = batches(4)
    model_f, opt_f = build(name, lr=0.01)
    model_t, opt_t = build(name, lr=torch.tensor(0.01))
    sched_f = torch.optim.lr_scheduler.StepLR(opt_f, step_size=2, gamma=0.5)
    sched_t = torch.optim.lr_scheduler.StepLR(opt_t, step_size=2, gamma=0.5)
    train(model_f, opt_f, data, sched_f)
    train(model_t, opt_t, data, sched_t)
    for g in opt_t.param_groups:
        assert isinstance(g["lr"], torch.Tensor), "the scheduler replaced the tensor lr"
        assert g["lr"].item() == pytest.approx(0.0025, rel=1e-6)  # 0.01·0.5², a float32 tensor: 1e-7 relative
    # The float32 tensor 0.01 is 0.01·(1 − 2.2e-8), and torch itself computes lr/(1 − β₁ᵗ) in float32
    # for a tensor lr: each update differs by about 1e-7 relative, i.e. at most a few float32 ulps of
    # the weights (|w| < 2 here, ulp ≤ 2.4e-7) per step. Over 4 steps 1e-5 absolute leaves a
    # tenfold margin; a lr applied wrongly (unscheduled, or read once) is off by 25% of an update,
    # about 1e-3. Trion orthogonalizes in bfloat16 (Newton-Schulz): a gradient a float32 ulp away may
    # round an entry of the direction to the next bf16 value, 2^-8 of it, and those entries are at most
    # about 1, so one step can differ by lr·2^-8 = 3.9e-5 there; 2e-4 covers 4 steps and is still 5x
    # below a misapplied lr.
    atol = 2e-4 if opt_f.param_groups[0].get("orthogonalize") == "newton_schulz" else 1e-5
    for (n, a), b in zip(model_f.named_parameters(), model_t.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")

    # a scheduler that sets the tensor to 0 stops every group
    model, opt = build(name, lr=torch.tensor(0.01))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    train(model, opt, batches(1), sched)
    still = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, batches(2, seed=3), sched)
    for n, p in model.named_parameters():
        assert torch.equal(p, still[n]), f"{n} moved with lr {opt.param_groups[0]['lr']}"


#: presets whose plain parameters take torch's AdamW whole: the rest keep 8-bit moments there (galore8bit,
#: qgalore) or step them by Adafactor (galore_adafactor)
PLAIN_ADAM = [n for n in NAMES if n not in ("galore8bit", "qgalore", "galore_adafactor")]


@pytest.mark.parametrize("name", PLAIN_ADAM)
def test_tensor_lr_plain_parameters_are_torch_adamw_bit_for_bit(name):
    """A tensor lr reaches the plain parameters as torch.optim.AdamW takes it: torch computes 1 − lr·wd and
    lr/(1 − β₁ᵗ) in the tensor's float32 there, and reading the lr as a Python number first was a float32
    ulp off (found last session). A scheduler halves it in place on the way."""
    model, opt = linear(name, lr=torch.tensor(0.01), weight_decay=0.1)
    bias = model.bias.detach().clone().requires_grad_()
    group = opt.param_groups[1]  # the preset's own betas and eps (GWT's ε is 1e-6)
    ref = torch.optim.AdamW([bias], lr=torch.tensor(0.01), betas=group["betas"], eps=group["eps"], weight_decay=0.1)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    for t in range(5):
        linear_step(model, opt, seed=t)
        bias.grad = model.bias.grad.clone()
        ref.step()
        for s in scheds:
            s.step()
        assert torch.equal(model.bias, bias), f"step {t}: {(model.bias - bias).abs().max().item():.3g}"
    assert_projected(opt)



# ------------------------------------------------------------------ 8. Python-number steps
@parametrize_names
@pytest.mark.parametrize("kind", [int, float], ids=["int", "float"])
def test_state_dict_with_python_number_steps_loads_and_continues(name, kind):
    """torch.optim.AdamW loads a state dict whose 'step' entries are Python numbers (older torch
    wrote them; torch's test_load_nontensor_step writes them) and turns them into tensors."""
    model, opt = build(name)
    train(model, opt, batches(3))
    sd = copy.deepcopy(opt.state_dict())
    for s in sd["state"].values():
        if "step" in s:
            s["step"] = kind(s["step"].item())
    model2, opt2 = build(name, seed=123)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    data = batches(3, seed=7)  # includes the refresh at step 4
    train(model, opt, data)
    train(model2, opt2, data)
    assert_same_weights(model, model2)
    for p, q in zip(chain_params(opt), chain_params(opt2)):
        assert isinstance(opt2.state[q]["step"], torch.Tensor), "step stayed a Python number"
        assert torch.equal(opt.state[p]["step"], opt2.state[q]["step"])


# ------------------------------------------------------------------ 9. goes the right direction
SEEDS = range(6)


def regression_problem(seed: int, case: str):
    """A 16×12 weight and a bias. ``regression``: a fixed linear regression (64 samples), a
    full-rank gradient. ``in_subspace``: torch's test_forloop_goes_right_direction problem,
    (W x + b)² for one input x, whose weight gradient has rank 1 and so lies inside any subspace
    a refresh picks from it."""
    g = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(16, 12, generator=g))
    b = nn.Parameter(torch.randn(16, generator=g))
    if case == "regression":
        x = torch.randn(64, 12, generator=g)
        y = x @ torch.randn(12, 16, generator=g) + 0.1 * torch.randn(64, 16, generator=g)
        return w, b, lambda: ((x @ w.T + b - y) ** 2).mean()
    x = torch.randn(12, generator=g)
    return w, b, lambda: (w.mv(x) + b).pow(2).sum()


def goes_downhill(name: str, rank: int, seed: int, case: str, steps: int = 20, **kw: Any) -> tuple[float, float]:
    w, b, loss_fn = regression_problem(seed, case)
    kw.setdefault("lr", 1e-3)  # torch.optim.AdamW's default, as torch's test uses
    opt = make(name, [{"params": [w], "rank": rank, "update_proj_gap": 2}, {"params": [b]}], **kw)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(steps):
        opt.step(closure)
    return initial, closure().item()


@parametrize_names
@pytest.mark.parametrize("case", ["regression", "in_subspace"])
@pytest.mark.parametrize("rank", [2, 4])
def test_goes_right_direction(name, case, rank):
    """As torch's test_forloop_goes_right_direction: 20 steps at lr 1e-3 (refreshing every 2)
    lower the loss, for 6 seeds."""
    if rank != 2 and rank_for(name, rank) == 1:
        pytest.skip("APOLLO-Mini is rank 1 whatever the rank asked; the rank-2 case runs it")
    bad = []
    for seed in SEEDS:
        initial, final = goes_downhill(name, rank_for(name, rank), seed, case)
        if not final < initial:
            bad.append(f"seed {seed}: {initial:.6g} -> {final:.6g}")
    assert not bad, "the loss went up: " + "; ".join(bad)


@parametrize_names
def test_torch_optim_db_adamw_inputs(name):
    """torch's own AdamW configurations on CPU (optim_db's optim_inputs_func_adamw: defaults, lr,
    weight_decay, maximize, amsgrad, ...) on torch's goes-right-direction problem: each either works
    (the loss falls, or rises under maximize) or is refused at construction by an error that names
    the option."""
    pytest.importorskip("expecttest", reason="torch.testing._internal.common_optimizers imports expecttest")
    from torch.testing._internal.common_optimizers import optim_inputs_func_adamw

    bad = []
    for optim_input in optim_inputs_func_adamw("cpu", torch.float32):
        kwargs = dict(optim_input.kwargs)
        try:
            initial, final = goes_downhill(name, rank_for(name, 2), 0, "in_subspace", **kwargs)
        except Exception as err:  # noqa: BLE001
            msg = str(err)
            named = [k for k, v in kwargs.items() if k in msg]
            if "unexpected keyword argument" in msg or not named:
                bad.append(f"{optim_input.desc} {kwargs}: {type(err).__name__}: {msg[:200]}")
            continue
        ok = final > initial if kwargs.get("maximize") else final < initial
        if not ok:
            bad.append(f"{optim_input.desc} {kwargs}: loss {initial:.6g} -> {final:.6g}")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ 10. zero_grad, frozen, groups
@parametrize_names
def test_zero_grad(name):
    model, opt = build(name)
    train(model, opt, batches(1))
    grads = {n: p.grad for n, p in model.named_parameters()}
    opt.zero_grad(set_to_none=False)
    for n, p in model.named_parameters():
        assert p.grad is grads[n] and not p.grad.any(), f"{n}: zeroed in place"
    opt.zero_grad()  # torch's default: set_to_none=True
    assert all(p.grad is None for p in model.parameters())
    lm_loss(model, batches(1)[0]).backward()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


@parametrize_names
def test_step_is_noop_for_zero_grads(name):
    """As torch's test_step_is_noop_for_zero_grads: without weight decay, zero gradients (what
    zero_grad(set_to_none=False) leaves) move nothing, refreshes included, and stay finite."""
    model, opt = build(name, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(3):  # refreshes at steps 0 and 2
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} moved under a zero gradient"


@parametrize_names
def test_parameters_without_grad_are_skipped(name):
    """A parameter whose .grad is None is not stepped and its state is not touched; one that never
    had a gradient gets no state; a step with no gradient at all changes nothing."""
    model, opt = build(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()  # no gradients yet
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert not opt.state.get(p), f"{n} got state without a gradient"

    frozen_ids = {id(p) for p in model.layers[1].parameters()}  # a projected weight and plain ones
    for p in model.layers[1].parameters():
        p.requires_grad_(False)
    train(model, opt, batches(2))
    for n, p in model.named_parameters():
        if id(p) in frozen_ids:
            assert torch.equal(p, before[n]) and not opt.state.get(p), n
    for p in model.layers[1].parameters():
        p.requires_grad_(True)
    train(model, opt, batches(2, seed=3))  # now every parameter has state
    assert_projected(opt)

    for p in model.layers[1].parameters():
        p.requires_grad_(False)
    kept = {n: (p.detach().clone(), snapshot(opt.state[p])) for n, p in model.named_parameters() if id(p) in frozen_ids}
    train(model, opt, batches(3, seed=4))  # steps 4 (a refresh), 5, 6 without them
    for n, p in model.named_parameters():
        if id(p) in frozen_ids:
            assert torch.equal(p, kept[n][0]), f"{n} moved without a gradient"
            assert same(opt.state[p], kept[n][1]), f"{n}: state changed without a gradient"
        else:
            assert not torch.equal(p, before[n]), n


@parametrize_names
def test_add_param_group_then_step(name):
    model, opt = build(name)
    train(model, opt, batches(1))
    extra = nn.Linear(32, 24)
    # named, as lro.param_groups' groups are (torch refuses to mix named and unnamed groups)
    opt.add_param_group({"params": [("extra.weight", extra.weight), ("extra.bias", extra.bias)],
                         "rank": rank_for(name, 4), "update_proj_gap": 2})
    assert opt.param_groups[-1]["lr"] == opt.defaults["lr"]  # defaults filled in, as torch
    w0, b0 = extra.weight.detach().clone(), extra.bias.detach().clone()
    for t in range(3):
        g = torch.Generator().manual_seed(t)
        extra.weight.grad = torch.randn(24, 32, generator=g)
        extra.bias.grad = torch.randn(24, generator=g)
        opt.step()
    assert not torch.equal(extra.weight, w0) and not torch.equal(extra.bias, b0)
    assert opt.state[extra.weight] and opt.state[extra.bias]
    assert "projector" in opt.state[extra.weight], "the new group's 2-D weight was not projected"
    assert torch.isfinite(extra.weight).all()
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [("again", extra.weight)]})


@parametrize_names
@pytest.mark.parametrize("empty", [list, lambda: iter(())], ids=["list", "iterator"])
def test_empty_parameter_list_errors_as_torch(name, empty):
    with pytest.raises(Exception) as ref:  # noqa: PT011  whatever torch raises is the reference
        torch.optim.AdamW(empty())
    with pytest.raises(type(ref.value), match=re.escape(str(ref.value))):
        make(name, empty())


@parametrize_names
def test_zero_element_parameters_step_and_reload(name):
    """A zero-element parameter (a ``Linear(d, 0)`` placeholder, an empty bias) in the rank group and the plain
    one steps as torch's AdamW does (nothing to move) and the optimizer reloads its own state dict: a mean over
    zero rows once made GaLoreAdafactor's column statistics 0/0 = NaN, which the load then refused as corrupt."""
    w = nn.Parameter(torch.randn(16, 12))
    empties = [nn.Parameter(torch.randn(*shape)) for shape in ((0, 12), (12, 0), (0,))]
    # the orthogonal rule refuses a rank above a weight's short side (documented), so its empty matrices are plain
    orthogonal = make(name, [{"params": [w], "rank": 4}]).param_groups[0]["rule"] == "orthogonal"
    low, plain = ([w], empties) if orthogonal else ([w, *empties[:2]], empties[2:])

    def groups():
        return [{"params": low, "rank": rank_for(name, 4)}, {"params": plain}]

    opt = make(name, groups())
    for _ in range(2):
        for p in (w, *empties):
            p.grad = torch.randn_like(p)
        opt.step()
    for p in empties:
        for key, value in opt.state[p].items():
            assert not torch.is_tensor(value) or torch.isfinite(value.float()).all(), (key, value)
    fresh = make(name, groups())
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    assert torch.isfinite(w).all()


@parametrize_names
def test_default_dtype_float64_changes_no_state_and_no_number(name):
    """``torch.set_default_dtype(torch.float64)`` (a notebook's habit) leaves a float32 model's steps alone: the
    same state dtypes and the same bits over refreshes. Q-GaLore's lazy queue was built without a dtype after
    its first refresh and followed the default (found by a QA pass)."""
    def run():
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(24, 16, dtype=torch.float32))
        opt = make(name, [{"params": [w], "rank": rank_for(name, 4), "update_proj_gap": 2}])
        for i in range(5):
            w.grad = torch.randn(24, 16, dtype=torch.float32, generator=torch.Generator().manual_seed(i))
            opt.step()
        state = opt.state[w]
        return w.detach().clone(), {k: v.dtype for k, v in state.items() if torch.is_tensor(v)}

    weights, dtypes = run()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        weights64, dtypes64 = run()
    finally:
        torch.set_default_dtype(default)
    assert dtypes64 == dtypes
    assert torch.equal(weights64, weights)
