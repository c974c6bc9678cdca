"""QGaLoreAdamW against q-galore-torch 1.0's projector (the reference package; an optional test dependency).

q-galore-torch's optimizer is bitsandbytes' 8-bit Adam, which needs CUDA, and its package ``__init__`` imports
bitsandbytes; its projector (``q_galore_projector.py``) is plain torch, so it is loaded from its file and put
into galore-torch's AdamW (whose step calls ``state["projector"].project(grad, step)`` as q-galore's does).
That is Q-GaLore with float32 moments, which ours runs with ``state_bits=32``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import lowrank_optim as lro
from conftest import decaying_matrix
from lowrank_optim.quant import Int4Tensor

galore_torch = pytest.importorskip("galore_torch", reason="galore-torch is not installed (pip install -e '.[dev]')")


def q_galore_projector_class():
    spec = importlib.util.find_spec("q_galore_torch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("q-galore-torch is not installed (pip install -e '.[dev]' brings it)")
    path = f"{spec.submodule_search_locations[0]}/q_galore_projector.py"
    module_spec = importlib.util.spec_from_file_location("q_galore_projector", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.GaLoreProjector


SHAPES = [(40, 24), (24, 40)]
STEPS = 14


def _grads():
    return [[decaying_matrix(*s, seed=10 * t + k, dtype=torch.float32) for k, s in enumerate(SHAPES)]
            for t in range(STEPS)]


def _run(opt, params, grads):
    out = []
    for g in grads:
        for p, gt in zip(params, g):
            p.grad = gt.clone()
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


@pytest.mark.parametrize("threshold,growth", [(-1.0, 3), (2.0, 2)])
def test_float_basis_and_lazy_schedule_match_q_galore_torch(threshold, growth):
    """INT4 off (``quant=False``), refresh every step (gap 1) and the lazy schedule: a threshold no mean can miss
    (−1) grows the gap 3x at every refresh once the queue of 5 is full, one none can reach (2) never does.
    Both signs of cosine agree with such thresholds, so the schedules must coincide (ours averages |cos|,
    q-galore-torch the signed cosine, see the README). 14 steps, refreshes at 2..7 and 10 (the gap 1, 3, 9, 27): equal to
    float32 precision after every step, and the same gap at the end."""
    Projector = q_galore_projector_class()
    init = [decaying_matrix(*s, seed=99 + k, dtype=torch.float32) for k, s in enumerate(SHAPES)]
    theirs_p = [torch.nn.Parameter(w.clone()) for w in init]
    theirs = galore_torch.GaLoreAdamW([{"params": theirs_p, "rank": 6, "update_proj_gap": 1, "scale": 0.25,
                                        "proj_type": "std"}], lr=1e-2, eps=1e-12, weight_decay=0.0,
                                      no_deprecation_warning=True)
    for p in theirs_p:
        theirs.state[p]["projector"] = Projector(6, update_proj_gap=1, scale=0.25, quant=False,
                                                 cos_threshold=threshold, gamma_proj=growth, queue_size=5)
    ours_p = [torch.nn.Parameter(w.clone()) for w in init]
    # the group dict as q-galore-torch's scripts write it; LAPACK's signs and the galore-torch schedule (no stagger)
    ours = lro.QGaLoreAdamW([{"params": ours_p, "rank": 6, "update_proj_gap": 1, "scale": 0.25, "quant": False,
                              "cos_threshold": threshold, "gamma_proj": growth, "queue_size": 5, "stagger": False,
                              "projector_options": {"canonical_signs": False}}],
                            lr=1e-2, eps=1e-12, weight_decay=0.0, state_bits=32)
    grads = _grads()
    for t, (a_all, b_all) in enumerate(zip(_run(ours, ours_p, grads), _run(theirs, theirs_p, grads))):
        for a, b in zip(a_all, b_all):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t}: {m}")
    for p, q in zip(ours_p, theirs_p):
        assert int(ours.state[p]["proj_gap"]) == theirs.state[q]["projector"].update_proj_gap == (27 if growth == 3 else 1)


def test_int4_bases_differ_from_q_galore_torch_by_their_zero_points():
    """The INT4 formats differ (README, "q-galore-torch 1.0"): q-galore-torch rounds the zero point to an integer
    code, z = −round(min/s) clamped into [0, 15], so 0 lies on its grid s·(k − z) and the group's extremes may
    move; ours keeps the float minimum, zero + s·k, so both extremes are on the grid. Each is within half a
    step of the float basis wherever its grid covers the value (ours everywhere), and on an SVD basis
    (a group of 256 mixed-sign values) the two land within 10% of each other in relative error."""
    Projector = q_galore_projector_class()
    G = decaying_matrix(512, 256, seed=1, dtype=torch.float32)
    plain, quant = Projector(64, quant=False), Projector(64, quant=True, group_size=256, n_bit=4)
    plain.project(G, 0)
    quant.project(G, 0)
    basis = plain.ortho_matrix
    theirs = (quant.ortho_matrix_scales * (quant.ortho_matrix.float() - quant.ortho_matrix_zeros)).reshape(basis.shape)
    q = Int4Tensor.quantize(basis)
    ours = q.dequantize()
    rows = basis.reshape(-1, 256)
    step = (rows.amax(1) - rows.amin(1)) / 15
    # half a step, plus float32 round-off of the grid point (a few ulps of values below 1)
    assert bool(((ours - basis).reshape(-1, 256).abs() <= step[:, None] / 2 + 1e-6).all())
    assert torch.equal(ours.reshape(-1, 256).amin(1), rows.amin(1))  # the minimum is a grid point exactly
    err_ours = ((ours - basis).norm() / basis.norm()).item()
    err_theirs = ((theirs - basis).norm() / basis.norm()).item()
    assert abs(err_ours - err_theirs) < 0.1 * err_theirs, (err_ours, err_theirs)
    assert not torch.equal(ours, theirs)
