"""Bad input: a clear error naming the parameter or option and the fix, raised before any change."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lowrank_optim as lro
from conftest import batches, lm_loss, make_model, train


def groups(model, **kw):
    return lro.param_groups(model, rank=8, update_proj_gap=3, **kw)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lr=-1e-3), r"invalid lr=-0.001: the learning rate must be a finite number >= 0"),
        (dict(lr=float("nan")), r"invalid lr"),
        (dict(betas=(1.0, 0.999)), r"invalid betas.*beta1 must be in \[0, 1\)"),
        (dict(betas=(0.9, -0.1)), r"invalid betas.*beta2 must be in \[0, 1\)"),
        (dict(betas=(0.9,)), r"invalid betas.*pair"),
        (dict(eps=-1.0), r"invalid eps"),
        (dict(weight_decay=-0.1), r"invalid weight_decay"),
        (dict(rank=0), r"invalid rank=0: rank must be an integer >= 1"),
        (dict(rank=2.5), r"invalid rank=2.5"),
        (dict(rank=True), r"invalid rank=True"),
        (dict(update_proj_gap=0), r"invalid update_proj_gap=0"),
        (dict(scale=0.0), r"invalid scale=0.0: scale must be a finite number > 0"),
        (dict(proj_type="diagonal"), r"invalid proj_type='diagonal': choose one of std, reverse_std, left, right"),
        (dict(projector="qr"), rf"invalid projector='qr': choose one of {', '.join(sorted(lro.projectors.REGISTRY))}$"),
        (dict(foreach="yes"), r"invalid foreach"),
    ],
)
def test_constructor_arguments_are_validated(kw, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        lro.GaLoreAdamW(groups(model), **kw)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("rank", 0, r"param group 0: invalid rank=0"),
        ("rank", -3, r"param group 0: invalid rank=-3"),
        ("proj_type", "sideways", r"param group 0: invalid proj_type='sideways'"),
        ("projector", "nope", r"param group 0: invalid projector='nope'"),
        ("lr", -1, r"param group 0: invalid lr=-1"),
        ("projecter", "svd", r"unknown option 'projecter'; did you mean 'projector'\?"),
        ("update_proj_gaps", 10, r"did you mean 'update_proj_gap'\?"),
    ],
)
def test_group_keys_are_validated(key, value, match):
    model = make_model()
    g = groups(model)
    g[0][key] = value
    with pytest.raises(ValueError, match=match):
        lro.GaLoreAdamW(g)


def test_unrelated_group_metadata_passes_through():
    model = make_model()
    g = groups(model)
    g[0]["name"] = "attention and mlp"  # frameworks attach such keys; they are not typos of ours
    opt = lro.GaLoreAdamW(g)
    assert opt.param_groups[0]["name"] == "attention and mlp"


def test_rejected_add_param_group_changes_nothing():
    model = make_model()
    opt = lro.GaLoreAdamW(groups(model))
    extra = torch.nn.Linear(16, 16)
    with pytest.raises(ValueError, match="invalid rank"):
        opt.add_param_group({"params": [extra.weight], "rank": 0})
    assert len(opt.param_groups) == 3
    with pytest.raises(ValueError, match=r"complex; .*torch.optim.AdamW of their own"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 3


def test_rank_not_below_short_side_falls_back_with_one_warning_naming_it():
    model = make_model()  # q_proj is 32×32, up 48×32, down 32×48: short side 32 everywhere
    opt_groups = lro.param_groups(model, rank=32)
    with pytest.warns(lro.RankFallbackWarning) as record:
        opt = lro.GaLoreAdamW(opt_groups, lr=1e-2)
    messages = [str(w.message) for w in record]
    assert len(messages) == 6  # one per projected weight, no more
    assert any("'layers.0.q_proj.weight' has shape (32, 32)" in m for m in messages)
    assert all("updated as plain AdamW" in m and "rank below 32" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stepping warns no more
        train(model, opt, batches(2))
    assert all("projector" not in s for s in opt.state.values())


def test_no_rank_anywhere_warns_that_nothing_is_projected():
    model = make_model()
    with pytest.warns(lro.RankFallbackWarning, match="no parameter group sets 'rank'"):
        lro.GaLoreAdamW(model.parameters())


def snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def assert_unchanged(model, opt, snap):
    weights, state = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    now = opt.state_dict()
    assert now["state"].keys() == state["state"].keys()
    for k, s in state["state"].items():
        for key, v in s.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(now["state"][k][key], v), (k, key)
            elif isinstance(v, dict):
                assert torch.equal(now["state"][k][key]["P"], v["P"])


def test_sparse_gradient_is_refused_before_anything_changes():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    lin = torch.nn.Linear(4, 12, bias=False)
    opt = lro.GaLoreAdamW([{"params": [("lin.weight", lin.weight)], "rank": 2},
                           {"params": [("emb.weight", emb.weight)]}], lr=0.1)
    before = (lin.weight.detach().clone(), emb.weight.detach().clone())
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    with pytest.raises(RuntimeError, match="parameter 'emb.weight' has a sparse gradient.*SparseAdam"):
        opt.step()
    assert torch.equal(lin.weight, before[0]) and torch.equal(emb.weight, before[1])
    assert len(opt.state) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_at_refresh_names_the_parameter_and_changes_nothing(bad):
    model = make_model()
    opt = lro.GaLoreAdamW(groups(model, stagger=False), lr=1e-2)  # every subspace renews together
    data = batches(4)
    train(model, opt, data[:3])  # steps 0..2; the next step (3) refreshes
    snap = snapshot(model, opt)
    opt.zero_grad()
    lm_loss(model, data[3]).backward()
    model.layers[1].up_proj.weight.grad[3, 5] = bad
    with pytest.raises(lro.NonFiniteGradientError, match=r"parameter 'layers.1.up_proj.weight' has a non-finite gradient"):
        opt.step()
    assert_unchanged(model, opt, snap)
    # the same optimizer goes on normally once the gradient is finite again
    model.layers[1].up_proj.weight.grad[3, 5] = 0.0
    opt.step()
    assert int(opt.state[model.layers[1].up_proj.weight]["step"]) == 4


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda sd: sd["param_groups"].pop(), r"GaLoreAdamW.load_state_dict: the state dict has 2 parameter groups, "
                                              r"this optimizer has 3; nothing was loaded. Build the optimizer"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), "param group 0: loaded state dict has"),
        (lambda sd: sd["state"][0]["projector"].__setitem__("P", torch.zeros(3, 3)),
         r"parameter 'layers.0.q_proj.weight'.*rank-3 basis"),
        (lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(5, 5)),
         r"parameter 'layers.0.q_proj.weight': exp_avg has shape \(5, 5\)"),
        (lambda sd: sd["state"][0].pop("projector"), "has no projector"),
        (lambda sd: sd["param_groups"][0].__setitem__("rank", 0), "loaded param group 0: invalid rank=0"),
    ],
)
def test_mismatched_checkpoint_is_refused_and_state_is_kept(mutate, match):
    model = make_model()
    opt = lro.GaLoreAdamW(groups(model), lr=1e-2)
    train(model, opt, batches(2))
    bad = copy.deepcopy(opt.state_dict())
    mutate(bad)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_unchanged(model, opt, snap)
    assert opt.param_groups[0]["rank"] == 8


def test_a_torch_adamw_checkpoint_is_named_as_such_with_the_fix():
    """Continuing a Trainer AdamW run with one of ours met a bare "loaded state dict has 2 parameter groups"
    (a QA pass): the refusal names the optimizer, where the state dict came from and the two ways on."""
    model = make_model()
    adamw = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if p.dim() > 1]},
                               {"params": [p for n, p in model.named_parameters() if p.dim() < 2]}])
    opt = lro.GaLoreAdamW(groups(model), lr=1e-2)
    with pytest.raises(ValueError, match=r"has 2 parameter groups \(its groups have no 'rank': it was saved by another "
                                         r"optimizer, e.g. torch.optim.AdamW.*delete optimizer.pt and scheduler.pt"):
        opt.load_state_dict(adamw.state_dict())


def test_stochastic_rounding_on_a_float16_weight_is_refused_by_name():
    """stochastic_rounding=True rounds bf16 and INT8 weights; a float16 weight was accepted and rounded to
    nearest, the same run as False. It is refused when the optimizer is built, naming the parameter; bf16
    and float32 weights in the same request build (float32 has nothing to round)."""
    model = make_model(dtype=torch.float16)
    with pytest.raises(ValueError, match=r"parameter 'layers.0.q_proj.weight' is float16, and stochastic_rounding=True rounds"):
        lro.GaLoreAdamW(lro.param_groups(model), stochastic_rounding=True)
    lro.GaLoreAdamW(lro.param_groups(model))  # the default stays accepted
    lro.GaLoreAdamW(lro.param_groups(make_model(dtype=torch.bfloat16)), stochastic_rounding=True)
    lro.GaLoreAdamW(lro.param_groups(make_model()), stochastic_rounding=True)


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s.__setitem__("exp_avg_absmax", s["exp_avg_absmax"].long()),
     r"scales 'exp_avg_absmax' in float32; the checkpoint's are torch.int64"),
    (lambda s: s.__setitem__("exp_avg_absmax", s["exp_avg_absmax"].half()),
     r"scales 'exp_avg_absmax' in float32; the checkpoint's are torch.float16"),
    (lambda s: s.__setitem__("exp_avg", s["exp_avg"].t().contiguous().t()),
     r"the INT8 codes 'exp_avg' are not contiguous"),
    # each FSDP2 rank pads its piece's scales to the largest piece's: a 2-rank full state dict has more
    # scales than one process's blocks, which read as "incomplete" before
    (lambda s: s.__setitem__("exp_avg_absmax", torch.cat([s["exp_avg_absmax"], s["exp_avg_absmax"][:1]])),
     r"holds \d+ 'exp_avg_absmax' values where \d+ .* saved on another number of ranks"),
    (lambda s: s.__setitem__("exp_avg_absmax", s["exp_avg_absmax"][:-1]), r"the checkpoint's are incomplete"),
])
def test_int8_moments_of_another_dtype_or_layout_are_refused_at_load(mutate, match):
    """An integer absmax loaded and was truncated at every step (the run diverged silently); non-contiguous
    codes loaded and the next step failed with a raw view error. Both are refused when loading, naming the
    key, and the optimizer keeps its state."""
    model = make_model()
    opt = lro.GaLoreAdamW8bit(groups(model), lr=1e-2, min_8bit_size=64)
    train(model, opt, batches(2))
    bad = copy.deepcopy(opt.state_dict())
    key = next(k for k, s in bad["state"].items() if s.get("exp_avg") is not None and s["exp_avg"].dtype == torch.uint8
               and s["exp_avg"].dim() == 2 and min(s["exp_avg"].shape) > 1)
    mutate(bad["state"][key])
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("key,value", [("rank", 4), ("state_bits", 8), ("rule", "adafactor"),
                                       ("proj_type", "reverse_std"), ("projector", "rsvd")])
def test_a_method_key_edited_mid_run_is_refused_before_anything_changes(key, value):
    """torch lets param_groups be edited in place (schedulers do it with lr). A method key cannot change
    under existing state: the step ignored rank=4 and state_bits=8 (and its checkpoint then loaded into
    neither a rank-4 nor a rank-8 optimizer), and rule="adafactor" raised KeyError after counting steps."""
    model = make_model()
    opt = lro.GaLoreAdamW(groups(model), lr=1e-2)
    data = batches(3)
    train(model, opt, data[:2])
    before = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    opt.zero_grad()
    lm_loss(model, data[2]).backward()
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{key}'\] is {value!r}, but the group's state was "
                                         rf"built with {key}={before!r}; nothing was changed"):
        opt.step()
    assert_unchanged(model, opt, snap)
    opt.param_groups[0][key] = before  # put back, the run goes on
    opt.step()
    # a new optimizer takes the new value: its state starts afresh
    fresh = lro.GaLoreAdamW(lro.param_groups(model, **{"rank": 8, "update_proj_gap": 3, key: value}), lr=1e-2)
    fresh.step()


def test_lr_decay_scale_and_the_gap_may_change_mid_run_and_a_new_gap_gets_new_phases():
    """The keys a run may schedule stay editable. A new gap takes effect from each weight's next refresh
    (scheduled under the old one): that refresh moves it onto its phase of the new gap, at most a new gap
    later, and from there it renews every new gap steps."""
    model = make_model()
    opt = lro.GaLoreAdamW(groups(model), lr=1e-2)  # gap 3
    data = batches(16)
    train(model, opt, data[:2])
    for key, value in (("lr", 5e-3), ("weight_decay", 0.1), ("scale", 0.5), ("update_proj_gap", 4),
                       ("betas", (0.8, 0.99))):
        opt.param_groups[0][key] = value
    renewed = {id(p): [] for p in opt.param_groups[0]["params"]}
    for t, tokens in enumerate(data[2:], start=2):
        before = {id(p): opt.state[p]["projector"] for p in opt.param_groups[0]["params"]}
        opt.zero_grad()
        lm_loss(model, tokens).backward()
        opt.step()
        for p in opt.param_groups[0]["params"]:
            if opt.state[p]["projector"] is not before[id(p)]:
                renewed[id(p)].append(t)
    for steps in renewed.values():
        assert steps[0] <= 4 and steps[1] - steps[0] <= 4, steps
        assert len(steps) >= 4 and all(b - a == 4 for a, b in zip(steps[1:], steps[2:])), steps


def test_a_checkpoint_of_another_ef_bits_is_refused():
    """E is m×n per weight, the largest state: resuming with ef_bits=8 to save memory silently kept the
    checkpoint's float32 buffer (and group) where state_bits and proj_bits were already refused."""
    model = make_model()
    opt = lro.DCTAdamW(groups(model), lr=1e-2)
    train(model, opt, batches(2))
    saved = copy.deepcopy(opt.state_dict())
    other = lro.DCTAdamW(groups(model), lr=1e-2, ef_bits=8)
    with pytest.raises(ValueError, match=r"the state dict has ef_bits=32, this optimizer ef_bits=8"):
        other.load_state_dict(saved)
    assert not other.state and other.param_groups[0]["ef_bits"] == 8


