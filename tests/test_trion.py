"""Trion (Modoranu et al. 2025, arXiv:2505.17967; ``ista_daslab_optimizers`` ``Trion``): Dion's update on r DCT
columns of the momentum, with error feedback on the momentum. Its basis variant, the update against a float64
reference, against the official optimizer, resume, refusals and the CLI."""

from __future__ import annotations

import functools
import json
import math
import types
from pathlib import Path

import pytest
import torch
from conftest import assert_same_parameters, batches, ista_module, train_and_resume

import lowrank_optim as lro
from lowrank_optim.projectors import dct as dct_module
from lowrank_optim.rules import orthogonal
from lowrank_optim.rules.orthogonal import newton_schulz

MU = 0.95


def dct3_matrix(d: int) -> torch.Tensor:
    """The official ``dct3_matrix``: C[k, j] = c_k cos(π k (2j + 1) / 2d), c_0 = √(1/d), c_k = √(2/d), in float64."""
    k = torch.arange(d, dtype=torch.float64)[:, None]
    j = torch.arange(d, dtype=torch.float64)[None, :]
    c = torch.full((d, 1), math.sqrt(2.0 / d), dtype=torch.float64)
    c[0] = math.sqrt(1.0 / d)
    return c * torch.cos(math.pi * k * (2 * j + 1) / (2 * d))


