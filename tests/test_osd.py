"""Online Subspace Descent: ``online_pca``'s P optimizers and the ``OnlineSubspaceDescent`` preset.

The references below are written from the official code (kyleliang919/Online-Subspace-Descent,
``galore_torch/galore_projector.py``, ``proj_type="continuous*"``) and from the optimizers it calls, in
float64: the PCA loss ‖P PᵀĜ − Ĝ‖² (left) / ‖Ĝ QᵀQ − Ĝ‖² (right), Ĝ = G/‖G‖, differentiated by autograd as
the official code does; P from the first gradient's SVD, not stepped at that step; at every later step P is
used first, then stepped with lr (1/gap)·(lr_t/lr_0) by torch.optim.AdamW (β .9/.999, ε 1e-8, wd 0.01),
bitsandbytes' Adam8bit (the same without decay, INT8 moments), its Lion (β .9/.99), transformers' Adafactor
(ε₁ 1e-30, clip 1, decay −0.8, no momentum) or torch.optim.SGD.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lowrank_optim as lro
from lowrank_optim.projectors import pca_optimizers

from conftest import batches, decaying_matrix, spawn_two, train_and_resume

OPTIMIZERS = ["adamw", "adam8bit", "lion", "adafactor", "sgd"]


# ----------------------------------------------------------------------------- float64 references
def pca_loss_grad(P: torch.Tensor, G: torch.Tensor, side: str) -> torch.Tensor:
    """The official code's gradient: autograd through ‖PPᵀĜ − Ĝ‖² (left) or ‖ĜQᵀQ − Ĝ‖² (right)."""
    P = P.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        Gh = G / torch.norm(G)
        rec = P @ P.t() @ Gh if side == "left" else Gh @ P.t() @ P
        (torch.norm(rec - Gh) ** 2).backward()
    return P.grad


