"""lro.param_groups: which parameters get low-rank keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank_optim as lro
from conftest import make_model


def names(group):
    return [n for n, _ in group["params"]]


def test_linear_weights_get_rank_keys_the_rest_stays_plain():
    model = make_model()
    low, plain = lro.param_groups(model, rank=16, update_proj_gap=50, scale=0.5)
    assert names(low) == [f"layers.{i}.{k}.weight" for i in range(2) for k in ("q_proj", "up_proj", "down_proj")]
    assert (low["rank"], low["update_proj_gap"], low["scale"]) == (16, 50, 0.5)
    assert "proj_type" not in low  # not given: the optimizer's default applies
    low_only_rank, _ = lro.param_groups(model, rank=4)
    assert set(low_only_rank) == {"params", "rank"}
    assert "rank" not in plain
    assert set(names(plain)) == {
        "embed_tokens.weight", "layers.0.norm.weight", "layers.0.norm.bias", "layers.0.up_proj.bias",
        "layers.1.norm.weight", "layers.1.norm.bias", "layers.1.up_proj.bias",
        "norm.weight", "norm.bias", "lm_head.weight",
    }
    every = {id(p) for g in (low, plain) for _, p in g["params"]}
    assert every == {id(p) for p in model.parameters()}


def test_target_modules_filter_by_name_substring():
    model = make_model()
    low, plain = lro.param_groups(model, rank=4, target_modules=["up_proj", "down_proj"], projector="svd", lr=0.02)
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
    low, plain = lro.param_groups(model, rank=4, target_modules=["lm_head", "q_proj"])
    assert names(low) == ["layers.0.q_proj.weight", "layers.1.q_proj.weight"]
    assert names(plain).count("embed_tokens.weight") == 1
    opt = lro.GaLoreAdamW(lro.param_groups(model, rank=4))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_model_without_linear_layers_gives_one_plain_group():
    model = nn.Sequential(nn.Conv1d(2, 2, 3))
    (plain,) = lro.param_groups(model, rank=4)
    assert "rank" not in plain


def test_drop_in_example_from_the_readme_trains():
    model = make_model()
    opt = lro.GaLoreAdamW(lro.param_groups(model, rank=8, update_proj_gap=200, scale=0.25), lr=1e-2)
    x = torch.randint(0, 40, (2, 9))
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    assert opt.state[model.layers[0].q_proj.weight]["exp_avg"].shape == (32, 8)
