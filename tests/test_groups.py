"""lro.param_groups: which parameters get low-rank keys and which no weight decay; the presets' own
ranks for ``rank="auto"``; ``match_adamw_rms``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import lowrank_optim as lro
from conftest import make_model


def names(group):
    return [n for n, _ in group["params"]]


def test_linear_weights_get_rank_keys_the_rest_stays_plain():
    model = make_model()
    low, plain, free = lro.param_groups(model, rank=16, update_proj_gap=50, scale=0.5)
    assert names(low) == [f"layers.{i}.{k}.weight" for i in range(2) for k in ("q_proj", "up_proj", "down_proj")]
    assert (low["rank"], low["update_proj_gap"], low["scale"]) == (16, 50, 0.5)
    assert "proj_type" not in low and "weight_decay" not in low  # not given: the optimizer's defaults apply
    low_only_rank, _, _ = lro.param_groups(model, rank=4)
    assert set(low_only_rank) == {"params", "rank"}
    # the plain groups carry rank=None, so a rank given to the constructor cannot reach the embedding
    assert plain["rank"] is None and free["rank"] is None
    assert names(plain) == ["embed_tokens.weight", "lm_head.weight"] and "weight_decay" not in plain
    assert set(names(free)) == {
        "layers.0.norm.weight", "layers.0.norm.bias", "layers.0.up_proj.bias",
        "layers.1.norm.weight", "layers.1.norm.bias", "layers.1.up_proj.bias", "norm.weight", "norm.bias",
    }
    assert free["weight_decay"] == 0.0
    every = [id(p) for g in (low, plain, free) for _, p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())


def test_no_decay_takes_names_or_a_predicate():
    model = make_model()
    _, plain, free = lro.param_groups(model, no_decay=["embed_tokens.weight", "norm.weight"])
    assert names(free) == ["embed_tokens.weight", "norm.weight"]
    assert "layers.0.norm.bias" in names(plain)
    _, plain, free = lro.param_groups(model, no_decay=lambda name, p: p.dim() < 2 or "embed" in name)
    assert names(plain) == ["lm_head.weight"] and "embed_tokens.weight" in names(free)
    opt = lro.GaLoreAdamW(lro.param_groups(model, rank=4), lr=1e-2, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    # names replace the rule, so a misspelled one would leave its parameter decaying: refused, with the fix
    with pytest.raises(ValueError, match=r"no_decay names 'embed_token.weight' \(did you mean 'embed_tokens.weight'\?\), "
                                         r"'nope', which are not parameters of the model"):
        lro.param_groups(model, no_decay=["embed_token.weight", "nope", "norm.weight"])
    with pytest.raises(ValueError, match="no_decay names 'norm'"):
        lro.param_groups(model, no_decay="norm")


def test_constructor_rank_reaches_only_the_low_rank_group():
    model = make_model()
    opt = lro.GaLoreAdamW(lro.param_groups(model), rank=4)  # rank="auto" takes the constructor's number
    assert [g["rank"] for g in opt.param_groups] == [4, None, None]
    opt.init_state()
    assert opt.state[model.embed_tokens.weight]["exp_avg"].shape == model.embed_tokens.weight.shape


def test_target_modules_filter_by_name_substring():
    model = make_model()
    low, plain, _ = lro.param_groups(model, rank=4, target_modules=["up_proj", "down_proj"], projector="svd", lr=0.02)
    assert names(low) == [f"layers.{i}.{k}.weight" for i in range(2) for k in ("up_proj", "down_proj")]
    assert low["projector"] == "svd" and low["lr"] == 0.02
    assert "layers.0.q_proj.weight" in names(plain)
    with pytest.raises(ValueError, match="matches no nn.Linear.*named like"):
        lro.param_groups(model, target_modules=["attn"])
    with pytest.raises(ValueError, match="target_modules is empty"):
        lro.param_groups(model, target_modules=[])


def test_head_tied_to_the_embedding_stays_plain_and_appears_once():
    model = make_model()
    model.lm_head.weight = model.embed_tokens.weight
    low, plain, _ = lro.param_groups(model, rank=4, target_modules=["lm_head", "q_proj"])
    assert names(low) == ["layers.0.q_proj.weight", "layers.1.q_proj.weight"]
    assert names(plain).count("embed_tokens.weight") == 1
    opt = lro.GaLoreAdamW(lro.param_groups(model, rank=4))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_the_output_head_stays_plain_whatever_the_targets_match():
    """README and lro.hf: embeddings and the output head are never projected. A target that names it, a
    substring that catches it ("head", Trainer's regex ".*" becomes a predicate) or a predicate that
    accepts everything leaves lm_head in the plain group; targeting it alone is an error saying why."""
    model = make_model()
    for targets in (["lm_head", "q_proj"], ["head", "q_proj"], lambda name, module: True):
        low, plain, _ = lro.param_groups(model, rank=4, target_modules=targets)
        assert "lm_head.weight" in names(plain) and "lm_head.weight" not in names(low), targets
    with pytest.raises(ValueError, match=r"matches no nn.Linear in the model that is projected \(the output head, "
                                         r"lm_head/embed_out/output/head, never is\)"):
        lro.param_groups(model, target_modules=["lm_head"])
    # a predicate that accepts only the head, or nothing, would leave no low-rank group: AdamW at
    # AdamW's memory with nothing said, so it is the same error
    for predicate in (lambda name, module: name == "lm_head", lambda name, module: False):
        with pytest.raises(ValueError, match=r"the target_modules predicate matches no nn.Linear .*named like"):
            lro.param_groups(model, target_modules=predicate)


class Untied(nn.Module):
    """An untied output head under another name than lm_head, and a block with a layer named output."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(64, 32)
        self.block = nn.ModuleDict({"fc": nn.Linear(32, 128), "output": nn.Linear(128, 32)})
        setattr(self, head, nn.Linear(32, 64, bias=False))


@pytest.mark.parametrize("head", ["output", "head", "embed_out"])
def test_an_untied_head_named_as_torchtitan_mingpt_or_neox_name_it_stays_plain(head):
    """Only a module named lm_head was known as the head: torchtitan's and Meta's LLaMA `output`, a `head`,
    GPT-NeoX's `embed_out` were projected (a QA pass). At the top of the model those names are the head; a
    block's own `output` layer (BERT's) is projected as before."""
    low, plain, _ = lro.param_groups(Untied(head), rank=8)
    assert f"{head}.weight" in names(plain) and names(low) == ["block.fc.weight", "block.output.weight"]


def test_hugging_face_s_output_embeddings_are_the_head_whatever_their_name():
    class Model(Untied):
        def get_output_embeddings(self):
            return self.proj

    low, plain, _ = lro.param_groups(Model("proj"), rank=8)
    assert "proj.weight" in names(plain) and "proj.weight" not in names(low)


def test_model_without_linear_layers_gives_one_plain_group():
    model = nn.Sequential(nn.Conv1d(2, 2, 3))
    (plain, free) = lro.param_groups(model, rank=4)
    assert plain["rank"] is None and names(free) == ["0.bias"]


def test_drop_in_example_from_the_readme_trains():
    model = make_model()
    opt = lro.GaLoreAdamW(lro.param_groups(model, rank=8, update_proj_gap=200, scale=0.25), lr=1e-2)
    x = torch.randint(0, 40, (2, 9))
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    assert opt.state[model.layers[0].q_proj.weight]["exp_avg"].shape == (32, 8)


def test_auto_rank_is_a_quarter_of_the_width_and_the_presets_own():
    """No fallback on a narrow model: rank = short side / 4 (GaLore's 128 at width 512); APOLLO-Mini 1."""
    model = make_model(dim=32, hidden=48)  # every projected weight's short side is 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RankFallbackWarning
        assert lro.GaLoreAdamW(lro.param_groups(model)).param_groups[0]["rank"] == 8
        assert lro.APOLLO(model).param_groups[0]["rank"] == 8  # a module stands for param_groups(model)
        mini = lro.APOLLOMini(model)
    assert mini.param_groups[0]["rank"] == 1
    assert (mini.param_groups[0]["scaling"], mini.param_groups[0]["scale"]) == ("tensor", 8.0)  # 128 * 32 / 512
    wide = nn.Sequential(nn.Linear(512, 1376), nn.Linear(1376, 512), nn.Linear(512, 512))
    assert lro.GaLoreAdamW(wide).param_groups[0]["rank"] == 128  # the paper's rank at LLaMA-60M


def test_apollo_mini_scale_is_the_paper_s_from_width_512_and_keeps_its_relative_step_below():
    """scale="auto": 128 at width >= 512 (LLaMA-60M and up), 128·d/512 below, so √(scale/d), the rank-1
    update's size against an AdamW step, stays the paper's 0.5 at 60M; a number given is kept."""
    def scale_at(width, **kw):
        model = nn.Sequential(nn.Linear(width, 4 * width), nn.Linear(4 * width, width))
        return lro.APOLLOMini(model, **kw).param_groups[0]["scale"]

    assert (scale_at(1024), scale_at(512), scale_at(128)) == (128.0, 128.0, 32.0)
    assert scale_at(128, scale=128.0) == 128.0
    model = make_model()
    assert lro.APOLLOMini(lro.param_groups(model, scale=4.0)).param_groups[0]["scale"] == 4.0
    with pytest.raises(ValueError, match="scale='auto' is for presets with a width rule"):
        lro.GaLoreAdamW(model, scale="auto")


def test_a_constructor_rank_reaching_hand_built_groups_warns_that_embeddings_are_projected():
    """nanoGPT's configure_optimizers groups (and Trainer's optimizer_cls_and_kwargs, model.parameters()) carry no
    rank, so rank= given to the constructor reached them and projected the tied embedding and the positions,
    silently (a QA pass). One warning says so; groups with their own rank (galore-torch's pattern), the model
    itself, lro.param_groups, and named groups without an embedding or head stay quiet."""
    emb, pos, lin = nn.Embedding(64, 32), nn.Embedding(16, 32), nn.Linear(32, 128)
    decay = [emb.weight, pos.weight, lin.weight]
    nanogpt = [{"params": decay, "weight_decay": 0.1}, {"params": [lin.bias], "weight_decay": 0.0}]
    with pytest.warns(lro.ConstructorRankWarning, match=r"rank=8 given to the constructor .* 3 unnamed 2-D parameters"):
        lro.GaLoreAdamW(nanogpt, rank=8)
    named = [("transformer.wte.weight", emb.weight), ("transformer.h.0.mlp.c_fc.weight", lin.weight)]
    with pytest.warns(lro.ConstructorRankWarning, match=r"\['transformer.wte.weight'\] are projected"):
        lro.GaLoreAdamW(iter(named), rank=8)  # an iterator, as named_parameters() is: read once, still stepped
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", lro.ConstructorRankWarning)
        lro.GaLoreAdamW([{"params": [lin.weight], "rank": 8}, {"params": [emb.weight, lin.bias]}])  # galore-torch's
        lro.GaLoreAdamW(model, rank=8)
        lro.GaLoreAdamW(lro.param_groups(model), rank=8)
        lro.GaLoreAdamW([("h.0.mlp.c_fc.weight", lin.weight)], rank=8)
        lro.GaLoreAdamW([lin.weight, emb.weight], rank=8)  # chosen weights alone, no norm or bias: as chosen
        with pytest.warns(lro.RankFallbackWarning):  # no rank anywhere: nothing is projected, and it says so
            lro.GaLoreAdamW(nanogpt)
    # the same groups with rank=8 given to the constructor too: it reaches the embedding's group
    with pytest.warns(lro.ConstructorRankWarning, match="1 unnamed 2-D parameters"):
        lro.GaLoreAdamW([{"params": [lin.weight], "rank": 8}, {"params": [emb.weight, lin.bias]}], rank=8)
    with pytest.warns(lro.ConstructorRankWarning):
        opt = lro.GaLoreAdamW(named, rank=8)
    assert len(opt.param_groups[0]["params"]) == 2


def test_match_adamw_rms_sets_the_scale_from_width_and_rank():
    """scale = sqrt(d / r) for project_back(N), d / r for APOLLO's scaled gradient (which takes sqrt(scale))."""
    model = make_model(dim=32, hidden=48)
    assert lro.GaLoreAdamW(model, match_adamw_rms=True).param_groups[0]["scale"] == 2.0  # sqrt(32 / 8)
    assert lro.APOLLO(model, match_adamw_rms=True).param_groups[0]["scale"] == 4.0
    assert lro.APOLLOMini(model, match_adamw_rms=True).param_groups[0]["scale"] == 32.0
    groups = lro.param_groups(model, rank=2, match_adamw_rms=True)
    assert lro.FRUGAL(groups).param_groups[0]["scale"] == 4.0
    with pytest.raises(ValueError, match="scale=0.5 and match_adamw_rms=True"):
        lro.GaLoreAdamW(model, scale=0.5, match_adamw_rms=True)
    with pytest.raises(ValueError, match="scale=0.5 and match_adamw_rms=True"):
        lro.GaLoreAdamW(lro.param_groups(model, scale=0.5, match_adamw_rms=True))
    with pytest.raises(ValueError, match="invalid match_adamw_rms='yes'"):
        lro.GaLoreAdamW(model, match_adamw_rms="yes")
    for rank in (0, -2, 2.5):  # the rank's own error, not the scale's arithmetic (ZeroDivisionError, math domain)
        with pytest.raises(ValueError, match=f"param group 0: invalid rank={rank}: rank must be an integer >= 1"):
            lro.GaLoreAdamW(lro.param_groups(model, rank=rank, match_adamw_rms=True))


class GQA(nn.Module):
    """Grouped-query attention's shapes: q/o 32×32, k/v 8×32 (one key/value head of width 8), an MLP 64×32."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(32, d, bias=False) for d in (32, 8, 8, 32))
        self.up_proj = nn.Linear(32, 64, bias=False)


def test_match_adamw_rms_scales_each_short_side_by_its_own_width():
    """One group took the most common short side's scale, so k/v_proj of grouped-query attention (every
    Llama-3, Mistral, Qwen) stepped √(32/8) = 2x an AdamW update at AdamW's lr (a QA pass measured 2.08x). With
    match_adamw_rms the low-rank weights are grouped by short side, each scaled by its own √(d/r); without it
    the group is one, as before."""
    model = GQA()
    groups = lro.param_groups(model, rank=4, match_adamw_rms=True)
    assert [names(g) for g in groups] == [["q_proj.weight", "o_proj.weight", "up_proj.weight"],
                                          ["k_proj.weight", "v_proj.weight"]]
    for opt in (lro.GaLoreAdamW(groups), lro.GaLoreAdamW(model, rank=4, match_adamw_rms=True)):
        assert [g["scale"] for g in opt.param_groups] == [math.sqrt(32 / 4), math.sqrt(8 / 4)]
    assert [g["scale"] for g in lro.APOLLO(lro.param_groups(model, rank=4, match_adamw_rms=True)).param_groups] == [
        32 / 4, 8 / 4]
    assert len(lro.param_groups(model, rank=4)) == 1  # no match_adamw_rms: one group, GaLore's fixed scale
    # each weight's first step then has AdamW's RMS 1 (sign(G) directions, see the test below)
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lro.GaLoreAdamW(model, rank=4, match_adamw_rms=True, lr=1.0, weight_decay=0.0).step()
    for n, p in model.named_parameters():
        rms = (p.detach() - before[n]).pow(2).mean().sqrt().item()
        assert math.isclose(rms, 1.0, rel_tol=1e-5), (n, rms)


def test_matched_update_has_the_rms_of_adamw_s_first_step():
    """On the first step Adam's direction is sign(G) (RMS 1): the matched GaLore update of an orthonormal
    projection then has RMS 1 as well, where AdamW's has RMS 1 too. Tolerance: eps=1e-8 against |G|
    of order 0.1 changes the direction by 1e-7 relative; 1e-5 leaves room for float32 sums."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 96))
    w.grad = torch.randn(64, 96)
    before = w.detach().clone()
    opt = lro.GaLoreAdamW([{"params": [w], "rank": 16}], lr=1.0, weight_decay=0.0, match_adamw_rms=True)
    assert opt.param_groups[0]["scale"] == 2.0
    opt.step()
    rms = (w.detach() - before).pow(2).mean().sqrt().item()
    # the update is scale * P N with N = sign(R): RMS(N) = 1, spread over 64 rows from 16
    assert math.isclose(rms, 1.0, rel_tol=1e-5), rms