class RefP:
    """One P optimizer, from the formulas of the classes the official code builds."""

    def __init__(self, name: str, P: torch.Tensor) -> None:
        self.name, self.t = name, 0
        self.m, self.v = torch.zeros_like(P), torch.zeros_like(P)
        self.row, self.col = P.new_zeros(P.shape[0]), P.new_zeros(P.shape[1])

    def step(self, P: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
        self.t += 1
        t = self.t
        if self.name == "sgd":
            return P - lr * g
        if self.name in ("adamw", "adam8bit"):  # torch.optim.AdamW; Adam8bit: the same update, no decay
            wd = 0.01 if self.name == "adamw" else 0.0
            self.m = 0.9 * self.m + 0.1 * g
            self.v = 0.999 * self.v + 0.001 * g * g
            denom = self.v.sqrt() / (1 - 0.999**t) ** 0.5 + 1e-8
            return P * (1 - lr * wd) - lr / (1 - 0.9**t) * self.m / denom
        if self.name == "lion":  # the official lion.py: sign of the interpolation, then the momentum
            new = P - lr * torch.sign(0.9 * self.m + 0.1 * g)
            self.m = 0.99 * self.m + 0.01 * g
            return new
        beta2 = 1 - t ** -0.8  # transformers' Adafactor, factored second moment, no first moment
        sq = g * g + 1e-30
        self.row = beta2 * self.row + (1 - beta2) * sq.mean(dim=1)
        self.col = beta2 * self.col + (1 - beta2) * sq.mean(dim=0)
        u = g / torch.sqrt(torch.outer(self.row / self.row.mean(), self.col))
        rms = u.norm() / u.numel() ** 0.5
        return P - lr * u / max(1.0, float(rms))


# ----------------------------------------------------------------------------- the P update
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_p_update_against_the_official_formulas(name, proj_type):
    """Five steps of each P optimizer, with the lr schedule's ratio changing, equal the float64 reference.
    Both run in float64 and differ by the closed-form ∇L against autograd's (rounding of 1e-16 relative),
    which Adam's M/√V carries at most 1/ε-amplified where a gradient entry is ~0 (none here): 1e-10."""
    Gs = [decaying_matrix(30, 20, seed=s, decay=0.85) for s in range(6)]
    proj = lro.projectors.make("online_pca", 4, proj_type=proj_type, lr=0.1, pca_optimizer=name)
    proj.update(Gs[0])  # the SVD; P is not stepped at this step
    P = proj.basis().clone()
    ref = RefP(name, P)
    for t, ratio in zip(range(1, 6), [1.0, 1.0, 0.5, 0.25, 1.0]):
        before = proj.basis().clone()
        proj = proj.learned(Gs[t], ratio)
        P = ref.step(P, pca_loss_grad(P, Gs[t], proj.side), 0.1 * ratio)
        torch.testing.assert_close(proj.basis(), P, rtol=1e-10, atol=1e-12, msg=f"step {t}")
        assert not torch.equal(proj.basis(), before)
    assert int(proj.state_dict()["pca_step"]) == 5


def test_the_reference_optimizers_are_the_classes_the_official_code_builds():
    """The written AdamW, SGD and Adafactor references equal torch.optim.AdamW, torch.optim.SGD and
    transformers' Adafactor with the official settings, on the same gradients (float64: 1e-12)."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(12, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    start = torch.randn(12, 5, generator=g, dtype=torch.float64)
    makers = {"adamw": lambda p: torch.optim.AdamW([p], lr=0.1), "sgd": lambda p: torch.optim.SGD([p], lr=0.1)}
    try:
        from transformers.optimization import Adafactor

        makers["adafactor"] = lambda p: Adafactor([p], lr=0.1, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                                                  relative_step=False, scale_parameter=False, warmup_init=False)
    except ImportError:
        pass
    for name, make in makers.items():
        p = torch.nn.Parameter(start.clone())
        opt, ref, P = make(p), RefP(name, start), start.clone()
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
            P = ref.step(P, grad, 0.1)
        torch.testing.assert_close(p.detach(), P, rtol=1e-12, atol=1e-12, msg=name)


def test_adam8bit_keeps_int8_moments_above_bitsandbytes_min_size():
    """A P of ≥ 4096 elements keeps uint8 moments (1 byte + 4/256 per element, counted by nbytes()); its steps
    follow float Adam to the INT8 code's rounding: each step moves an entry by ≤ lr (Adam's |M̂/√V̂| ≤ ~1),
    and a moment off by a code step (a few %) moves it by a few % of lr: 0.1·lr over 3 steps."""
    Gs = [decaying_matrix(600, 700, seed=s, decay=0.97, dtype=torch.float32) for s in range(4)]
    proj = lro.projectors.make("online_pca", 8, proj_type="left", lr=0.01, pca_optimizer="adam8bit")
    proj.update(Gs[0])
    state = proj.state_dict()
    assert state["pca_exp_avg"].dtype == torch.uint8 and state["pca_exp_avg_sq"].dtype == torch.uint8
    assert proj.nbytes() == 600 * 8 * 4 + 2 * (600 * 8 + 4 * 19) + 8  # P, codes and absmax, the step
    P = proj.basis().double()
    ref = RefP("adam8bit", P)
    for G in Gs[1:]:
        proj = proj.learned(G)
        P = ref.step(P, pca_loss_grad(P, G.double(), "left"), 0.01)
    assert float((proj.basis().double() - P).abs().max()) < 0.1 * 0.01


def test_p_is_stepped_after_this_step_used_it():
    """In the optimizer: step 0 projects with the SVD basis of G₀ and leaves it; step 1 projects G₁ with that
    same basis (Adam's first moment shows which) and only then steps it. Float64 weights: 1e-12."""
    W = torch.nn.Parameter(torch.zeros(24, 16, dtype=torch.float64))  # std: the right side, Q is r×n
    opt = lro.OnlineSubspaceDescent([{"params": [W], "rank": 3}], lr=0.01, update_proj_gap=10)
    Gs = [decaying_matrix(24, 16, seed=s, decay=0.8) for s in range(3)]
    svd = lro.projectors.make("svd", 3)
    svd.update(Gs[0])
    Q0 = svd.basis()
    W.grad = Gs[0].clone()
    opt.step()
    torch.testing.assert_close(opt._projectors[W].basis(), Q0, rtol=0, atol=1e-12)  # not stepped at step 0
    m0 = 0.1 * Gs[0] @ Q0.T
    torch.testing.assert_close(opt.state[W]["exp_avg"], m0, rtol=1e-12, atol=1e-14)
    W.grad = Gs[1].clone()
    opt.step()
    torch.testing.assert_close(opt.state[W]["exp_avg"], 0.9 * m0 + 0.1 * Gs[1] @ Q0.T, rtol=1e-12, atol=1e-14)
    Q1 = RefP("adamw", Q0).step(Q0, pca_loss_grad(Q0, Gs[1], "right"), 0.1)
    torch.testing.assert_close(opt._projectors[W].basis(), Q1, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- the preset
def osd_reference(weights, grads, lrs, *, rank, gap, scale, wd, pca, initial_lr):
    """Online Subspace Descent in float64 (GaLore's Adam step; the official P step after use); returns the
    weights after every step. Plain Adam(W) for the 1-D parameters."""
    out, states = [w.clone() for w in weights], [{} for _ in weights]
    for t, (gs, lr) in enumerate(zip(grads, lrs)):
        for i, (w, g) in enumerate(zip(out, gs)):
            s = states[i]
            if w.dim() == 1:
                s.setdefault("m", torch.zeros_like(w)), s.setdefault("v", torch.zeros_like(w))
                s["m"], s["v"] = 0.9 * s["m"] + 0.1 * g, 0.999 * s["v"] + 0.001 * g * g
                n = (s["m"] / (1 - 0.9 ** (t + 1))) / ((s["v"] / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)
                out[i] = w - lr * (n + wd * w)
                continue
            side = "right" if w.shape[0] >= w.shape[1] else "left"
            if t == 0:
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                s["P"] = u[:, :rank] if side == "left" else vh[:rank]
                s["popt"] = RefP(pca, s["P"])
            P = s["P"]
            r = P.T @ g if side == "left" else g @ P.T
            s.setdefault("m", torch.zeros_like(r)), s.setdefault("v", torch.zeros_like(r))
            s["m"], s["v"] = 0.9 * s["m"] + 0.1 * r, 0.999 * s["v"] + 0.001 * r * r
            n = (s["m"] / (1 - 0.9 ** (t + 1))) / ((s["v"] / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)
            back = P @ n if side == "left" else n @ P
            out[i] = w - lr * (scale * back + wd * w)
            if t > 0:  # after use; not at the step of the SVD
                s["P"] = s["popt"].step(P, pca_loss_grad(P, g, side), (1 / gap) * lr / initial_lr)
    return out


@pytest.mark.parametrize("pca", ["adamw", "lion", "adafactor"])
def test_preset_whole_step_against_the_float64_reference(pca):
    """Seven steps of the preset (a tall and a wide weight, a bias; the lr halved by a scheduler at step 3, which
    P's lr follows) equal the reference. Float64 throughout; singular-vector signs cancel in every update
    (Adam, Lion, Adafactor are sign-equivariant per element, and the loss is sign-invariant): 1e-9."""
    shapes = [(40, 24), (16, 36), (24,)]
    torch.manual_seed(0)
    weights = [torch.randn(s, dtype=torch.float64) for s in shapes]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    grads = [[decaying_matrix(*s, seed=10 * t + i, decay=0.8) if len(s) == 2 else torch.randn(s, dtype=torch.float64)
              for i, s in enumerate(shapes)] for t in range(7)]
    opt = lro.OnlineSubspaceDescent([{"params": params[:2], "rank": 4, "projector_options": {"pca_optimizer": pca}},
                                     {"params": params[2:]}], lr=0.01, weight_decay=0.1, update_proj_gap=5)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3], gamma=0.5)
    lrs = []
    for gs in grads:
        lrs.append(opt.param_groups[0]["lr"])
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        sched.step()
    want = osd_reference(weights, grads, lrs, rank=4, gap=5, scale=0.25, wd=0.1, pca=pca, initial_lr=0.01)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-9, atol=1e-11)


def test_an_lr_the_loop_writes_steps_the_basis_as_a_scheduler_s_does():
    """nanoGPT's loop writes the lr into param_groups itself; P's lr follows lr_t / lr_0 either way, lr_0
    being the group's lr when it joined (the official code divides by its constructor's lr). It was 1
    without a scheduler's initial_lr: no warmup, no decay for P."""
    shape, steps = (12, 8), 6
    grads = [decaying_matrix(*shape, seed=t, decay=0.8).float() for t in range(steps)]
    factor = [(t + 1) / steps for t in range(steps)]
    runs = []
    for by_hand in (True, False):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(shape))
        opt = lro.OnlineSubspaceDescent([{"params": [w], "rank": 3}], lr=0.01, update_proj_gap=4)
        sched = None if by_hand else torch.optim.lr_scheduler.LambdaLR(opt, lambda t: factor[min(t, steps - 1)])
        for t, g in enumerate(grads):
            if by_hand:
                opt.param_groups[0]["lr"] = 0.01 * factor[t]
            w.grad = g.clone()
            opt.step()
            if sched is not None:
                sched.step()
        runs.append((w.detach().clone(), opt.state[w]["projector"]["P"].clone()))
    (w_hand, p_hand), (w_sched, p_sched) = runs
    assert torch.equal(w_hand, w_sched) and torch.equal(p_hand, p_sched)


