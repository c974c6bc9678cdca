"""Layer-wise updates (lro.layerwise): the same numbers as the ordinary loop, with gradients freed as
they are consumed. Every comparison with the ordinary loop on one process is bitwise (torch.equal):
each parameter's update is the same arithmetic whether it is stepped alone or with the others, and the
clipping norm is computed as clip_grad_norm_ computes it. The DDP comparison is bitwise against
ordinary DDP on the same ranks and to float tolerance against one process on the global batch (the
mean of two half-batch means is rounded differently from the mean of the whole batch)."""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import sys
import tempfile
from pathlib import Path
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import lowrank_optim as lro
from conftest import batches, lm_loss, make_model, roundtrip, same, spawn_two

RANK = 8
MAX_NORM = 0.05  # the tiny model's gradient norms are 1 to 2: clipping engages at every step


def galore(model, **kw):
    return lro.GaLoreAdamW(lro.param_groups(model, rank=RANK, update_proj_gap=3), lr=3e-3, weight_decay=0.1, **kw)


def apollo(model):
    return lro.APOLLO(lro.param_groups(model, rank=RANK, update_proj_gap=3), lr=3e-3, weight_decay=0.1)


def fira(model):
    return lro.Fira(lro.param_groups(model, rank=RANK, update_proj_gap=3), lr=3e-3, weight_decay=0.1)


def plain_groups(model):
    """LowRankAdamW with no rank anywhere: torch's AdamW numbers for every parameter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        return lro.LowRankAdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def torch_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def torch_sgd(model):
    return torch.optim.SGD(model.parameters(), lr=3e-2, momentum=0.9, nesterov=True)


OPTIMIZERS = {"galore": galore, "apollo": apollo, "fira": fira, "plain_groups": plain_groups,
              "torch_adamw": torch_adamw, "torch_sgd": torch_sgd}


def opt_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def ordinary(model, opt, data, k=1, clip=None, sched=None):
    """k accumulated backward passes, clip_grad_norm_(model.parameters()) as a loop writes it, step."""
    norms = []
    for i, tokens in enumerate(data):
        (lm_loss(model, tokens) / k).backward()
        if i % k == k - 1:
            if clip is not None:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
    return norms


def layerwise(model, opt, data, k=1, clip=None, sched=None, lw=None):
    lw = lw or lro.layerwise(model, opt, accumulation_steps=k, max_grad_norm=clip)
    norms, stepped = [], []
    for tokens in data:
        stepped.append(lw.backward(lm_loss(model, tokens) / k))
        if stepped[-1]:
            if clip is not None:
                norms.append(lw.last_grad_norm)
            if sched is not None:
                sched.step()
    return norms, stepped, lw


def assert_bitwise(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name}: max difference {(p - q).abs().max().item():.3e}"


def assert_states_equal(opt_a, opt_b):
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        for name, value in sa[key].items():
            other = sb[key][name]
            if isinstance(value, dict):
                assert value.keys() == other.keys()
                for sub in value:
                    v, w = value[sub], other[sub]
                    assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (key, name, sub)
            else:
                assert torch.equal(value, other), (key, name)


# ---------------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_equals_ordinary_step_bitwise(name):
    """6 steps (GaLore/Fira refresh at steps 0 and 3, APOLLO redraws its projection) with each
    parameter stepped from its hook equal 6 ordinary steps bit for bit, weights and state."""
    make = OPTIMIZERS[name]
    data = batches(6)
    ref, ours = make_model(), make_model()
    ref_opt, our_opt = make(ref), make(ours)
    ordinary(ref, ref_opt, data)
    _, stepped, lw = layerwise(ours, our_opt, data)
    assert stepped == [True] * 6 and lw.steps == 6
    assert_bitwise(ref, ours)
    assert_states_equal(ref_opt, our_opt)
    assert all(p.grad is None for p in ours.parameters())


def test_accumulation_steps_3_equals_three_backwards_then_one_step():
    data = batches(9)
    ref, ours = make_model(), make_model()
    ref_opt, our_opt = galore(ref), galore(ours)
    ordinary(ref, ref_opt, data, k=3)
    lw = lro.layerwise(ours, our_opt, accumulation_steps=3)
    before = [p.detach().clone() for p in ours.parameters()]
    assert [lw.backward(lm_loss(ours, t) / 3) for t in data[:2]] == [False, False]
    # accumulating: nothing moved, the gradients are held as in the ordinary loop
    assert all(torch.equal(p, b) for p, b in zip(ours.parameters(), before))
    assert all(p.grad is not None for p in ours.parameters())
    assert lw.will_step
    _, stepped, _ = layerwise(ours, our_opt, data[2:], k=3, lw=lw)
    assert stepped == [True, False, False, True, False, False, True]
    assert lw.steps == 3 and lw.micro_steps == 9
    assert_bitwise(ref, ours)
    assert_states_equal(ref_opt, our_opt)


@pytest.mark.parametrize("k", [1, 3])
def test_clipping_equals_clip_grad_norm_then_step(k):
    """The measuring pass gives clip_grad_norm_'s total norm bit for bit, and clipping engages."""
    data = batches(6)
    ref, ours = make_model(), make_model()
    ref_opt, our_opt = fira(ref), fira(ours)
    ref_norms = ordinary(ref, ref_opt, data, k=k, clip=MAX_NORM)
    our_norms, stepped, lw = layerwise(ours, our_opt, data, k=k, clip=MAX_NORM)
    assert sum(stepped) == len(ref_norms) == 6 // k
    assert all(n > 10 * MAX_NORM for n in ref_norms)  # clipping really engaged
    for a, b in zip(ref_norms, our_norms):
        assert torch.equal(a, b)
    assert_bitwise(ref, ours)
    assert_states_equal(ref_opt, our_opt)
    # and clipping changed the trajectory: without it the weights differ
    free = make_model()
    ordinary(free, fira(free), data, k=k)
    assert not all(torch.equal(p, q) for p, q in zip(free.parameters(), ours.parameters()))


