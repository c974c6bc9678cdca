"""DCT-AdamW (Modoranu et al. 2025, arXiv:2505.17967): the two DCT bases and their column selection, the
error-feedback residual (E ← A − Π(A), A = G + E) with every projector, its 8- and 4-bit buffers, the
preset against the official ``ista_daslab_optimizers.DCTAdamW``, resume, refusals and FSDP2 row shards."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_same_parameters, batches, ista_module, make_model, spawn_two, train_and_resume

import lowrank_optim as lro
from lowrank_optim.optim.reference import ReferenceLowRankAdamW
from lowrank_optim.projectors import dct as dct_module


# ---------------------------------------------------------------------------- the two bases
def dct2_matrix(d: int) -> torch.Tensor:
    """C[k, j] = c_k cos(π k (2j + 1) / 2d): the orthonormal DCT-II matrix, frequencies as rows (the
    official ``dct3_matrix``), written from the definition."""
    k = torch.arange(d, dtype=torch.float64)[:, None]
    j = torch.arange(d, dtype=torch.float64)[None, :]
    c = torch.full((d, 1), math.sqrt(2.0 / d), dtype=torch.float64)
    c[0] = math.sqrt(1.0 / d)
    return c * torch.cos(math.pi * k * (2 * j + 1) / (2 * d))


@pytest.mark.parametrize("d", [7, 24, 33])
def test_variant_bases_are_the_dct2_and_dct3_vectors(d):
    """makhoul: the DCT-II vectors (rows of C) as columns; matmul (the official default): C's columns,
    the DCT-III vectors, as the official code uses ``Q = dct3_matrix`` with ``Q[:, idx]``."""
    c = dct2_matrix(d)
    torch.testing.assert_close(dct_module.variant_basis(d, "makhoul", torch.float64, "cpu"), c.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(dct_module.variant_basis(d, "matmul", torch.float64, "cpu"), c, rtol=0, atol=1e-12)
    for variant in dct_module.VARIANTS:
        b = dct_module.variant_basis(d, variant, torch.float64, "cpu")
        torch.testing.assert_close(b.T @ b, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [8, 25, 64])
def test_makhoul_fft_is_the_orthonormal_dct2(n):
    """The FFT path equals scipy's orthonormal DCT-II (float64: 1e-12 is ~100 ε of values of size ~1)."""
    scipy_fft = pytest.importorskip("scipy.fft", reason="scipy is not installed")
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    want = torch.from_numpy(scipy_fft.dct(x.numpy(), norm="ortho", axis=-1))
    torch.testing.assert_close(dct_module.dct2_rows(x), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["makhoul", "matmul"])
@pytest.mark.parametrize("shape,side", [((40, 24), "right"), ((24, 40), "left")])
def test_selection_is_the_top_l1_columns_of_the_variant(variant, shape, side):
    """Scores: ℓ1 norms of the columns of A·B (right) or rows of Bᵀ·A (left); the r best, ascending."""
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    d = shape[1] if side == "right" else shape[0]
    b = dct2_matrix(d).T if variant == "makhoul" else dct2_matrix(d)
    scores = (g @ b).abs().sum(0) if side == "right" else (b.T @ g).abs().sum(1)
    want = torch.sort(torch.topk(scores, 6).indices).values
    proj = lro.projectors.make("dct", 6, dct_variant=variant)
    proj.update(g)
    assert proj.side == side and proj.state_dict()["idx"].tolist() == want.tolist()
    cols = b[:, want]
    torch.testing.assert_close(proj.basis(dtype=torch.float64), cols if side == "left" else cols.T, rtol=0, atol=1e-12)
    low = proj.project(g)
    torch.testing.assert_close(low, cols.T @ g if side == "left" else g @ cols, rtol=0, atol=1e-12)
    assert proj.nbytes() == 6 * 8  # the indices only


