"""Quantized storage in the optimizers: INT8 moments (state_bits=8), INT4 bases (proj_bits=4), INT8
weights with stochastic rounding (Q-GaLore), and their containers.

The 8-bit rule is checked against a float64 reference written here from its definition (Dettmers
et al. 2022): dequantize, one Adam step, N from the unquantized moments, requantize each block to
the nearest code (an argmin over the code book, not the package's midpoint search).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowrank_optim as lro
from conftest import batches, lm_loss, make_model, roundtrip, train
from lowrank_optim.kernels import code_book
from lowrank_optim.quant import Int4Tensor, Int8Blockwise, Int8Weight, int8_weight_bytes, quantize_model_int8

# Several tests step single plain parameters on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::lowrank_optim.RankFallbackWarning")


# ------------------------------------------------------------------ float64 references
def ref_quantize(x: torch.Tensor, signed: bool, block: int = 256) -> torch.Tensor:
    """x rounded to the nearest code × its block's absmax (float64), by argmin over the book."""
    book = code_book("dynamic", signed).double()
    flat = x.double().reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), block):
        chunk = flat[start:start + block]
        absmax = chunk.abs().max()
        if absmax == 0:
            out[start:start + block] = 0
            continue
        idx = (chunk[:, None] / absmax - book[None, :]).abs().argmin(dim=1)
        out[start:start + block] = book[idx] * absmax
    return out.view(x.shape)


def ref_galore8bit(w0, grads, rank, lr, scale, wd, betas=(0.9, 0.999), eps=1e-8):
    """GaLore (right side, SVD at step 0, no refresh) with moments stored through ref_quantize."""
    w = w0.double().clone()
    b1, b2 = betas
    q = torch.linalg.svd(grads[0].double(), full_matrices=False)[2][:rank]
    m = v = None
    for t, g in enumerate(grads, start=1):
        r = g.double() @ q.T
        m_prev = torch.zeros_like(r) if m is None else m
        v_prev = torch.zeros_like(r) if v is None else v
        m_new = b1 * m_prev + (1 - b1) * r
        v_new = b2 * v_prev + (1 - b2) * r * r
        n = (m_new / (1 - b1**t)) / ((v_new / (1 - b2**t)).sqrt() + eps)
        w = w * (1 - lr * wd) - lr * scale * (n @ q)
        m, v = ref_quantize(m_new, True), ref_quantize(v_new, False)
    return w


def test_galore8bit_matches_the_float64_reference():
    torch.manual_seed(0)
    m_, n_ = 96, 40
    layer = nn.Linear(n_, m_, bias=False)
    w0 = layer.weight.detach().clone()
    grads = [torch.randn(m_, n_) * (0.5 + 0.1 * k) for k in range(4)]
    opt = lro.GaLoreAdamW8bit([{"params": [layer.weight], "rank": 8}], lr=1e-2, weight_decay=0.1,
                              update_proj_gap=100, min_8bit_size=0)
    for g in grads:
        layer.weight.grad = g.clone()
        opt.step()
    state = opt.state[layer.weight]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_absmax"].numel() == 3  # 96×8 = 768
    want = ref_galore8bit(w0, grads, 8, 1e-2, 0.25, 0.1)
    diff = (layer.weight.detach().double() - want).abs()
    # A moment within float32 rounding of a midpoint between two codes may take the other code (the
    # reference decides in float64): one code step of M is ~1.4% of one element's update, 2.5e-3 here,
    # and a flipped element of R (96×8) moves one row of W (40 weights) through project_back.
    assert (diff < 1e-6).double().mean() > 0.95, diff
    assert diff.max() < 1e-4, diff.max()
    assert (layer.weight.detach() - w0).abs().max() > 5e-3  # the steps were real (4 of at most 2.5e-3)


