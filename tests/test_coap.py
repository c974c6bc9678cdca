"""COAP (lro.COAP, projector="coap") against the official code's update, written out here from its formulas.

The official code (bytedance/coap, ``coap_torch/optimizer/adamw.py`` and ``projection/coap_matrix.py``) is
not installable, so the reference below restates it in float64, step by step: the side from the shape
(right when m ≥ n), at the first step P from one randomized range finder (Y = X Ω, Q = qr(Y), P = the
right factor of svd(Qᵀ X), X = G or Gᵀ), then at every step with ``step % T_u == 0`` (counted before the
increment) either one SGD step on MSE(G PᵀP, G)·(1 − mean cos(M P, G)) through autograd, its gradient
clipped by ``torch.nn.utils.clip_grad_norm_`` to norm 1, lr 0.1, or, when ``step % (T_u·λ) == 0``, the same
range finder warm-started from P; then Adam on R = project(G) with the moments kept across refreshes
(``restore_state=False``), the step projected back times ``scale``.

It takes from the library only what is an input rather than the algorithm: Ω (``gaussian`` from the
parameter's seed; the official code draws it from a generator seeded 3407), and it follows the library's
documented conventions where those differ: canonical singular-vector signs (``canonical_signs=False``
runs LAPACK's, as the official code), and ε added to √V̂ (the official code adds it to √V: the reference
puts ε·√(1 − β₂ᵗ) there, which is the same number). Weight decay is 0 (the official code decays the
updated weights, the core the weights before the update).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_parameters, batches, decaying_matrix, train_and_resume

import lowrank_optim as lro
from lowrank_optim.projectors.coap import coap_loss_grad
from lowrank_optim.projectors.random_proj import gaussian, mix_seed

RANK, GAP, LAMBDA, STEPS = 4, 2, 3, 20  # refreshes at steps 2, 4, 8, 10, 14, 16 (SGD) and 6, 12, 18 (re-SVD)
HYPER = {"lr": 0.02, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
SCALE = 0.25
# The wide weight's gradients are 60x larger, so its loss gradient is clipped and the tall one's is not.
SHAPES = {"tall": ((20, 12), 1.0), "wide": ((12, 20), 60.0)}


def gradient(name: str, t: int) -> torch.Tensor:
    """A slowly moving gradient (a fixed part and a changing one), so that M and G correlate."""
    (m, n), size = SHAPES[name]
    k = list(SHAPES).index(name)
    return size * (decaying_matrix(m, n, seed=10 + k) + 0.5 * decaying_matrix(m, n, seed=100 * k + t))


def initial(name: str) -> torch.Tensor:
    (m, n), _ = SHAPES[name]
    return decaying_matrix(m, n, seed=77 + list(SHAPES).index(name))


# ----------------------------------------------------------------------------- the official update, restated
def canonical_rows(vh: torch.Tensor) -> torch.Tensor:
    """Each row flipped so that its largest-magnitude entry is positive (the library's sign rule)."""
    idx = vh.abs().argmax(dim=1, keepdim=True)
    return vh * torch.sign(torch.gather(vh, 1, idx))


def compute_orthogonal(x: torch.Tensor, omega: torch.Tensor, canonical: bool) -> torch.Tensor:
    q, _ = torch.linalg.qr(x @ omega, mode="reduced")
    _, _, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
    return canonical_rows(vh) if canonical else vh


def official_update_proj(proj, exp_avg, side, grad, clipped, lr=0.1):
    """``MatrixCOAP.update_proj``: autograd through the loss, clip_grad_norm_(max_norm=1), one SGD step."""
    proj = proj.clone().requires_grad_(True)
    with torch.enable_grad():
        if side == "right":
            full_moment = exp_avg @ proj
            loss = F.mse_loss(grad @ proj.T @ proj, grad)
        else:
            full_moment = proj @ exp_avg
            loss = F.mse_loss(proj @ proj.T @ grad, grad)
        loss = loss * (1 - F.cosine_similarity(full_moment, grad, dim=1).mean())
        loss.backward()
    clipped.append(float(torch.nn.utils.clip_grad_norm_(proj, max_norm=1.0)) > 1.0)
    return (proj - lr * proj.grad).detach()


def official_run(canonical: bool, steps: int = STEPS):
    """The official COAPAdamProjector + AdamW on each weight, float64: weights and P after every step."""
    beta1, beta2 = HYPER["betas"]
    weights = {name: initial(name).clone() for name in SHAPES}
    state = {name: {"step": 0, "P": None} for name in SHAPES}
    history, clipped = [], []
    for t in range(steps):
        for position, name in enumerate(SHAPES):
            g, s, w = gradient(name, t), state[name], weights[name]
            side = "right" if g.shape[0] >= g.shape[1] else "left"
            x = g if side == "right" else g.T
            it = s["step"]
            if s["P"] is None:
                omega = gaussian((x.shape[1], RANK), mix_seed(position, 0), "cpu", torch.float64)
                vh = compute_orthogonal(x, omega, canonical)
                s["P"] = vh if side == "right" else vh.T
            elif it % GAP == 0:
                if it % (GAP * LAMBDA) == 0:
                    vh = compute_orthogonal(x, s["P"].T if side == "right" else s["P"], canonical)
                    s["P"] = vh if side == "right" else vh.T
                else:
                    s["P"] = official_update_proj(s["P"], s["exp_avg"], side, g, clipped)
            low = g @ s["P"].T if side == "right" else s["P"].T @ g
            if "exp_avg" not in s:
                s["exp_avg"], s["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
            s["step"] += 1
            k = s["step"]
            s["exp_avg"] = beta1 * s["exp_avg"] + (1 - beta1) * low
            s["exp_avg_sq"] = beta2 * s["exp_avg_sq"] + (1 - beta2) * low * low
            c1, c2 = 1 - beta1**k, 1 - beta2**k
            # the official √V + ε with ε·√c₂: the core's ε on √V̂ (module docstring)
            norm_grad = s["exp_avg"] / (s["exp_avg_sq"].sqrt() + HYPER["eps"] * math.sqrt(c2))
            back = norm_grad @ s["P"] if side == "right" else s["P"] @ norm_grad
            weights[name] = w - HYPER["lr"] * math.sqrt(c2) / c1 * SCALE * back
        history.append({name: (weights[name].clone(), state[name]["P"].clone()) for name in SHAPES})
    return history, clipped


def ours_run(dtype: torch.dtype, canonical: bool, steps: int = STEPS, **keys):
    params = {name: torch.nn.Parameter(initial(name).to(dtype)) for name in SHAPES}
    opt = lro.COAP([{"params": list(params.items()), "rank": RANK, "update_proj_gap": GAP, "stagger": False,
                     "projector_options": {"reproject_factor": LAMBDA, "canonical_signs": canonical}}],
                   scale=SCALE, **HYPER, **keys)
    history = []
    for t in range(steps):
        for name, p in params.items():
            p.grad = gradient(name, t).to(dtype)
        opt.step()
        history.append({name: (p.detach().clone(), opt.state[p]["projector"]["P"].clone())
                        for name, p in params.items()})
    return opt, params, history


# Tolerances, relative and absolute alike, on weights and bases of order 1. float64: the two sides compute
# the same formulas in other orders (autograd against the written-out gradient, their own QR and SVD calls),
# measured ≤ 1.7e-15 over the 20 steps; 1e-12 leaves a 600x margin and still sees the smallest change tried
# (dropping clip_grad_norm_'s 1e-6 guard moves P by 2e-8; dropping the cosine factor by 4e-2). float32 (one
# ulp 6e-8): the basis is recomputed from float32 products at each refresh, measured ≤ 5.8e-7 on P and
# 9e-8 on W (relative to 1 + |y|); 1e-5 leaves a 17x margin.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_trajectory_matches_the_official_update_over_sgd_steps_and_resvds(dtype):
    ref, clipped = official_run(canonical=True)
    assert True in clipped and False in clipped, "the grid should take clipped and unclipped P steps"
    _, _, ours = ours_run(dtype, canonical=True)
    tol = TOLERANCE[dtype]
    for t, (a, b) in enumerate(zip(ours, ref)):
        for name in SHAPES:
            for what, x, y in (("W", a[name][0], b[name][0]), ("P", a[name][1], b[name][1])):
                torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol, msg=lambda m, t=t, name=name, what=what: f"step {t} {name} {what}: {m}")


def test_lapack_signs_follow_the_official_code_exactly():
    """canonical_signs=False keeps LAPACK's signs: the official code's basis itself, not only its subspace."""
    ref, _ = official_run(canonical=False)
    _, _, ours = ours_run(torch.float64, canonical=False)
    for a, b in zip(ours, ref):
        for name in SHAPES:
            tol = TOLERANCE[torch.float64]
            torch.testing.assert_close(a[name][1], b[name][1], rtol=tol, atol=tol)
            torch.testing.assert_close(a[name][0], b[name][0], rtol=tol, atol=tol)


def test_the_steps_change_p_as_the_schedule_says():
    """P is the first sketch until step 2, moves a little at each SGD refresh (at most lr = 0.1 in norm) and
    is orthonormal again after each re-SVD; the counter in the state tells which refresh comes next."""
    opt, params, ours = ours_run(torch.float64, canonical=True)
    for name in SHAPES:
        ps = [h[name][1] for h in ours]
        assert torch.equal(ps[0], ps[1])  # no refresh at step 1
        for t in (2, 4, 8):  # SGD refreshes (counted before the increment: history index t)
            assert 0 < float((ps[t] - ps[t - 1]).norm()) <= 0.1 + 1e-12
        for t in (6, 12, 18):  # re-SVDs: orthonormal rows (right) or columns (left)
            basis = ps[t] if ps[t].shape[0] == RANK else ps[t].T
            torch.testing.assert_close(basis @ basis.T, torch.eye(RANK, dtype=torch.float64), atol=1e-12, rtol=0)
        assert opt.state[params[name]]["projector"]["refreshes"] == 10  # the first + 9 more


def test_the_written_out_gradient_is_autograds_also_where_a_norm_is_clamped():
    """The loss's gradient against autograd on the official loss, both sides, with a zero row of the moment
    (its norm clamped at 1e-8: the cosine then passes no gradient through it) and without a moment."""
    g = torch.Generator().manual_seed(3)
    for cos_dim in (1, 0):
        x = torch.randn(9, 7, generator=g, dtype=torch.float64)
        p = 0.5 * torch.randn(3, 7, generator=g, dtype=torch.float64)
        moment = torch.randn(9, 3, generator=g, dtype=torch.float64)
        moment[2] = 0.0 if cos_dim == 1 else moment[2]
        want = p.clone().requires_grad_(True)
        loss = F.mse_loss(x @ want.T @ want, x) * (1 - F.cosine_similarity(moment @ want, x, dim=cos_dim).mean())
        loss.backward()
        torch.testing.assert_close(coap_loss_grad(x, p, moment, cos_dim), want.grad, rtol=1e-12, atol=1e-12)
        plain = p.clone().requires_grad_(True)
        F.mse_loss(x @ plain.T @ plain, x).backward()
        torch.testing.assert_close(coap_loss_grad(x, p, None, cos_dim), plain.grad, rtol=1e-12, atol=1e-12)


def test_the_refresh_reads_the_rules_first_moment_as_it_was_before_the_step(monkeypatch):
    """The seam: at each refresh the projector is given the rule's first moment (Adam's M, dequantized
    under INT8 storage; Adafactor's with ``momentum``, none without), before this step's update."""
    seen = []
    original = lro.projectors.COAPProjector._sgd_step

    def spy(self, x, p, moment, side):
        seen.append(None if moment is None else moment.clone())
        return original(self, x, p, moment, side)

    monkeypatch.setattr(lro.projectors.COAPProjector, "_sgd_step", spy)
    w = torch.nn.Parameter(decaying_matrix(20, 12, seed=1, dtype=torch.float32))
    for keys, expect in (({}, "exp_avg"), ({"state_bits": 8, "min_8bit_size": 0}, "exp_avg"),
                         ({"rule": "adafactor", "momentum": 0.9}, "exp_avg"), ({"rule": "adafactor"}, None)):
        seen.clear()
        opt = lro.COAP([{"params": [w], "rank": RANK, "update_proj_gap": 2, "stagger": False}], lr=1e-3, **keys)
        before = []
        for t in range(3):
            w.grad = gradient("tall", t).float()
            if t == 2 and expect is not None:
                state = opt.state[w]
                before.append(lro.optim.state.first_moment(lro.rules.get(opt.param_groups[0]["rule"]), state).clone())
            opt.step()
        assert len(seen) == 1, keys  # one SGD refresh, at step 2
        if expect is None:
            assert seen[0] is None
        else:
            assert torch.equal(seen[0], before[0]), keys


def test_resume_is_bit_identical_across_sgd_steps_and_resvds():
    keys = {"rank": 4, "update_proj_gap": 2, "projector_options": {"reproject_factor": 2}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        model, opt, twin, _ = train_and_resume(lambda m: lro.COAP(lro.param_groups(m, **keys), lr=1e-2), batches(12), 5)
    assert_same_parameters(model, twin)
    counts = {s["projector"]["refreshes"] for s in opt.state.values() if "projector" in s}
    assert max(counts) >= 5  # the staggered schedule: every weight past its second re-SVD


def test_bf16_weights_keep_a_float32_basis():
    w = torch.nn.Parameter(decaying_matrix(20, 12, seed=1).to(torch.bfloat16))
    opt = lro.COAP([{"params": [w], "rank": RANK, "update_proj_gap": 1}], lr=1e-3)
    for t in range(3):
        w.grad = gradient("tall", t).to(torch.bfloat16)
        opt.step()
    assert opt.state[w]["projector"]["P"].dtype == torch.float32
    assert torch.isfinite(w).all()


def test_bad_options_and_combinations_are_refused_by_name():
    w = torch.nn.Parameter(torch.randn(20, 12))
    for option, value in (("reproject_factor", 0), ("lr", -1.0), ("max_norm", float("nan"))):
        with pytest.raises(ValueError, match=option):
            lro.projectors.make("coap", 4, **{option: value})
    with pytest.raises(ValueError, match="orthonormal"):  # P drifts off orthonormality between re-SVDs
        lro.FRUGAL([{"params": [w], "rank": 4, "projector": "coap"}])
    assert "row shards" in lro.projectors.COAPProjector.shard_error("right", {})
    with pytest.raises(ValueError, match="rank exceeds"):
        lro.projectors.make("coap", 13).update(torch.randn(20, 12))
