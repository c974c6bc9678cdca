"""SLTrain (Han et al. 2024): lro.nn.SparseLowRankLinear against W = (alpha/r) B A + S formed densely."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import batches, lm_loss, make_model, train, train_and_resume
from torch import nn

import lowrank_optim as lro
from lowrank_optim.allocations import Allocations
from lowrank_optim.models import llama_skeleton, load_config
from lowrank_optim.nn import SparseLowRankLinear, parse_sltrain, to_sltrain


def reference_weight(layer: SparseLowRankLinear, a, b, values) -> torch.Tensor:
    """The paper's W = (alpha / r) B A + S in float64, S scattered from the support (row, col) pairs."""
    rows = torch.repeat_interleave(torch.arange(layer.out_features), torch.diff(layer.sparse_crow.long()))
    s = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    s = s.index_put((rows, layer.sparse_col.long()), values)
    return layer.alpha / layer.rank * b @ a + s


def layer_and_input(dtype=torch.float64, bias=True, out=48, inp=40, rank=6, density=0.1):
    torch.manual_seed(0)
    layer = SparseLowRankLinear(inp, out, rank, density, alpha=8.0, bias=bias, seed=3).to(dtype)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; a nonzero B makes every gradient path count
    x = torch.randn(2, 3, inp, dtype=dtype, requires_grad=True)
    return layer, x


def grads_of(layer, x, grad_y, weight_fn=None):
    params = [x, layer.lora_A, layer.lora_B, layer.sparse_value] + ([layer.bias] if layer.bias is not None else [])
    if weight_fn is None:
        y = layer(x)
    else:  # the dense float64 reference: autograd through the formed W
        y = x @ weight_fn().T + (layer.bias if layer.bias is not None else 0)
    return [y] + list(torch.autograd.grad(y, params, grad_y))


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_the_dense_reference(bias):
    layer, x = layer_and_input(bias=bias)
    grad_y = torch.randn(2, 3, 48, dtype=torch.float64)
    ours = grads_of(layer, x, grad_y)
    ref = grads_of(layer, x, grad_y, lambda: reference_weight(layer, layer.lora_A, layer.lora_B, layer.sparse_value))
    # float64 throughout: the two differ only by summation order, ~1e-15 relative; 1e-12 leaves margin
    for name, a, b in zip(["y", "x", "A", "B", "S", "bias"], ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_float32_layer_matches_the_float64_reference():
    layer, x = layer_and_input(dtype=torch.float32)
    grad_y = torch.randn(2, 3, 48)
    ours = grads_of(layer, x, grad_y)
    layer64 = layer.double()
    x64 = x.detach().double().requires_grad_()
    ref = grads_of(layer64, x64, grad_y.double(),
                   lambda: reference_weight(layer64, layer64.lora_A, layer64.lora_B, layer64.sparse_value))
    # float32 sums of at most 48 products of O(1) terms: rounding ~48 * 6e-8 relative; 1e-5 is ~4x that
    for name, a, b in zip(["y", "x", "A", "B", "S", "bias"], ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)


def test_backward_forms_no_out_by_in_tensor():
    layer, x = layer_and_input(dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    grad_y = torch.randn_like(y)
    with Allocations() as seen:
        y.backward(grad_y)
    full = layer.out_features * layer.in_features
    assert max(saved) < full and seen.largest < full, (max(saved), seen.largest, full)
    # the tracker does see a formed W: a dense linear's backward returns an out×in weight gradient
    dense = nn.Linear(layer.in_features, layer.out_features)
    yd = dense(x)
    with Allocations() as seen_dense:
        yd.backward(grad_y)
    assert seen_dense.largest == full


def test_initialization_and_support_follow_the_official_code():
    layer = SparseLowRankLinear(200, 300, 16, 0.03, seed=1)
    nnz = int(0.03 * 200 * 300)
    assert layer.sparse_value.shape == (nnz,) and layer.sparse_col.dtype == torch.int32
    crow = layer.sparse_crow.long()
    assert crow[0] == 0 and crow[-1] == nnz and bool((torch.diff(crow) >= 0).all())
    flat = torch.repeat_interleave(torch.arange(300), torch.diff(crow)) * 200 + layer.sparse_col.long()
    assert bool((torch.diff(flat) > 0).all())  # sorted, no entry twice
    bound = 1 / math.sqrt(200)
    assert float(layer.lora_B.detach().abs().max()) == 0.0
    assert float(layer.lora_A.detach().abs().max()) <= bound and float(layer.sparse_value.detach().abs().max()) <= bound
    # uniform on (-bound, bound): the spread is near its std bound / sqrt(3), not a narrower init's
    assert abs(float(layer.lora_A.detach().std()) - bound / math.sqrt(3)) < 0.05 * bound
    again = SparseLowRankLinear(200, 300, 16, 0.03, seed=1)
    other = SparseLowRankLinear(200, 300, 16, 0.03, seed=2)
    assert torch.equal(again.sparse_col, layer.sparse_col) and not torch.equal(other.sparse_col, layer.sparse_col)
    # a uniform support: every row holds about density * in entries (binomial, sd ~2.4 of mean 6)
    assert 2.0 < float(torch.diff(crow).float().mean()) < 10.0 and layer.scale == 32.0 / 16


def test_to_sltrain_on_the_llama_skeleton_replaces_attention_and_mlp_only():
    model = to_sltrain(llama_skeleton("configs/llama_tiny.json"), rank=8, density=0.03)
    replaced = [n for n, m in model.named_modules() if isinstance(m, SparseLowRankLinear)]
    assert len(replaced) == 4 * 7 and all(("self_attn" in n) or ("mlp" in n) for n in replaced)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.shape == (8, 128) and q.lora_B.shape == (128, 8) and q.sparse_value.is_meta


def test_to_sltrain_trains_with_adamw_and_our_plain_path():
    data = batches(40)
    for make_opt in (lambda p: torch.optim.AdamW(p, lr=3e-3), lambda p: lro.LowRankAdamW(p, lr=3e-3)):  # no rank: the plain AdamW path
        model = to_sltrain(make_model(), rank=4, density=0.05, seed=0)
        assert sum(isinstance(m, SparseLowRankLinear) for m in model.modules()) == 6  # lm_head kept dense
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lro.RankFallbackWarning)
            opt = make_opt(list(model.parameters()))
        losses = train(model, opt, data)
        assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_checkpoint_resume_is_bit_identical():
    def make(seed=0):  # the twin's own weights and support differ until it loads the checkpoint
        return to_sltrain(make_model(seed), rank=4, density=0.05, seed=seed)

    model, _, twin, _ = train_and_resume(lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3), batches(8), 4, make)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert float(lm_loss(model, batches(1, seed=5)[0])) == float(lm_loss(twin, batches(1, seed=5)[0]))


