"""The inner rules beyond Adam (DESIGN.md section 4), each against a float64 reference written here
from its paper, and against torch's own optimizers where they share the rule.

Adafactor (Shazeer & Stern 2018, Algorithm 4 with update clipping, torch.optim.Adafactor's ε placement),
on the low-rank R (r×n or m×r) at step t = 1, 2, ...:
    w = t^c;  r ← (1−w) r + w·mean_cols(R²);  c ← (1−w) c + w·mean_rows(R²)
    V̂ = r cᵀ / max(mean(r), ε);  U = R / √max(V̂, ε²);  Û = U / max(1, RMS(U)/d)
    [M ← β₁M + (1−β₁)Û, direction M]  else direction Û
    W ← W − lr·(scale·back(direction) + wd·W)

Orthogonal (SUMO, Refael et al. 2025, Algorithm 1; Muon's RMS matching):
    at a refresh: M ← map(M) (rotate);   M ← μM + (1−μ)R;   O = U Vᵀ of M's SVD
    W ← W − lr·(scale·0.2·√max(shape(R))·back(O) + wd·W)
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

import lowrank_optim as lro
from conftest import batches, decaying_matrix, make_model, train
from lowrank_optim.rules import adafactor, orthogonal


def gradient(t: int, W: torch.Tensor) -> torch.Tensor:
    m, n = W.shape
    return decaying_matrix(m, n, seed=300 + t, dtype=W.dtype) + 0.5 * W


def svd_basis(G: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U[:, :rank] if side == "left" else Vh[:rank]


def project(basis, G, side):
    return basis.T @ G if side == "left" else G @ basis.T


def back(basis, N, side):
    return basis @ N if side == "left" else N @ basis


def rotation(old, new, side):
    """old coordinates → new: T M (left, T = P_newᵀ P_old) or M T (right, T = Q_old Q_newᵀ)."""
    return new.T @ old if side == "left" else old @ new.T


def reference_adafactor(W0, steps, *, rank, gap, scale, lr, wd, eps, c, d, beta1, side, rotate=False):
    W = W0.clone()
    basis = None
    row = col = M = None
    for t in range(1, steps + 1):
        G = gradient(t - 1, W)
        if (t - 1) % gap == 0:
            new = svd_basis(G, rank, side)
            if rotate and basis is not None:
                T = rotation(basis, new, side)
                rot = (lambda X: T @ X) if side == "left" else (lambda X: X @ T)
                V = (row @ col) / max(row.mean().item(), eps)
                V = rot(V).abs()
                row, col = V.mean(dim=1, keepdim=True), V.mean(dim=0, keepdim=True)
                if M is not None:
                    M = rot(M)
            basis = new
        R = project(basis, G, side)
        if row is None:
            row, col = torch.zeros(R.shape[0], 1, dtype=R.dtype), torch.zeros(1, R.shape[1], dtype=R.dtype)
            M = torch.zeros_like(R) if beta1 is not None else None
        w = t**c
        row = (1 - w) * row + w * (R * R).mean(dim=1, keepdim=True)
        col = (1 - w) * col + w * (R * R).mean(dim=0, keepdim=True)
        V = (row @ col) / max(row.mean().item(), eps)
        U = R / torch.sqrt(torch.clamp(V, min=eps * eps))
        U = U / max(1.0, (U.square().mean().sqrt() / d).item())
        if beta1 is not None:
            M = beta1 * M + (1 - beta1) * U
            U = M
        W = W - lr * (scale * back(basis, U, side) + wd * W)
    return W


def reference_orthogonal(W0, steps, *, rank, gap, scale, lr, wd, mu, side, rotate=True):
    W = W0.clone()
    basis = M = None
    for t in range(steps):
        G = gradient(t, W)
        if t % gap == 0:
            new = svd_basis(G, rank, side)
            if rotate and basis is not None:
                T = rotation(basis, new, side)
                M = T @ M if side == "left" else M @ T
            basis = new
        R = project(basis, G, side)
        if M is None:
            M = torch.zeros_like(R)
        M = mu * M + (1 - mu) * R
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)
        O = U @ Vh * (0.2 * math.sqrt(max(R.shape)))
        W = W - lr * (scale * back(basis, O, side) + wd * W)
    return W


def run_ours(cls, W0, steps, opt_kw, **keys):
    # the float64 references take LAPACK's singular vectors as they come: ours too, by the explicit option
    keys.setdefault("projector_options", {"canonical_signs": False})
    W = torch.nn.Parameter(W0.clone())
    opt = cls([{"params": [W], **keys}], **opt_kw)
    for t in range(steps):
        W.grad = gradient(t, W.detach())
        opt.step()
    return W.detach(), opt


SIDES = [((24, 16), "std", "right"), ((16, 24), "std", "left"), ((24, 16), "left", "left"), ((16, 24), "right", "right")]


@pytest.mark.parametrize("shape,proj_type,side", SIDES)
@pytest.mark.parametrize("beta1,rotate", [(None, False), (0.9, True)], ids=["no-momentum-keep", "momentum-rotate"])
def test_adafactor_matches_float64_reference_across_refreshes(shape, proj_type, side, beta1, rotate):
    W0 = decaying_matrix(*shape, seed=11)
    keys = dict(rank=4, update_proj_gap=3, scale=0.25, proj_type=proj_type, momentum=beta1,
                on_refresh="rotate" if rotate else "keep")
    opt_kw = dict(lr=0.01, eps=1e-8, weight_decay=0.1)
    ours, opt = run_ours(lro.GaLoreAdafactor, W0, 8, opt_kw, **keys)  # refreshes at steps 1, 4, 7
    ref = reference_adafactor(W0, 8, rank=4, gap=3, scale=0.25, lr=0.01, wd=0.1, eps=1e-8, c=-0.8, d=1.0,
                              beta1=beta1, side=side, rotate=rotate)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    state = next(iter(opt.state.values()))
    m, n = shape
    low = (4, n) if side == "left" else (m, 4)
    assert state["row_var"].shape == (low[0], 1) and state["col_var"].shape == (1, low[1])
    assert ("exp_avg" in state) == (beta1 is not None) and "exp_avg_sq" not in state


def test_adafactor_clips_large_updates():
    """d bounds the RMS of Û: with a small clip threshold the direction's RMS is exactly d."""
    state = adafactor.fresh_state((6, 5), torch.float64, torch.device("cpu"), None)
    state["step"] += 1
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = adafactor.direction(x, state, beta2_decay=-0.8, eps=1e-30, clip_threshold=0.1, momentum=None)
    torch.testing.assert_close(out.square().mean().sqrt(), torch.tensor(0.1, dtype=torch.float64))