def test_8bit_moments_are_the_nearest_codes_of_the_updated_moments():
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(70, 90))  # plain AdamW with 8-bit states
    opt = lro.LowRankAdamW([p], lr=1e-3, state_bits=8, min_8bit_size=0)
    g1, g2 = torch.randn(70, 90), torch.randn(70, 90)
    p.grad = g1
    opt.step()
    m1 = ref_quantize(0.1 * g1, True)
    s = opt.state[p]
    got = lro.quant.Int8Blockwise(s["exp_avg"], s["exp_avg_absmax"]).dequantize().double()
    torch.testing.assert_close(got, m1, rtol=0, atol=1e-7)
    p.grad = g2
    opt.step()
    m2 = ref_quantize(0.9 * m1 + 0.1 * g2.double(), True)
    got = lro.quant.Int8Blockwise(s["exp_avg"], s["exp_avg_absmax"]).dequantize().double()
    torch.testing.assert_close(got, m2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls,keys", [
    (lro.GaLoreAdamW8bit, {}),
    (lro.APOLLO, {"state_bits": 8}),
    (lro.Fira, {"state_bits": 8}),
    (lro.FRUGAL, {"state_bits": 8}),
])
def test_8bit_states_train_like_32bit(cls, keys):
    data = batches(40)

    def run(extra):
        model = make_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lro.RankFallbackWarning)
            opt = cls(lro.param_groups(model, rank=8, update_proj_gap=10, **extra), lr=1e-2)
        return sum(train(model, opt, data)[-5:]) / 5

    full = run({"state_bits": 32})
    eight = run({**keys, "min_8bit_size": 0})
    assert abs(eight - full) / full < 0.05, (eight, full)


def test_8bit_moment_bytes_are_at_most_half_of_32bit():
    model = make_model(dim=64, hidden=512)
    a = lro.GaLoreAdamW(lro.param_groups(model, rank=16))
    b = lro.GaLoreAdamW8bit(lro.param_groups(model, rank=16), min_8bit_size=0)
    a.init_state()
    b.init_state()
    ratio = b.state_nbytes()["moments"] / a.state_nbytes()["moments"]
    assert ratio <= 0.5 and ratio < 0.27, ratio  # 1 byte + 4 per 256 against 4 bytes


def test_small_moments_stay_float32_under_the_default_threshold():
    model = make_model()  # every moment below 4096 elements
    opt = lro.GaLoreAdamW8bit(lro.param_groups(model, rank=8))
    train(model, opt, batches(1))
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    big = nn.Parameter(torch.randn(64, 128))
    opt2 = lro.GaLoreAdamW8bit([{"params": [big], "rank": 8}])
    big.grad = torch.randn(64, 128)
    opt2.step()
    assert opt2.state[big]["exp_avg"].dtype == torch.float32  # 128×8 = 1024 < 4096
    opt3 = lro.GaLoreAdamW8bit([big])  # plain: 64×128 = 8192 elements
    opt3.step()
    assert opt3.state[big]["exp_avg"].dtype == torch.uint8


def test_8bit_checkpoint_must_be_complete():
    model = make_model()
    opt = lro.GaLoreAdamW8bit(lro.param_groups(model, rank=8), min_8bit_size=0)
    train(model, opt, batches(1))
    sd = roundtrip(opt.state_dict())
    del sd["state"][0]["exp_avg_sq_absmax"]
    fresh = lro.GaLoreAdamW8bit(lro.param_groups(make_model(), rank=8), min_8bit_size=0)
    with pytest.raises(ValueError, match="INT8 moments need uint8 'exp_avg_sq'"):
        fresh.load_state_dict(sd)
    assert not fresh.state


# ------------------------------------------------------------------ INT4 bases
def test_int4_basis_is_close_to_the_svd_and_small():
    torch.manual_seed(0)
    g = torch.randn(300, 200)
    full = lro.projectors.make("svd", 32)
    four = lro.projectors.make("svd", 32, bits=4)
    full.update(g)
    four.update(g)
    p, q = full.basis(), four.basis()
    assert q.dtype == torch.float32 and q.shape == p.shape == (32, 200)
    # 15 levels over each group's range: error at most half a step
    step = (p.max() - p.min()) / 15
    assert (p - q).abs().max() <= step / 2 + 1e-6
    assert four.nbytes() <= 0.15 * full.nbytes(), (four.nbytes(), full.nbytes())
    assert "P" not in four.state_dict() and four.state_dict()["P_packed"].dtype == torch.uint8


