"""``ref:PRESET``: the methods' reference packages at the settings our presets resolve to
(lowrank_optim/train/references.py), as ``lowrank-optim compare`` and bench/nanogpt_lr.py run them."""

from __future__ import annotations

import json

import pytest
import torch

import lowrank_optim as lro
from conftest import batches, lm_loss, make_model
from lowrank_optim.cli import main
from lowrank_optim.train import TrainError, build_optimizer
from lowrank_optim.train.references import REFERENCES, reference_twin
from test_train import SMALL, cli

apollo_torch = pytest.importorskip("apollo_torch", reason="apollo-torch is not installed")


def test_the_twin_gets_our_groups_and_resolved_settings():
    """The same parameters in the same groups with the same lr, betas, ε and decay, and the projected
    group's rank, gap, scale, scaling, projection and limiter. TinyLM at width 32: rank 8, matched scale
    d/r = 4 for APOLLO."""
    model = make_model(dim=32, hidden=48)
    ours = lro.APOLLO(lro.param_groups(model), lr=4e-3, betas=(0.9, 0.99), weight_decay=0.1, match_adamw_rms=True)
    ref = reference_twin("apollo", ours)
    assert isinstance(ref, apollo_torch.APOLLOAdamW) and ref.disable_nl is False
    assert len(ours.param_groups) == len(ref.param_groups)
    for a, b in zip(ours.param_groups, ref.param_groups):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        assert [b[k] for k in ("lr", "betas", "eps", "weight_decay")] == [a[k] for k in ("lr", "betas", "eps", "weight_decay")]
    (low,) = [g for g in ref.param_groups if "rank" in g]
    keys = ("rank", "update_proj_gap", "scale", "scale_type", "proj", "proj_type")
    assert {k: low[k] for k in keys} == {"rank": 8, "update_proj_gap": 200, "scale": 4.0, "scale_type": "channel",
                                         "proj": "random", "proj_type": "std"}
    off = reference_twin("apollo", lro.APOLLO(lro.param_groups(model), limiter=None))
    assert off.disable_nl is True
    # a group's own betas and ε reach its twin group (they went in once, from the first group; found by a QA pass)
    groups = lro.param_groups(model)
    groups[0].update(betas=(0.5, 0.9), eps=1e-3)
    ours = lro.APOLLO(groups, lr=4e-3)
    ref = reference_twin("apollo", ours)
    assert [(g["betas"], g["eps"]) for g in ref.param_groups] == [(g["betas"], g["eps"]) for g in ours.param_groups]
    assert ref.param_groups[0]["betas"] != ref.param_groups[1]["betas"]
    # apollo-torch's limiter is one switch: mixed groups are refused, not run all unlimited
    low = lro.param_groups(model)[0]
    half = len(low["params"]) // 2
    mixed = [{**low, "params": low["params"][:half], "limiter": None}, {**low, "params": low["params"][half:]}]
    with pytest.raises(TrainError, match="limiter is on or off for every group at once"):
        reference_twin("apollo", lro.APOLLO(mixed))


@pytest.mark.parametrize("options, message", [
    ({"residual": "sign"}, "galore-torch runs residual='drop' only, this entry has 'sign'"),
    ({"limiter": 1.01}, "galore-torch runs limiter=None only, this entry has 1.01"),
    ({"rule": "adafactor"}, "galore-torch runs rule='adam' only, this entry has 'adafactor'"),
])
def test_settings_the_package_has_no_word_for_are_refused_by_name(options, message):
    pytest.importorskip("galore_torch", reason="galore-torch is not installed")
    with pytest.raises(TrainError, match=message):
        reference_twin("galore", lro.GaLoreAdamW(lro.param_groups(make_model(dim=32, hidden=48)), **options))
    with pytest.raises(TrainError, match="apollo-torch's limiter is 1.01 or off, this entry has limiter=1.05"):
        reference_twin("apollo", lro.APOLLO(lro.param_groups(make_model(dim=32, hidden=48)), limiter=1.05))
    with pytest.raises(TrainError, match="no reference package on the index for 'frugal'; there is one for ref:apollo"):
        build_optimizer("ref:frugal", make_model())