def test_match_adamw_rms_gives_frugal_s_sign_residual_adamw_s_rms():
    """sign() moves every residual entry by lr, RMS 1, where AdamW's update has ~0.2: match_adamw_rms sets
    residual_lr_scale to 0.2 in the projected groups unless it is given (to the group or the constructor),
    and the residual term's RMS on a first step is then 0.2 of lr. Only FRUGAL's sign residual: Fira's is
    Adam-scaled already. Tolerance: the residual's sign is ±1 on every entry of a random gradient (none is
    round-off), so its RMS is exactly 0.2; float32 differences of the weights leave 1e-6 relative."""
    model = make_model(dim=32, hidden=48)
    assert {g["residual_lr_scale"] for g in lro.FRUGAL(model, match_adamw_rms=True).param_groups if g["rank"]} == {0.2}
    assert {g["residual_lr_scale"] for g in lro.FRUGAL(model).param_groups} == {1.0}
    given = lro.FRUGAL(model, match_adamw_rms=True, residual_lr_scale=0.5).param_groups
    assert {g["residual_lr_scale"] for g in given} == {0.5}
    grouped = lro.FRUGAL(lro.param_groups(model, match_adamw_rms=True, residual_lr_scale=0.7)).param_groups
    assert {g["residual_lr_scale"] for g in grouped if g["rank"]} == {0.7}
    assert {g["residual_lr_scale"] for g in lro.Fira(model, match_adamw_rms=True).param_groups} == {1.0}
    torch.manual_seed(0)
    grad, start = torch.randn(64, 96), torch.randn(64, 96)
    moved = []
    for residual in ("sign", "drop"):  # the same low-rank step (scale 2, the same SVD), with and without the residual
        w = nn.Parameter(start.clone())
        w.grad = grad.clone()
        lro.FRUGAL([{"params": [w], "rank": 16, "match_adamw_rms": True, "residual": residual}], lr=1.0,
                   weight_decay=0.0).step()
        moved.append(w.detach())
    rms = (moved[1] - moved[0]).pow(2).mean().sqrt().item()
    assert math.isclose(rms, 0.2, rel_tol=1e-5), rms


