"""Memory accounting: eager state equals a real step's state, and the report adds it up honestly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import lowrank_optim as lro
from conftest import PRESET_CASES, batches, make_model, train
from lowrank_optim.cli import main
from lowrank_optim.models import llama_skeleton

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "llama_60m.json")

CASES = PRESET_CASES


def build(cls, keys, dtype=torch.float32):
    model = make_model(dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        opt = cls(lro.param_groups(model, **{"rank": 8, "update_proj_gap": 2, **keys}), lr=1e-3)
    return model, opt


def state_shapes(opt):
    out = {}
    for k, (p, s) in enumerate(opt.state.items()):
        for key, v in s.items():
            if isinstance(v, torch.Tensor):
                out[(k, key)] = (tuple(v.shape), v.dtype)
            elif isinstance(v, dict):
                out[(k, key)] = {kk: (tuple(vv.shape), vv.dtype) if isinstance(vv, torch.Tensor) else type(vv)
                                 for kk, vv in v.items()}
    return out


@pytest.mark.parametrize("name,cls,keys", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_state_is_the_state_real_steps_build(name, cls, keys, dtype):
    """Same keys, shapes, dtypes and bytes as after three real steps (with a refresh). Q-GaLore's lazy
    schedule included: its queue of 5 and its gap are there from the start (a distributed checkpoint loads
    only the keys init_state builds; they used to appear at refreshes and were dropped on resume)."""
    _, eager = build(cls, keys, dtype)
    eager.init_state()
    model, real = build(cls, keys, dtype)
    train(model, real, batches(3))
    assert state_shapes(eager) == state_shapes(real)
    assert eager.state_nbytes() == real.state_nbytes()


@pytest.mark.parametrize("name,cls,keys", CASES[:5], ids=[c[0] for c in CASES[:5]])
def test_init_state_changes_no_numbers(name, cls, keys):
    data = batches(5)
    a_model, a = build(cls, keys)
    b_model, b = build(cls, keys)
    b.init_state()
    train(a_model, a, data)
    train(b_model, b, data)
    for (n, x), y in zip(a_model.named_parameters(), b_model.parameters()):
        assert torch.equal(x, y), n


def test_init_state_works_on_the_meta_device():
    model = llama_skeleton(CONFIG)
    opt = lro.APOLLO(lro.param_groups(model, rank=64))
    opt.init_state()
    nb = opt.state_nbytes()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert opt.state[q]["exp_avg"].device.type == "meta" and opt.state[q]["exp_avg"].shape == (512, 64)
    assert nb["projectors"] == 8 * 56  # a seed per projected weight, nothing else


def test_skeleton_matches_transformers_llama():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    for name in ("llama_tiny", "llama_60m"):
        cfg = transformers.LlamaConfig.from_json_file(str(ROOT / "configs" / f"{name}.json"))
        with torch.device("meta"):
            ref = transformers.LlamaForCausalLM(cfg)
        ours = llama_skeleton(ROOT / "configs" / f"{name}.json")
        assert [(k, tuple(p.shape)) for k, p in ours.named_parameters()] == [
            (k, tuple(p.shape)) for k, p in ref.named_parameters()
        ]


@pytest.mark.parametrize("optimizer,cls,keys", [("galore", lro.GaLoreAdamW, {}), ("apollo", lro.APOLLO, {}),
                                                ("fira", lro.Fira, {}), ("galore", lro.GaLoreAdamW, {"projector": "dct"})])
def test_estimate_equals_measured_state_of_a_real_model(optimizer, cls, keys):
    model = make_model()
    report = lro.memory.estimate(model, optimizer, rank=8, **keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        opt = cls(lro.param_groups(model, rank=8, **keys), lr=1e-3)
    train(model, opt, batches(2))
    nb = opt.state_nbytes()
    shared = lro.projectors.dct.shared_basis_nbytes() if keys.get("projector") == "dct" else 0
    assert report.ours.optimizer_states == nb["moments"] + nb["other"]
    if shared:  # every projected side of this model is 32 long: one 32×32 basis, counted once
        assert report.ours.projections == nb["projectors"] + 32 * 32 * 4
    else:
        assert report.ours.projections == nb["projectors"]
    # AdamW's column is torch.optim.AdamW's own state after a real step
    ref_model = make_model()
    ref = torch.optim.AdamW(ref_model.parameters())
    train(ref_model, ref, batches(1))
    assert report.adamw.optimizer_states == sum(v.numel() * v.element_size() for s in ref.state.values() for v in s.values())
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert report.ours.weights == report.adamw.weights == weights == report.ours.gradients
    assert report.ours.total == weights * 2 + report.ours.optimizer_states + report.ours.projections


def test_a_float64_model_s_shared_dct_basis_counts_8_bytes_an_element():
    """projectors.dct keeps a float64 basis for float64 weights; the estimate counted 4 bytes an element
    (a QA pass: 16,384 B counted for d=64 against 32,768 held)."""
    model = make_model(dtype=torch.float64)
    report = lro.memory.estimate(model, "galore", rank=8, projector="dct")
    opt = lro.GaLoreAdamW(lro.param_groups(model, rank=8, projector="dct"), lr=1e-3)
    train(model, opt, batches(1))
    assert report.ours.projections == opt.state_nbytes()["projectors"] + 32 * 32 * 8


def test_estimate_with_int8_weights_and_8bit_states_equals_the_real_thing():
    """--weights int8 counts what quantize_model_int8 stores; --state-bits 8 what the optimizer keeps,
    and 8-bit AdamW's baseline is our plain 8-bit AdamW's real state."""
    model = make_model(dim=64, hidden=128)
    report = lro.memory.estimate(model, "qgalore", rank=8, weights="int8", state_bits=8, min_8bit_size=0)
    lro.quantize_model_int8(model)
    opt = lro.QGaLoreAdamW(lro.param_groups(model, rank=8, min_8bit_size=0), state_bits=8)
    train(model, opt, batches(2))
    nb = opt.state_nbytes()
    assert report.ours.weights == lro.quant.int8_weight_bytes(model)
    assert report.ours.optimizer_states == nb["moments"] + nb["other"]
    assert report.ours.projections == nb["projectors"]
    assert report.adamw.weights == sum(p.numel() * 4 for p in make_model(dim=64, hidden=128).parameters())
    big = lro.memory.estimate(CONFIG, "galore", state_bits=8)
    plain = lro.memory.estimate(CONFIG, "galore")
    assert big.adamw.optimizer_states < 0.55 * plain.adamw.optimizer_states  # bf16 moments → INT8
    assert big.ours.optimizer_states < 0.5 * plain.ours.optimizer_states  # fp32 low-rank, bf16 plain → INT8
    with pytest.raises(ValueError, match="AdamW cannot update INT8 weights"):
        lro.memory.estimate(CONFIG, "adamw", weights="int8")


def test_a_model_quantized_already_counts_its_int8_weights_and_buffers_count_too():
    """Quantize, then estimate (the README's order): the INT8 weights counted at float32 size, 2x the bytes
    held; and buffers (SLTrain's support indices) were left out, 15% under estimate_sltrain's count (a QA
    pass). Both are counted as held now; AdamW's column keeps the float weights it would need."""
    model = make_model(dim=64, hidden=128)
    floats = sum(p.numel() * 4 for p in model.parameters())
    lro.quantize_model_int8(model)
    report = lro.memory.estimate(model, "qgalore", rank=8)
    assert report.ours.weights == lro.quant.int8_weight_bytes(model) < 0.6 * floats
    assert report.adamw.weights == floats
    assert lro.memory.estimate(model, "qgalore", rank=8, weights="int8").ours.weights == report.ours.weights
    sparse = lro.nn.to_sltrain(llama_skeleton(CONFIG, device="cpu"), 16, 0.05)
    held = sum(t.numel() * t.element_size() for t in (*sparse.parameters(), *sparse.buffers()))
    assert sum(b.numel() for b in sparse.buffers()) > 0
    assert lro.memory.estimate(sparse, "adamw").ours.weights == held
    assert lro.memory.estimate_sltrain(CONFIG, "16:0.05", weights="fp32").ours.weights == held


def test_layerwise_with_accumulation_counts_every_gradient_and_the_table_says_which():
    """The first k - 1 backward passes of lro.layerwise(accumulation_steps=k) hold every gradient: the 7B
    rows at --layerwise were 12 GiB short of that for anyone accumulating (a QA pass)."""
    one = lro.memory.estimate(CONFIG, "galore", layerwise=True)
    four = lro.memory.estimate(CONFIG, "galore", layerwise=True, accumulation_steps=4)
    assert one.ours.gradients == 32000 * 512 * 2 and four.ours.gradients == 58_073_600 * 2
    assert "one micro-batch per step" in one.table() and "first 3 backward passes" in four.table()
    assert lro.memory.estimate(CONFIG, "galore", accumulation_steps=4).ours.gradients == four.ours.gradients
    sl = lro.memory.estimate_sltrain(CONFIG, "16:0.05", layerwise=True, accumulation_steps=4)
    assert sl.ours.gradients > lro.memory.estimate_sltrain(CONFIG, "16:0.05", layerwise=True).ours.gradients
    with pytest.raises(ValueError, match="accumulation_steps must be an integer >= 1"):
        lro.memory.estimate(CONFIG, "galore", accumulation_steps=0)


def test_sample_layers_counts_a_draw_on_a_model_mid_run():
    """Mid-LISA (the sampler left layers out) the estimate counted no decoder layer at all, 30% under the
    state a draw holds (a QA pass): a layer frozen whole counts as one a draw may pick."""
    model = llama_skeleton(CONFIG, device="cpu")
    fresh = lro.memory.estimate(model, "galore", rank=16, sample_layers=1)
    for i, layer in enumerate(model.model.layers):  # what LayerSampler leaves after a draw of layer 2
        layer.requires_grad_(i == 2)
    live = lro.memory.estimate(model, "galore", rank=16, sample_layers=1)
    assert live.ours.to_dict() == fresh.ours.to_dict()
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)  # frozen by the user, not by a draw
    model.model.layers[0].mlp.requires_grad_(True)
    partial = lro.memory.estimate(model, "galore", rank=16, sample_layers=1)
    assert partial.ours.gradients < fresh.ours.gradients


def test_cli_memory_refuses_flags_it_would_ignore(capsys):
    for argv, match in ((["--optimizer", "adamw", "--sltrain", "16:0.05", "--sample-layers", "2"], "--sample-layers"),
                        (["--optimizer", "galore", "--ef-bits", "8"], "invalid ef_bits=8: it sets residual="),
                        (["--measure", "--grad-accum", "2"], "drop --grad-accum")):
        assert main(["memory", "--config", CONFIG, *argv]) == 2
        assert match in capsys.readouterr().err, argv


def test_cli_memory_int8_and_8bit_json(capsys):
    argv = ["memory", "--config", str(ROOT / "configs" / "llama_7b.json"), "--optimizer", "apollo_mini",
            "--weights", "int8", "--state-bits", "8", "--layerwise", "--batch", "1", "--seq", "2048",
            "--checkpointing", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ours"]["total"] < 12 * 10**9  # APOLLO-Mini's "7B under 12 GB with INT8 weights"
    assert out["ours"]["weights"] < 0.55 * out["adamw"]["weights"]
    assert main(argv[:-1]) == 0
    assert "adamw8bit" in capsys.readouterr().out


def test_layerwise_keeps_one_gradient_and_checkpointing_shrinks_activations():
    full = lro.memory.estimate(CONFIG, "galore", batch=2, seq=256)
    lw = lro.memory.estimate(CONFIG, "galore", batch=2, seq=256, layerwise=True)
    ck = lro.memory.estimate(CONFIG, "galore", batch=2, seq=256, checkpointing=True)
    double = lro.memory.estimate(CONFIG, "galore", batch=4, seq=256)
    assert full.ours.gradients == 58_073_600 * 2  # every bf16 gradient
    assert lw.ours.gradients == 32000 * 512 * 2  # the largest one: the embedding's
    assert ck.ours.activations < full.ours.activations
    assert double.ours.activations == 2 * full.ours.activations
    assert full.ours.optimizer_states < full.adamw.optimizer_states


def test_cli_memory_json_and_table(capsys):
    assert main(["memory", "--config", str(ROOT / "configs" / "llama_7b.json"), "--optimizer", "apollo_mini", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"ours", "adamw"}
    for side in out.values():
        assert set(side) == {"weights", "gradients", "optimizer_states", "projections", "activations", "total"}
        assert side["total"] == sum(v for k, v in side.items() if k != "total")
    assert out["ours"]["optimizer_states"] < out["adamw"]["optimizer_states"] / 5
    assert main(["memory", "--config", CONFIG, "--rank", "128", "--batch", "1", "--seq", "512", "--checkpointing"]) == 0
    table = capsys.readouterr().out
    assert "| optimizer_states" in table and "galore" in table and "adamw" in table


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--optimizer", "sgd"], "unknown optimizer 'sgd'"),
        (["--batch", "2"], "give both batch and seq"),
        (["--batch", "0", "--seq", "8"], "batch must be an integer >= 1"),
    ],
)
def test_cli_memory_errors(capsys, argv, match):
    assert main(["memory", "--config", CONFIG, *argv]) == 2
    assert match in capsys.readouterr().err
    assert main(["memory", "--config", "configs/nope.json"]) == 2
    assert "no config file" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer,layerwise,checkpointing", [("galore", False, False), ("apollo_mini", True, True),
                                                               ("adamw", True, False)])
