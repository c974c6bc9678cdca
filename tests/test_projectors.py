"""The Projector interface and the svd projector (DESIGN.md section 3)."""

from __future__ import annotations

import pytest
import torch

import lowrank_optim as lro
from conftest import decaying_matrix, roundtrip
from lowrank_optim.projectors import Projector, choose_side


@pytest.mark.parametrize(
    "proj_type,tall,wide",
    [("std", "right", "left"), ("reverse_std", "left", "right"), ("left", "left", "left"), ("right", "right", "right")],
)
def test_side_rules(proj_type, tall, wide):
    assert choose_side((30, 20), proj_type) == tall
    assert choose_side((20, 30), proj_type) == wide
    assert choose_side((20, 20), proj_type) == tall  # square counts as m >= n


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_svd_projection_is_the_best_rank_r_approximation(shape, proj_type):
    """project_back(project(G)) is the truncated SVD of G (Eckart-Young): its error is the tail
    of the spectrum, and the basis is orthonormal."""
    G = decaying_matrix(*shape, seed=1)
    r = 5
    proj = lro.projectors.make("svd", r, proj_type=proj_type)
    proj.update(G)
    low = proj.project(G)
    side = choose_side(shape, proj_type)
    assert proj.side == side
    assert low.shape == ((r, shape[1]) if side == "left" else (shape[0], r))
    assert low.shape == proj.low_rank_shape(shape)
    s = torch.linalg.svdvals(G)
    err = torch.linalg.norm(G - proj.project_back(low))
    torch.testing.assert_close(err, torch.linalg.norm(s[r:]), rtol=1e-10, atol=1e-12)
    B = proj.basis()
    gram = B.T @ B if side == "left" else B @ B.T
    torch.testing.assert_close(gram, torch.eye(r, dtype=G.dtype), rtol=0, atol=1e-12)


def test_apply_back_is_fused_and_equals_the_plain_formula():
    G = decaying_matrix(30, 20, seed=2)
    for proj_type in ("left", "right"):
        proj = lro.projectors.make("svd", 4, proj_type=proj_type)
        proj.update(G)
        low = proj.project(G)
        W = decaying_matrix(30, 20, seed=3)
        want = 0.9 * W - 0.5 * proj.project_back(low)
        proj.apply_back(W, low, alpha=-0.5, beta=0.9)
        torch.testing.assert_close(W, want, rtol=1e-12, atol=1e-14)


def test_refreshed_leaves_the_original_untouched():
    proj = lro.projectors.make("svd", 3)
    proj.update(decaying_matrix(12, 8, seed=1))
    before = proj.basis().clone()
    new = proj.refreshed(decaying_matrix(12, 8, seed=2))
    assert torch.equal(proj.basis(), before)
    assert not torch.allclose(new.basis(), before)


def test_non_finite_gradient_is_refused():
    proj = lro.projectors.make("svd", 3)
    G = decaying_matrix(12, 8, seed=1)
    G[0, 0] = float("nan")
    with pytest.raises(lro.NonFiniteGradientError, match="non-finite"):
        proj.update(G)
    assert not proj.initialized


def test_state_dict_roundtrip_and_nbytes():
    G = decaying_matrix(40, 24, seed=4, dtype=torch.float32)
    proj = lro.projectors.make("svd", 6)
    proj.update(G)
    sd = roundtrip(proj.state_dict())
    assert set(sd) == {"side", "P"} and sd["side"] == "right"
    twin = lro.projectors.make("svd", 6)
    twin.load_state_dict(sd)
    assert torch.equal(twin.project(G), proj.project(G))
    assert proj.nbytes() == 6 * 24 * 4  # r × n floats, nothing else
    with pytest.raises(ValueError, match="rank-6 basis but this projector has rank 5"):
        lro.projectors.make("svd", 5).load_state_dict(sd)
    with pytest.raises(ValueError, match="side="):
        twin.load_state_dict({"side": "up", "P": sd["P"]})
    with pytest.raises(ValueError, match=r"needs \(6, 30\)"):
        twin.check_fits((40, 30))


def test_half_precision_basis_and_float32_svd():
    G = decaying_matrix(40, 24, seed=5, dtype=torch.bfloat16)
    proj = lro.projectors.make("svd", 6, canonical_signs=False)  # compared with LAPACK's own vectors
    proj.update(G)
    assert proj.basis().dtype == torch.bfloat16
    ref = torch.linalg.svd(G.float(), full_matrices=False)[2][:6]
    torch.testing.assert_close(proj.basis().float(), ref, rtol=0, atol=4e-3)
    assert proj.project(G).dtype == torch.bfloat16


def test_registry():
    assert "svd" in lro.projectors.available()
    names = ", ".join(sorted(lro.projectors.REGISTRY))  # every registered projector, in order
    with pytest.raises(ValueError, match=f"unknown projector 'fft'; available: {names}$"):
        lro.projectors.make("fft", 4)
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
        lro.projectors.make("svd", 0)
    with pytest.raises(ValueError, match="proj_type must be one of"):
        lro.projectors.make("svd", 2, proj_type="both")

    class Identityish(Projector):
        name = "test_first_rows"

        def _refresh(self, grad, side):
            self._state["k"] = torch.tensor(self.rank)

        def project(self, grad):
            return grad[: self.rank] if self.side == "left" else grad[:, : self.rank]

        def project_back(self, low):
            return low

        def basis(self, *, device=None, dtype=None):
            return torch.eye(self.rank)

        def _placeholder(self, shape, side, dtype, device):
            return {"k": torch.tensor(self.rank)}

    try:
        lro.projectors.register(Identityish)
        assert isinstance(lro.projectors.make("test_first_rows", 2), Identityish)
        with pytest.raises(ValueError, match="already registered"):
            lro.projectors.register(type("Other", (Identityish,), {"name": "test_first_rows"}))
    finally:
        lro.projectors.REGISTRY.pop("test_first_rows", None)
    with pytest.raises(TypeError):
        Projector(2)  # abstract