def test_clipping_with_a_generic_torch_optimizer_and_no_clip_needed():
    """A max norm above the gradient norm leaves the step unchanged (coefficient clamped to 1)."""
    data = batches(4)
    ref, ours = make_model(), make_model()
    ref_opt, our_opt = torch_adamw(ref), torch_adamw(ours)
    ref_norms = ordinary(ref, ref_opt, data, k=2, clip=100.0)
    our_norms, _, _ = layerwise(ours, our_opt, data, k=2, clip=100.0)
    assert all(torch.equal(a, b) for a, b in zip(ref_norms, our_norms))
    assert_bitwise(ref, ours)


def test_scheduler_drives_the_update_inside_the_backward():
    data = batches(6)
    ref, ours = make_model(), make_model()
    ref_opt, our_opt = galore(ref), galore(ours)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=1e-2, total_steps=6)
    our_sched = torch.optim.lr_scheduler.OneCycleLR(our_opt, max_lr=1e-2, total_steps=6)
    ordinary(ref, ref_opt, data, sched=ref_sched)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        layerwise(ours, our_opt, data, sched=our_sched)
    assert [g["lr"] for g in ref_opt.param_groups] == [g["lr"] for g in our_opt.param_groups]
    assert_bitwise(ref, ours)


@pytest.mark.parametrize("stop_at", [2, 3])
def test_resume_through_layerwise_training_is_bit_identical(stop_at):
    """N layer-wise steps, checkpoint (torch.save/load weights_only), a fresh model, optimizer,
    scheduler and handle, M more == N+M uninterrupted layer-wise steps == N+M ordinary steps."""
    data = batches(6)

    def setup(seed=0):
        model = make_model(seed=seed)
        opt = galore(model)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
        return model, opt, sched

    ref, ref_opt, ref_sched = setup()
    ordinary(ref, ref_opt, data, sched=ref_sched)
    full, full_opt, full_sched = setup()
    layerwise(full, full_opt, data, sched=full_sched)

    a, a_opt, a_sched = setup()
    _, _, lw_a = layerwise(a, a_opt, data[:stop_at], sched=a_sched)
    lw_a.remove()
    ckpt = roundtrip({"model": a.state_dict(), "opt": a_opt.state_dict(), "sched": a_sched.state_dict()})
    b, b_opt, b_sched = setup(seed=123)  # everything must come from the checkpoint
    b.load_state_dict(ckpt["model"])
    b_opt.load_state_dict(ckpt["opt"])
    b_sched.load_state_dict(ckpt["sched"])
    layerwise(b, b_opt, data[stop_at:], sched=b_sched)

    assert_bitwise(full, b)
    assert_bitwise(ref, b)
    assert_states_equal(full_opt, b_opt)