@pytest.mark.parametrize("group,key,value,match", [
    (-1, "betas", 0.95, r"param_groups\[2\]: invalid betas=0.95: pass a pair"),
    (-1, "betas", (0.9, 1.5), r"param_groups\[2\]: invalid betas=\(0.9, 1.5\): beta2 must be in \[0, 1\)"),
    (0, "update_proj_gap", 0, r"param_groups\[0\]: invalid update_proj_gap=0"),
    (0, "lr", float("nan"), r"param_groups\[0\]: invalid lr=nan"),
    (1, "weight_decay", -0.1, r"param_groups\[1\]: invalid weight_decay=-0.1"),
])
def test_a_setting_edited_mid_run_is_validated_before_the_step(group, key, value, match):
    """lr, betas, decay and the gap stay editable in param_groups, but an edit was never validated: betas=0.95
    failed with "cannot unpack" after two weights had stepped, and update_proj_gap=0 with "min() arg is an
    empty sequence" at the next refresh (a QA pass). The constructor's message now comes first, with nothing
    changed, and the run goes on once the value is put back."""
    model = make_model()
    opt = lro.GaLoreAdamW(groups(model), lr=1e-2)
    train(model, opt, batches(2))
    old = opt.param_groups[group][key]
    opt.param_groups[group][key] = value
    opt.zero_grad()
    lm_loss(model, batches(3)[2]).backward()
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_unchanged(model, opt, snap)
    opt.param_groups[group][key] = old
    opt.step()
    assert int(opt.state[model.layers[0].q_proj.weight]["step"]) == 3