@pytest.mark.parametrize("saved, loaded, shape", [("matmul", "makhoul", (20, 12)), ("trion", "matmul", (12, 20))])
def test_a_loaded_state_of_another_variant_is_refused(saved, loaded, shape):
    proj = lro.projectors.make("dct", 4, dct_variant=saved)
    proj.update(torch.randn(shape))
    other = lro.projectors.make("dct", 4, dct_variant=loaded)
    with pytest.raises(ValueError, match=f"dct_variant='{saved}'"):
        other.load_state_dict(proj.state_dict())
    if loaded == "makhoul":
        legacy = {k: v for k, v in proj.state_dict().items() if k != "variant"}
        other.load_state_dict(legacy)  # a checkpoint of before the variants: the makhoul basis


# ---------------------------------------------------------------------------- error feedback
def reference_run(name: str, w0: torch.Tensor, grads: list[torch.Tensor], *, rank: int, gap: int, lr: float,
                  wd: float, scale: float, betas=(0.9, 0.999), eps=1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64, from the paper's formulas: A = G + E; refresh P from A every ``gap`` steps; R = project(A);
    Adam on R (moments kept); W ← W − lr·(scale·project_back(N) + wd·W); E ← A − Π(A), Π the orthogonal
    projector onto the basis' span, P (PᵀP)⁻¹ Pᵀ (left) or Qᵀ (Q Qᵀ)⁻¹ Q (right)."""
    w, e = w0.clone(), torch.zeros_like(w0)
    proj = lro.projectors.make(name, rank, seed=0)
    m = v = None
    for t, g in enumerate(grads):
        a = g + e
        if t % gap == 0:
            proj = proj.refreshed(a)
        b = proj.basis(dtype=torch.float64)
        r = b.T @ a if proj.side == "left" else a @ b.T
        m = (1 - betas[0]) * r if m is None else betas[0] * m + (1 - betas[0]) * r
        v = (1 - betas[1]) * r * r if v is None else betas[1] * v + (1 - betas[1]) * r * r
        n = (m / (1 - betas[0] ** (t + 1))) / ((v / (1 - betas[1] ** (t + 1))).sqrt() + eps)
        back = b @ n if proj.side == "left" else n @ b
        w = w - lr * (scale * back + wd * w)
        span = b @ torch.linalg.solve(b.T @ b, b.T) if proj.side == "left" else b.T @ torch.linalg.solve(b @ b.T, b)
        e = a - (span @ a if proj.side == "left" else a @ span)
    return w, e


@pytest.mark.parametrize("name", ["svd", "dct", "random", "sparse"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_error_feedback_matches_the_float64_reference(name, shape):
    """7 steps, refreshes at 0, 3, 6 (each from A = G + E). Float64 throughout, so the only differences are
    the order of float64 sums: 1e-10 on weights of size ~1 is ~10⁶ ε, far below any wrong term (≥ 1e-4)."""
    gen = torch.Generator().manual_seed(11)
    w0 = torch.randn(*shape, dtype=torch.float64, generator=gen)
    grads = [torch.randn(*shape, dtype=torch.float64, generator=gen) for _ in range(7)]
    p = torch.nn.Parameter(w0.clone())
    opt = lro.LowRankAdamW([p], lr=0.01, weight_decay=0.1, rank=5, update_proj_gap=3, scale=0.5, stagger=False,
                           projector=name, residual="error_feedback")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want_w, want_e = reference_run(name, w0, grads, rank=5, gap=3, lr=0.01, wd=0.1, scale=0.5)
    torch.testing.assert_close(p.detach(), want_w, rtol=0, atol=1e-10)
    torch.testing.assert_close(opt.state[p]["ef"], want_e, rtol=0, atol=1e-10)
    assert float(opt.state[p]["ef"].norm()) > 0.5  # it holds what the subspace dropped


@pytest.mark.parametrize("name", ["svd", "dct", "random", "sparse"])
def test_the_readable_reference_agrees(name):
    """optim/reference.py states the same algorithm in float32: 2e-6 on weights of size ~1 (float32 sums)."""
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(30, 20, generator=gen)
    grads = [torch.randn(30, 20, generator=gen) for _ in range(6)]
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    keys = dict(lr=0.01, weight_decay=0.1, rank=4, update_proj_gap=2, projector=name, residual="error_feedback")
    fast, ref = lro.LowRankAdamW([a], stagger=False, **keys), ReferenceLowRankAdamW([b], **keys)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        fast.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(fast.state[a]["ef"], ref.state[b]["ef"], rtol=1e-5, atol=1e-4)


def test_error_feedback_with_a_gaussian_basis_stays_bounded():
    """project_back(project(A)) is no projection for random's Gaussian Q (QᵀQ ≈ n/r on its range): fed back
    as it is, ‖E‖ would grow n/r-fold a step. With Π, ‖E‖ ≤ ‖A‖ ≤ ‖G‖ + ‖E_prev‖ at every step."""
    p = torch.nn.Parameter(torch.zeros(64, 48))
    opt = lro.LowRankAdamW([p], lr=1e-3, rank=4, update_proj_gap=5, projector="random", residual="error_feedback")
    gen, prev = torch.Generator().manual_seed(2), 0.0
    for _ in range(12):
        p.grad = torch.randn(64, 48, generator=gen)
        opt.step()
        now = float(opt.state[p]["ef"].norm())
        assert now <= float(p.grad.norm()) + prev + 1e-3
        prev = now
    assert prev < 12 * math.sqrt(64 * 48)


# ---------------------------------------------------------------------------- 8- and 4-bit buffers
def one_step_buffer(bits: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(the stored E dequantized, the exact E = G − Π(G) of the first step, the state)."""
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(48, 32, generator=gen))
    opt = lro.DCTAdamW([p], lr=1e-2, rank=8, ef_bits=bits)
    g = torch.randn(48, 32, generator=gen)
    p.grad = g.clone()
    opt.step()
    proj = opt._projectors[p]
    exact = g - proj.project_back(proj.project(g))
    return lro.updates.ErrorFeedback().buffer(opt.state[p]), exact, opt.state[p]


def test_4bit_buffer_is_within_half_a_level_of_each_group():
    """Min–max in groups of 256 rounded to nearest: every element within (max − min)/15/2 of its group's
    exact value (float32 rounding of the arithmetic adds ~1e-6 of the range: 1% slack)."""
    got, exact, state = one_step_buffer(4)
    assert "ef_packed" in state and state["ef_packed"].numel() == 48 * 32 // 2
    groups = exact.reshape(-1, 256)
    half = (groups.max(1).values - groups.min(1).values) / 15 / 2
    err = (got - exact).reshape(-1, 256).abs()
    assert bool((err <= half[:, None] * 1.01).all())
    assert float((got - exact).norm() / exact.norm()) < 0.15  # uniform levels: ~range/(15·√12) per element


def test_8bit_buffer_is_within_half_the_code_books_widest_gap():
    """INT8 dynamic code, absmax per block of 256: each element is within half the widest gap between
    adjacent codes (times its block's absmax) of the exact E; the relative error in norm is about 1%."""
    from lowrank_optim.kernels import reference

    got, exact, state = one_step_buffer(8)
    assert state["ef"].dtype == torch.uint8 and state["ef_absmax"].numel() == 48 * 32 // 256
    book = reference.code_book("dynamic", signed=True, device="cpu")
    widest = float(torch.diff(torch.sort(book).values).max())
    absmax = exact.reshape(-1, 256).abs().max(1).values
    err = (got - exact).reshape(-1, 256).abs()
    assert bool((err <= absmax[:, None] * widest / 2 * 1.01).all())
    assert float((got - exact).norm() / exact.norm()) < 0.03


@pytest.mark.parametrize("bits,share", [(8, 0.25), (4, 0.6)])
def test_quantized_buffers_train_like_the_float_one(bits, share):
    """20 steps of a small model: the quantized buffer's run stays nearer the float32 buffer's than a run
    without error feedback does (its weights' change, in norm: measured 3.5% (8-bit) and 11% (4-bit) of the
    float run's change, against 24% without feedback). The buffers' own errors are ~1% and ~8% of E; the runs
    drift apart over the steps, so the bound is a share of what the feedback is there to recover."""
    from conftest import train

    data = batches(20)
    runs = {}
    for key, keys in ((32, {}), (bits, {"ef_bits": bits}), ("drop", {"residual": "drop"})):
        model = make_model()
        start = [q.detach().clone() for q in model.parameters()]
        train(model, lro.DCTAdamW(lro.param_groups(model, rank=8), lr=3e-3, min_8bit_size=0, **keys), data)
        runs[key] = torch.cat([(q.detach() - s).reshape(-1) for q, s in zip(model.parameters(), start)])
    off = float((runs[bits] - runs[32]).norm())
    assert off < share * float((runs["drop"] - runs[32]).norm())
    assert off > 0  # the quantized buffer is in use


# ---------------------------------------------------------------------------- memory, resume, refusals
@pytest.mark.parametrize("bits,per_element", [(32, 4.0), (8, 1 + 4 / 256), (4, 0.5 + 8 / 256)])
def test_the_buffer_is_counted_in_init_state_and_state_nbytes(bits, per_element):
    p = torch.nn.Parameter(torch.empty(512, 256, device="meta"))
    opt = lro.DCTAdamW([{"params": [p], "rank": 16}], lr=1e-3, ef_bits=bits)
    opt.init_state()
    nb = opt.state_nbytes()
    assert nb["moments"] == 2 * 512 * 16 * 4 and nb["projectors"] == 16 * 8
    assert nb["other"] - 12 == pytest.approx(512 * 256 * per_element)  # 12: step (float32), next_refresh (int64)
    ours = lro.memory.estimate(make_model(), "dct_adamw", rank=8, ef_bits=bits).ours.optimizer_states
    plain = lro.memory.estimate(make_model(), "galore", rank=8, projector="dct").ours.optimizer_states
    linear = sum(q.numel() for n, q in make_model().named_parameters() if q.dim() == 2 and "emb" not in n and "head" not in n)
    assert ours - plain == pytest.approx(linear * per_element, rel=0.05)


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_resume_is_bit_identical(bits):
    def build(model):
        return lro.DCTAdamW(lro.param_groups(model, rank=8), lr=3e-3, ef_bits=bits, min_8bit_size=0)

    model, opt, twin, twin_opt = train_and_resume(build, batches(8), 4)
    assert_same_parameters(model, twin)


def test_max_dim_keeps_large_weights_on_adamw():
    big, small = torch.nn.Parameter(torch.randn(64, 16)), torch.nn.Parameter(torch.randn(32, 16))
    opt = lro.DCTAdamW([{"params": [big, small], "rank": 4}], lr=1e-3, max_dim=64)
    for q in (big, small):
        q.grad = torch.randn_like(q)
    opt.step()
    assert "projector" not in opt.state[big] and opt.state[big]["exp_avg"].shape == (64, 16)
    assert "projector" in opt.state[small] and "ef" in opt.state[small]
    assert lro.DCTAdamW.method_defaults()["max_dim"] == 32000


@pytest.mark.parametrize("keys,name", [
    ({"ef_bits": 16}, "ef_bits"), ({"ef_bits": True}, "ef_bits"), ({"max_dim": 1}, "max_dim"),
    ({"max_dim": 3.5}, "max_dim"), ({"scaling": "channel"}, "scaling"),
])
def test_bad_options_are_refused_by_name(keys, name):
    p = torch.nn.Parameter(torch.randn(16, 8))
    with pytest.raises(ValueError, match=f"invalid {name}="):
        lro.DCTAdamW([{"params": [p], "rank": 2}], lr=1e-3, **keys)
    with pytest.raises(ValueError, match=f"invalid {name}="):
        lro.DCTAdamW([{"params": [p], "rank": 2, **keys}], lr=1e-3)


def test_a_bad_dct_variant_is_refused_by_name():
    with pytest.raises(ValueError, match="dct_variant must be one of 'makhoul', 'matmul'"):
        lro.projectors.make("dct", 2, dct_variant="fft")
    p = torch.nn.Parameter(torch.randn(16, 8))
    with pytest.raises(ValueError, match="invalid dct_variant='fft'"):  # when the optimizer is built
        lro.DCTAdamW([{"params": [p], "rank": 2, "dct_variant": "fft"}], lr=1e-3)
    with pytest.raises(ValueError, match="dct_variant must be one of"):
        lro.DCTAdamW([p], rank=2, lr=1e-3, projector_options={"dct_variant": "fft"})


def test_dct_variant_is_a_group_key_that_projector_options_override():
    """DCTAdamW's ``dct_variant`` reaches the dct projector; ``projector_options`` win; another projector
    ignores it (so DCTAdamW(projector="svd") is error feedback around GaLore's subspace)."""
    def variant(**keys):
        p = torch.nn.Parameter(torch.randn(24, 16))
        opt = lro.DCTAdamW([{"params": [p], "rank": 4, **keys}], lr=1e-3)
        p.grad = torch.randn(24, 16)
        opt.step()
        return opt._projectors[p]

    assert variant().variant == "matmul"
    assert variant(dct_variant="makhoul").variant == "makhoul"
    assert variant(projector_options={"dct_variant": "makhoul"}).variant == "makhoul"
    assert variant(projector="svd").name == "svd"


# ---------------------------------------------------------------------------- the official DCTAdamW
@functools.cache
def official_dct_adamw():
    """``ista_daslab_optimizers.DCTAdamW`` (see ``conftest.ista_module``)."""
    return ista_module("fft_low_rank.dct_adamw").DCTAdamW


def held_sorted(official, monkeypatch) -> None:
    """The official code with three changes, each to what it computes in exact arithmetic or to our
    documented departure, so that what remains compared is the algorithm:

    * its ``dct3_matrix`` evaluates the cosines in float32 (its basis is orthonormal to 1e-6 only; where a
      rotation sends a moment to ~0 that noise decides Adam's direction): built here in float64 from the
      same formula, then cast, as ours;
    * its ``rotate_subspace`` writes ``torch.matmul(w, R, out=w)`` into its own input, which on CPU returns
      wrong products (seen: errors of 9 on entries of size 1): here ``w.copy_(w @ R)``, the product it means;
    * its ``topk(sorted=False)`` holds the indices in the backend's order, ours ascending (lro.projectors.dct):
      here sorted after each selection, the low-rank gradient's slots with them."""
    module = sys.modules[official.__module__]
    projector = module.FFTLowRankProjector

    def dct3_matrix(n, dtype, device):
        return dct2_matrix(n).to(device=device, dtype=dtype)

    def rotate_subspace(self, rot, w):
        w.copy_(w @ rot if self.is_right_proj else rot @ w)

    original = projector.change_subspace

    def change_subspace(self, q, a, col_norms, out=None):
        low = original(self, q, a, col_norms)
        order = torch.argsort(self.indices_crt.long())
        self.indices_crt.copy_(self.indices_crt[order])
        return low[:, order] if self.is_right_proj else low[order, :]

    monkeypatch.setattr(module, "dct3_matrix", dct3_matrix)
    monkeypatch.setattr(projector, "rotate_subspace", rotate_subspace)
    monkeypatch.setattr(projector, "change_subspace", change_subspace)


@pytest.mark.parametrize("sim_type,rotate,gap", [("matmul", False, 1), ("makhoul", False, 1), ("matmul", True, 1),
                                                 ("makhoul", True, 1), ("matmul", False, 100)])
def test_parity_with_the_official_dct_adamw(sim_type, rotate, gap, monkeypatch):
    """8 steps on a right-side 48×32 and a left-side 32×64 weight and a bias, error feedback on, weight decay,
    refreshing at every step (the official default; kept or rotated moments) or at the first only. float32 on
    both sides: 2e-6 on weights of size ~1 (measured 2.4e-7, two float32 ulps: sums in another order; a wrong
    term, sign or index moves them by ≥ 1e-3)."""
    official = official_dct_adamw()
    held_sorted(official, monkeypatch)
    gen = torch.Generator().manual_seed(8)
    shapes = [(48, 32), (32, 64), (32,)]
    start = [torch.randn(*s, generator=gen) for s in shapes]
    grads = [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(8)]
    theirs = [torch.nn.Parameter(x.clone()) for x in start]
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    with contextlib.redirect_stdout(io.StringIO()):
        ref = official(theirs, lr=1e-2, weight_decay=0.1, rank=8, proj="dct", use_ef=True, update_proj_gap=gap,
                       rotate_subspace=rotate, sim_type=sim_type)
        opt = lro.DCTAdamW([{"params": ours[:2], "rank": 8}, {"params": ours[2:], "rank": None}], lr=1e-2,
                           weight_decay=0.1, update_proj_gap=gap, on_refresh="rotate" if rotate else "keep",
                           dct_variant=sim_type)
        for step in grads:
            for a, b, g in zip(theirs, ours, step):
                a.grad, b.grad = g.clone(), g.clone()
            ref.step()
            opt.step()
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=2e-6)
    for a, b in zip(theirs[:2], ours[:2]):  # E's entries reach ~5 (accumulated gradients): 1e-4 is the same few ulps
        torch.testing.assert_close(opt.state[b]["ef"], ref.state[a]["ef"], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- FSDP2
FSDP_CASES = {
    "dct_adamw-right-ef8": (lro.DCTAdamW, {"proj_type": "right", "ef_bits": 8, "min_8bit_size": 256}),
    "svd-left-ef": (lro.GaLoreAdamW, {"proj_type": "left", "residual": "error_feedback",
                                      "projector_options": {"canonical_signs": True}}),
}


def _save_and_resume(model, opt, build, rest, where) -> dict[str, torch.Tensor]:
    """Save model and optimizer with torch.distributed.checkpoint, load them into a sharded model of other
    weights and a fresh optimizer, train it on ``rest``: its full parameters (the buffer E travels as the
    DTensor pieces of every rank)."""
    import torch.distributed.checkpoint as dcp
    from test_fsdp import full_params, shard_model, tiny_llama, train
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(where))
    twin = shard_model(tiny_llama(seed=1, vocab=128))
    twin_opt = build(twin)
    twin_opt.init_state()  # the template DCP loads into
    state = {"model": get_model_state_dict(twin), "optim": get_optimizer_state_dict(twin, twin_opt)}
    dcp.load(state, checkpoint_id=str(where))
    set_model_state_dict(twin, state["model"])
    set_optimizer_state_dict(twin, twin_opt, state["optim"])
    train(twin, twin_opt, rest)
    return full_params(twin)


def _fsdp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from test_fsdp import full_params, global_batches, shard_model, tiny_llama, train

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        report = {}
        for name, (cls, keys) in FSDP_CASES.items():
            def build(model):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", lro.RankFallbackWarning)
                    return cls(lro.param_groups(model, rank=8, update_proj_gap=2, **keys), lr=3e-3, weight_decay=0.01)

            batches_ = global_batches(4)
            mine = [b[2 * rank: 2 * rank + 2] for b in batches_]
            model = shard_model(tiny_llama(vocab=128))
            opt = build(model)
            train(model, opt, mine[:2])
            if name == "dct_adamw-right-ef8":
                report["dcp"] = _save_and_resume(model, opt, build, mine[2:], Path(out, "ckpt"))
            train(model, opt, mine[2:])
            got = full_params(model)
            if name == "dct_adamw-right-ef8":
                report["dcp"] = all(torch.equal(got[k], v) for k, v in report["dcp"].items())
            if rank == 0:
                ref_model = tiny_llama(vocab=128)
                train(ref_model, build(ref_model), batches_)
                want = full_params(ref_model)
                report[name] = max(((got[k] - want[k]).abs()).max().item() for k in want)
            ef = next(s["ef"] for s in opt.state.values() if "ef" in s)
            assert type(ef).__name__ == "DTensor"
        try:
            from torch.distributed.tensor import Shard, distribute_tensor
            from torch.distributed.device_mesh import init_device_mesh

            w = torch.nn.Parameter(distribute_tensor(torch.randn(16, 8), init_device_mesh("cpu", (2,)), [Shard(0)]))
            lro.DCTAdamW([{"params": [("w", w)], "rank": 2}], lr=1e-3, ef_bits=4)
        except ValueError as err:
            report["refused"] = str(err)
        Path(out, f"ef{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_error_feedback_on_two_fsdp2_ranks_equals_one_process(tmp_path):
    """4 steps (2 refreshes) of the tiny LLaMA of test_fsdp on 2 gloo ranks against one process. E is each
    rank's rows (a DTensor); 8-bit blocks fall inside each rank's piece at multiples of 256 elements, so they
    are one process's. A distributed checkpoint after step 2 resumes on the 2 ranks bit for bit. Tolerance 1e-4
    (measured: 1.1e-5 with the 8-bit buffer, 1.5e-7 with the float one): test_fsdp's float32 reasoning (sums in
    another order, amplified by Adam) plus an INT8 code boundary that a last-bit difference can cross; a wrong
    shard or a missing sum moves the weights by ≥ 1e-3."""
    pytest.importorskip("transformers", reason="the train extra (transformers) is not installed")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    results = [tmp_path / f"ef{r}.json" for r in range(2)]
    spawn_two(_fsdp_worker, (f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), results)
    report = json.loads((tmp_path / "ef0.json").read_text())
    for name in FSDP_CASES:
        assert report[name] < 1e-4, (name, report[name])
    assert "ef_bits=4" in report["refused"] and "'w'" in report["refused"]
    assert report["dcp"] is True  # saved after 2 steps on 2 ranks, resumed there: bit for bit


def test_memory_command_counts_the_buffer_in_each_width(capsys):
    """``lowrank-optim memory --optimizer dct_adamw --ef-bits B``: with n projected elements, 32 → 8 bits saves
    n·(4 − 1 − 4/256) bytes and 8 → 4 bits n·(1 + 4/256 − 0.5 − 8/256): the same n from both (1%: the last
    INT8/INT4 blocks of a weight may be partial)."""
    from lowrank_optim import cli

    config = str(Path(__file__).resolve().parents[1] / "configs" / "llama_tiny.json")
    states = {}
    for bits in (32, 8, 4):
        assert cli.main(["memory", "--config", config, "--optimizer", "dct_adamw", "--ef-bits", str(bits), "--json"]) == 0
        states[bits] = json.loads(capsys.readouterr().out)["ours"]["optimizer_states"]
    n = (states[32] - states[8]) / (4 - 1 - 4 / 256)
    assert n > 0
    assert (states[8] - states[4]) / (1 + 4 / 256 - 0.5 - 8 / 256) == pytest.approx(n, rel=0.01)


def test_error_feedback_with_grass_repeated_rows():
    """Grass draws rows with replacement, so an index can be drawn twice and the basis' Gram matrix is
    singular: Π uses its pseudo-inverse, E = A − Π(A) is A off the drawn rows and 0 on them."""
    p = torch.nn.Parameter(torch.zeros(6, 40))
    opt = lro.Grass([{"params": [p], "rank": 5}], lr=1e-3, residual="error_feedback", update_proj_gap=1)
    gen, repeated = torch.Generator().manual_seed(0), 0
    for _ in range(6):
        p.grad = torch.randn(6, 40, generator=gen)
        opt.step()
        proj = opt._projectors[p]
        idx = proj.state_dict()["idx"]
        repeated += int(idx.unique().numel() < idx.numel())
        e = opt.state[p]["ef"]
        assert proj.side == "left" and torch.isfinite(e).all()
        assert float(e[idx.unique()].abs().max()) < 1e-5 and float(e.norm()) > 0  # float32 round-off on the rows
    assert repeated > 0  # the singular case was met
