"""The fast path (LowRankAdamW and the presets) against the readable reference,
lowrank_optim.optim.reference, over every projector, both sides, every on_refresh policy, float64 and float32.

Each run steps a no-rank group (a 6×5 weight) and a rank group of a tall 12×8 weight (right side), a
12 bias, a wide 8×12 weight (left side) and a weight whose short side is the rank (stepped as AdamW),
for 7 steps with update_proj_gap 2: refreshes at steps 0, 2, 4, 6, three of them changing the subspace.

The gradients are synthetic and do not depend on the weights: step t's gradient of parameter i is
1.1ᵗ·D(t, i), with D a matrix of distinct singular values (conftest.decaying_matrix), so every SVD basis
is well defined; it is the gradient of the linear loss Σ ⟨G, W⟩, whose values are compared as well.
Both optimizers therefore see the same gradients and refresh the same subspaces; what is compared is
what they do with them, and a rounding difference in one step is not fed back into the next gradient.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import pytest
import torch

import lowrank_optim as lro
from conftest import decaying_matrix, projector_keys
from lowrank_optim.optim.reference import ReferenceLowRankAdamW

RANK, GAP, STEPS = 3, 2, 7
HEAD_DIM = 4  # shared_head's heads: the weights' head axes (8, 12) in 4-wide heads, each of rank >= RANK
HYPER = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)

# Tolerances, relative and absolute alike (allclose's tol·(1 + |y|), on weights and losses of order 1).
# The two sides compute the same formulas with different roundings (lerp against β·M + (1 − β)·R, one
# addmm_ against a matmul and a subtraction, √(V/c) against √V/√c, ...), a few ulps a step, and the
# differences are not amplified: the gradients do not depend on the weights, and every sign() sees a
# residual away from 0 (checked below). float64: measured ≤ 5e-16; 1e-12 leaves a 2000× margin and
# still sees the smallest formula change tried (dropping a 1e-8 guard moves the weights by 1e-10).
# float32 (one ulp is 6e-8): measured ≤ 2.2e-7; 1e-5 leaves a 45× margin for a core that rounds in yet
# other places, and is 700× below the smallest real disagreement found (7.7e-3: Adam's bias correction
# not restarted at a reset, since fixed).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
# The smallest |entry| of a sign() argument, relative to its largest, for the comparison to be well posed:
# both sides compute the residual to a few ulps of its largest entry, so an entry 16 ulps from 0 (1e-6 in
# float32, 1e-12 is 4500 ulps in float64) keeps its sign on both. (haar's residual on this grid has one
# entry at 2.9e-6 of the largest, where both sides agree to 3e-7 in float32.)
SIGN_MARGIN = {torch.float64: 1e-12, torch.float32: 1e-6}

# name: (fast class, the keys the fast side is given, the method as the reference states it, rank).
# The presets are given nothing beyond the grid's keys: their defaults are what is tested.
SGD = dict(residual="sgd", residual_lr_scale=0.5, limiter=1.01, scale=0.5)
METHODS = {
    "LowRankAdamW-sgd": (lro.LowRankAdamW, SGD, SGD, RANK),
    "GaLoreAdamW": (lro.GaLoreAdamW, {}, dict(scale=0.25), RANK),
    "APOLLO": (lro.APOLLO, {}, dict(scaling="channel", limiter=1.01, scale=1.0), RANK),
    # APOLLO-Mini's default scale below width 512 is 128·d/512; d = 8, the grid's most common short side
    "APOLLOMini": (lro.APOLLOMini, {}, dict(scaling="tensor", limiter=1.01, scale=128.0 * 8 / 512), 1),
    "FRUGAL": (lro.FRUGAL, {}, dict(residual="sign", residual_lr_scale=1.0, scale=1.0), RANK),
    "Fira": (lro.Fira, {}, dict(residual="fira", limiter=1.01, scale=1.0), RANK),
    # error feedback: A = G + E refreshes and is projected, E = A − Π(A) (any projector)
    "LowRankAdamW-ef": (lro.LowRankAdamW, dict(residual="error_feedback", scale=0.5),
                        dict(residual="error_feedback", scale=0.5), RANK),
}

def shapes(rank: int) -> list[tuple[int, ...]]:
    return [(6, 5), (12, 8), (12,), (8, 12), (rank, 7)]


@functools.lru_cache(maxsize=None)
def gradients(dtype: torch.dtype, rank: int) -> list[list[torch.Tensor]]:
    out = []
    for t in range(STEPS):
        step = []
        for i, shape in enumerate(shapes(rank)):
            if len(shape) == 1:
                g = torch.randn(shape, generator=torch.Generator().manual_seed(100 * i + t), dtype=torch.float64)
            else:
                g = decaying_matrix(*shape, seed=100 * i + t)
            step.append((1.1**t * g).to(dtype))
        out.append(step)
    return out


@functools.lru_cache(maxsize=None)
def initial_weights(rank: int) -> list[torch.Tensor]:
    return [decaying_matrix(*s, seed=50 + i) if len(s) == 2 else torch.linspace(-1, 1, s[0], dtype=torch.float64)
            for i, s in enumerate(shapes(rank))]


def run(make, dtype, rank, keys, watch=None):
    """``make(groups)`` stepped STEPS times: (optimizer, parameters, losses, weights after each step)."""
    params = [torch.nn.Parameter(w.to(dtype, copy=True)) for w in initial_weights(rank)]
    opt = make([{"params": params[:1]}, {"params": params[1:], "rank": rank, **keys}])
    losses, weights = [], []
    for grads in gradients(dtype, rank):
        losses.append(sum(float((g.double() * p.detach().double()).sum()) for p, g in zip(params, grads)))
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        if watch is not None:
            watch(opt, params, grads)
        weights.append([p.detach().clone() for p in params])
    return opt, params, losses, weights


def fast(method, dtype, keys):
    cls, fast_keys, _, rank = METHODS[method]
    with warnings.catch_warnings():  # the (rank, 7) weight is stepped as AdamW: the grid test checks it
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        # the reference states galore-torch's schedule (every subspace at t % gap == 0); the default spreads
        # the refreshes over the gap (tests/test_schedule.py)
        return run(lambda groups: cls(groups, **HYPER, **fast_keys, stagger=False), dtype, rank, keys)


def reference(method, dtype, keys, watch=None):
    _, _, ref_keys, rank = METHODS[method]
    return run(lambda groups: ReferenceLowRankAdamW(groups, **HYPER, **ref_keys), dtype, rank, keys, watch)


def sign_margin(opt, params, grads, margins):
    """Record min |S| / max |S| of each projected weight's residual S (exact zeros aside: sparse's kept rows)."""
    for p, g in zip(params, grads):
        proj = opt.state[p].get("projector")
        if proj is not None:
            rest = g - proj.project_back(proj.project(g))
            margins.append(float(rest.abs()[rest != 0].min() / rest.abs().max()))


def disagreements(a, b, tol):
    """The steps at which losses or weights of two runs differ beyond ``tol``."""
    def close(x, y):
        return torch.allclose(torch.as_tensor(x), torch.as_tensor(y), rtol=tol, atol=tol)

    return [t for t in range(STEPS)
            if not close(a[2][t], b[2][t]) or not all(close(x, y) for x, y in zip(a[3][t], b[3][t]))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("on_refresh", ["keep", "reset", "rotate"])
@pytest.mark.parametrize("projector", lro.projectors.available())
@pytest.mark.parametrize("method", list(METHODS))
def test_fast_path_matches_the_reference(method, projector, on_refresh, dtype):
    keys = dict(update_proj_gap=GAP, **projector_keys(projector, HEAD_DIM), on_refresh=on_refresh)
    residual = METHODS[method][2].get("residual", "drop")
    if lro.updates.REGISTRY[residual].uses_residual and not lro.projectors.REGISTRY[projector].orthonormal:
        with pytest.raises(ValueError, match="orthonormal"):
            fast(method, dtype, keys)
        with pytest.raises(ValueError, match="orthonormal"):
            reference(method, dtype, keys)
        pytest.skip(f"residual={residual!r} needs G - project_back(project(G)) to be the part of G outside the "
                    f"subspace, and {projector!r} has no orthonormal basis: both sides refuse it")
    margins = []
    watch = (lambda *a: sign_margin(*a, margins)) if residual == "sign" else None
    ref = reference(method, dtype, keys, watch)
    assert not margins or min(margins) > SIGN_MARGIN[dtype], "a sign() argument is too close to 0 for this comparison"
    got = fast(method, dtype, keys)
    bad = disagreements(got, ref, TOLERANCE[dtype])
    for t in bad[:1]:
        worst = max(float((x - y).abs().max()) for x, y in zip(got[3][t], ref[3][t]))
        pytest.fail(f"first disagreement at step {t}: losses {got[2][t]!r} vs {ref[2][t]!r}, weights by {worst:.3g}")


def test_the_grid_exercises_what_it_claims():
    """Sides, plain parameters, the limiter and the refresh policies all change the numbers compared above."""
    keys = dict(update_proj_gap=GAP, projector="svd", on_refresh="keep")
    opt, params, _, keep = reference("Fira", torch.float64, keys)
    plain, tall, bias, wide, small = params
    assert opt.state[tall]["projector"].side == "right" and opt.state[wide]["projector"].side == "left"
    assert all("projector" not in opt.state[p] for p in (plain, bias, small))
    fast_opt, fast_params, _, _ = fast("Fira", torch.float64, keys)
    assert all(("projector" in fast_opt.state[p]) == ("projector" in opt.state[q]) for p, q in zip(fast_params, params))
    unlimited = run(lambda groups: ReferenceLowRankAdamW(groups, **HYPER, residual="fira"), torch.float64, RANK, keys)
    assert (keep[-1][1] - unlimited[3][-1][1]).abs().max() > 1e-6, "the norm-growth limiter never engaged"
    for policy in ("reset", "rotate"):
        other = reference("Fira", torch.float64, {**keys, "on_refresh": policy})[3]
        assert (keep[-1][1] - other[-1][1]).abs().max() > 1e-6, f"on_refresh={policy!r} changed nothing"


@pytest.mark.parametrize("projector", [name for name, cls in sorted(lro.projectors.REGISTRY.items())
                                       if "canonical_signs" in inspect.signature(cls).parameters])
def test_projector_options_reach_both_sides_unchanged(projector):
    """Both sides build their projectors from the same options, so they follow the signs chosen (and the
    projectors' default, whatever it is). The option flips basis vectors (the final bases differ); where
    moments are kept across SVD refreshes that changes the numbers too, but online_pca and coap take one
    SVD in this grid, and their steps after it are equivariant to its signs."""
    finals = []
    for canonical in (False, True):
        keys = dict(update_proj_gap=GAP, **projector_keys(projector, HEAD_DIM), on_refresh="keep",
                    projector_options={"canonical_signs": canonical})
        opt, params, *ref = reference("GaLoreAdamW", torch.float64, keys)
        assert not disagreements(fast("GaLoreAdamW", torch.float64, keys), (opt, params, *ref), TOLERANCE[torch.float64])
        finals.append([opt.state[p]["projector"].basis() for p in params if "projector" in opt.state[p]])
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(*finals)), "canonical_signs changed no basis here"