@pytest.mark.parametrize("clip", [1.0, 0.05], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_blocked_whole_step_is_the_direction_applied(monkeypatch, clip, beta1):
    """step_factored (whole 2-D plain parameters, in row blocks: here 4 rows, 3 blocks and a short last one)
    against W·(1 − lr·wd) − lr·direction from one unblocked direction call, over steps where the clipping is
    off and where it binds. Everything but the RMS is element for element the same arithmetic; the RMS is
    summed per block in float32, so the two may differ by a few ulps of the clipping divisor, which moves
    each update entry by as many ulps (rtol 1e-6, about 8 float32 ulps)."""
    monkeypatch.setattr(adafactor, "BLOCK", 4 * 7)
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(14, 7, generator=gen)
    grads = [torch.randn(14, 7, generator=gen) * (1 + t) for t in range(4)]
    opts = dict(beta2_decay=-0.8, eps=1e-8, clip_threshold=clip, momentum=beta1)
    ours, ref = w0.clone(), w0.clone()
    s_ours = adafactor.fresh_state(w0.shape, w0.dtype, w0.device, beta1)
    s_ref = adafactor.fresh_state(w0.shape, w0.dtype, w0.device, beta1)
    lr, decay = 0.01, 1 - 0.01 * 0.1
    for g in grads:
        s_ours["step"] += 1
        s_ref["step"] += 1
        adafactor.step_factored(ours, g, s_ours, lr=lr, decay=decay, **opts)
        d = adafactor.direction(g, s_ref, **opts)
        ref.mul_(decay).add_(d, alpha=-lr)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
        if beta1 is None:  # the case meant: the clipping binds (RMS of Û is d) or it does not (RMS above d)
            rms = d.square().mean().sqrt().item()
            assert rms == pytest.approx(clip, rel=1e-5) if clip < 1 else rms > 0.1
    for key in s_ref:  # M averages signed updates: an entry that nearly cancels holds ulps of its larger terms
        scale = s_ref[key].abs().max().item()
        torch.testing.assert_close(s_ours[key], s_ref[key], rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("shape", [(12, 7), (9,)], ids=["factored-2d", "full-1d"])
def test_adafactor_direction_equals_torch_adafactor(shape):
    """The group's plain parameters run Adafactor on the whole gradient; its direction is
    torch.optim.Adafactor's to rounding. This is also the case of "a projector that keeps the whole short
    side": a weight whose rank is not below its short side is not projected and gets the group's rule on
    its whole gradient (any projection onto a full orthonormal basis would rotate G, and Adafactor is not
    rotation-invariant, so only the identity can equal torch). The step differs, on purpose: torch multiplies the direction by
    the relative step α = max(ε₂, RMS(W))·min(lr, 1/√t), we by lr (no relative step, as GaLore's
    Adafactor). So each step's weight change is compared after dividing by each one's step size."""
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) * (1 + t) for t in range(5)]
    ours = torch.nn.Parameter(W0.clone())
    theirs = torch.nn.Parameter(W0.clone())
    eps = torch.finfo(torch.float32).eps
    with pytest.warns(lro.RankFallbackWarning, match="plain Adafactor"):  # no rank: whole-tensor Adafactor
        opt = lro.GaLoreAdafactor([ours], lr=0.01, eps=eps, weight_decay=0.0)
    ref = torch.optim.Adafactor([theirs], lr=0.01, eps=(eps, 1e-3), weight_decay=0.0)
    for t, grad in enumerate(grads, start=1):
        before_ours, before_theirs = ours.detach().clone(), theirs.detach().clone()
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        alpha = max(1e-3, (before_theirs.norm() / math.sqrt(before_theirs.numel())).item()) * min(0.01, t**-0.5)
        torch.testing.assert_close((before_ours - ours.detach()) / 0.01, (before_theirs - theirs.detach()) / alpha,
                                   rtol=2e-4, atol=1e-5)
    assert set(opt.state[ours]) == set(ref.state[theirs])  # the same statistics: step, row/col_var or variance