def test_match_adamw_rms_gives_adafactor_adamw_s_first_moment():
    """Adafactor steps by G/√V̂ (about 1 per entry) where Adam's m̂/√v̂ averages noise down, 3x smaller at
    AdamW's tuned lr (bench/update_rms.py): match_adamw_rms gives it a first moment at AdamW's β₁ unless one is
    given, in every group it reaches; the other rules keep their keys."""
    model = make_model(dim=32, hidden=48)
    opt = lro.GaLoreAdafactor(model, match_adamw_rms=True, betas=(0.8, 0.99))
    assert [g["momentum"] for g in opt.param_groups] == [0.8] * len(opt.param_groups)
    assert lro.GaLoreAdafactor(model, match_adamw_rms=True, momentum=0.5).param_groups[0]["momentum"] == 0.5
    assert lro.GaLoreAdafactor(model).param_groups[0]["momentum"] is None
    assert lro.SUMO(model, match_adamw_rms=True).param_groups[0]["momentum"] == lro.SUMO(model).param_groups[0]["momentum"]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    low = next(p for p in opt.param_groups[0]["params"] if p.dim() == 2)
    assert "exp_avg" in opt.state[low]  # the first moment is kept (and saved), r·n floats


def test_a_weight_decay_given_to_param_groups_is_the_model_s_decay():
    """nanoGPT users give the decay once: it reached the projected weights only, and the embedding and head took
    the constructor's default 0.01 (a QA pass). It reaches every decayed group; the no-decay group keeps 0."""
    low, plain, free = lro.param_groups(make_model(), rank=4, weight_decay=0.1)
    assert (low["weight_decay"], plain["weight_decay"], free["weight_decay"]) == (0.1, 0.1, 0.0)
    low, plain, free = lro.GaLoreAdamW(lro.param_groups(make_model(), rank=4), weight_decay=0.05).param_groups
    assert (low["weight_decay"], plain["weight_decay"], free["weight_decay"]) == (0.05, 0.05, 0.0)
