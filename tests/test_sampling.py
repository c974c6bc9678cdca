"""Layer sampling (LISA, OwLore): the schedule, the sampling law, frozen layers' state and updates,
resume, layer-wise updates, OWL's outlier ratios against a float64 reference, the OwLore recipe."""

from __future__ import annotations

import importlib.util
import itertools
import math

import pytest
import torch
from conftest import PRESET_CASES, ROOT, assert_same_parameters, batches, lm_loss, make_model, roundtrip
from torch import nn

import lowrank_optim as lro
from lowrank_optim.cli import main
from lowrank_optim.train import checkpoint


def nbytes(value) -> int:
    """Bytes of every tensor in a (nested) optimizer state entry."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


def layer_state_bytes(opt, model) -> list[int]:
    return [sum(nbytes(opt.state.get(p, {})) for p in layer.parameters()) for layer in model.layers]


def galore(model, **kw):
    return lro.GaLoreAdamW(lro.param_groups(model, rank=4, update_proj_gap=2), lr=1e-2, **kw)


def step_all(model, opt, sampler, data, lw=None) -> list[list[int]]:
    """The ordinary loop with ``sampler.step()`` after the optimizer's; returns the choice before each step."""
    chosen = []
    for tokens in data:
        chosen.append(sampler.active)
        loss = lm_loss(model, tokens)
        if lw is not None:
            lw.backward(loss)
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sampler.step()
    return chosen