# ---------------------------------------------------------------------------- the basis
@pytest.mark.parametrize("shape,side", [((40, 24), "right"), ((24, 40), "left")])
def test_trion_variant_scores_and_projects_as_the_official_code(shape, side):
    """Right (m ≥ n): S = M·C, scores the column ℓ1 norms, m = S[:, idx], basis C[:, idx]. Left: S = C·M, scores
    the row ℓ1 norms, m = S[idx, :], project_back(m) = C[idx, :]ᵀ·m. float64: 1e-12 is ~10⁴ ε on values ~1."""
    a = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    c = dct3_matrix(min(shape))
    s = a @ c if side == "right" else c @ a
    scores = s.abs().sum(0) if side == "right" else s.abs().sum(1)
    idx = torch.sort(torch.topk(scores, 6).indices).values
    proj = lro.projectors.make("dct", 6, dct_variant="trion")
    proj.update(a)
    assert proj.side == side and proj.state_dict()["idx"].tolist() == idx.tolist()
    low = proj.project(a)
    torch.testing.assert_close(low, s[:, idx] if side == "right" else s[idx, :], rtol=0, atol=1e-12)
    back = low @ c[:, idx].T if side == "right" else c[idx, :].T @ low
    torch.testing.assert_close(proj.project_back(low), back, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- float64 reference
def ns5(x: torch.Tensor) -> torch.Tensor:
    """Muon's quintic Newton–Schulz, 5 steps, in float64 (the official iteration without its bfloat16 cast)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    y = x.T if x.shape[0] > x.shape[1] else x
    y = y / (y.norm() + 1e-7)
    for _ in range(5):
        g = y @ y.T
        y = a * y + (b * g + c * g @ g) @ y
    return y.T if x.shape[0] > x.shape[1] else y


def polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def reference_trion(w0, grads, *, rank, lr, wd, orth):
    """From the official formulas, float64: M ← M + G; S = M·C (right) or C·M (left); idx the top-r ℓ1 columns
    (rows); m = S[:, idx]; M ← M − (1 − μ)·m·Qᵀ; W ← (1 − lr·wd)·W − lr·0.2·√max(R, C)·orth(m)·Qᵀ."""
    w, mom = w0.clone(), torch.zeros_like(w0)
    rows, cols = w0.shape
    c = dct3_matrix(min(rows, cols))
    for g in grads:
        mom = mom + g
        if rows >= cols:
            s = mom @ c
            q = c[:, torch.topk(s.abs().sum(0), rank).indices]  # (C, r)
            m = mom @ q
            mom = mom - (1 - MU) * m @ q.T
            update = orth(m) @ q.T
        else:
            s = c @ mom
            q = c[torch.topk(s.abs().sum(1), rank).indices, :]  # (r, R)
            m = q @ mom
            mom = mom - (1 - MU) * q.T @ m
            update = q.T @ orth(m)
        w = w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(rows, cols)) * update
    return w, mom


def run_ours(w0, grads, **keys):
    p = torch.nn.Parameter(w0.clone())
    opt = lro.Trion([{"params": [p], "rank": 5}], lr=0.01, weight_decay=0.1, **keys)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state[p]["ef"]


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_matches_the_float64_reference_with_an_exact_polar_factor(shape):
    """6 steps, a new selection every step. With ``orthogonalize="svd"`` every operation is float64 on both
    sides: 1e-10 on weights and momenta of size ~1 (~10⁶ ε; a wrong μ, sign or index moves them by ≥ 1e-3)."""
    gen = torch.Generator().manual_seed(11)
    w0 = torch.randn(*shape, dtype=torch.float64, generator=gen)
    grads = [torch.randn(*shape, dtype=torch.float64, generator=gen) for _ in range(6)]
    want_w, want_m = reference_trion(w0, grads, rank=5, lr=0.01, wd=0.1, orth=polar)
    got_w, got_m = run_ours(w0, grads, orthogonalize="svd")
    torch.testing.assert_close(got_m, want_m, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-10)
    assert float((got_w - w0).abs().max()) > 1e-2  # the weights moved


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_matches_the_float64_reference_with_newton_schulz(shape):
    """The preset (Newton–Schulz in bfloat16) against NS₅ in float64. The momentum does not depend on the
    orthogonalization: 1e-10 as above. The weights: bfloat16 keeps 8 bits, so each entry of NS₅(m) is off by up
    to a few % after five iterations (measured 1.3e-4 and 1.4e-4 on a total move of ~2.3e-2): 3e-4 (a missing
    factor or a wrong basis column moves the weights by ≥ 3e-3)."""
    gen = torch.Generator().manual_seed(12)
    w0 = torch.randn(*shape, dtype=torch.float64, generator=gen)
    grads = [torch.randn(*shape, dtype=torch.float64, generator=gen) for _ in range(6)]
    want_w, want_m = reference_trion(w0, grads, rank=5, lr=0.01, wd=0.1, orth=ns5)
    got_w, got_m = run_ours(w0, grads)
    torch.testing.assert_close(got_m, want_m, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=3e-4)
    assert float((got_w - w0).abs().max()) > 1e-2


def test_momentum_keyword_is_trions_mu():
    """``momentum=`` to the constructor is Trion's μ (the official key): it sets ``ef_momentum``; the
    orthogonal rule's own momentum stays 0, so the low-rank buffer is m itself."""
    p = torch.nn.Parameter(torch.randn(24, 16))
    opt = lro.Trion([{"params": [p], "rank": 4}], lr=1e-3, momentum=0.5)
    assert opt.param_groups[0]["ef_momentum"] == 0.5 and opt.param_groups[0]["momentum"] == 0.0
    g = torch.randn(24, 16)
    p.grad = g.clone()
    opt.step()
    proj = opt._projectors[p]
    low = proj.project(g)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], low, rtol=0, atol=1e-6)  # float32 sums
    torch.testing.assert_close(opt.state[p]["ef"], g - 0.5 * proj.project_back(low), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- the official Trion
class OneProcess:
    """``torch.distributed`` for one process, as the official step calls it (world 1: all_gather is a copy)."""

    @staticmethod
    def get_world_size() -> int:
        return 1

    @staticmethod
    def get_rank() -> int:
        return 0

    @staticmethod
    def all_gather(tensor_list, tensor):
        for t in tensor_list:
            if t is not tensor:
                t.copy_(tensor)


@functools.cache
def official_trion_module():
    """``ista_daslab_optimizers.fft_low_rank.trion`` imported without the package's ``__init__`` (wandb and its
    CUDA-only optimizers), with a stand-in ``wandb`` (imported, never used) and a stand-in for its Triton
    Newton–Schulz module (only ``ns_type="triton"`` uses it; the test uses ``"torch"``)."""
    triton_ns = types.ModuleType("ista_daslab_optimizers.utils.newton_schulz_triton")
    triton_ns.newton_schulz_triton = None
    return ista_module("fft_low_rank.trion", wandb=types.ModuleType("wandb"),
                       **{"ista_daslab_optimizers.utils.newton_schulz_triton": triton_ns})


def patched_official(monkeypatch, rank: int, sizes, same_ns: bool):
    """The official module with what it needs to run on one CPU process, each patch documented:

    * ``dist``: the step calls ``dist.get_world_size()`` and ``dist.all_gather`` unconditionally, which need an
      initialized process group: :class:`OneProcess` (world 1, all_gather a copy);
    * its DCT cache: on a miss ``trion_update`` calls ``dct3_matrix(..., device=device, dtype=dtype)`` with two
      names that module does not define (a NameError), and the weight update calls ``get_dct_matrix``, which it
      neither defines nor imports. The cache is filled here for every (size, rank) the test uses, with the
      ``dct3_matrix`` formula evaluated in float64 and cast to float32 (as ours; its own evaluates the cosines in
      float32), and ``get_dct_matrix`` returns that cached matrix;
    * with ``same_ns``, ``zeropower_via_newtonschulz5`` and ours are both replaced by one float64 iteration
      (``ns5``), so that only the composition is compared; the two bfloat16 iterations are compared on their
      own in another test."""
    trion = official_trion_module()
    monkeypatch.setattr(trion.GlobalCache, "_instance", None)  # a fresh cache, the previous one restored after
    for size in sizes:
        trion.GlobalCache.add(category="ortho", key=(size, rank), item=dct3_matrix(size).float())
    monkeypatch.setattr(trion, "dist", OneProcess)
    monkeypatch.setattr(trion, "get_dct_matrix",
                        lambda size, key, device, dtype: trion.GlobalCache.get(category="ortho", key=key), raising=False)
    if same_ns:  # ns5 in float64 on both sides: see test_parity_with_the_official_trion
        monkeypatch.setattr(trion, "zeropower_via_newtonschulz5", lambda g, steps: ns5(g.double()).float())
        monkeypatch.setattr(orthogonal, "newton_schulz", lambda g, steps: ns5(g.double()).float())
    return trion


def run_both(official, steps: int, rank: int):
    gen = torch.Generator().manual_seed(8)
    shapes = [(48, 32), (32, 64), (32,)]
    start = [torch.randn(*s, generator=gen) for s in shapes]
    grads = [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(steps)]
    theirs = [torch.nn.Parameter(x.clone()) for x in start]
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    ref = official.Trion([
        {"params": theirs[:2], "use_muon": True, "lr": 0.01, "momentum": MU, "weight_decay": 0.1, "rank": rank,
         "ns_type": "torch", "scaling_type": "kimi"},
        {"params": theirs[2:], "use_muon": False, "lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8,
         "weight_decay": 0.1}])
    opt = lro.Trion([{"params": ours[:2], "rank": rank}, {"params": ours[2:], "rank": None}], lr=0.01,
                    weight_decay=0.1)
    for step in grads:
        for a, b, g in zip(theirs, ours, step):
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    return theirs, ours, ref, opt


def test_parity_with_the_official_trion(monkeypatch):
    """8 steps on a right-side 48×32 and a left-side 32×64 weight (a new selection each step) and a bias (AdamW),
    weight decay 0.1, with the same Newton–Schulz on both sides, in float64: with both sides' bfloat16
    iteration, the float32 ulp by which the two compositions' inputs differ (sums in another order, which
    depends on the CPU's BLAS kernels) sometimes flips one bfloat16 rounding and moves a weight by 4.6e-5
    (seen at step 6 on an AVX512-BF16 Xeon; on another CPU never). float32 otherwise: 2e-6 on weights of size
    ~1 (measured 9.5e-7 after 8 steps, a few float32 ulps; a wrong term, sign or index moves them by ≥ 1e-3); the momenta
    reach ~10 (8 gradients of size 1, 5% of the selected part kept): 2e-5 is the same few ulps."""
    official = patched_official(monkeypatch, 8, (32,), same_ns=True)
    theirs, ours, ref, opt = run_both(official, 8, 8)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=2e-6)
    for a, b in zip(theirs[:2], ours[:2]):
        torch.testing.assert_close(opt.state[b]["ef"], ref.state[a]["momentum_buffer"], rtol=0, atol=2e-5)
        assert float(opt.state[b]["ef"].norm()) > 1.0