@pytest.mark.parametrize("clip", [None, MAX_NORM])
def test_gradients_are_freed_and_a_full_set_never_exists(clip):
    """A probe hook registered before the handle's sees, at every gradient, how many .grad exist at
    once: one (its own) with layer-wise updates, the whole model in the ordinary loop."""
    model = make_model()
    params = list(model.parameters())
    seen = []

    def probe(_):
        seen.append(sum(q.grad is not None for q in params))

    for p in params:
        p.register_post_accumulate_grad_hook(probe)
    opt = galore(model)
    lw = lro.layerwise(model, opt, max_grad_norm=clip)
    for tokens in batches(3):
        assert lw.backward(lm_loss(model, tokens))
        assert all(p.grad is None for p in params)
    passes = 3 * (2 if clip else 1)  # the measuring pass fires every hook too
    assert len(seen) == passes * len(params)
    assert max(seen) == 1

    lw.remove()  # without the handle: the ordinary backward holds them all
    seen.clear()
    lm_loss(model, batches(1)[0]).backward()
    assert max(seen) == len(params)


def test_plain_loss_backward_works_without_clipping():
    """loss.backward() itself (the pass end found by autograd's end-of-backward callback), with
    accumulation, equals the ordinary loop."""
    data = batches(6)
    ref, ours = make_model(), make_model()
    ref_opt, our_opt = apollo(ref), apollo(ours)
    ordinary(ref, ref_opt, data, k=2)
    lw = lro.layerwise(ours, our_opt, accumulation_steps=2)
    for tokens in data:
        (lm_loss(ours, tokens) / 2).backward()
    assert lw.steps == 3 and all(p.grad is None for p in ours.parameters())
    assert_bitwise(ref, ours)


def test_plain_loss_backward_with_clipping_says_to_use_lw_backward():
    model = make_model()
    lw = lro.layerwise(model, galore(model), max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match=r"lw\.backward\(loss\)"):
        lm_loss(model, batches(1)[0]).backward()
    assert lw.steps == 0


def checkpointed_loss(model, tokens, reentrant):
    """TinyLM's forward with each block under torch.utils.checkpoint."""

    def block(b, x):
        h = b.norm(x)
        return x + torch.tanh(b.q_proj(h)) + b.down_proj(torch.nn.functional.gelu(b.up_proj(h)))

    x = model.embed_tokens(tokens[:, :-1])
    for b in model.layers:
        x = torch.utils.checkpoint.checkpoint(block, b, x, use_reentrant=reentrant)
    logits = model.lm_head(model.norm(x))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_with_accumulation_and_clipping(reentrant):
    """lw.backward marks the pass itself, so a reentrant checkpoint's inner backward (a graph task
    of its own) is part of it; the measuring pass recomputes the checkpointed blocks too."""
    data = batches(4)
    ref, ours = make_model(), make_model()
    ref_opt, our_opt = galore(ref), galore(ours)
    for i, tokens in enumerate(data):
        (checkpointed_loss(ref, tokens, reentrant) / 2).backward()
        if i % 2 == 1:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
            ref_opt.step()
            ref_opt.zero_grad()
    lw = lro.layerwise(ours, our_opt, accumulation_steps=2, max_grad_norm=MAX_NORM)
    stepped = [lw.backward(checkpointed_loss(ours, tokens, reentrant) / 2) for tokens in data]
    assert stepped == [False, True, False, True]
    assert_bitwise(ref, ours)


