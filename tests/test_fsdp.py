"""FSDP2 (``fully_shard``, DTensor rows) on CPU: 2 processes with gloo, against one process.

Each worker trains a small transformers LLaMA (hidden 64, MLP 96, so the MLP's down projection takes
the left side and every other weight the right) on its half of a global batch of 4 sequences; rank 0
also trains the unsharded model on the whole batch and compares. Tolerance: rtol 1e-4, atol 5e-5 on the
weights (of size ~0.02) after 5 steps (3 refreshes). The sharded run sums gradients and projections in
another order and refreshes from the Gram matrix's eigenvectors instead of LAPACK's SVD: float32
rounding of order 1e-6 relative, amplified by Adam's N = M/(√V + ε) where a gradient element is near ε
(embedding rows of rare tokens: 1e-5 seen); anything structural (a wrong shard, a wrong sign, a
missing reduction) is off by 1e-3 or more.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers", reason="the train extra (transformers) is not installed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import lowrank_optim as lro  # noqa: E402
from conftest import spawn_two  # noqa: E402

CASES = {
    # the defaults: singular vectors get canonical signs wherever they are computed
    "galore": (lro.GaLoreAdamW, {}),
    "apollo": (lro.APOLLO, {}),
    "apollo_mini": (lro.APOLLOMini, {"rank": 1}),
    # FRUGAL with the SGD residual and kept moments: sign() of residual entries near 0 flips with the last
    # bit of the sums, and so does Adam's first step after a reset (N = ±1 wherever R is nonzero): both are
    # discontinuities, not errors; the SGD residual with kept moments runs the same sharded code continuously
    "frugal": (lro.FRUGAL, {"residual": "sgd", "on_refresh": "keep"}),
    "fira": (lro.Fira, {"projector_options": {"canonical_signs": True}}),
    "sumo": (lro.SUMO, {"projector": "svd", "projector_options": {"canonical_signs": True}}),
    "galore_adafactor": (lro.GaLoreAdafactor, {"momentum": 0.9, "projector_options": {"canonical_signs": True}}),
    # INT8 moments, blocks of 256 inside each rank's piece: with right-side projections and a vocabulary
    # of 128 every piece of this model starts at a multiple of 256 elements and the 64-element norms stay
    # float32 (min 256), so the blocks are one process's blocks
    "galore8bit": (lro.GaLoreAdamW8bit, {"min_8bit_size": 256, "proj_type": "right",
                                        "projector_options": {"canonical_signs": True}}),
    "galore-sparse": (lro.GaLoreAdamW, {"projector": "sparse"}),
    # Grass: rows drawn ∝ norm² from the all-reduced scores and the shared seed: the same draw on every rank
    "grass": (lro.Grass, {}),
    # rotate on shards: INT8 moments dequantized, rotated and requantized; Adafactor's statistics rebuilt
    "galore8bit-rotate": (lro.GaLoreAdamW8bit, {"min_8bit_size": 256, "proj_type": "right", "on_refresh": "rotate"}),
    "galore_adafactor-rotate": (lro.GaLoreAdafactor, {"momentum": 0.9, "on_refresh": "rotate"}),
    "galore-dct-right": (lro.GaLoreAdamW, {"projector": "dct", "proj_type": "right"}),
    "galore-online_pca": (lro.GaLoreAdamW, {"projector": "online_pca", "projector_options": {"canonical_signs": True}}),
    # Q-GaLore: INT4 bases quantized in groups of 256 inside each rank's piece, the lazy schedule, INT8
    # moments. Left-side bases at rank 16 put every rank's rows of P at a multiple of 256 elements (so
    # the INT4 groups are one process's), and the low-rank moments stay float32 (min 2048: their column
    # pieces would not align); the embeddings' INT8 moments align as for galore8bit
    "qgalore": (lro.QGaLoreAdamW, {"rank": 16, "min_8bit_size": 2048, "proj_type": "left",
                                  "projector_options": {"canonical_signs": True}}),
    # GaLore+: q/k/v's head 0 lies on rank 0 alone (rank 1 adds an empty piece to the Gram), o_proj's head 0
    # columns on both; the MLP keeps svd
    "galore-shared_head": (lro.GaLoreAdamW, {"projector": "shared_head"}),
}
#: (rtol, atol) where the default is too tight: a gradient that differs in its last bit (the sums run
#: in another order) can land on the other side of a code boundary, and one step of the dynamic code
#: book moves that element's N by up to a few percent: lr · 5% · 5 steps ≈ 1e-3 on the weight (seen:
#: 9.9e-4 on the embeddings), so 2e-3; weights move by up to 1.5e-2 in these 5 steps, and a structural
#: error moves them by that much.
TOLERANCE: dict[str, tuple[float, float]] = {"galore8bit": (1e-2, 2e-3), "qgalore": (1e-2, 2e-3),
                                             "galore8bit-rotate": (1e-2, 2e-3)}
VOCAB = {"galore8bit": 128, "qgalore": 128, "galore8bit-rotate": 128}
#: Under INT8 moments a last-bit difference can also flip a code of V where V is near zero (an embedding
#: row a batch barely touches): that one element's N = M/(√V + ε) then changes by O(1), and its weight by up
#: to lr·5 steps·O(1) (seen: one element of 8192 off by 4.9e-3). So the quantized cases allow a few such
#: elements per tensor, 0.1% (at least one), each within 5 steps × lr 3e-3 × 2 = 3e-2; a structural error
#: (wrong shard, sign or reduction) moves most elements of a tensor and fails the count.
FLIP_FRACTION = 1e-3
FLIP_BOUND = 3e-2


def _matches(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, flips: bool) -> bool:
    close = torch.isclose(got, want, rtol=rtol, atol=atol)
    if not flips:
        return bool(close.all())
    off = int((~close).sum())
    worst = (got - want).abs().max().item() if got.numel() else 0.0
    return off <= max(1, int(FLIP_FRACTION * got.numel())) and worst <= FLIP_BOUND


def tiny_llama(seed: int = 0, vocab: int = 97):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                         num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def global_batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 97, (4, 17), generator=g) for _ in range(n)]


def build(model, name):
    cls, keys = CASES[name]
    keys = {"rank": 8, "update_proj_gap": 2, **keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        return cls(lro.param_groups(model, **keys), lr=3e-3, weight_decay=0.01)


def train(model, opt, batches):
    for tokens in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss
        loss.backward()
        opt.step()


def shard_model(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def state_bytes(opt) -> int:
    total = 0
    for state in opt.state.values():
        for v in list(state.values()) + list(state.get("projector", {}).values()):
            if isinstance(v, torch.Tensor):
                t = v.to_local() if hasattr(v, "to_local") else v
                total += t.numel() * t.element_size()
    return total


def refusals() -> list[str]:
    """Layouts and options we do not step on shards: each must be refused when the optimizer is built."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    mesh2d = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    cases = [
        (distribute_tensor(torch.randn(16, 8), mesh, [Shard(1)]), {}, "Shard\\(0\\) \\(rows\\) only"),
        (distribute_tensor(torch.randn(16, 8), mesh, [Replicate()]), {}, "not tensor parallelism"),
        (distribute_tensor(torch.randn(16, 8), mesh2d, [Replicate(), Shard(0)]), {}, "2-D device mesh"),
        (distribute_tensor(torch.randn(16, 8), mesh, [Shard(0)]), {"stochastic_rounding": True}, "stochastic_rounding=True is not built for FSDP2"),
        (distribute_tensor(torch.randn(8, 16), mesh, [Shard(0)]), {"projector": "dct"}, "projector='dct' on the left side"),
        (distribute_tensor(torch.randn(16, 8), mesh, [Shard(0)]), {"projector_options": {"canonical_signs": False}},
         "canonical_signs=False \\(LAPACK's singular-vector signs"),
    ]
    import re

    messages = []
    for tensor, keys, pattern in cases:
        p = torch.nn.Parameter(tensor)
        try:
            lro.GaLoreAdamW([{"params": [("layers.0.w", p)], "rank": 2, **keys}], lr=1e-3)
        except ValueError as err:
            assert re.search(pattern, str(err)) and "'layers.0.w'" in str(err), (pattern, str(err))
            messages.append(str(err))
        else:
            raise AssertionError(f"not refused: {keys} {tensor.placements}")
    return messages