def test_parity_with_the_official_trion_and_its_newton_schulz(monkeypatch):
    """The same, with the official bfloat16 ``zeropower_via_newtonschulz5``. It writes bA + cA² and aX + BX as
    separate bfloat16 ops where ours fuses them (``addmm``); five iterations amplify those roundings to ~3.5% of
    ‖NS₅(m)‖ (test below). The momenta do not depend on it (2e-5 as above); each weight's total change differs by
    ≤ 3% of its norm (measured 1.0%), where a wrong factor, column or step count moves it by ≥ 30%."""
    official = patched_official(monkeypatch, 8, (32,), same_ns=False)
    gen = torch.Generator().manual_seed(8)
    start = [torch.randn(*s, generator=gen) for s in ((48, 32), (32, 64), (32,))]
    theirs, ours, ref, opt = run_both(official, 8, 8)
    for a, b, w0 in zip(theirs, ours, start):
        moved = a.detach() - w0
        assert float((b.detach() - a.detach()).norm()) <= 0.03 * float(moved.norm())
    for a, b in zip(theirs[:2], ours[:2]):
        torch.testing.assert_close(opt.state[b]["ef"], ref.state[a]["momentum_buffer"], rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape", [(48, 8), (8, 64), (20, 20)])
def test_newton_schulz_is_the_official_iteration(shape):
    """Ours against the official ``zeropower_via_newtonschulz5`` (both bfloat16, same coefficients, steps,
    orientation and normalization; roundings in other places, grown by five iterations of a polynomial of slope
    up to ~3.4): measured 3.0–3.7% of the norm apart: 6%, against ≥ 30% from any other step count."""
    official = official_trion_module()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    theirs = official.zeropower_via_newtonschulz5(x, steps=5).float()
    ours = newton_schulz(x, 5).float()
    assert float((ours - theirs).norm()) <= 0.06 * float(theirs.norm())
    for steps in (4, 6):
        assert float((newton_schulz(x, steps).float() - theirs).norm()) > 0.15 * float(theirs.norm())


# ---------------------------------------------------------------------------- resume, refusals, CLI
@pytest.mark.parametrize("bits", [32, 8])
def test_resume_is_bit_identical(bits):
    """Float32 M, and M in blockwise INT8 (``ef_bits=8``)."""
    def build(model):
        return lro.Trion(lro.param_groups(model, rank=8), lr=3e-3, ef_bits=bits, min_8bit_size=0)

    model, _, twin, twin_opt = train_and_resume(build, batches(8), 4)
    assert_same_parameters(model, twin)
    kept = [s["ef"] for s in twin_opt.state.values() if "ef" in s]
    assert kept and all(e.dtype == (torch.float32 if bits == 32 else torch.uint8) for e in kept)


def test_it_trains_the_tiny_model():
    """30 steps on the tests' learnable sequences: the mean of the last 5 losses is below 2/3 of the first 5's
    (measured 0.33; GaLore 0.32)."""
    from conftest import make_model, train

    model = make_model()
    losses = train(model, lro.Trion(lro.param_groups(model, rank=8), lr=1e-2, scale=0.25), batches(30))
    assert sum(losses[-5:]) / 5 < (2 / 3) * sum(losses[:5]) / 5


@pytest.mark.parametrize("keys,name", [
    ({"ef_momentum": 1.0}, "ef_momentum"), ({"ef_momentum": -0.1}, "ef_momentum"), ({"ef_momentum": True}, "ef_momentum"),
    ({"ef_momentum": "0.9"}, "ef_momentum"), ({"ns_steps": 0}, "ns_steps"), ({"dct_variant": "fft"}, "dct_variant"),
])
def test_bad_options_are_refused_by_name(keys, name):
    p = torch.nn.Parameter(torch.randn(16, 8))
    with pytest.raises(ValueError, match=f"invalid {name}="):
        lro.Trion([{"params": [p], "rank": 2, **keys}], lr=1e-3)
    assert not lro.Trion([{"params": [p], "rank": 2}], lr=1e-3).state


@pytest.mark.parametrize("value", [0.9, None])
def test_a_group_momentum_for_the_rule_is_refused(value):
    """A group's ``momentum`` would be a second momentum inside the rule (None is the rule's 0.95): refused."""
    p = torch.nn.Parameter(torch.randn(16, 8))
    with pytest.raises(ValueError, match="invalid momentum=.*ef_momentum"):
        lro.Trion([{"params": [p], "rank": 2, "momentum": value}], lr=1e-3)


def test_cli_lists_and_counts_trion(capsys):
    """``lowrank-optim list`` names it; ``memory --optimizer trion`` counts, per projected m×n weight, M (m·n
    float32) and the r×n (m×r) rule buffer: more than DCT-AdamW's E plus Adam's two moments minus one."""
    from lowrank_optim import cli

    assert cli.main(["list"]) == 0
    assert "trion" in capsys.readouterr().out
    config = str(Path(__file__).resolve().parents[1] / "configs" / "llama_tiny.json")
    states = {}
    for name in ("trion", "dct_adamw"):
        assert cli.main(["memory", "--config", config, "--optimizer", name, "--json"]) == 0
        states[name] = json.loads(capsys.readouterr().out)["ours"]["optimizer_states"]
    assert 0 < states["trion"] < states["dct_adamw"]  # one low-rank buffer instead of Adam's two


def test_dct_variant_trion_takes_makhoul_on_the_left_and_matmul_on_the_right():
    # (a trion state loaded by another variant is refused: test_dct_adamw's variant test covers it)
    assert dct_module.side_variant("trion", "left") == "makhoul"
    assert dct_module.side_variant("trion", "right") == "matmul"