def test_preset_defaults_and_registration():
    assert lro.PRESETS["osd"] is lro.OnlineSubspaceDescent
    assert "OnlineSubspaceDescent" in lro.__all__
    W = torch.nn.Parameter(torch.zeros(8, 6))
    opt = lro.OnlineSubspaceDescent([{"params": [W], "rank": 2}], lr=0.01)
    group = opt.param_groups[0]
    assert (group["projector"], group["scale"], group["update_proj_gap"]) == ("online_pca", 0.25, 200)
    proj = opt._new_projector(group, W)
    assert proj.pca_optimizer == "adamw" and proj.lr == 1 / 200
    from lowrank_optim.train.optimizers import DEFAULTS

    assert DEFAULTS["osd"]["scale"] == 0.25


# ----------------------------------------------------------------------------- resume, bad input
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_is_bit_identical(name, monkeypatch):
    """Checkpoint after 3 steps (torch.load(weights_only=True)), 3 more: the same weights bit for bit; the P
    optimizer's state is tensors in the projector's state and counted by state_nbytes(). adam8bit with INT8
    moments even for this small model's P (min size 0)."""
    monkeypatch.setattr(pca_optimizers, "MIN_8BIT_SIZE", 0)

    def build(model):
        groups = lro.param_groups(model, rank=4, update_proj_gap=10, projector_options={"pca_optimizer": name})
        return lro.OnlineSubspaceDescent(groups, lr=0.01)

    model, opt, twin, twin_opt = train_and_resume(build, batches(6), 3)
    for (key, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), key
    states = [s["projector"] for s in opt.state.values() if "projector" in s]
    assert states and all(int(s["pca_step"]) == 5 for s in states)
    if name == "adam8bit":
        assert all(s["pca_exp_avg"].dtype == torch.uint8 for s in states)
    kept = sum(v.numel() * v.element_size() for s in states for v in s.values() if isinstance(v, torch.Tensor))
    assert opt.state_nbytes()["projectors"] == kept