def test_plain_backward_with_checkpointing():
    """Non-reentrant checkpointing needs nothing; a reentrant one's inner backward cannot be told from
    a pass of its own by a plain loss.backward(), which says so instead of miscounting."""
    data = batches(4)
    ref, ours = make_model(), make_model()
    ref_opt, our_opt = galore(ref), galore(ours)
    for i, tokens in enumerate(data):
        (checkpointed_loss(ref, tokens, False) / 2).backward()
        if i % 2 == 1:
            ref_opt.step()
            ref_opt.zero_grad()
    lw = lro.layerwise(ours, our_opt, accumulation_steps=2)
    for tokens in data:
        (checkpointed_loss(ours, tokens, False) / 2).backward()
    assert lw.steps == 2
    assert_bitwise(ref, ours)
    with pytest.raises(RuntimeError, match=r"reentrant.*lw\.backward\(loss\)"):
        checkpointed_loss(ours, data[0], True).backward()
    our_opt.zero_grad()
    assert lw.backward(checkpointed_loss(ours, data[0], True) / 2) is False  # the pass count is intact


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(accumulation_steps=0), ValueError, "accumulation_steps"),
        (dict(accumulation_steps=2.0), ValueError, "accumulation_steps"),
        (dict(accumulation_steps=True), ValueError, "accumulation_steps"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
        (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
        (dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm"),
        (dict(max_grad_norm=float("inf")), ValueError, "max_grad_norm"),
        (dict(max_grad_norm="1"), ValueError, "max_grad_norm"),
        (dict(optimizer="lbfgs"), TypeError, "closure"),
        (dict(optimizer="not an optimizer"), TypeError, "torch.optim.Optimizer"),
        (dict(model="other"), ValueError, "not in model_or_params"),
        (dict(model=3), TypeError, "model_or_params"),
    ],
)
def test_bad_arguments_raise_before_any_hook_is_registered(kwargs, error, match):
    model = make_model()
    opt = galore(model)
    optimizer = {"lbfgs": torch.optim.LBFGS(model.parameters()), "not an optimizer": object()}.get(
        kwargs.pop("optimizer", None), opt
    )
    target = {"other": make_model(), None: model}.get(kwargs.pop("model", None), 3)
    with pytest.raises(error, match=match):
        lro.layerwise(target, optimizer, **kwargs)
    # no hook: an ordinary backward keeps every gradient and moves nothing
    before = [p.detach().clone() for p in model.parameters()]
    lm_loss(model, batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_a_second_handle_on_the_same_parameters_is_refused_until_the_first_is_removed():
    model = make_model()
    opt = galore(model)
    lw = lro.layerwise(model, opt)
    with pytest.raises(RuntimeError, match="already has layer-wise updates"):
        lro.layerwise(model, opt)
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())
    lw.remove()
    lro.layerwise(model, opt).remove()


def test_remove_and_context_manager_unregister_every_hook():
    data = batches(2)
    model = make_model()
    opt = galore(model)
    with lro.layerwise(model, opt) as lw:
        assert lw.backward(lm_loss(model, data[0]))
        assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    with pytest.raises(RuntimeError, match="removed"):
        lw.backward(lm_loss(model, data[1]))
    before = [p.detach().clone() for p in model.parameters()]
    lm_loss(model, data[1]).backward()  # ordinary again: gradients kept, nothing stepped
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert lw.steps == 1 and "removed" in repr(lw)


# ---------------------------------------------------------------------------------------------- non-finite gradients
def poison(model, steps):
    """inf in layers.0.q_proj.weight's gradient on the given backward passes (0-based, counting every pass the
    parameter's gradient is computed in, so a layer-wise measuring pass counts as one). Late in the backward:
    lm_head, the norms and layer 1 have their gradients before it."""
    calls = {"n": -1, "poisoned": set(steps)}

    def hook(g):
        calls["n"] += 1
        return g * float("inf") if calls["n"] in calls["poisoned"] else g

    model.layers[0].q_proj.weight.register_hook(hook)
    return calls


@pytest.mark.parametrize("k", [1, 2])
def test_nonfinite_skip_with_clipping_skips_the_whole_step_as_the_ordinary_loop(k):
    """nonfinite="skip" under clipping: the measuring pass finds the inf before the first update, so the step
    is skipped whole and counted once, bit for bit the ordinary loop (clip_grad_norm_, whose inf total norm
    makes every gradient 0 or NaN, then opt.step(), which skips). Before, every parameter reached before the
    bad one was stepped on its zeroed gradient and each call counted a skip."""
    data = batches(4 * k)
    ref, ours = make_model(), make_model()
    ref_opt, our_opt = galore(ref, nonfinite="skip"), galore(ours, nonfinite="skip")
    poison(ref, [2 * k - 1])  # the ordinary loop computes each gradient once: pass 2k - 1 ends step 2
    # layer-wise takes k + 1 gradients a step (the measuring pass): step 2's measuring and real passes
    poison(ours, [2 * k, 2 * k + 1])
    ordinary(ref, ref_opt, data, k=k, clip=MAX_NORM)
    _, stepped, lw = layerwise(ours, our_opt, data, k=k, clip=MAX_NORM)
    assert [g["nonfinite_skipped"] for g in ref_opt.param_groups] == [1] * len(ref_opt.param_groups)
    assert [g["nonfinite_skipped"] for g in our_opt.param_groups] == [1] * len(our_opt.param_groups)
    assert_bitwise(ref, ours)
    assert_states_equal(ref_opt, our_opt)
    assert sum(stepped) == 4 and all(p.grad is None for p in ours.parameters())


def test_nonfinite_raise_with_clipping_refuses_before_any_update():
    model = make_model()
    opt = galore(model)
    lw = lro.layerwise(model, opt, max_grad_norm=MAX_NORM)
    lw.backward(lm_loss(model, batches(1)[0]))
    poison(model, [0])
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(lro.NonFiniteGradientError, match="q_proj.weight.*unchanged"):
        lw.backward(lm_loss(model, batches(2)[1]))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert same(state, opt.state_dict())


def test_nonfinite_skip_without_clipping_skips_the_rest_of_the_pass_and_counts_once():
    """Without the measuring pass a parameter is stepped as its gradient arrives: those before the inf stay
    stepped (the module doc says so), the rest of that backward is skipped, and the step counts one skip (it
    counted one per parameter call)."""
    model = make_model()
    opt = galore(model, nonfinite="skip")
    lw = lro.layerwise(model, opt)
    poison(model, [1])
    order = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p, order=order: order.append(p))
    lw.backward(lm_loss(model, batches(1)[0]))
    arrival = list(order)
    before = [p.detach().clone() for p in arrival]
    lw.backward(lm_loss(model, batches(2)[1]))
    assert [g["nonfinite_skipped"] for g in opt.param_groups] == [1] * len(opt.param_groups)
    bad = next(i for i, p in enumerate(arrival) if p is model.layers[0].q_proj.weight)
    moved = [not torch.equal(p, b) for p, b in zip(arrival, before)]
    assert all(moved[:bad]) and not any(moved[bad:])
    assert all(p.grad is None for p in model.parameters())