def test_schedule_freezes_all_but_the_drawn_layers_and_redraws_every_k_steps():
    model = make_model(blocks=5)
    opt = galore(model)
    s = lro.LayerSampler(model, opt, every=3, layers=2, seed=7)
    g = torch.Generator().manual_seed(7)  # the sampler's draws, made here by hand
    expected = [sorted(torch.multinomial(torch.full((5,), 0.2, dtype=torch.float64), 2, replacement=False,
                                         generator=g).tolist()) for _ in range(4)]
    chosen = step_all(model, opt, s, batches(12))
    assert chosen == [expected[t // 3] for t in range(12)]
    for i, layer in enumerate(model.layers):
        assert all(p.requires_grad == (i in s.active) for p in layer.parameters())
    outside = [model.embed_tokens.weight, model.norm.weight, model.lm_head.weight]
    assert all(p.requires_grad for p in outside)  # embeddings, final norm and head always train (LISA, OwLore)


def test_draws_are_without_replacement_and_follow_successive_sampling_law():
    probs = [0.1, 0.2, 0.3, 0.4, 0.0]
    model = make_model(blocks=5, dim=8, hidden=8)
    s = lro.LayerSampler(model, torch.optim.SGD(model.parameters(), lr=0.1), every=1, layers=2, probs=probs, seed=3)
    n = 4000
    counts: dict[tuple[int, int], int] = {}
    for _ in range(n):
        s.step()
        pair = tuple(s.active)
        assert len(set(pair)) == 2 and 4 not in pair  # distinct layers; a zero-probability layer never
        counts[pair] = counts.get(pair, 0) + 1
    for i, j in itertools.combinations(range(4), 2):
        # P({i, j}) for two successive draws, each ∝ the remaining probabilities (numpy.random.choice
        # with replace=False, as in the official code)
        p = probs[i] * probs[j] / (1 - probs[i]) + probs[j] * probs[i] / (1 - probs[j])
        sigma = math.sqrt(p * (1 - p) / n)
        # 5 standard errors of a binomial frequency: a correct sampler fails one of the 6 cells with
        # probability < 4e-6 (and the seed makes the test deterministic)
        assert abs(counts.get((i, j), 0) / n - p) < 5 * sigma, (i, j)


@pytest.mark.parametrize("name,cls,keys", PRESET_CASES + [("adamw", None, {})], ids=lambda v: v if isinstance(v, str) else "")
def test_frozen_layers_hold_no_state_and_get_no_update(name, cls, keys):
    model = make_model(blocks=4)
    if cls is None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        groups = lro.param_groups(model, rank=keys.pop("rank", 4), update_proj_gap=2, **dict(keys))
        opt = cls(groups, lr=1e-2, weight_decay=0.1)
    s = lro.LayerSampler(model, opt, every=2, layers=1, seed=1)
    for tokens in batches(6):
        before = [[p.detach().clone() for p in layer.parameters()] for layer in model.layers]
        active = s.active
        opt.zero_grad(set_to_none=True)
        lm_loss(model, tokens).backward()
        opt.step()
        state = layer_state_bytes(opt, model)
        for i, layer in enumerate(model.layers):
            same = all(torch.equal(a, p) for a, p in zip(before[i], layer.parameters()))
            assert same == (i not in active), (i, active)  # weight decay 0.1 would move a frozen weight too
            assert (state[i] == 0) == (i not in active), (i, state)  # measured: a frozen layer holds 0 bytes
        s.step()


def tensors(value) -> list[torch.Tensor]:
    """Every tensor of a (nested) state entry, cloned."""
    if isinstance(value, torch.Tensor):
        return [value.clone()]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


def test_keep_state_keeps_frozen_layers_state_unchanged():
    model = make_model(blocks=4)
    opt = galore(model)
    s = lro.LayerSampler(model, opt, every=2, layers=2, keep_state=True, seed=0)
    seen: set[int] = set()
    for tokens in batches(8):
        seen |= set(s.active)
        frozen = [i for i in range(4) if i not in s.active]
        snap = {i: tensors([opt.state.get(p, {}) for p in model.layers[i].parameters()]) for i in frozen}
        step_all(model, opt, s, [tokens])
        for i in frozen:
            now = tensors([opt.state.get(p, {}) for p in model.layers[i].parameters()])
            assert len(now) == len(snap[i]) and all(torch.equal(a, b) for a, b in zip(snap[i], now))
    state = layer_state_bytes(opt, model)
    assert all((b > 0) == (i in seen) for i, b in enumerate(state))  # every layer ever trained keeps its state
    assert len(seen) < 4 or all(b > 0 for b in state)


@pytest.mark.parametrize("build", [galore, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)],
                         ids=["galore", "adamw"])
def test_resume_mid_interval_is_bit_identical(build):
    data = batches(10)

    def fresh(seed):
        model = make_model(seed=seed, blocks=4)
        opt = build(model)
        return model, opt, lro.LayerSampler(model, opt, every=3, layers=2, seed=5)

    model, opt, s = fresh(0)
    step_all(model, opt, s, data[:4])
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sampler": s.state_dict()})
    straight = step_all(model, opt, s, data[4:])
    twin, twin_opt, twin_s = fresh(9)  # another init, and the sampler's first draw differs from the saved one
    twin.load_state_dict(ckpt["model"])
    twin_opt.load_state_dict(ckpt["opt"])
    twin_s.load_state_dict(ckpt["sampler"])
    resumed = step_all(twin, twin_opt, twin_s, data[4:])
    assert straight == resumed
    assert_same_parameters(model, twin)
    assert layer_state_bytes(opt, model) == layer_state_bytes(twin_opt, twin)


@pytest.mark.parametrize("before", [True, False], ids=["layerwise-first", "sampler-first"])
def test_layerwise_updates_equal_the_ordinary_loop(before):
    data = batches(7)
    ref = make_model(blocks=4)
    ref_opt = galore(ref, weight_decay=0.1)
    ref_chosen = step_all(ref, ref_opt, lro.LayerSampler(ref, ref_opt, every=2, layers=1, seed=2), data)
    model = make_model(blocks=4)
    opt = galore(model, weight_decay=0.1)
    lw = lro.layerwise(model, opt) if before else None
    s = lro.LayerSampler(model, opt, every=2, layers=1, seed=2)
    lw = lw or lro.layerwise(model, opt)  # built while three layers are frozen: they are hooked all the same
    with lw:
        chosen = step_all(model, opt, s, data, lw=lw)
    assert chosen == ref_chosen and len({tuple(c) for c in chosen}) > 1
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_user_frozen_parameters_stay_frozen():
    model = make_model(blocks=3)
    model.layers[0].up_proj.bias.requires_grad_(False)
    opt = galore(model)
    s = lro.LayerSampler(model, opt, every=1, layers=3)
    assert s.active == [0, 1, 2] and not model.layers[0].up_proj.bias.requires_grad


@pytest.mark.parametrize("kwargs,error,match", [
    ({"every": 0}, ValueError, "every"),
    ({"every": 2.5}, ValueError, "every"),
    ({"layers": 0}, ValueError, "layers"),
    ({"layers": 5}, ValueError, "layers=5 exceeds"),
    ({"probs": "owls"}, ValueError, "probs must be"),
    ({"probs": [1.0, 1.0]}, ValueError, "probs has 2 entries"),
    ({"probs": [1.0, -1.0, 1.0, 1.0]}, ValueError, "non-negative"),
    ({"probs": [1.0, 0.0, 0.0, 0.0], "layers": 2}, ValueError, "fewer than layers=2"),
    ({"probs": "owl"}, ValueError, "calibration"),
    ({"keep_state": 1}, TypeError, "keep_state"),
    ({"seed": -1}, ValueError, "seed"),
    ({"decoder_layers": nn.Linear(2, 2)}, TypeError, "decoder_layers"),
    ({"probs": "owl", "calibration": torch.zeros(1, 3, dtype=torch.long), "threshold": 0}, ValueError, "threshold"),
])
def test_bad_arguments_are_refused_before_anything_changes(kwargs, error, match):
    model = make_model(blocks=4)
    opt = galore(model)
    with pytest.raises(error, match=match):
        lro.LayerSampler(model, opt, **{"layers": 1, **kwargs})
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="optimizer"):
        lro.LayerSampler(model, None)
    with pytest.raises(ValueError, match="no parameter of the decoder layers"):
        lro.LayerSampler(model, torch.optim.SGD([model.lm_head.weight], lr=0.1), layers=1)