@pytest.mark.parametrize("shape,proj_type,side", SIDES)
def test_orthogonal_matches_float64_reference_across_refreshes(shape, proj_type, side):
    W0 = decaying_matrix(*shape, seed=13)
    keys = dict(rank=4, update_proj_gap=3, scale=0.25, proj_type=proj_type, projector="svd")
    opt_kw = dict(lr=0.01, weight_decay=0.1)
    ours, opt = run_ours(lro.SUMO, W0, 8, opt_kw, **keys)
    ref = reference_orthogonal(W0, 8, rank=4, gap=3, scale=0.25, lr=0.01, wd=0.1, mu=0.95, side=side)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    state = next(iter(opt.state.values()))
    m, n = shape
    assert state["momentum_buffer"].shape == ((4, n) if side == "left" else (m, 4))
    assert set(state) == {"step", "momentum_buffer", "projector", "next_refresh"}  # one momentum, the basis, the schedule


def test_orthogonal_with_rank_equal_short_side_is_muon_with_its_lr_adjustment():
    """Rank = the short side, exact SVD, Nesterov: the update is torch.optim.Muon's with
    adjust_lr_fn='match_rms_adamw', except Muon orthogonalizes by Newton–Schulz in bfloat16. With the SVD
    swapped into Muon's update the two agree; with our Newton–Schulz they agree bit for bit."""
    g = torch.Generator().manual_seed(5)
    G = torch.randn(16, 10, generator=g)
    state = orthogonal.fresh_state(G.shape, torch.float32, G.device)
    out = orthogonal.direction(G, state, momentum=0.95, nesterov=True, method="newton_schulz", ns_steps=5)
    buf = torch.zeros_like(G).lerp_(G, 0.05)
    theirs = _zeropower_via_newtonschulz(G.lerp(buf, 0.95), (3.4445, -4.775, 2.0315), 5, 1e-7)
    assert torch.equal(out, theirs.float() * (0.2 * math.sqrt(16)))