def deficient_cases() -> dict[str, tuple[torch.Tensor, object]]:
    """Wide gradients (the left side: P is sharded by rows) of rank 2 and 0, asked for rank 4, with the
    projector that refreshes them: the exact SVD's and GaLore+'s o_proj (head 0's six columns of twelve)."""
    from lowrank_optim.projectors import SharedHeadProjector, SVDProjector

    g = torch.Generator().manual_seed(3)
    low = torch.randn(6, 2, generator=g) @ torch.randn(2, 12, generator=g)  # rank 2
    return {"svd-rank2": (low, SVDProjector(4, proj_type="left")),
            "svd-zero": (torch.zeros(6, 12), SVDProjector(4, proj_type="left")),
            "shared_head-rank2": (low, SharedHeadProjector(4, head_dim=6, head_axis="cols"))}


def deficient_bases() -> dict[str, list]:
    """Each case's whole left basis P, refreshed from this rank's rows (3 of 6) and gathered."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lowrank_optim.distributed import comm_of

    mesh = init_device_mesh("cpu", (2,))
    bases = {}
    for label, (whole, projector) in deficient_cases().items():
        comm = comm_of(distribute_tensor(whole, mesh, [Shard(0)]))
        projector.bind(comm).update(whole[comm.start:comm.stop])
        bases[label] = comm.gather(projector.basis(), 0, whole.shape[0], "refresh").tolist()
    return bases


def zero_answers() -> list[bool]:
    """RowShard.all_zero on a 4×3 gradient whose rows are zero on both ranks, on rank 0's only, on rank 1's
    only: a zero subspace refresh is skipped only where the whole gradient is zero (every rank agrees)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lowrank_optim.distributed import comm_of

    mesh = init_device_mesh("cpu", (2,))
    answers = []
    for nonzero_rows in ([], [0], [3]):
        whole = torch.zeros(4, 3)
        whole[nonzero_rows] = 1.0
        comm = comm_of(distribute_tensor(whole, mesh, [Shard(0)]))
        answers.append(comm.all_zero(whole[comm.start:comm.stop]))
    return answers