def test_load_state_dict_refuses_another_samplers_state():
    model = make_model(blocks=4)
    opt = galore(model)
    s = lro.LayerSampler(model, opt, every=2, layers=1)
    state = roundtrip(s.state_dict())
    for key, value, match in [("every", 3, "every=3"), ("active", torch.tensor([7]), "active layers"),
                              ("probs", torch.tensor([1.0, 0, 0, 0], dtype=torch.float64), "probabilities")]:
        with pytest.raises(ValueError, match=match):
            s.load_state_dict({**state, key: value})
    with pytest.raises(ValueError, match="lacks"):
        s.load_state_dict({"step": 1})


# ----------------------------------------------------------------------------- OWL
def reference_owl_ratios(model, tokens, threshold) -> list[float]:
    """OWL's layer outlier ratio from its definition, in float64, with TinyLM's forward written out:
    A_ij = |W_ij| · ‖X_j‖₂ (X_j: input feature j over all tokens, ‖X_j‖² divided by the number of
    sequences), D_l = 100 · #{A > M · mean(A)} / #A over all linears of layer l."""
    d = {k: v.detach().double() for k, v in model.state_dict().items()}
    x = d["embed_tokens.weight"][tokens]
    out = []
    for i in range(len(model.layers)):
        pre = f"layers.{i}."
        h = nn.functional.layer_norm(x, x.shape[-1:], d[pre + "norm.weight"], d[pre + "norm.bias"])
        up = h @ d[pre + "up_proj.weight"].T + d[pre + "up_proj.bias"]
        act = nn.functional.gelu(up)
        scores = []
        for name, inp in (("q_proj", h), ("up_proj", h), ("down_proj", act)):
            norm = (inp.reshape(-1, inp.shape[-1]) ** 2).sum(0) / tokens.shape[0]
            scores.append((d[pre + name + ".weight"].abs() * norm.sqrt()).flatten())
        a = torch.cat(scores)
        out.append(100.0 * float((a > threshold * a.mean()).sum()) / a.numel())
        x = x + torch.tanh(h @ d[pre + "q_proj.weight"].T) + act @ d[pre + "down_proj.weight"].T
    return out


def test_owl_ratios_match_a_float64_reference_of_the_definition():
    model = make_model(blocks=4)
    with torch.no_grad():  # plant outliers: a few heavy input columns, more in the later layers
        for i, layer in enumerate(model.layers):
            layer.q_proj.weight[:, : 2 * i + 1] *= 30.0
    tokens = batches(3, batch=4)
    calib = torch.cat([t[:, :-1] for t in tokens])
    ratios = lro.owl_ratios(model, [t[:, :-1] for t in tokens], threshold=5.0)
    expected = reference_owl_ratios(model, calib, 5.0)
    # counts of scores above a threshold: exact as long as no score lies within float32 rounding of the
    # threshold, which this model's scores do not (checked with a margin of 1e-4 relative)
    assert ratios.tolist() == expected
    assert expected == sorted(expected) and expected[0] > 0  # the planted outliers are seen
    s = lro.LayerSampler(model, galore(model), layers=2, probs="owl", calibration=calib, threshold=5.0)
    assert torch.allclose(s.probs, torch.tensor(expected, dtype=torch.float64) / sum(expected), rtol=0, atol=1e-15)