def test_the_fsdp2_refusal_reads_as_a_sentence_and_names_only_the_fixes_that_apply():
    """"projector='golore' has no refresh on row shards is not built for FSDP2 shards yet ... and no stochastic
    rounding" (a QA pass): each part is a noun phrase now, and stochastic rounding is named only when set."""
    from lowrank_optim.optim.groups import shard_error

    w = torch.nn.Parameter(torch.randn(16, 12))
    golore = lro.GoLore([{"params": [w], "rank": 4, "projector_options": {"switch_step": 4}}]).param_groups[0]
    msg = shard_error(golore, w, "'w'")
    assert msg == ("parameter 'w' is an FSDP2 shard, and projector='golore' (it has no refresh on row shards) is not "
                   "built for FSDP2 shards yet; on FSDP2 use another projector or option (or train without FSDP2)")
    rounding = lro.GaLoreAdamW([{"params": [w], "rank": 4}], stochastic_rounding=True).param_groups[0]
    assert shard_error(rounding, w, "'w'").endswith("stochastic_rounding=True is not built for FSDP2 shards yet; on "
                                                    "FSDP2 use no stochastic rounding (or train without FSDP2)")


def test_numpy_scalars_are_taken_as_torch_takes_them_and_stored_as_python_numbers():
    """lr=np.float32(1e-3) was refused as "not a finite number", rank=np.int64(8) as "not an integer", although
    torch.optim.AdamW takes them (a QA pass). They are read as the numbers they hold, and stored as Python
    numbers, so the checkpoint still loads with torch.load(weights_only=True); mid-run too."""
    import io

    import numpy as np

    model = make_model()
    opt = lro.GaLoreAdamW(lro.param_groups(model, rank=np.int64(4), update_proj_gap=np.int64(3)),
                          lr=np.float32(1e-2), betas=(np.float32(0.9), 0.999))
    low = opt.param_groups[0]
    assert (type(low["rank"]), type(low["update_proj_gap"]), type(low["lr"]), type(low["betas"][0])) == (
        int, int, float, float)
    train(model, opt, batches(2))
    opt.param_groups[1]["lr"] = np.float32(5e-3)
    train(model, opt, batches(1))
    assert type(opt.param_groups[1]["lr"]) is float
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))


def test_a_meta_device_parameter_is_refused_by_name_at_step():
    """torch's internal "Cannot copy out of meta tensor; no data!" came from the non-finite screen, naming
    nothing (a QA pass). The refusal names the parameter and what does work on meta (init_state)."""
    p = torch.nn.Parameter(torch.empty(64, 32, device="meta"))
    p.grad = torch.empty(64, 32, device="meta")
    opt = lro.GaLoreAdamW([{"params": [("w", p)], "rank": 8}])
    opt.init_state()
    with pytest.raises(ValueError, match=r"parameter 'w' and its gradient are on the meta device.*init_state"):
        opt.step()