@pytest.mark.parametrize("shape", [(8, 8), (5, 13), (40, 6), (1, 9)])
def test_newton_schulz_is_torch_muons_bit_for_bit(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    ours = orthogonal.newton_schulz(x, 5)
    theirs = _zeropower_via_newtonschulz(x, (3.4445, -4.775, 2.0315), 5, 1e-7)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_svd_orthogonalization_is_exact_and_drops_null_directions():
    x = decaying_matrix(6, 10, seed=2, decay=0.5)
    o = orthogonal.orthogonalize_svd(x)
    torch.testing.assert_close(o @ o.T, torch.eye(6, dtype=x.dtype), rtol=0, atol=1e-12)
    assert torch.equal(orthogonal.orthogonalize_svd(torch.zeros(4, 7)), torch.zeros(4, 7))
    rank2 = x[:2].repeat(3, 1)  # rank 2: the orthogonal factor keeps rank 2
    assert torch.linalg.matrix_rank(orthogonal.orthogonalize_svd(rank2)) == 2


def test_batched_polar_factors_are_each_matrixs_own_and_a_nan_stays_in_its_matrix():
    """orthogonalize_svd_many (one eigh per shape) gives each matrix the bits orthogonalize_svd gives it
    alone (LAPACK steps every matrix of a batch on its own, so no tolerance), and a non-finite matrix in a
    batch is NaN without touching its neighbours: its Gram matrix is zeroed before the shared eigh."""
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(s, generator=gen) for s in [(12, 5), (5, 12), (12, 5), (12, 5), (3, 3)]]
    xs.append(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    xs[2][3, 1] = float("nan")
    xs[3][0, 0] = float("inf")
    many = orthogonal.orthogonalize_svd_many(xs)
    for i, (x, got) in enumerate(zip(xs, many)):
        alone = orthogonal.orthogonalize_svd(x)
        assert got.shape == x.shape and got.dtype == alone.dtype
        if i in (2, 3):
            assert got.isnan().all() and alone.isnan().all()
        else:
            assert torch.equal(got, alone), i
            o = got.double() if x.shape[0] >= x.shape[1] else got.double().T
            # orthonormal columns, to a float32 polar factor's 1e-6-level error per entry
            torch.testing.assert_close(o.T @ o, torch.eye(min(x.shape), dtype=torch.float64), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="2-D"):
        orthogonal.orthogonalize_svd_many([torch.zeros(3)])


@pytest.mark.parametrize("shape", [(128, 512), (1376, 128), (128, 1376)])
def test_float32_polar_factor_is_closer_to_the_exact_one_than_lapacks_float32_svd(shape):
    """U Vᵀ of float32 momenta (LLaMA-60M's low-rank shapes, singular values over three decades, above the
    drop threshold of max(shape)·ε·σ_max) against the float64 SVD of the same float32 matrix: the float64
    Gram/eigh with the product in float32 is 2.4–4e-6 off per entry (ε₃₂·‖X‖·‖(XᵀX)^(-1/2)‖ grows with the
    condition number, 1e3 here); LAPACK's float32 SVD, what SUMO's official code calls, 1.6–5.5e-5."""
    gen = torch.Generator().manual_seed(sum(shape))
    k = min(shape)
    sv = torch.logspace(0, -3, k, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen, dtype=torch.float64))
    x = ((u * sv) @ v.T).float()
    uu, _, vh = torch.linalg.svd(x.double(), full_matrices=False)  # the exact factor of the float32 matrix
    exact = uu @ vh
    got = orthogonal.orthogonalize_svd(x)
    u32, _, vh32 = torch.linalg.svd(x, full_matrices=False)
    lapack = (u32 @ vh32).double()
    assert got.dtype == torch.float32
    err = (got.double() - exact).abs().max()
    assert err < 1e-5 and err < (lapack - exact).abs().max() / 2