def test_qgalore_state_roundtrips_and_uses_int4_and_lazy_refresh():
    model = make_model()
    opt = lro.QGaLoreAdamW(lro.param_groups(model, rank=8, update_proj_gap=2), min_8bit_size=0)
    train(model, opt, batches(12))
    low = [s for s in opt.state.values() if "projector" in s]
    assert low and all("P_packed" in s["projector"] for s in low)
    assert all("lazy_queue" in s for s in low)
    assert all(s["exp_avg"].dtype == torch.uint8 for s in low)
    fresh = lro.QGaLoreAdamW(lro.param_groups(make_model(), rank=8, update_proj_gap=2), min_8bit_size=0)
    fresh.load_state_dict(roundtrip(opt.state_dict()))


# ------------------------------------------------------------------ INT8 weights
def quantized_model(**kw):
    model = make_model(**kw)
    quantize_model_int8(model)
    return model


def test_quantize_model_int8_targets_the_projected_linears():
    model = quantized_model()
    q = model.layers[0].q_proj.weight
    assert isinstance(q, Int8Weight) and isinstance(q, nn.Parameter) and q.requires_grad
    assert q.dtype == torch.float32 and q.shape == (32, 32)
    assert not isinstance(model.lm_head.weight, Int8Weight)
    assert not isinstance(model.embed_tokens.weight, Int8Weight)
    groups = lro.param_groups(model, rank=8)
    assert any(isinstance(p, Int8Weight) for _, p in groups[0]["params"])


