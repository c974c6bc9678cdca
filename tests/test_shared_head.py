"""GaLore+'s cross-head projector (``shared_head``): one head's top-r basis for every head of an attention
weight. References are written here from the method's formulas, in float64."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import batches, decaying_matrix, make_model, train_and_resume

import lowrank_optim as lro
from lowrank_optim.projectors import SharedHeadProjector

HEAD_DIM, HEADS, WIDTH = 8, 4, 24


def canonical(v: torch.Tensor) -> torch.Tensor:
    """Columns of v with their largest-magnitude entry made positive (the library's sign convention)."""
    idx = v.abs().argmax(dim=0)
    return v * torch.sign(v[idx, torch.arange(v.shape[1])])


def reference_basis(block: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """The top-r singular vectors of one head's block by LAPACK's SVD, on the side the heads share:
    Q = Vᵀ[:r] (r×n) for row heads, P = U[:, :r] (m×r) for column heads, signs fixed by the right vectors."""
    _, s, vh = torch.linalg.svd(block, full_matrices=False)
    v = canonical(vh[:rank].T)
    if side == "right":
        return v.T
    return (block @ v) / s[:rank]  # U = G V Σ⁻¹, with V's signs


def head_gradient(axis: str, seed: int = 0) -> torch.Tensor:
    """HEADS blocks of width HEAD_DIM along ``axis`` (rows or cols), WIDTH long on the other, float64."""
    g = decaying_matrix(HEADS * HEAD_DIM, WIDTH, seed=seed)
    return g if axis == "rows" else g.T.contiguous()


@pytest.mark.parametrize("axis,head", [("rows", 0), ("rows", 2), ("cols", 0), ("cols", 3)])
def test_project_and_project_back_are_the_per_head_maps_with_one_heads_basis(axis, head):
    rank = 5
    G = head_gradient(axis, seed=3)
    proj = SharedHeadProjector(rank, head_dim=HEAD_DIM, head_axis=axis, head=head)
    proj.update(G)
    side = "right" if axis == "rows" else "left"
    assert proj.side == side
    dim = 0 if axis == "rows" else 1
    blocks = G.split(HEAD_DIM, dim=dim)
    B = reference_basis(blocks[head], rank, side)
    # k = min(r + oversample, d_h) = d_h: the sketch spans the whole block, so the randomized refresh is the
    # exact SVD up to float64 rounding of a few QRs and matmuls on 8×24 matrices (~1e-15 relative).
    torch.testing.assert_close(proj.basis(), B, rtol=0, atol=1e-10)
    low = proj.project(G)
    # per head: R_i = G_i Qᵀ (row heads) or Pᵀ G_i (column heads), concatenated along the head axis
    R = torch.cat([Gi @ B.T if side == "right" else B.T @ Gi for Gi in blocks], dim=dim)
    torch.testing.assert_close(low, R, rtol=0, atol=1e-12)
    back = proj.project_back(low)
    # per head: R_i Q or P R_i, concatenated: rounding of one small matmul (~1e-15)
    parts = R.split(HEAD_DIM, dim=dim) if side == "right" else R.split(HEAD_DIM, dim=1)
    ref = torch.cat([Ri @ B if side == "right" else B @ Ri for Ri in parts], dim=dim)
    torch.testing.assert_close(back, ref, rtol=0, atol=1e-12)


def test_the_largest_head_option_takes_the_block_of_largest_norm():
    G = head_gradient("rows", seed=4)
    G[2 * HEAD_DIM: 3 * HEAD_DIM] *= 5.0
    proj = SharedHeadProjector(4, head_dim=HEAD_DIM, head="largest")
    proj.update(G)
    B = reference_basis(G[2 * HEAD_DIM: 3 * HEAD_DIM], 4, "right")
    torch.testing.assert_close(proj.basis(), B, rtol=0, atol=1e-10)  # as above: the exact SVD to rounding


def shared_structure_gradient(heads: int, head_dim: int, n: int, k: int, noise: float, seed: int) -> torch.Tensor:
    """G_i = A_i X + noise: every head's gradient is its own mix of the same k input directions X (k×n), as
    q/k/v gradients are (Σ_t δ_{i,t} x_tᵀ over the same activations x_t)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q.T * torch.linspace(3, 1, k).double()[:, None]
    blocks = [torch.randn(head_dim, k, generator=g, dtype=torch.float64) @ X for _ in range(heads)]
    G = torch.cat(blocks)
    return G + noise * torch.randn(G.shape, generator=g, dtype=torch.float64) / n ** 0.5


def captured(G: torch.Tensor, Q: torch.Tensor) -> float:
    """The fraction of ‖G‖² inside the row space of Q (r×n, orthonormal rows)."""
    return float((G @ Q.T).norm() ** 2 / G.norm() ** 2)


def test_one_heads_basis_captures_what_the_whole_weights_svd_does_when_heads_share_their_inputs():
    heads, head_dim, n, rank = 8, 16, 128, 8
    G = shared_structure_gradient(heads, head_dim, n, k=rank, noise=0.1, seed=0)
    svd = lro.projectors.make("svd", rank)
    svd.update(G)
    shared = SharedHeadProjector(rank, head_dim=head_dim)
    shared.update(G)
    best, got = captured(G, svd.basis()), captured(G, shared.basis())
    assert best > 0.95  # the construction: rank-8 structure under 10% noise
    assert got > 0.98 * best, (got, best)
    # head 0 with inputs of its own, and weak: its basis misses the other heads', the SVD and the largest head do not
    odd = G.clone()
    odd[:head_dim] = 0.2 * shared_structure_gradient(1, head_dim, n, k=rank, noise=0.1, seed=1)
    svd.update(odd)
    shared.update(odd)
    largest = SharedHeadProjector(rank, head_dim=head_dim, head="largest")
    largest.update(odd)
    assert captured(odd, shared.basis()) < 0.2 * captured(odd, svd.basis())
    assert captured(odd, largest.basis()) > 0.95 * captured(odd, svd.basis())


def head_model(seed: int = 0, **kw):
    model = make_model(seed=seed, **kw)
    model.config = types.SimpleNamespace(hidden_size=32, num_attention_heads=4)  # head_dim 8
    return model


def test_param_groups_splits_attention_by_head_axis_and_keeps_svd_for_the_rest():
    model = head_model()
    groups = lro.param_groups(model, rank=4, projector="shared_head", projector_options={"head": "largest"})
    low = [g for g in groups if g["rank"] is not None]
    names = [[n for n, _ in g["params"]] for g in low]
    assert low[0]["projector"] == "shared_head" and low[0]["head_dim"] == 8 and low[0]["head_axis"] == "rows"
    assert names[0] == ["layers.0.q_proj.weight", "layers.1.q_proj.weight"]
    assert low[1]["projector"] == "svd" and "projector_options" not in low[1] and "head_dim" not in low[1]
    assert all("q_proj" not in n for n in names[1])
    given = lro.param_groups(make_model(), rank=4, projector="shared_head", head_dim=16, other_projector="rsvd")
    assert given[0]["head_dim"] == 16 and given[1]["projector"] == "rsvd" and "other_projector" not in given[1]


def test_it_trains_and_resumes_bit_identically():
    def build(model):
        model.config = types.SimpleNamespace(hidden_size=32, num_attention_heads=4)
        return lro.GaLoreAdamW(lro.param_groups(model, rank=4, update_proj_gap=2, projector="shared_head"), lr=1e-2)

    model, opt, twin, _ = train_and_resume(build, batches(6), 3)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    q = model.layers[0].q_proj.weight
    state = opt.state[q]["projector"]
    assert set(state) == {"side", "P", "refreshes"} and state["P"].shape == (4, 32)
    assert opt._projectors[q].nbytes() == 4 * 32 * 4 + 8  # the one basis (fp32) and the refresh counter


def test_one_step_is_galores_with_the_head_basis():
    """W ← W − lr·scale·(N Q) with N Adam's first direction, R/(|R| + ε) = sign(R), Q from head 0."""
    W = torch.nn.Parameter(torch.zeros(HEADS * HEAD_DIM, WIDTH, dtype=torch.float64))
    opt = lro.GaLoreAdamW([{"params": [W], "rank": 4, "projector": "shared_head", "head_dim": HEAD_DIM}],
                          lr=0.1, weight_decay=0.0, scale=0.25, eps=0.0)
    G = head_gradient("rows", seed=5)
    W.grad = G.clone()
    opt.step()
    Q = reference_basis(G[:HEAD_DIM], 4, "right")
    # Adam's first step with bias correction and ε = 0 is sign(R); basis as in the first test (1e-10)
    torch.testing.assert_close(W.detach(), -0.1 * 0.25 * torch.sign(G @ Q.T) @ Q, rtol=0, atol=1e-10)


@pytest.mark.parametrize("options,match", [
    ({}, "shared_head needs head_dim"),
    ({"head_dim": 0}, "shared_head needs head_dim"),
    ({"head_dim": 8, "head_axis": "heads"}, "head_axis must be 'rows'"),
    ({"head_dim": 8, "head": -1}, "head must be an integer >= 0"),
    ({"head_dim": 8, "head": "first"}, "head must be an integer >= 0"),
    ({"head_dim": 4}, "rank 5 exceeds head_dim 4"),
    ({"head_dim": 8, "proj_type": "left"}, "proj_type='left' does not fit head_axis='rows'"),
])
def test_bad_options_are_refused_by_name(options, match):
    with pytest.raises(ValueError, match=match):
        SharedHeadProjector(5, **options)


def test_a_head_axis_that_does_not_split_or_a_missing_head_is_refused_before_any_state_and_shards_are_served():
    proj = SharedHeadProjector(2, head_dim=7)
    with pytest.raises(ValueError, match="length 32, not a multiple of head_dim 7"):
        proj.update(head_gradient("rows"))
    assert not proj.initialized
    proj = SharedHeadProjector(2, head_dim=8, head=4)
    with pytest.raises(ValueError, match="head=4 but this weight has 4 heads"):
        proj.update(head_gradient("rows"))
    assert not proj.initialized
    assert SharedHeadProjector.shard_error("right", {}) is None and SharedHeadProjector.shard_error("left", {}) is None


@pytest.fixture(scope="module")
def one_rank_group():
    """A world-size-1 gloo process group in this process (the seam's all-reduces then sum one term)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


@pytest.mark.parametrize("axis,head", [("rows", 1), ("cols", 2), ("rows", "largest"), ("cols", "largest")])
def test_the_sharded_refresh_gives_the_one_process_basis(one_rank_group, axis, head):
    from lowrank_optim.distributed import RowShard

    G = head_gradient(axis, seed=6)
    if head == "largest":
        dim = 0 if axis == "rows" else 1
        G.narrow(dim, 3 * HEAD_DIM, HEAD_DIM).mul_(4.0)
    local = SharedHeadProjector(4, head_dim=HEAD_DIM, head_axis=axis, head=head)
    local.update(G)
    comm = RowShard(group=None, world=1, rank=0, start=0, stop=G.shape[0], shape=tuple(G.shape), mesh=None,
                    placements=())
    shard = SharedHeadProjector(4, head_dim=HEAD_DIM, head_axis=axis, head=head).bind(comm)
    shard.update(G)
    # the Gram matrix's eigenvectors against the randomized refresh, both the exact subspace of an 8-wide
    # block with singular values 0.7^k (condition ~12): float64 rounding squared by the Gram, ~1e-13
    torch.testing.assert_close(shard.basis(), local.basis(), rtol=0, atol=1e-9)
    assert shard.state_dict()["refreshes"] == 1


def test_param_groups_refuses_a_model_without_heads():
    with pytest.raises(ValueError, match="needs the attention heads' width: pass head_dim"):
        lro.param_groups(make_model(), rank=4, projector="shared_head")
    lin = torch.nn.Sequential(torch.nn.Linear(16, 16))
    with pytest.raises(ValueError, match="found no attention projection"):
        lro.param_groups(lin, rank=4, projector="shared_head", head_dim=8)


def test_the_optimizer_refuses_a_group_without_heads_when_built():
    W = torch.nn.Parameter(torch.zeros(HEADS * HEAD_DIM, WIDTH))
    with pytest.raises(ValueError, match="shared_head needs head_dim"):
        lro.GaLoreAdamW([{"params": [W], "rank": 4, "projector": "shared_head"}])
    with pytest.raises(ValueError, match="invalid head_dim=8: .*rank 12 exceeds head_dim 8"):
        lro.GaLoreAdamW([{"params": [W], "rank": 12, "projector": "shared_head", "head_dim": 8}])