def test_state_bytes_are_as_documented():
    """Per m×n weight at rank r (left side, n > m): Adam 2·r·n floats, Adafactor r + n, orthogonal r·n."""
    m, n, r = 16, 40, 4
    sizes = {}
    for name, cls in (("adam", lro.GaLoreAdamW), ("adafactor", lro.GaLoreAdafactor), ("orthogonal", lro.SUMO)):
        W = torch.nn.Parameter(torch.randn(m, n))
        opt = cls([{"params": [W], "rank": r}], lr=1e-3)
        W.grad = torch.randn(m, n)
        opt.step()
        sizes[name] = opt.state_nbytes()["moments"]
    assert sizes == {"adam": 4 * 2 * r * n, "adafactor": 4 * (r + n), "orthogonal": 4 * r * n}


def test_plain_parameters_follow_the_rule_of_their_group():
    """GaLoreAdafactor: plain parameters get (factored) Adafactor; SUMO: plain parameters get AdamW."""
    model = make_model()
    opt = lro.GaLoreAdafactor(lro.param_groups(model, rank=8), lr=1e-3)
    train(model, opt, batches(1))
    emb = opt.state[model.embed_tokens.weight]
    assert emb["row_var"].shape == (40, 1) and emb["col_var"].shape == (1, 32)
    assert "variance" in opt.state[model.norm.weight]
    model = make_model()
    opt = lro.SUMO(lro.param_groups(model, rank=8), lr=1e-3)
    train(model, opt, batches(1))
    assert set(opt.state[model.embed_tokens.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert "momentum_buffer" in opt.state[model.layers[0].up_proj.weight]


@pytest.mark.parametrize("keys,option", [
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"rule": "lion"}, "rule"),
    ({"ns_steps": 0}, "ns_steps"),
    ({"orthogonalize": "qr"}, "orthogonalize"),
    ({"beta2_decay": 0.5}, "beta2_decay"),
    ({"clip_threshold": 0.0}, "clip_threshold"),
    ({"rule": "adafactor", "state_bits": 8}, "state_bits"),
])
def test_bad_rule_options_are_refused_by_name(keys, option):
    model = make_model()
    with pytest.raises(ValueError, match=option):
        lro.SUMO(lro.param_groups(model, rank=8, **keys), lr=1e-3)
    W = torch.nn.Parameter(torch.randn(8, 8))
    opt = lro.SUMO([{"params": [W], "rank": 2}], lr=1e-3)
    with pytest.raises(ValueError, match=option):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(8, 8))], "rank": 2, **keys})
    assert len(opt.param_groups) == 1


def test_orthogonal_rank_above_the_short_side_is_refused_naming_the_parameter():
    model = make_model()
    groups = lro.param_groups(model, rank=33)  # q_proj is 32×32
    with pytest.raises(ValueError, match=r"q_proj.*rank=33 is above its short side 32"):
        lro.SUMO(groups, lr=1e-3)
    with pytest.warns(lro.RankFallbackWarning):  # other rules fall back to AdamW for such a parameter
        lro.GaLoreAdamW(lro.param_groups(make_model(), rank=33), lr=1e-3)