def _worker(rank: int, world: int, init: str, out: str, names: list[str]) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        report = {"refused": refusals(), "deficient": deficient_bases(), "zero": zero_answers()}
        for name in names:
            batches = global_batches(5)
            model = shard_model(tiny_llama(vocab=VOCAB.get(name, 97)))
            opt = build(model, name)
            train(model, opt, [b[2 * rank: 2 * rank + 2] for b in batches])
            got = full_params(model)
            ours = state_bytes(opt)
            # the optimizer reports this rank's bytes, not the global tensors'
            moments = sum((v.to_local() if hasattr(v, "to_local") else v).numel() * v.element_size()
                          for st in opt.state.values() for k, v in st.items()
                          if k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax", "row_var",
                                   "col_var", "variance", "momentum_buffer"))
            assert opt.state_nbytes()["moments"] == moments
            single = state_bytes_single = None
            if rank == 0:
                ref_model = tiny_llama(vocab=VOCAB.get(name, 97))
                ref_opt = build(ref_model, name)
                train(ref_model, ref_opt, batches)
                want = full_params(ref_model)
                worst = max(((got[k] - want[k]).abs() / (want[k].abs() + 1e-2)).max().item() for k in want)
                rtol, atol = TOLERANCE.get(name, (1e-4, 5e-5))
                ok = all(_matches(got[k], want[k], rtol, atol, flips=name in TOLERANCE) for k in want)
                single = state_bytes(ref_opt)
                report[name] = {"ok": ok, "worst": worst, "state": ours, "single": single,
                                "diffs": {k: (got[k] - want[k]).abs().max().item() for k in want}}
            else:
                report[name] = {"state": ours}
            del state_bytes_single
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def run_workers(tmp_path, names):
    results = [tmp_path / f"rank{r}.json" for r in range(2)]
    spawn_two(_worker, (f"file://{tmp_path / 'rendezvous'}", str(tmp_path), names), results)
    return [json.loads(path.read_text()) for path in results]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The two ranks' reports of one run of every case (one spawn for the module's checks: it is slow)."""
    return run_workers(tmp_path_factory.mktemp("fsdp"), list(CASES))


def test_every_preset_on_two_fsdp2_ranks_equals_one_process(reports):
    r0, r1 = reports
    assert len(r0["refused"]) == len(r1["refused"]) == 6
    for name in CASES:
        assert r0[name]["ok"], (name, r0[name])
        ratio = max(r0[name]["state"], r1[name]["state"]) / r0[name]["single"]
        assert ratio <= 0.55, (name, ratio, r0[name], r1[name])


def test_a_rank_deficient_gradient_gets_an_orthonormal_left_basis_on_two_ranks(reports):
    """Row-sharded P of a gradient with fewer singular values than the rank: both ranks gather the same P;
    its columns for the resolved pairs are one process's (1e-6: the same float64 Gram eigenpairs, summed in
    another order, then rounded to float32), and the rest complete them orthonormally (1e-6: float32
    rounding of a float64 QR). Dividing G v by a zero σ instead gives columns of size ~1e300 or NaN."""
    r0, r1 = reports
    assert r0["deficient"] == r1["deficient"]
    for label, (whole, projector) in deficient_cases().items():
        got = torch.tensor(r0["deficient"][label])
        assert got.shape == (6, 4), label
        torch.testing.assert_close(got.t() @ got, torch.eye(4), rtol=0, atol=1e-6, msg=label)
        projector.update(whole)
        want = projector.basis()
        resolved = 0 if label.endswith("zero") else 2
        torch.testing.assert_close(got[:, :resolved], want[:, :resolved], rtol=0, atol=1e-6, msg=label)


def test_every_rank_agrees_whether_a_sharded_gradient_is_all_zero(reports):
    assert reports[0]["zero"] == reports[1]["zero"] == [True, False, False]


def _dcp_worker(rank: int, world: int, init: str, out: str, name: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        batches = [b[2 * rank: 2 * rank + 2] for b in global_batches(5)]
        model = shard_model(tiny_llama())
        opt = build(model, name)
        train(model, opt, batches[:3])  # refreshes at steps 1 and 3
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=str(Path(out, "ckpt")))
        train(model, opt, batches[3:])
        straight = full_params(model)

        model2 = shard_model(tiny_llama(seed=1))  # other weights: all must come from the checkpoint
        opt2 = build(model2, name)
        opt2.init_state()  # the template DCP loads into (and no zero-gradient step from torch's DSD)
        state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(state, checkpoint_id=str(Path(out, "ckpt")))
        set_model_state_dict(model2, state["model"])
        set_optimizer_state_dict(model2, opt2, state["optim"])
        train(model2, opt2, batches[3:])
        resumed = full_params(model2)
        if rank == 0:
            torch.save({"straight": straight, "resumed": resumed}, Path(out, "dcp.pt"))
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def test_distributed_checkpoint_resumes_on_two_ranks_and_on_one(tmp_path):
    """Save after 3 steps on 2 ranks; load on 2 ranks and, in this process, on one; 2 more steps each
    equal the uninterrupted 2-rank run (2 ranks: bit for bit; 1 process: to the tolerance above)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    name = "fira"
    # dcp.pt is written by rank 0 after the last collective both ranks take part in (the gathered weights of
    # both runs), so with it the work is complete and checked below in full
    spawn_two(_dcp_worker, (f"file://{tmp_path / 'rendezvous'}", str(tmp_path), name), [tmp_path / "dcp.pt"])
    out = torch.load(tmp_path / "dcp.pt", weights_only=True)
    for k, want in out["straight"].items():
        assert torch.equal(out["resumed"][k], want), k

    model = tiny_llama(seed=2)
    opt = build(model, name)
    opt.init_state()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert all(not hasattr(v, "to_local") for s in opt.state.values() for v in s.values())
    train(model, opt, global_batches(5)[3:])
    got = full_params(model)
    for k, want in out["straight"].items():
        torch.testing.assert_close(got[k], want, rtol=1e-4, atol=5e-5, msg=k)