def test_int8_linear_forward_and_backward_use_the_dequantized_weight():
    torch.manual_seed(0)
    layer = nn.Linear(300, 40)
    quantize_model_int8(nn.Sequential(layer), target_modules=["0"])
    w = layer.weight.dequantize().detach().requires_grad_()
    x = torch.randn(3, 5, 300, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = layer(x)
    y_ref = nn.functional.linear(x2, w, layer.bias)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    grad_w = layer.weight.grad
    layer.weight.grad = None
    layer.bias.grad = None
    y_ref.backward(g)
    assert type(grad_w) is torch.Tensor and grad_w.dtype == torch.float32
    torch.testing.assert_close(grad_w, w.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_int8_weight_checkpoint_is_tensors_only_and_refuses_a_float_model():
    model = quantized_model()
    train(model, lro.QGaLoreAdamW(lro.param_groups(model, rank=8)), batches(2))
    sd = roundtrip(model.state_dict())  # weights_only=True
    assert "layers.0.q_proj.weight_codes" in sd and "layers.0.q_proj.weight" not in sd
    other = quantized_model(seed=5)
    other.load_state_dict(sd)
    assert torch.equal(other.layers[0].q_proj.weight.codes, model.layers[0].q_proj.weight.codes)
    with pytest.raises(RuntimeError, match="Missing key"):
        make_model().load_state_dict(sd)


def test_int8_weight_refuses_in_place_updates_from_other_optimizers():
    model = quantized_model()
    lm_loss(model, batches(1)[0]).backward()
    before = model.layers[0].q_proj.weight.codes.clone()
    with pytest.raises(RuntimeError, match="INT8-stored weight"):
        torch.optim.SGD([model.layers[0].q_proj.weight], lr=0.1).step()
    assert torch.equal(model.layers[0].q_proj.weight.codes, before)


def test_an_optimizer_built_before_quantizing_refuses_the_replaced_weights():
    """quantize_model_int8 puts a new Parameter in each layer; an optimizer built before it held the old
    float weights, which never get a gradient again: three steps left every INT8 weight as it was, without
    a word. It now refuses, naming the weight and the fix, before changing anything; built after, it trains."""
    model = make_model()
    early = lro.QGaLoreAdamW(lro.param_groups(model, rank=4), lr=1e-2)
    quantize_model_int8(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lm_loss(model, batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match=r"parameter 'layers.0.q_proj.weight' is the float weight that "
                                           r"lro.quantize_model_int8 replaced .* Build the optimizer after"):
        early.step()
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()) and not early.state
    late = lro.QGaLoreAdamW(lro.param_groups(model, rank=4), lr=1e-2)
    late.step()
    assert not torch.equal(model.layers[0].q_proj.weight.dequantize(), before["layers.0.q_proj.weight"].dequantize())


def test_int8_weights_take_at_most_030_of_fp32():
    model = make_model(dim=256, hidden=512, bias=False)
    linear = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m is not model.lm_head]
    fp32 = sum(w.numel() * 4 for w in linear)
    quantize_model_int8(model)
    stored = sum(m.weight.nbytes_stored() for m in model.modules() if isinstance(m, nn.Linear) and m is not model.lm_head)
    assert stored <= 0.3 * fp32, stored / fp32
    assert int8_weight_bytes(model) < sum(p.numel() * 4 for p in make_model(dim=256, hidden=512, bias=False).parameters())


def _qgalore_loss(quantize: bool, stochastic: bool | None) -> float:
    model = make_model(dim=64, hidden=96)
    if quantize:
        quantize_model_int8(model)
    cls = lro.QGaLoreAdamW if quantize else lro.GaLoreAdamW
    opt = cls(lro.param_groups(model, rank=16, update_proj_gap=20, min_8bit_size=0), lr=1e-3,
              stochastic_rounding=stochastic)
    train(model, opt, batches(80))
    with torch.no_grad():
        return sum(lm_loss(model, t).item() for t in batches(4, seed=99)) / 4


def test_qgalore_int8_weights_train_like_fp32_and_need_stochastic_rounding():
    """The paper's ablation: with updates below one grid step (lr 1e-3 here), rounding to nearest
    throws them away; stochastic rounding keeps them in expectation."""
    fp32 = _qgalore_loss(False, None)
    sr = _qgalore_loss(True, None)
    nearest = _qgalore_loss(True, False)
    assert abs(sr - fp32) / fp32 < 0.03, (sr, fp32)
    assert nearest > 1.05 * sr, (nearest, sr)


def test_stochastic_rounding_moves_bf16_weights_by_sub_ulp_updates():
    torch.manual_seed(0)
    w0 = torch.ones(64, 64, dtype=torch.bfloat16)
    out = {}
    for flag in (None, True):
        p = nn.Parameter(w0.clone())
        opt = lro.LowRankAdamW([p], lr=1e-4, weight_decay=0.0, stochastic_rounding=flag)
        for _ in range(20):
            p.grad = torch.ones_like(p)
            opt.step()
        out[flag] = p.detach().float().mean().item()
    assert out[None] == 1.0  # 1e-4 steps are below bf16's half ulp at 1 (2^-8): rounded away
    assert abs(out[True] - (1.0 - 20 * 1e-4)) < 5e-4  # in expectation the 20 steps arrive


# ------------------------------------------------------------------ containers and errors
def test_containers_roundtrip_through_weights_only_checkpoints():
    torch.manual_seed(0)
    x = torch.randn(33, 77)
    q8 = Int8Blockwise.quantize(x)
    q8b = Int8Blockwise.from_state_dict(roundtrip(q8.state_dict()))
    assert torch.equal(q8b.dequantize(), q8.dequantize())
    assert q8.nbytes() == 33 * 77 + 4 * 10
    for group in (256, "row"):
        q4 = Int4Tensor.quantize(x, group=group)
        q4b = Int4Tensor.from_state_dict(roundtrip(q4.state_dict(prefix="w_")), prefix="w_")
        assert torch.equal(q4b.dequantize(), q4.dequantize())
        assert q4.dequantize().shape == x.shape
    assert Int4Tensor.quantize(x, group="row").scale.numel() == 33


@pytest.mark.parametrize("bad,match", [
    ({"state_bits": 4}, "invalid state_bits=4: choose 32"),
    ({"proj_bits": 8}, "invalid proj_bits=8"),
    ({"projector": "random", "proj_bits": 4}, "projector='random' stores no dense basis"),
    ({"stochastic_rounding": "yes"}, "invalid stochastic_rounding='yes'"),
    ({"min_8bit_size": -1}, "invalid min_8bit_size=-1"),
])
def test_bad_quantization_keys_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        lro.GaLoreAdamW(lro.param_groups(make_model(), rank=8, **bad))


def test_non_finite_values_are_refused_by_the_quantizers():
    x = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="inf or NaN"):
        Int8Blockwise.quantize(x)
    with pytest.raises(ValueError, match="inf or NaN"):
        Int4Tensor.quantize(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="signed=True"):
        Int8Blockwise.quantize(torch.tensor([-1.0]), signed=False)