@pytest.mark.parametrize("kwargs, word", [
    ({"rank": 0}, "rank"), ({"rank": 33}, "rank"), ({"density": 0.0}, "density"), ({"density": 1.5}, "density"),
    ({"density": 1e-6}, "density"), ({"alpha": -1.0}, "alpha"), ({"target_modules": ["nothing_like_this"]}, "target_modules"),
    ({"target_modules": []}, "target_modules"),
])
def test_bad_arguments_are_refused_before_any_layer_is_replaced(kwargs, word):
    model = make_model()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=word):
        to_sltrain(model, **{"rank": 4, "density": 0.05, **kwargs})
    assert {n: type(m) for n, m in model.named_modules()} == before
    with pytest.raises(TypeError, match="seed"):
        to_sltrain(model, rank=4, seed=True)


def test_bf16_runs_on_cpu_through_float32_sparse_products():
    layer, x = layer_and_input(dtype=torch.float32, bias=False)
    y32 = layer(x)
    y16 = layer.to(torch.bfloat16)(x.detach().to(torch.bfloat16).requires_grad_())
    y16.sum().backward()
    # bf16 keeps 8 significant bits: ~4e-3 relative per rounding, a few roundings deep; outputs are O(3)
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=6e-2)
    assert layer.sparse_value.grad.dtype == torch.bfloat16


def test_parse_sltrain_reads_the_cli_spec_and_refuses_bad_ones():
    assert parse_sltrain("128:0.03") == (128, 0.03, 32.0) and parse_sltrain("8:0.05:8") == (8, 0.05, 8.0)
    for bad, word in (("128", "RANK:DENSITY"), ("x:0.1", "integer rank"), ("8:1.5", "density"), ("0:0.1", "rank"),
                      ("8:0.1:0", "alpha")):
        with pytest.raises(ValueError, match=word):
            parse_sltrain(bad)


def test_memory_counts_factors_values_support_and_adamw_state():
    cfg = load_config("configs/llama_tiny.json")
    report = lro.memory.estimate_sltrain(cfg, "8:0.05", weights="fp32")
    h, inter, vocab, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    shapes = [(h, h)] * 4 + [(inter, h)] * 2 + [(h, inter)]  # (out, in): q k v o, gate up, down
    factors = sum(8 * (o + i) + int(0.05 * o * i) for o, i in shapes) * layers
    support = sum(4 * (int(0.05 * o * i) + o + 1) for o, i in shapes) * layers  # int32 columns + row pointers
    dense_rest = 2 * vocab * h + (2 * layers + 1) * h  # embeddings, head, norms
    params = factors + dense_rest
    assert report.ours.weights == 4 * params + support and report.ours.gradients == 4 * params
    tensors = layers * (7 * 3 + 2) + 3  # A, B, values per replaced layer; 2 norms per layer; embed, norm, head
    assert report.ours.optimizer_states == 2 * 4 * params + 4 * tensors  # AdamW: 2 moments + a float32 step each
    assert report.adamw == lro.memory.estimate(cfg, "adamw", weights="fp32").adamw
    with pytest.raises(ValueError, match="int8"):
        lro.memory.estimate_sltrain(cfg, "8:0.05", weights="int8")


def test_cli_memory_and_pretrain_flags(capsys):
    from lowrank_optim.cli import main

    assert main(["memory", "--config", "configs/llama_tiny.json", "--optimizer", "adamw", "--sltrain", "8:0.05"]) == 0
    assert "sltrain" in capsys.readouterr().out
    assert main(["memory", "--config", "configs/llama_tiny.json", "--sltrain", "8:0.05"]) == 2  # galore: refused
    assert "--optimizer adamw" in capsys.readouterr().err
    from lowrank_optim.train import TrainArgs
    from lowrank_optim.train.errors import TrainError
    from lowrank_optim.train.loop import check_args

    with pytest.raises(TrainError, match="--sltrain"):
        check_args(TrainArgs(config="configs/llama_tiny.json", optimizer="adamw", sltrain="8:2"))
    with pytest.raises(TrainError, match="--fsdp"):
        check_args(TrainArgs(config="configs/llama_tiny.json", optimizer="adamw", sltrain="8:0.05", fsdp=True))