def test_clipping_refuses_a_compiled_backward_before_anything_runs():
    """The stepping pass replays the graph the measuring pass kept, and torch 2.13's inductor backward does not
    replay faithfully: on a nanoGPT block the second run's gradients were 20% off the first's, so every weight
    stepped on wrong gradients without a word (a QA pass; this file's tiny model happened not to show it). A
    loss whose graph holds a compiled backward is refused under clipping, with nothing run or stepped
    (aot_eager builds the same CompiledFunctionBackward node without a C++ compiler); without clipping there
    is no replay, and the compiled model steps."""
    model = make_model()
    fast = torch.compile(model, backend="aot_eager")
    opt = galore(model)
    lw = lro.layerwise(model, opt, max_grad_norm=MAX_NORM)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="a torch.compile'd backward's second run is not the first's.*nothing "
                                           "was run. Compile without max_grad_norm"):
        lw.backward(lm_loss(fast, batches(1)[0]))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters()) and not opt.state and lw.steps == 0
    lw.remove()
    plain = lro.layerwise(model, opt)
    assert plain.backward(lm_loss(fast, batches(1)[0]))
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class SharedBlock(torch.nn.Module):
    """One block applied twice, each time in its own reentrant checkpoint segment (ALBERT-style sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.block, self.out = torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 1)

    def forward(self, x):
        x = self.inp(x)
        for _ in range(2):
            x = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.block(t)), x, use_reentrant=True)
        return self.out(x).square().mean()


@pytest.mark.parametrize("clip", [None, MAX_NORM])
def test_a_weight_shared_by_reentrant_checkpoint_segments_is_refused_not_stepped_twice(clip):
    """Each reentrant segment's inner backward delivers its share of a shared weight's gradient, so its hook
    fired twice and it was stepped twice, on partial gradients, silently (a QA pass). The second arrival is
    refused naming the weight; with clipping the measuring pass refuses it before any update."""
    torch.manual_seed(0)
    model = SharedBlock()
    opt = lro.GaLoreAdamW([{"params": [("block.weight", model.block.weight)], "rank": 4},
                           {"params": [(n, p) for n, p in model.named_parameters() if n != "block.weight"]}], lr=1e-2)
    lw = lro.layerwise(model, opt, max_grad_norm=clip)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"block\.(weight|bias) received its gradient in parts within one "
                                           r"backward.*use_reentrant=False"):
        lw.backward(model(torch.randn(8, 16)))
    if clip is not None:
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not opt.state
    else:
        assert all(int(st["step"]) <= 1 for st in opt.state.values())  # the first part's step, not a second


# ---------------------------------------------------------------------------------------------- DDP, 2 processes
DDP_CONFIGS = [
    dict(view=True, k=1, clip=None, static=False, plain=False),
    dict(view=False, k=1, clip=None, static=False, plain=False),
    dict(view=True, k=1, clip=None, static=True, plain=False),
    dict(view=True, k=2, clip=None, static=False, plain=False),  # accumulation under lw.no_sync()
    dict(view=False, k=2, clip=None, static=True, plain=False),  # its first backward must sync
    dict(view=True, k=2, clip=MAX_NORM, static=False, plain=False),
    dict(view=False, k=1, clip=None, static=False, plain=True),  # plain loss.backward()
]
DDP_STEPS = 3


def _ddp_data(cfg):
    return batches(DDP_STEPS * cfg["k"], seed=5, batch=4)


class Branchy(torch.nn.Module):
    """TinyLM plus a layer used only when asked and one never used."""

    def __init__(self):
        super().__init__()
        self.lm = make_model()
        torch.manual_seed(7)
        self.extra = torch.nn.Linear(32, 40, bias=False)
        self.never = torch.nn.Linear(32, 40, bias=False)

    def forward(self, tokens, use_extra):
        logits = self.lm(tokens)
        return logits + self.extra(self.lm.embed_tokens(tokens)) if use_extra else logits


def _ddp_worker(rank, world, port, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        # The ordering this design rests on: a post-accumulate-grad hook sees the local gradient;
        # DDP reduces after it.
        model = make_model()
        ddp = DDP(model)
        seen = {}
        model.lm_head.weight.register_post_accumulate_grad_hook(lambda p: seen.update(g=p.grad.clone()))
        shard = batches(1, seed=5, batch=4)[0][2 * rank: 2 * rank + 2]
        lm_loss(ddp, shard).backward()
        local = make_model()
        lm_loss(local, shard).backward()
        results["hook_sees_local"] = torch.equal(seen["g"], local.lm_head.weight.grad)
        results["grad_is_reduced"] = not torch.equal(model.lm_head.weight.grad, local.lm_head.weight.grad)
        # the wrapped module instead of the wrapper: its hooks would step on local gradients (a QA pass saw the
        # ranks drift apart by 1.45 in one step); refused before any hook is registered
        try:
            lro.layerwise(model, galore(model))
            results["inner_module_refused"] = False
        except ValueError as err:
            results["inner_module_refused"] = "pass the wrapper: lro.layerwise(ddp_model, opt)" in str(err)

        for i, cfg in enumerate(DDP_CONFIGS):
            data = _ddp_data(cfg)
            k, clip = cfg["k"], cfg["clip"]
            kw = dict(gradient_as_bucket_view=cfg["view"], static_graph=cfg["static"], bucket_cap_mb=0.01)
            # ordinary DDP: no_sync accumulation, clip_grad_norm_, step
            ref = make_model()
            ref_ddp = DDP(ref, **kw)
            ref_opt = galore(ref)
            for j, tokens in enumerate(data):
                shard = tokens[2 * rank: 2 * rank + 2]
                sync = j % k == k - 1 or (cfg["static"] and j == 0)  # static_graph: DDP syncs the first
                with contextlib.nullcontext() if sync else ref_ddp.no_sync():
                    (lm_loss(ref_ddp, shard) / k).backward()
                if j % k != k - 1:
                    continue
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
                ref_opt.step()
                ref_opt.zero_grad()
            # layer-wise
            ours = make_model()
            our_ddp = DDP(ours, **kw)
            lw = lro.layerwise(our_ddp, galore(ours), accumulation_steps=k, max_grad_norm=clip)
            # the embedding's gradient is the last to complete: by then, without clipping, the head
            # (first bucket) has been stepped from its reduced gradient, inside the backward. (DDP
            # reduces one bucket of everything until it rebuilds its buckets after its first
            # iteration, two with static_graph; the last step has several buckets.)
            head = ours.lm_head.weight
            early = []
            ours.embed_tokens.weight.register_post_accumulate_grad_hook(
                lambda _: early.append(not torch.equal(head, snapshot)) if lw.will_step else None
            )
            freed = True
            for tokens in data:
                snapshot = head.detach().clone()
                shard = tokens[2 * rank: 2 * rank + 2]
                with lw.no_sync():
                    loss = lm_loss(our_ddp, shard) / k
                    if cfg["plain"]:
                        stepping = lw.will_step
                        loss.backward()
                    else:
                        stepping = lw.backward(loss)
                if stepping:
                    freed &= all(p.grad is None for p in ours.parameters())
            results[i] = dict(
                params=[p.detach().clone() for p in ours.parameters()],
                equal_to_ddp=all(torch.equal(p, q) for p, q in zip(ref.parameters(), ours.parameters())),
                freed=freed,
                steps=lw.steps,
                stepped_early=early[-1] if clip is None else not any(early),
            )
            gathered = [torch.zeros(1) for _ in range(world)]
            flat = torch.cat([p.detach().flatten() for p in ours.parameters()])
            mine = torch.tensor([float(flat.double().sum())])
            dist.all_gather(gathered, mine)
            results[i]["ranks_agree"] = all(torch.equal(g, gathered[0]) for g in gathered)
            lw.remove()
        # find_unused_parameters: `extra` is used on rank 0 only (locally unused on rank 1, so DDP's
        # finalize gives it the reduced gradient there); `never` is used nowhere (no gradient, no step).
        for view in (True, False):
            runs = []
            for kind in ("ordinary", "layerwise"):
                model = Branchy()
                wrapped = DDP(model, find_unused_parameters=True, gradient_as_bucket_view=view, bucket_cap_mb=0.01)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
                lw = lro.layerwise(wrapped, opt) if kind == "layerwise" else None
                for tokens in batches(3, seed=5, batch=4):
                    shard = tokens[2 * rank: 2 * rank + 2]
                    logits = wrapped(shard[:, :-1], rank == 0)
                    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), shard[:, 1:].reshape(-1))
                    if lw is None:
                        loss.backward()
                        opt.step()
                        opt.zero_grad()
                    else:
                        lw.backward(loss)
                runs.append(model)
            a, b = runs
            results[f"unused_view_{view}"] = (
                all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
                and not torch.equal(b.extra.weight, Branchy().extra.weight)  # stepped on both ranks
                and torch.equal(b.never.weight, Branchy().never.weight)
                and all(p.grad is None for p in b.parameters())
            )
            flat = torch.cat([p.detach().flatten() for p in b.parameters()])
            gathered = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(gathered, torch.tensor([float(flat.double().sum())]))
            results[f"unused_view_{view}"] &= all(torch.equal(g, gathered[0]) for g in gathered)
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process_on_the_global_batch():
    """2 processes (gloo, CPU), each with half of every batch: layer-wise + DDP equals ordinary DDP
    bit for bit and one process on the whole batch to float tolerance, with gradient_as_bucket_view
    on and off, static_graph, accumulation under lw.no_sync(), clipping, plain loss.backward(), and
    find_unused_parameters with a parameter used on one rank only."""
    # The workers import this module, and through it `conftest`: they copy sys.path at spawn, so put
    # this directory first (in a full run bench/ holds a conftest.py too).
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.pt")
            # rank 0 writes the results after every collective, before the final barrier: with them on disk
            # the work is done, and a rank's abort in gloo's teardown (seen in CI) is tolerated (conftest)
            spawn_two(_ddp_worker, (_free_port(), out), [Path(out)])
            results = torch.load(out, weights_only=True)
    finally:
        sys.path.remove(here)
    assert results["hook_sees_local"] and results["grad_is_reduced"] and results["inner_module_refused"]
    assert results["unused_view_True"] and results["unused_view_False"]
    for i, cfg in enumerate(DDP_CONFIGS):
        got = results[i]
        assert got["equal_to_ddp"] and got["ranks_agree"] and got["freed"] and got["stepped_early"], cfg
        assert got["steps"] == DDP_STEPS, cfg
        single = make_model()
        ordinary(single, galore(single), _ddp_data(cfg), k=cfg["k"], clip=cfg["clip"])
        for (name, p), q in zip(single.named_parameters(), got["params"]):
            torch.testing.assert_close(q, p.detach(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{cfg} {name}: {m}")