def test_layerwise_qgalore_on_int8_weights_equals_the_ordinary_loop():
    """Accumulation of 2 and clipping, INT8 weights, 8-bit states, INT4 bases: bit for bit on CPU."""
    data = batches(6)

    def run(layerwise: bool):
        model = quantized_model()
        opt = lro.QGaLoreAdamW(lro.param_groups(model, rank=8, update_proj_gap=3, min_8bit_size=0), lr=1e-2)
        if layerwise:
            handle = lro.layerwise(model, opt, accumulation_steps=2, max_grad_norm=1.0)
            for tokens in data:
                handle.backward(lm_loss(model, tokens) / 2)
            handle.remove()
        else:
            for i, tokens in enumerate(data):
                (lm_loss(model, tokens) / 2).backward()
                if i % 2:
                    # over the model's parameters in its order, as lro.layerwise documents (it sums the norms
                    # in that order); the optimizer's order sums them in another, which can differ in the last
                    # bit (seen at OMP_NUM_THREADS=1)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad()
        return model

    a, b = run(False), run(True)
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        same = torch.equal(x.codes, y.codes) and torch.equal(x.scale, y.scale) if isinstance(x, Int8Weight) else torch.equal(x, y)
        assert same, name
    assert any(isinstance(p, Int8Weight) for p in a.parameters())


def test_8bit_adam_rows_with_a_zero_gradient_stay_bounded():
    """V is a square and underflows its block's smallest level long before M does; read as 0, a step
    where the element's gradient is exactly 0 (an embedding row absent from the batch) divided M by ε
    alone and moved the weight by ~100·lr. Code 0 of V now reads as half the smallest level: every step
    stays within Adam's bound (|N| ≤ (1 − β₁)/√(1 − β₂) ≈ 3.2 on a first step, ~1 after)."""
    import warnings

    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.zeros(128, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        opt = lro.LowRankAdamW([W], lr=1.0, state_bits=8, min_8bit_size=0, weight_decay=0.0)
    for _ in range(6):
        g = torch.randn(128, 64) * torch.logspace(-6, -1, 64)  # a wide range of magnitudes per row
        g[torch.rand(128) < 0.5] = 0.0  # rows absent from this batch
        before = W.detach().clone()
        W.grad = g
        opt.step()
        assert (W.detach() - before).abs().max() < 3.5


def _int8_linear(group, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 16, bias=False), nn.ReLU(), nn.Linear(16, 4))
    return quantize_model_int8(model, target_modules=["0"], group=group)


def test_int8_checkpoint_refuses_a_model_quantized_with_another_group():
    """A 16x32 weight has 2 groups at group=300 and at group=256: the shapes of codes, scales and zero points
    agree, so the load used to decode the codes with the destination's group (a silently different weight).
    The checkpoint now records its group and the load names both, before copying anything."""
    src, dst = _int8_linear(300), _int8_linear(256, seed=1)
    assert src[0].weight.scale.shape == dst[0].weight.scale.shape
    sd = roundtrip(src.state_dict())
    assert int(sd["0.weight_group"]) == 300
    before = dst[0].weight.codes.clone()
    with pytest.raises(RuntimeError, match=r"0.weight: the checkpoint's INT8 weight was quantized with group=300, "
                                           r"but this model's uses group=256.*group=300"):
        dst.load_state_dict(sd)
    assert torch.equal(dst[0].weight.codes, before)
    same = _int8_linear(300, seed=1)
    same.load_state_dict(sd)
    assert torch.equal(same[0].weight.dequantize(), src[0].weight.dequantize())


def test_int8_checkpoint_without_a_group_record_is_taken_as_the_default_group():
    """Checkpoints written before the group was recorded load as group 256 (the only default there was), and
    a model quantized with another group is told how to state the checkpoint's group."""
    sd = _int8_linear(256).state_dict()
    del sd["0.weight_group"]
    _int8_linear(256, seed=1).load_state_dict(sd)
    with pytest.raises(RuntimeError, match=r"does not record its group .* taken as the default 256.*"
                                           r"state_dict\['0.weight_group'\] = torch.tensor\(N\)"):
        _int8_linear(300, seed=1).load_state_dict(sd)
