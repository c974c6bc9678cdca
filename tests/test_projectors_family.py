"""The projector family beside svd: rsvd, dct, random, sparse, online_pca (DESIGN.md sections 3, 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

import lowrank_optim as lro
from conftest import decaying_matrix, roundtrip
from lowrank_optim.projectors import Projector, choose_side
from lowrank_optim.projectors import dct as dct_module
from lowrank_optim.projectors.random_proj import gaussian, mix_seed

FAMILY = ["rsvd", "dct", "random", "sparse", "online_pca"]
ORTHONORMAL = ["svd", "rsvd", "dct", "sparse", "online_pca"]  # online_pca: right after its SVD
PROJ_TYPES = ["std", "reverse_std", "left", "right"]
SHAPES = [(30, 20), (20, 30)]


def dense_back(B: torch.Tensor, low: torch.Tensor, side: str) -> torch.Tensor:
    return B @ low if side == "left" else low @ B


def dense_project(B: torch.Tensor, G: torch.Tensor, side: str) -> torch.Tensor:
    return B.T @ G if side == "left" else G @ B.T


def energy(B: torch.Tensor, G: torch.Tensor, side: str) -> float:
    """‖Π G‖² / ‖G‖² for Π the orthogonal projection onto the span of B (orthonormalized in float64,
    so a non-orthonormal basis is judged by its subspace alone)."""
    B, G = B.double(), G.double()
    q = torch.linalg.qr(B if side == "left" else B.T).Q
    return float(torch.linalg.norm(dense_project(q if side == "left" else q.T, G, side)) ** 2 / torch.linalg.norm(G) ** 2)


def random_subspace_energy(G: torch.Tensor, r: int, side: str, seed: int = 11) -> float:
    g = torch.Generator().manual_seed(seed)
    d = G.shape[0] if side == "left" else G.shape[1]
    B = torch.randn(d, r, generator=g, dtype=torch.float64)
    return energy(B if side == "left" else B.T, G, side)


def snapshot(proj: Projector) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in proj.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        if isinstance(a[k], torch.Tensor) != isinstance(b[k], torch.Tensor):
            return False
        if isinstance(a[k], torch.Tensor):
            if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


# ---------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_shapes_and_sides(name, shape, proj_type):
    m, n = shape
    r = 4
    G = decaying_matrix(m, n, seed=1, dtype=torch.float32)
    proj = lro.projectors.make(name, r, proj_type=proj_type)
    proj.update(G)
    side = choose_side(shape, proj_type)
    assert proj.side == side
    low = proj.project(G)
    assert low.shape == ((r, n) if side == "left" else (m, r)) == proj.low_rank_shape(shape)
    assert low.dtype == G.dtype
    assert proj.project_back(low).shape == shape
    assert proj.basis().shape == ((m, r) if side == "left" else (r, n))
    proj.check_fits(shape)


@pytest.mark.parametrize("name", ORTHONORMAL + ["random"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_maps_are_the_basis_formula(name, shape, proj_type):
    """project = Bᵀ G / G Bᵀ and project_back = B R / R B with B = basis(), checked in float64;
    for the orthonormal ones BᵀB = I, so project_back(project(G)) is the orthogonal projection."""
    G = decaying_matrix(*shape, seed=2)
    proj = lro.projectors.make(name, 5, proj_type=proj_type)
    proj.update(G)
    B = proj.basis()
    assert B.dtype == torch.float64
    side = proj.side
    torch.testing.assert_close(proj.project(G), dense_project(B, G, side), rtol=1e-12, atol=1e-13)
    want = B @ B.T @ G if side == "left" else G @ B.T @ B
    torch.testing.assert_close(proj.project_back(proj.project(G)), want, rtol=1e-12, atol=1e-13)
    if name in ORTHONORMAL:
        gram = B.T @ B if side == "left" else B @ B.T
        torch.testing.assert_close(gram, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_apply_back_equals_the_dense_formula(name, proj_type):
    G = decaying_matrix(30, 20, seed=3)
    proj = lro.projectors.make(name, 4, proj_type=proj_type)
    proj.update(G)
    proj.update(decaying_matrix(30, 20, seed=4))  # online_pca: the gradient-step path, not the SVD
    low = proj.project(G)
    W = decaying_matrix(30, 20, seed=5)
    want = 0.9 * W - 0.5 * proj.project_back(low)
    proj.apply_back(W, low, alpha=-0.5, beta=0.9)
    torch.testing.assert_close(W, want, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------- rsvd
@pytest.mark.parametrize("shape", [(200, 120), (120, 200)])
@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_rsvd_energy_matches_svd_on_a_decaying_spectrum(shape, proj_type):
    """Energy ‖PPᵀG‖²/‖G‖² at r=16, decay 0.95, float32, seed 7. Figures seen (svd / rsvd with the
    default 2 power steps / 1 step / none): svd captures 0.8063 in every case;
    200×120 left 0.8059 (0.9995 of svd) / 0.8024 / 0.7682, right 0.8051 (0.9985) / 0.7969 / 0.6874;
    120×200 left 0.8057 (0.9993) / 0.8003 / 0.7084, right 0.8061 (0.9998) / 0.8042 / 0.7794."""
    G = decaying_matrix(*shape, seed=7, decay=0.95, dtype=torch.float32)
    r = 16
    svd = lro.projectors.make("svd", r, proj_type=proj_type)
    rsvd = lro.projectors.make("rsvd", r, proj_type=proj_type)
    no_power = lro.projectors.make("rsvd", r, proj_type=proj_type, power_iters=0)
    for p in (svd, rsvd, no_power):
        p.update(G)
    best = energy(svd.basis(), G, svd.side)
    got = energy(rsvd.basis(), G, rsvd.side)
    assert got >= 0.98 * best
    assert got <= best + 1e-6  # Eckart-Young: nothing beats the SVD
    # the power steps are what close the gap on a slowly decaying spectrum
    assert energy(no_power.basis(), G, no_power.side) < got - 0.02


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_rsvd_recovers_an_exactly_rank_r_matrix(shape, proj_type):
    g = torch.Generator().manual_seed(3)
    r = 4
    G = torch.randn(shape[0], r, generator=g, dtype=torch.float64) @ torch.randn(r, shape[1], generator=g, dtype=torch.float64)
    proj = lro.projectors.make("rsvd", r, proj_type=proj_type, power_iters=0)
    proj.update(G)
    torch.testing.assert_close(proj.project_back(proj.project(G)), G, rtol=0, atol=1e-11)


def test_rsvd_draws_from_seed_and_counter():
    """Ω depends on (seed, refresh count) only: twins agree, the next refresh draws anew."""
    G = decaying_matrix(60, 40, seed=1, decay=0.97)
    a = lro.projectors.make("rsvd", 3, seed=5, power_iters=0, oversample=0)
    b = lro.projectors.make("rsvd", 3, seed=5, power_iters=0, oversample=0)
    c = lro.projectors.make("rsvd", 3, seed=6, power_iters=0, oversample=0)
    for p in (a, b, c):
        p.update(G)
    assert torch.equal(a.basis(), b.basis())
    assert not torch.allclose(a.basis().abs(), c.basis().abs())
    first = a.basis().clone()
    a.update(G)
    assert a.state_dict()["refreshes"] == 2 and isinstance(a.state_dict()["refreshes"], int)
    # no oversampling or power steps on a flat spectrum: a new Ω gives a visibly different basis
    assert not torch.allclose(a.basis().abs(), first.abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rsvd_basis_does_not_depend_on_the_gradients_scale(dtype):
    """The power steps form X Xᵀ Q (entries about σ₁²), which overflowed float32 from |g| ≈ 1e16 on a 512-wide
    gradient (a raw LinAlgError from the QR midway through a step) and underflowed to zeros for tiny ones.
    Scaling G by a power of two changes only exponents, so the basis must be the same bits at 2^-100, 1 and
    2^60; at 1e20 and 1e-30 (not powers of two) it must capture the energy the unit-scale one does (the same
    sketch of a matrix rounded differently: 1e-6)."""
    G = decaying_matrix(96, 160, seed=4, decay=0.9, dtype=torch.float32).to(dtype)
    bases = {}
    for scale in (2.0**-100, 1.0, 2.0**60, 1e20, 1e-30):
        proj = lro.projectors.make("rsvd", 8)
        proj.update(G.float().mul(scale).to(dtype))
        bases[scale] = proj.basis()
        assert torch.isfinite(bases[scale]).all(), scale
    assert torch.equal(bases[2.0**-100], bases[1.0]) and torch.equal(bases[2.0**60], bases[1.0])
    unit = energy(bases[1.0], G.float(), proj.side)
    for scale in (1e20, 1e-30):
        assert abs(energy(bases[scale], G.float(), proj.side) - unit) < 1e-6, scale


# ---------------------------------------------------------------------------------------- dct
@pytest.mark.parametrize("d", [1, 7, 64])
def test_dct_basis_is_scipy_orthonormal_dct2(d):
    """Columns are the basis vectors: D == scipy.fft.dct(eye(d), norm="ortho") (the DCT along each
    row of the identity gives Dᵀ's rows), so Dᵀ x is the orthonormal DCT-II of x."""
    D = dct_module.dct_basis(d, torch.float64)
    want = torch.from_numpy(scipy.fft.dct(np.eye(d), norm="ortho"))
    torch.testing.assert_close(D, want, rtol=0, atol=1e-13)
    x = torch.randn(d, dtype=torch.float64)
    torch.testing.assert_close(D.T @ x, torch.from_numpy(scipy.fft.dct(x.numpy(), norm="ortho")), rtol=0, atol=1e-12)


def test_dct_basis_is_built_once_and_shared():
    dct_module.clear_cache()
    a = lro.projectors.make("dct", 3, proj_type="right")
    b = lro.projectors.make("dct", 5, proj_type="right")
    a.update(decaying_matrix(30, 24, seed=1, dtype=torch.float32))
    b.update(decaying_matrix(50, 24, seed=2, dtype=torch.float32))
    b.project(decaying_matrix(50, 24, seed=3, dtype=torch.bfloat16))  # bf16 gathers from the float32 D
    assert dct_module.dct_basis(24, torch.float32) is dct_module.dct_basis(24, torch.float32)
    assert dct_module.shared_basis_nbytes() == 24 * 24 * 4
    assert a.nbytes() == 3 * 8 and b.nbytes() == 5 * 8
    dct_module.clear_cache()
    assert dct_module.shared_basis_nbytes() == 0


def test_dct_picks_the_columns_of_largest_l1_score():
    G = decaying_matrix(30, 24, seed=4)
    proj = lro.projectors.make("dct", 6, proj_type="right")
    proj.update(G)
    S = G @ dct_module.dct_basis(24, torch.float64)
    want = torch.sort(torch.argsort(S.abs().sum(0), descending=True)[:6]).values
    assert torch.equal(proj.state_dict()["idx"], want)
    assert proj.state_dict()["idx"].dtype == torch.int64


def test_dct_scores_by_l1_and_sparse_by_l2():
    """A spike (one entry of 5: ℓ1 = ℓ2 = 5) against a spread (16 entries of 1: ℓ1 16, ℓ2 4): the DCT
    score (ℓ1 of the coefficients) prefers the spread, Grass's row norm (ℓ2) the spike."""
    coeffs = 0.01 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coeffs[3, 2] = 5.0
    coeffs[:, 6] = 1.0
    G = coeffs @ dct_module.dct_basis(8, torch.float64).T  # so that G D = coeffs
    dct = lro.projectors.make("dct", 1, proj_type="right")
    dct.update(G)
    assert dct.state_dict()["idx"].tolist() == [6]
    sparse = lro.projectors.make("sparse", 1, proj_type="right")
    sparse.update(coeffs)
    assert sparse.state_dict()["idx"].tolist() == [2]


def smooth_rows(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Rows that are slow waves across the columns plus 5% noise: low-frequency in DCT terms."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    freq = torch.rand(m, 1, generator=g, dtype=torch.float64) * 2.5
    phase = torch.rand(m, 1, generator=g, dtype=torch.float64) * 2 * math.pi
    amp = torch.randn(m, 1, generator=g, dtype=torch.float64)
    return amp * torch.cos(2 * math.pi * freq * t + phase) + 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64)


def test_dct_and_sparse_energy():
    """Figures seen (float32, r=16, seed 7): on decaying_matrix (random singular vectors, no
    structure to find) 200×120 decay 0.95: svd 0.8063, dct 0.2037, sparse 0.2104, a random rank-16
    subspace 0.1375. Where the structure is theirs they approach the SVD: dct on smooth rows
    (80×128, r=8, right side) 0.9919 against random 0.0619; sparse on a gradient concentrated on 8
    rows (100×60, left side) 0.9862 against random 0.0883."""
    G = decaying_matrix(200, 120, seed=7, decay=0.95, dtype=torch.float32)
    for name in ("dct", "sparse"):
        proj = lro.projectors.make(name, 16)
        proj.update(G)
        e = energy(proj.basis(), G, proj.side)
        assert random_subspace_energy(G, 16, proj.side) < e < 0.8063

    S = smooth_rows(80, 128, seed=1).float()
    dct = lro.projectors.make("dct", 8, proj_type="right")
    dct.update(S)
    e_dct, e_rand = energy(dct.basis(), S, "right"), random_subspace_energy(S, 8, "right")
    assert e_dct > 0.97 and e_rand < 0.15

    g = torch.Generator().manual_seed(2)
    C = 0.02 * torch.randn(100, 60, generator=g)
    rows = torch.tensor([3, 17, 18, 40, 41, 66, 90, 99])
    C[rows] += torch.randn(8, 60, generator=g)
    sparse = lro.projectors.make("sparse", 8, proj_type="left")
    sparse.update(C)
    assert torch.equal(sparse.state_dict()["idx"], rows)
    e_sparse, e_rand = energy(sparse.basis(), C, "left"), random_subspace_energy(C, 8, "left")
    assert e_sparse > 0.97 and e_rand < 0.15


def test_dct_reuses_the_refresh_product_for_the_same_gradient_only():
    G = decaying_matrix(40, 24, seed=5, dtype=torch.float32)
    proj = lro.projectors.make("dct", 6)
    proj.update(G)
    cols = proj.basis()  # r×n, right side
    first = proj.project(G)  # taken from the refresh's S, no second matmul
    torch.testing.assert_close(first, G @ cols.T, rtol=1e-5, atol=1e-6)
    again = proj.project(G)  # the remembered product is used once
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-6)
    proj.update(G)
    G.mul_(2.0)  # written in place after the refresh: the remembered product is stale
    torch.testing.assert_close(proj.project(G), G @ cols.T, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- random
def test_random_is_a_seeded_gaussian_never_stored():
    r = 8
    a = lro.projectors.make("random", r, proj_type="left", seed=3)
    b = lro.projectors.make("random", r, proj_type="left", seed=3)
    c = lro.projectors.make("random", r, proj_type="left", seed=4)
    a.update(decaying_matrix(2000, 30, seed=1, dtype=torch.float32))
    b.update(decaying_matrix(2000, 30, seed=2, dtype=torch.float32))  # other values, same seed
    c.update(decaying_matrix(2000, 30, seed=1, dtype=torch.float32))
    assert torch.equal(a.basis(), b.basis())
    assert not torch.allclose(a.basis(), c.basis())
    P = a.basis()
    assert P.shape == (2000, r) and P.dtype == torch.float32
    torch.testing.assert_close(P, gaussian((2000, r), 3, "cpu", torch.float32) / math.sqrt(r), rtol=1e-6, atol=0)
    assert abs(P.var().item() * r - 1) < 0.05 and abs(P.mean().item()) < 0.01
    sd = a.state_dict()
    assert set(sd) == {"side", "seed", "dim"} and sd["seed"] == 3 and sd["dim"] == 2000
    assert not any(isinstance(v, torch.Tensor) for v in sd.values())
    assert a.nbytes() == 8


def test_random_seed_advances_at_each_refresh():
    G = decaying_matrix(30, 20, seed=1)
    proj = lro.projectors.make("random", 4, seed=9)
    proj.update(G)
    first = proj.basis()
    proj.update(G)  # same gradient: the matrix still changes
    assert proj.state_dict()["seed"] == mix_seed(9)
    assert not torch.allclose(proj.basis(), first)
    proj.update(G)
    assert proj.state_dict()["seed"] == mix_seed(mix_seed(9))


def test_random_projection_is_unbiased():
    """E[P Pᵀ] = I for N(0, 1/r) entries, so project_back(project(G)) is G on average."""
    m, r, draws = 12, 3, 3000
    acc = torch.zeros(m, m, dtype=torch.float64)
    proj = lro.projectors.make("random", r, proj_type="left")
    G = torch.eye(m, dtype=torch.float64)
    for _ in range(draws):
        proj.update(G)
        acc += proj.project_back(proj.project(G))
    torch.testing.assert_close(acc / draws, G, rtol=0, atol=0.12)


# ---------------------------------------------------------------------------------------- sparse
@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_sparse_is_an_exact_gather_and_scatter(proj_type):
    G = decaying_matrix(30, 20, seed=6, dtype=torch.float32)
    proj = lro.projectors.make("sparse", 5, proj_type=proj_type)
    proj.update(G)
    axis = 0 if proj_type == "left" else 1
    norms = torch.linalg.vector_norm(G, dim=1 - axis)
    idx = torch.sort(torch.argsort(norms, descending=True)[:5]).values
    assert torch.equal(proj.state_dict()["idx"], idx)
    low = proj.project(G)
    assert torch.equal(low, G.index_select(axis, idx))
    back = proj.project_back(low)
    mask = torch.zeros(G.shape[axis], dtype=torch.bool)
    mask[idx] = True
    mask = mask[:, None] if axis == 0 else mask[None, :]
    assert torch.equal(back, torch.where(mask, G, torch.zeros_like(G)))
    assert torch.equal(proj.basis(), proj.basis().round())  # one-hot


# ---------------------------------------------------------------------------------------- online_pca
@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_online_pca_starts_from_the_svd_then_descends_without_one(monkeypatch, proj_type):
    G0 = decaying_matrix(40, 30, seed=1, decay=0.8)
    G1 = decaying_matrix(40, 30, seed=2, decay=0.8)
    ref = lro.projectors.make("svd", 4, proj_type=proj_type)
    ref.update(G0)
    calls = {"svd": 0}  # factorizations: the SVD or, as the svd projector computes it, the Gram matrix's eigh
    for name in ("svd", "eigh"):
        real = getattr(torch.linalg, name)

        def counting(*args, _real=real, **kw):
            calls["svd"] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(torch.linalg, name, counting)
    proj = lro.projectors.make("online_pca", 4, proj_type=proj_type, lr=0.3, pca_optimizer="sgd")
    proj.update(G0)
    assert calls["svd"] == 1
    assert torch.equal(proj.basis(), ref.basis())

    Gh = G1 / torch.linalg.norm(G1)
    errors = []
    for _ in range(30):
        B = proj.basis()
        rec = B @ B.T @ Gh if proj.side == "left" else Gh @ B.T @ B
        errors.append(float(torch.linalg.norm(Gh - rec)))
        proj.update(G1)
    assert calls["svd"] == 1
    # figures seen: 0.956 (left) / 0.951 (right) at the start, 0.545 / 0.510 after 24 steps; the
    # optimum (tail of the spectrum) is 0.410
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 0.6 * errors[0]
    assert errors[-1] > float(torch.linalg.norm(torch.linalg.svdvals(Gh)[4:]))


@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_online_pca_step_is_the_gradient_of_the_pca_loss(proj_type):
    """The closed form equals autograd's gradient of ‖Ĝ − PPᵀĜ‖² (left) / ‖Ĝ − ĜQᵀQ‖² (right) at a
    non-orthonormal P (after some steps P drifts off PᵀP = I)."""
    G = decaying_matrix(25, 18, seed=3, decay=0.9)
    proj = lro.projectors.make("online_pca", 3, proj_type=proj_type, lr=0.05, pca_optimizer="sgd")
    proj.update(decaying_matrix(25, 18, seed=4))
    start = proj.basis() * 1.3  # off the orthonormal manifold
    proj.load_state_dict({**proj.state_dict(), "P": start.clone()})
    P = start.clone().requires_grad_(True)
    Gh = G / torch.linalg.norm(G)
    rec = P @ P.T @ Gh if proj.side == "left" else Gh @ P.T @ P
    torch.linalg.norm(Gh - rec).pow(2).backward()
    proj.update(G)
    torch.testing.assert_close(proj.basis(), start - 0.05 * P.grad, rtol=1e-12, atol=1e-14)


def test_online_pca_options():
    # built once by the SVD, then moved after each step has used it (tests/test_osd.py)
    assert lro.projectors.OnlinePCAProjector.learns_after_use
    assert not lro.projectors.OnlinePCAProjector.refresh_every_step
    assert lro.projectors.make("online_pca", 2).pca_optimizer == "adamw"  # the official default
    assert lro.projectors.OnlinePCAProjector.options_from_group({"update_proj_gap": 200}) == {"lr": 0.005}
    assert lro.projectors.SVDProjector.options_from_group({"update_proj_gap": 200}) == {}
    assert Projector.options_from_group({}) == {}
    assert lro.projectors.make("online_pca", 2, lr=0.25).lr == 0.25


# ---------------------------------------------------------------------------------------- every projector
@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_state_dict_roundtrip_is_bitwise_and_resumes_identically(name, proj_type):
    G1 = decaying_matrix(40, 24, seed=1, dtype=torch.float32)
    G2 = decaying_matrix(40, 24, seed=2, dtype=torch.float32)
    G3 = decaying_matrix(40, 24, seed=3, dtype=torch.float32)
    proj = lro.projectors.make(name, 6, proj_type=proj_type, seed=4)
    proj.update(G1)
    proj.update(G2)  # online_pca: past its SVD; rsvd/random: past the first draw
    sd = roundtrip(proj.state_dict())
    twin = lro.projectors.make(name, 6, proj_type=proj_type, seed=4)
    twin.load_state_dict(sd)
    twin.check_fits(G1.shape)
    low = proj.project(G3)
    assert torch.equal(twin.project(G3), low)
    assert torch.equal(twin.project_back(low), proj.project_back(low))
    assert torch.equal(twin.basis(), proj.basis())
    proj.update(G3)
    twin.update(G3)
    assert same_state(twin.state_dict(), proj.state_dict())


@pytest.mark.parametrize("name", FAMILY)
def test_refreshed_leaves_the_original_untouched(name):
    G1 = decaying_matrix(40, 24, seed=1, dtype=torch.float32)
    G2 = decaying_matrix(40, 24, seed=2, dtype=torch.float32)
    proj = lro.projectors.make(name, 5)
    proj.update(G1)
    before = snapshot(proj)
    new = proj.refreshed(G2)
    assert same_state(proj.state_dict(), before)
    assert not same_state(new.state_dict(), before)
    new2 = new.refreshed(G1)  # and again from a refreshed one (online_pca: the step path)
    assert not same_state(new2.state_dict(), new.state_dict())
    assert same_state(proj.state_dict(), before)


@pytest.mark.parametrize("name", FAMILY)
def test_non_finite_gradient_is_refused(name):
    proj = lro.projectors.make(name, 3)
    G = decaying_matrix(12, 8, seed=1)
    bad = G.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(lro.NonFiniteGradientError, match="non-finite"):
        proj.update(bad)
    assert not proj.initialized
    proj.update(G)
    before = snapshot(proj)
    bad[0, 0] = float("inf")
    with pytest.raises(lro.NonFiniteGradientError):
        proj.update(bad)
    assert same_state(proj.state_dict(), before)


@pytest.mark.parametrize(
    "name,kw,match",
    [
        *[(n, {"rank": 0}, "rank must be") for n in FAMILY],
        *[(n, {"proj_type": "both"}, "proj_type must be") for n in FAMILY],
        *[(n, {"seed": -1}, "seed must be") for n in FAMILY],
        ("rsvd", {"oversample": -1}, "oversample must be an integer >= 0, got -1"),
        ("rsvd", {"oversample": 2.0}, "oversample must be"),
        ("rsvd", {"power_iters": -2}, "power_iters must be an integer >= 0, got -2"),
        ("rsvd", {"power_iters": True}, "power_iters must be"),
        ("online_pca", {"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ("online_pca", {"lr": -0.1}, "lr must be"),
        ("online_pca", {"lr": float("nan")}, "lr must be"),
        ("online_pca", {"lr": "0.1"}, "lr must be"),
    ],
)
def test_bad_options(name, kw, match):
    kw = {"rank": 3, **kw}
    with pytest.raises(ValueError, match=match):
        lro.projectors.make(name, kw.pop("rank"), **kw)


@pytest.mark.parametrize("name", ["rsvd", "dct", "sparse", "online_pca"])
def test_rank_larger_than_the_dimension_is_refused(name):
    proj = lro.projectors.make(name, 9, proj_type="left")
    with pytest.raises(ValueError, match=f"{name} projector of rank 9"):
        proj.update(decaying_matrix(8, 6, seed=1))


@pytest.mark.parametrize("name", FAMILY)
def test_loaded_state_is_checked(name):
    G = decaying_matrix(40, 24, seed=1, dtype=torch.float32)
    proj = lro.projectors.make(name, 6)
    proj.update(G)
    sd = roundtrip(proj.state_dict())
    if name != "random":  # the seed fixes no rank: any rank draws its own matrix from it
        with pytest.raises(ValueError, match=f"{name} projector state"):
            lro.projectors.make(name, 5).load_state_dict(sd)
    twin = lro.projectors.make(name, 6)
    twin.load_state_dict(sd)
    with pytest.raises(ValueError, match=rf"{name} projector .*40x30"):
        twin.check_fits((40, 30))
    with pytest.raises(ValueError, match="side="):
        twin.load_state_dict({**sd, "side": "up"})
    broken = {k: v for k, v in sd.items() if k not in ("P", "idx", "seed")}
    with pytest.raises(ValueError, match=f"{name} projector state needs"):
        twin.load_state_dict(broken)
    if name in ("dct", "sparse"):
        with pytest.raises(ValueError, match="strictly increasing"):
            twin.load_state_dict({**sd, "idx": sd["idx"].flip(0)})
        with pytest.raises(ValueError, match="1-D int64"):
            twin.load_state_dict({**sd, "idx": sd["idx"].int()})


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_is_what_is_kept(name, dtype):
    """rsvd: r·d·itemsize + 8 (the refresh counter); online_pca: 3·r·d·4 + 8 (P and its AdamW's two moments,
    kept in float32 for half precision gradients, and its step count); dct, sparse: 8·r (int64 indices); random: 8 (the seed). d is the
    projected dimension (n on the std side here)."""
    proj = lro.projectors.make(name, 6)
    assert proj.nbytes() == 0
    proj.update(decaying_matrix(40, 24, seed=1, dtype=dtype))
    item = torch.finfo(dtype).bits // 8
    want = {"rsvd": 6 * 24 * item + 8, "online_pca": 3 * 6 * 24 * 4 + 8, "dct": 6 * 8, "sparse": 6 * 8, "random": 8}
    assert proj.nbytes() == want[name]


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_bf16_input(name, proj_type):
    G = decaying_matrix(40, 24, seed=1, decay=0.8)
    ref = lro.projectors.make(name, 4, proj_type=proj_type)
    half = lro.projectors.make(name, 4, proj_type=proj_type)
    ref.update(G.float())
    half.update(G.bfloat16())
    if name == "rsvd":
        assert half.basis().dtype == torch.bfloat16
    if name == "online_pca":
        assert half.basis().dtype == torch.float32  # its small steps would round away in bf16
    low = half.project(G.bfloat16())
    assert low.dtype == torch.bfloat16 and low.shape == ref.project(G.float()).shape
    back = half.project_back(low)
    assert back.dtype == torch.bfloat16
    # the same subspace as in float32, to bf16's precision (signs of singular vectors are free)
    want = ref.project_back(ref.project(G.float()))
    torch.testing.assert_close(back.float(), want, rtol=0, atol=0.03 * float(want.abs().max()))
    W = torch.zeros(40, 24, dtype=torch.bfloat16)
    half.apply_back(W, low, alpha=1.0, beta=1.0)
    torch.testing.assert_close(W, back, rtol=0.02, atol=1e-3)


def test_registry_holds_the_family():
    for name, cls in [
        ("rsvd", lro.projectors.RSVDProjector),
        ("dct", lro.projectors.DCTProjector),
        ("random", lro.projectors.RandomProjector),
        ("sparse", lro.projectors.SparseProjector),
        ("online_pca", lro.projectors.OnlinePCAProjector),
    ]:
        assert name in lro.projectors.available()
        proj = lro.projectors.make(name, 2)
        assert type(proj) is cls and isinstance(proj, Projector) and cls.name == name
        assert cls.__name__ in lro.projectors.__all__
