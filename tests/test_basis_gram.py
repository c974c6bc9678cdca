"""Projector.basis_gram: the basis' Gram matrix, cached per basis, and whether it is the identity; and Fira's
residual norms built on it, against the residual formed explicitly in float64."""

from __future__ import annotations

import pytest
import torch

import lowrank_optim as lro
from lowrank_optim.projectors import make
from lowrank_optim.updates.residual import Fira


def _grad(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_an_svd_basis_is_the_identity_and_a_gaussian_one_is_not(shape):
    svd = make("svd", 8)
    svd.update(_grad(shape))
    gram, orthonormal = svd.basis_gram("cpu", torch.float32)
    assert orthonormal and torch.allclose(gram, torch.eye(8), atol=1e-5)
    rnd = make("random", 8)
    rnd.update(_grad(shape))
    gram, orthonormal = rnd.basis_gram("cpu", torch.float32)
    b = rnd.basis(dtype=torch.float32)
    want = b.t() @ b if rnd.side == "left" else b @ b.t()
    assert not orthonormal and torch.equal(gram, want)


def test_a_bfloat16_basis_is_not_taken_as_orthonormal():
    svd = make("svd", 8)
    svd.update(_grad((96, 40)))
    gram, orthonormal = svd.basis_gram("cpu", torch.bfloat16)  # bf16 entries are orthonormal to ~1e-2, not 1e-3
    assert not orthonormal and gram.dtype == torch.bfloat16


def test_the_gram_is_computed_once_per_basis(monkeypatch):
    proj = make("random", 8)
    proj.update(_grad((96, 40)))
    calls = []
    basis = type(proj).basis
    monkeypatch.setattr(type(proj), "basis", lambda self, **kw: calls.append(1) or basis(self, **kw))
    first = proj.basis_gram("cpu", torch.float32)
    assert proj.basis_gram("cpu", torch.float32) is first and len(calls) == 1
    proj.basis_gram("cpu", torch.float64)  # another dtype is another entry
    assert len(calls) == 2


def test_a_changed_basis_is_never_served_the_old_gram():
    proj = make("random", 8)
    proj.update(_grad((96, 40)))
    old = proj.basis_gram("cpu", torch.float32)[0].clone()
    # a refresh (a copy with a new state), a load, and an in-place write into the state each renew it
    new = proj.refreshed(_grad((96, 40), seed=1))
    new.load_state_dict({**new.state_dict(), "seed": 12345})
    b = new.basis(dtype=torch.float32)
    assert torch.equal(new.basis_gram("cpu", torch.float32)[0], b.t() @ b if new.side == "left" else b @ b.t())
    assert not torch.equal(new.basis_gram("cpu", torch.float32)[0], old)
    svd = make("svd", 8)
    svd.update(_grad((96, 40)))
    assert svd.basis_gram("cpu", torch.float32)[1]
    key = next(k for k, v in svd.state_dict().items() if isinstance(v, torch.Tensor) and v.dim() == 2)
    svd._state[key].mul_(2.0)  # no longer orthonormal: Γ = 4I
    gram, orthonormal = svd.basis_gram("cpu", torch.float32)
    assert not orthonormal and torch.allclose(gram, 4 * torch.eye(8), atol=1e-4)


def _explicit_residual_norms(proj, grad):
    """‖G_c − project_back(project(G))_c‖ per channel, in float64 from the stored basis."""
    b, g = proj.basis(dtype=torch.float64), grad.double()
    if proj.side == "left":
        return (g - b @ (b.t() @ g)).norm(dim=0, keepdim=True)
    return (g - (g @ b.t()) @ b).norm(dim=1, keepdim=True)


@pytest.mark.parametrize("projector", ["svd", "svd_int4", "online_pca", "dct"])
@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_fira_residual_norms_match_the_formed_residual(projector, shape):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape))
    w.grad = _grad(shape)
    name, keys = ("svd", {"proj_bits": 4}) if projector == "svd_int4" else (projector, {})
    opt = lro.Fira([{"params": [w], "rank": 8, "projector": name, **keys}], lr=1e-3)
    opt.step()  # builds the projector (an INT4 basis is not orthonormal: its Gram is used)
    proj = opt._projectors[w]
    grad = _grad(shape, seed=3)
    ctx = type("Ctx", (), {})()
    ctx.low, ctx.grad, ctx.projector, ctx.side = proj.project(grad), grad, proj, proj.side
    ctx.norm = lambda x, rows=None, dim=None, dtype=None: x.to(dtype).norm(dim=dim, keepdim=True)
    got = Fira.residual_norms(ctx, torch.float32).double()
    want = _explicit_residual_norms(proj, grad)
    # float32: ‖G_c‖² − ‖R_c‖² cancels to ‖residual_c‖² with an error of a few ε₃₂·‖G_c‖² (the docstring's
    # ε·‖G_c‖²/‖residual_c‖ in the norm); here ‖residual_c‖ ≥ 0.3‖G_c‖, so 1e-5 relative holds with room.
    # An orthonormal basis adds at most NEAR_IDENTITY·‖R_c‖² (1e-3), measured at ~2e-5 in Frobenius norm.
    orthonormal = proj.basis_gram("cpu", torch.float32)[1]
    if projector != "online_pca":  # its basis leaves orthonormality by its learning steps, gradually
        assert orthonormal == (projector in ("svd", "dct"))  # INT4 codes are not orthonormal: both paths run
    assert torch.allclose(got, want, rtol=5e-5 if orthonormal else 1e-5)


def test_fira_s_kept_gram_matrices_are_counted_by_state_nbytes_and_memory():
    """Fira's limiter keeps each projected weight's r×r Gram matrix between steps (the cache above): it is
    memory, 5.5% of Fira's state on llama_tiny, and neither state_nbytes nor `memory` counted it. Both now
    equal the bytes really held after real steps: every tensor in the state plus every cached Gram matrix.
    Without the limiter no Gram matrix is computed, and none is counted."""
    from conftest import batches, make_model, train

    for limiter in (1.01, None):
        model = make_model()
        opt = lro.Fira(lro.param_groups(model, rank=4), lr=1e-2, limiter=limiter)
        train(model, opt, batches(2))
        held = 0
        for p, state in opt.state.items():
            for value in list(state.values()) + list(state.get("projector", {}).values()):
                held += value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
            cache = opt._projector(p, opt.param_groups[0]).__dict__.get("_gram_cache") if "projector" in state else None
            held += 0 if cache is None else cache[2][0].numel() * cache[2][0].element_size()
        assert sum(opt.state_nbytes().values()) == held, limiter
        estimate = lro.memory.estimate(model, "fira", rank=4, limiter=limiter).ours
        assert estimate.optimizer_states + estimate.projections == held, limiter