def test_bad_options_are_refused_by_name():
    W = torch.nn.Parameter(torch.zeros(8, 6))
    with pytest.raises(ValueError, match="projector_options=.*pca_optimizer must be one of adamw, adam8bit"):
        lro.OnlineSubspaceDescent([{"params": [W], "rank": 2, "projector_options": {"pca_optimizer": "adam"}}])
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        lro.projectors.make("online_pca", 2, lr=0.0)
    proj = lro.projectors.make("online_pca", 2)
    with pytest.raises(ValueError, match="no basis yet"):
        proj.learned(torch.ones(8, 6))
    proj.update(decaying_matrix(8, 6, seed=1))
    with pytest.raises(ValueError, match="lr_ratio must be a number >= 0"):
        proj.learned(torch.ones(8, 6), -1.0)
    with pytest.raises(ValueError, match="2-D"):
        proj.learned(torch.ones(8))
    other = lro.projectors.make("online_pca", 2, pca_optimizer="lion")
    with pytest.raises(ValueError, match="pca_optimizer='lion' keeps"):
        other.load_state_dict(proj.state_dict())
    with pytest.raises(TypeError, match="does not learn after use"):
        lro.projectors.make("svd", 2).learned(torch.ones(8, 6))


@pytest.mark.parametrize("nonfinite", ["raise", "ignore"])
def test_non_finite_gradient_changes_nothing(nonfinite):
    """P would learn NaN from it: refused before anything changes, also where the step itself would let it
    through (nonfinite='ignore'), as a refresh from it is."""
    W = torch.nn.Parameter(torch.randn(12, 8))
    opt = lro.OnlineSubspaceDescent([{"params": [W], "rank": 2}], lr=0.01, nonfinite=nonfinite)
    W.grad = torch.randn(12, 8)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[W]["projector"].items() if isinstance(v, torch.Tensor)}
    weight = W.detach().clone()
    W.grad = torch.full((12, 8), float("nan"))
    with pytest.raises(lro.NonFiniteGradientError, match="learns from" if nonfinite == "ignore" else "non-finite"):
        opt.step()
    assert torch.equal(W.detach(), weight)
    for k, v in before.items():
        assert torch.equal(opt.state[W]["projector"][k], v), k


# ----------------------------------------------------------------------------- FSDP2
WORKER_CASES = ["adamw", "lion", "sgd", "adafactor"]


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(24, 16, bias=False))