@pytest.mark.parametrize("preset", ["galore", "fira"])
def test_the_twin_takes_our_step_at_a_scale_other_than_one(preset):
    """The twins of GaLore and Fira (LAPACK's SVD on both sides: our ``canonical_signs=False``) take our first
    step at the matched scale 2 (width 32, rank 8). Fira's package applies its alpha to project_back(R)
    inside the residual too, so its twin runs alpha = 1 at lr·scale with decay wd/scale; handing it alpha =
    scale moves the projected weights by ~lr·k·|project_back(R)|. Decay off for the step (the packages decay
    after the update, ours before: lr·wd·update apart) and checked as settings instead. Tolerance 1e-5 on
    the projected weights: the same float32 SVD and Adam's first step (ε 1e-12, whose placement then cannot
    matter) agree to ~2e-6 (measured on nanoGPT's width 128 too)."""
    pytest.importorskip(REFERENCES[preset][0], reason=f"{REFERENCES[preset][1]} is not installed")
    tokens = batches(1)[0]
    runs = []
    for twin in (False, True):
        model = make_model(dim=32, hidden=48)
        ours = lro.PRESETS[preset](lro.param_groups(model), lr=4e-3, betas=(0.9, 0.99), eps=1e-12, weight_decay=0.0,
                                   match_adamw_rms=True, projector_options={"canonical_signs": False})
        assert {g["scale"] for g in ours.param_groups if g.get("rank")} == {2.0}
        opt = reference_twin(preset, ours) if twin else ours
        lm_loss(model, tokens).backward()
        opt.step()
        projected = {id(p) for g in ours.param_groups if g.get("rank") for p in g["params"]}
        runs.append([p.detach().clone() for p in model.parameters() if id(p) in projected])
    assert len(runs[0]) >= 4
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    twin = reference_twin(preset, lro.PRESETS[preset](lro.param_groups(make_model(dim=32, hidden=48)), lr=4e-3,
                                                      weight_decay=0.1, match_adamw_rms=True))
    (low,) = [g for g in twin.param_groups if "rank" in g]
    want = {"fira": (8e-3, 0.05, {"alpha": 1.0}), "galore": (4e-3, 0.1, {"scale": 2.0})}[preset]
    assert (low["lr"], low["weight_decay"]) == pytest.approx(want[:2]) and all(low[k] == v for k, v in want[2].items())


def test_compare_runs_a_reference_entry_and_counts_the_package_s_projection_matrices(tmp_path, capsys):
    """``compare --optimizers galore:rank=8,ref:galore:rank=8``: the twin trains from the same weights on the
    same data (the same first loss), and its state counts the projector objects' matrices, which galore-torch
    keeps outside tensors: Adam's two r×n moments plus the basis, as ours, but for our scalar counters (a
    4-byte step per tensor, an 8-byte refresh phase per projected weight: 380 bytes of 1 MB, where
    galore-torch keeps Python ints), so within 0.1%. Without the bases the twin's count would be 5% lower."""
    pytest.importorskip("galore_torch", reason="galore-torch is not installed")
    rc, out, _ = cli(capsys, "compare", *SMALL, "--optimizers", "galore:rank=8,ref:galore:rank=8", "--max-steps", "3",
                     "--eval-every", "3", "--out", str(tmp_path))
    assert rc == 0, out
    runs = {r["label"]: r for r in json.loads((tmp_path / "compare.json").read_text())["runs"]}
    ours, theirs = runs["galore:rank=8"], runs["ref:galore:rank=8"]
    assert theirs["curve"][0][1] == ours["curve"][0][1]
    assert abs(theirs["curve"][-1][1] - ours["curve"][-1][1]) < 0.05 * ours["curve"][-1][1]
    assert 0 < ours["summary"]["state_bytes"] - theirs["summary"]["state_bytes"] < 1e-3 * ours["summary"]["state_bytes"]


def test_a_reference_entry_does_not_save_or_resume(tmp_path, capsys):
    rc = main(["pretrain", *SMALL, "--optimizer", "ref:galore", "--max-steps", "2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "ref:galore (the reference package) does not run with checkpoints" in err, err
    assert not (tmp_path / "run").exists()