def test_real_steps_of_the_measured_setup_run(optimizer, layerwise, checkpointing):
    """--measure's training loop, on the CPU (the peak itself is read from CUDA's allocator)."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    losses = lro.memory.train_steps(ROOT / "configs" / "llama_tiny.json", optimizer, rank=32, weights="fp32",
                                    layerwise=layerwise, batch=2, seq=16, checkpointing=checkpointing,
                                    steps=2, device="cpu")
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no CUDA GPU exists")
def test_measure_without_cuda_is_a_clear_error(capsys):
    assert main(["memory", "--config", CONFIG, "--measure"]) == 2
    assert "needs none" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to measure peak memory")
def test_measured_peak_is_near_the_estimate():
    kw = dict(rank=32, weights="bf16", batch=2, seq=128)
    peak = lro.memory.measure_peak(ROOT / "configs" / "llama_tiny.json", "galore", **kw)
    est = lro.memory.estimate(ROOT / "configs" / "llama_tiny.json", "galore", **kw).ours.total
    assert 0.5 * est < peak < 2.0 * est


def test_memory_says_when_a_rank_leaves_weights_unprojected_and_when_activations_are_left_out(capsys):
    assert main(["memory", "--config", str(ROOT / "configs" / "llama_7b.json"), "--rank", "4096"]) == 0
    out = capsys.readouterr().out
    assert "rank 4096 leaves 224 of the 224 linear weights unprojected" in out and "rank below 4096" in out
    assert "The totals leave out activations" in out and "--batch and --seq" in out
    assert main(["memory", "--config", str(ROOT / "configs" / "llama_7b.json"), "--batch", "1", "--seq", "64"]) == 0
    out = capsys.readouterr().out
    assert "unprojected" not in out and "leave out activations" not in out
    assert "rank=1024" in out  # the preset's rank at width 4096: a quarter of it, GaLore's 7B rank