def test_owl_ratios_margin_of_the_reference_case():
    # the exactness claim of the test above: no score within 1e-4 (relative) of M · mean
    model = make_model(blocks=4)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.q_proj.weight[:, : 2 * i + 1] *= 30.0
    calib = torch.cat([t[:, :-1] for t in batches(3, batch=4)])
    low = reference_owl_ratios(model, calib, 5.0 * (1 - 1e-4))
    high = reference_owl_ratios(model, calib, 5.0 * (1 + 1e-4))
    assert low == high


def test_owlore_recipe_uses_the_official_settings():
    model = make_model(blocks=3, dim=32, hidden=48)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.up_proj.weight[:, : i + 1] *= 40.0
    calib = torch.cat([t[:, :-1] for t in batches(2)])
    opt, s = lro.OwLore(model, calib, threshold=5.0)
    low = [g for g in opt.param_groups if g["rank"] is not None][0]
    assert isinstance(opt, lro.GaLoreAdamW)
    assert (low["rank"], low["update_proj_gap"], low["scale"], low["proj_type"]) == (32, 100, 1.0, "std")
    assert opt.defaults["lr"] == 3e-4
    assert (s.every, s.layers, s.num_layers) == (50, 3, 3)  # γ = 5 clamped to 3 layers
    ratios = lro.owl_ratios(model, calib, threshold=5.0)
    assert torch.equal(s.probs, ratios / ratios.sum())


# ----------------------------------------------------------------------------- the training CLI
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="the train extra (transformers) is not installed")

SMALL = ["--config", str(ROOT / "configs" / "llama_tiny.json"), "--batch-size", "4", "--seq-len", "32",
         "--eval-tokens", "256", "--no-progress", "--optimizer", "galore", "--max-steps", "6", "--eval-every", "3",
         "--layer-sampling", "lisa", "--sample-every", "2", "--sample-layers", "2"]


@needs_transformers
def test_cli_layer_sampling_resumes_bit_identically(tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["pretrain", *SMALL, "--out", str(whole)]) == 0
    assert main(["pretrain", *SMALL, "--out", str(parts), "--stop-at", "3"]) == 0
    assert main(["pretrain", *SMALL, "--out", str(parts), "--resume"]) == 0
    a, b = checkpoint.load(whole / "checkpoint.pt"), checkpoint.load(parts / "checkpoint.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["sampler"]["active"].tolist() == b["sampler"]["active"].tolist()
    assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])
    assert a["run"]["layer_sampling"] == {"mode": "lisa", "every": 2, "layers": 2}
    # frozen layers hold no state in the checkpoint: the 9 parameters of each of 2 frozen layers have none
    assert len(a["optimizer"]["state"]) == len(a["model"]) - 2 * 9
    capsys.readouterr()
    assert main(["pretrain", *SMALL[:-6], "--out", str(parts), "--resume"]) == 2  # not resumed without the sampler
    assert "layer_sampling" in capsys.readouterr().err


@needs_transformers
def test_cli_owl_refuses_a_model_without_outliers(tmp_path, capsys):
    rc = main(["pretrain", *SMALL[:-6], "--layer-sampling", "owl", "--out", str(tmp_path / "owl")])
    err = capsys.readouterr().err
    assert rc == 2 and "--owl-threshold 13.0" in err and "lower --owl-threshold" in err


def test_memory_estimate_counts_only_the_sampled_layers_state():
    from lowrank_optim import memory

    cfg = str(ROOT / "configs" / "llama_tiny.json")  # 4 alike decoder layers
    full = memory.estimate(cfg, "galore", rank=32)
    parts = [memory.estimate(cfg, "galore", rank=32, sample_layers=k) for k in (1, 2, 3, 4)]
    states = [r.ours.optimizer_states + r.ours.projections for r in parts]
    per_layer = states[1] - states[0]
    assert per_layer > 0 and states == [states[0] + k * per_layer for k in range(4)]  # linear in the layers
    assert states[3] == full.ours.optimizer_states + full.ours.projections
    assert [r.ours.gradients for r in parts][3] == full.ours.gradients > parts[0].ours.gradients
    assert parts[0].adamw.optimizer_states < full.adamw.optimizer_states  # the AdamW column samples too
    with pytest.raises(ValueError, match="sample_layers"):
        memory.estimate(cfg, "galore", sample_layers=5)