def _steps(net, opt, shard):
    for t in range(5):
        for i, p in enumerate(net.parameters()):
            g = decaying_matrix(*p.shape, seed=10 * t + i, decay=0.8, dtype=torch.float32)
            p.grad = shard(g, p)
        opt.step()


def _osd(net, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        return lro.OnlineSubspaceDescent([{"params": list(net.parameters()), "rank": 3,
                                           "projector_options": {"pca_optimizer": name}}],
                                         lr=0.01, update_proj_gap=4)


def _fsdp_worker(rank: int, world: int, init: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        report = {}
        for name in WORKER_CASES + ["adam8bit"]:
            net = fully_shard(_net())
            try:
                opt = _osd(net, name)
            except ValueError as err:
                report[name] = {"refused": str(err)}
                continue
            _steps(net, opt, lambda g, p: distribute_tensor(g, p.device_mesh, p.placements))
            got = [p.full_tensor() for p in net.parameters()]
            single = _net()
            _steps(single, _osd(single, name), lambda g, p: g)
            worst = max(float((a - b.detach()).abs().max()) for a, b in zip(got, single.parameters()))
            report[name] = {"worst": worst}
        report["dcp"] = {name: _dcp_resumes(name, Path(out, f"ckpt-{name}")) for name in ("adamw", "adafactor")}
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _dcp_resumes(name: str, where: Path) -> bool:
    """Save through torch.distributed.checkpoint after 5 steps, 5 more; a fresh sharded net and optimizer
    (init_state as the template) load it and take the same 5: bit for bit the same weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    shard = lambda g, p: distribute_tensor(g, p.device_mesh, p.placements)  # noqa: E731
    net = fully_shard(_net())
    opt = _osd(net, name)
    _steps(net, opt, shard)
    dcp.save({"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=str(where))
    _steps(net, opt, shard)
    torch.manual_seed(1)
    twin = fully_shard(torch.nn.Sequential(torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(24, 16, bias=False)))
    twin_opt = _osd(twin, name)
    twin_opt.init_state()
    state = {"model": get_model_state_dict(twin), "optim": get_optimizer_state_dict(twin, twin_opt)}
    dcp.load(state, checkpoint_id=str(where))
    set_model_state_dict(twin, state["model"])
    set_optimizer_state_dict(twin, twin_opt, state["optim"])
    _steps(twin, twin_opt, shard)
    return all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(net.parameters(), twin.parameters()))


def test_fsdp2_two_ranks_equal_one_process(tmp_path):
    """Each P optimizer on 2 gloo ranks (the tall weight's Q split by columns, the wide weight's P by rows)
    equals one process after 5 steps. The ranks sum ‖G‖² and the n×r, r×r products in another order and the
    first basis comes from the Gram matrix: float32 rounding (~1e-7 relative), which Lion's sign and Adam's
    M/√V can amplify to a part of lr on an entry near 0: 1e-4 on weights of size ~0.3 (lr 0.01, 5 steps;
    a missing reduction or a wrong piece is off by ≥ 1e-2). adam8bit is refused on shards, by name. A
    distributed checkpoint (P's AdamW moments and Adafactor's split statistic as DTensors) resumes bit for bit."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    results = [tmp_path / f"rank{r}.json" for r in range(2)]
    spawn_two(_fsdp_worker, (f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), results)
    for r in range(2):
        report = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert "pca_optimizer='adam8bit'" in report["adam8bit"]["refused"]
        for name in WORKER_CASES:
            assert report[name]["worst"] < 1e-4, (r, name, report[name])
        assert report["dcp"] == {"adamw": True, "adafactor": True}, report["dcp"]


def test_fsdp2_state_round_trips_through_torch_save(tmp_path):
    """World size 1 (the sharded code path in this process): the exported state (DTensors) of every P optimizer
    saves and loads into a fresh sharded optimizer, which continues bit for bit."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard = lambda g, p: distribute_tensor(g, p.device_mesh, p.placements)  # noqa: E731
        for name in WORKER_CASES:
            net, twin = fully_shard(_net()), fully_shard(_net())
            opt, twin_opt = _osd(net, name), _osd(twin, name)
            _steps(net, opt, shard)
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            twin_opt.load_state_dict(torch.load(buf, weights_only=False))
            with torch.no_grad():
                for a, b in zip(twin.parameters(), net.parameters()):
                    a.copy_(b)
            _steps(net, opt, shard)
            _steps(twin, twin_opt, shard)
            for a, b in zip(net.parameters(), twin.parameters()):
                assert torch.equal(a.full_tensor(), b.full_tensor()), name
    finally:
        if started:
            dist.destroy_process_group()