class _Pieces(torch.nn.Module):
    """A 64×13 weight at rank 5 on the right: 64×5 moments, 160 elements a rank, one block of 256 each, which
    pad to 2 scales on 2 ranks: as many as one process's ceil(320 / 256)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.proj = torch.nn.Embedding(64, 13), torch.nn.Linear(13, 64, bias=False)

    def forward(self, t):
        return torch.nn.functional.cross_entropy(self.proj(self.emb(t[:, :-1])).flatten(0, 1), t[:, 1:].flatten())


def _pieces_opt(model):
    return lro.GaLoreAdamW8bit(lro.param_groups(model, rank=5, update_proj_gap=2, min_8bit_size=256,
                                                proj_type="right"), lr=3e-3)


def _pieces_batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 64, (4, 17), generator=g) for _ in range(3)]


def _int8_dcp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _Pieces()
        fully_shard(model)
        opt = _pieces_opt(model)
        for t in _pieces_batches():
            opt.zero_grad()
            model(t[2 * rank: 2 * rank + 2]).backward()
            opt.step()
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(out, "ckpt")))
        again = _Pieces()  # the same number of ranks loads it
        fully_shard(again)
        opt2 = _pieces_opt(again)
        opt2.init_state()
        msd, osd = get_state_dict(again, opt2)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(Path(out, "ckpt")))
        set_state_dict(again, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if rank == 0:
            torch.save({"loaded": True}, Path(out, "int8.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_int8_moments_saved_on_two_ranks_are_refused_in_one_process_even_when_the_scales_count_the_same(tmp_path):
    """The scales of 8-bit moments are cut inside each rank's piece; where the padded count equals one process's,
    a 2-rank DCP checkpoint loaded into one process with every block's scale shifted: 13% off, silently (a QA
    pass). The state dict says how many ranks quantized it, and another number is refused by name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    spawn_two(_int8_dcp_worker, (f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), [tmp_path / "int8.pt"])
    assert torch.load(tmp_path / "int8.pt", weights_only=True)["loaded"]
    model = _Pieces()
    opt = _pieces_opt(model)
    opt.init_state()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))  # the scales' lengths agree: DCP takes it
    with pytest.raises(ValueError, match="holds INT8 moments saved on 2 ranks, and this optimizer's parameters are "
                                         "on 1"):
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
