"""Group dicts written for the reference packages work unchanged, or are refused by name.

apollo-torch reads ``proj`` and ``scale_type``, fira ``alpha``, q-galore-torch ``quant``, ``quant_n_bit``,
``quant_group_size``, ``cos_threshold``, ``gamma_proj`` and ``queue_size``, and apollo-torch and fira
``correct_bias``. Unknown group keys pass through as metadata (frameworks attach their own), so these used
to be dropped without a word: ``scale_type="tensor"`` trained with channel-wise scaling, ``alpha=0.25`` at
scale 1, ``correct_bias=False`` with the bias corrected. Each is now our key or a clear error.
"""

from __future__ import annotations

import pytest
import torch

import lowrank_optim as lro
from conftest import decaying_matrix
from lowrank_optim.hf import parse_optim_args


def weight(shape=(40, 24), seed=1):
    return torch.nn.Parameter(decaying_matrix(*shape, seed=seed, dtype=torch.float32))


def steps(opt, W, count, seed=10):
    for t in range(count):
        W.grad = decaying_matrix(*W.shape, seed=seed + t, dtype=torch.float32)
        opt.step()
    return W.detach().clone()


def test_an_apollo_torch_group_dict_trains_as_apollo_torch():
    """The same dict to both: tensor-wise scaling in the SVD subspace (limiters off, a tiny ε, no decay, as
    in test_parity_apollo_fira). Before, ours read neither key: channel-wise scaling in a random subspace."""
    apollo_torch = pytest.importorskip("apollo_torch", reason="apollo-torch is not installed")

    def group(W):
        return {"params": [W], "rank": 4, "update_proj_gap": 3, "scale": 2.0, "proj_type": "std", "proj": "svd",
                "scale_type": "tensor"}

    theirs_W, ours_W = weight(), weight()
    theirs = apollo_torch.APOLLOAdamW([group(theirs_W)], lr=1e-2, eps=1e-12, weight_decay=0.0, disable_nl=True)
    ours = lro.APOLLO([{**group(ours_W), "limiter": None, "projector_options": {"canonical_signs": False}}],
                      lr=1e-2, eps=1e-12, weight_decay=0.0)
    assert ours.param_groups[0]["scaling"] == "tensor" and ours.param_groups[0]["projector"] == "svd"
    # float32 round-off of the same SVD and the same products, over 7 steps and two refreshes
    torch.testing.assert_close(steps(ours, ours_W, 7), steps(theirs, theirs_W, 7), rtol=1e-5, atol=1e-6)


def test_fira_alpha_is_our_scale():
    """fira's ``alpha`` scales the low-rank update as our ``scale`` does (where the package also scales the
    residual's subtraction we follow the paper: test_fira_residual_with_scale_follows_the_paper_not_the_package)."""
    runs = {}
    for name, key in (("alpha", {"alpha": 0.25}), ("scale", {"scale": 0.25}), ("default", {})):
        W = weight()
        opt = lro.Fira([{"params": [W], "rank": 4, "update_proj_gap": 3, "correct_bias": True, **key}], lr=1e-2)
        runs[name] = steps(opt, W, 4)
        assert "alpha" not in opt.param_groups[0] and "correct_bias" not in opt.param_groups[0]
    assert torch.equal(runs["alpha"], runs["scale"]) and not torch.equal(runs["alpha"], runs["default"])


def _lazy_gap(**keys):
    W = weight((48, 32))
    opt = lro.QGaLoreAdamW([{"params": [W], "rank": 4, "update_proj_gap": 1, "stagger": False, **keys}], lr=1e-3)
    steps(opt, W, 8)
    return int(opt.state[W]["proj_gap"]), opt.param_groups[0]


def test_q_galore_torch_keys_set_the_int4_basis_and_the_lazy_schedule():
    """cos_threshold and gamma_proj are our lazy_threshold and lazy_growth: a threshold below any |cos| grows the
    gap at every refresh once the queue of 5 is full (refreshes at steps 2 to 7, so the 5th and 6th grow it:
    1·3·3 = 9, and the next is due after step 8); one above 1 never does."""
    grow, group = _lazy_gap(quant=True, quant_n_bit=4, quant_group_size=256, queue_size=5, cos_threshold=-1.0,
                            gamma_proj=3)
    assert grow == 9 and group["lazy_threshold"] == -1.0 and group["lazy_growth"] == 3 and group["proj_bits"] == 4
    assert _lazy_gap(cos_threshold=1.5)[0] == 1
    assert _lazy_gap(quant=False, quant_n_bit=8)[1]["proj_bits"] == 32  # unquantized: the bit width means nothing
    W = weight()
    ctor = lro.QGaLoreAdamW([{"params": [W], "rank": 4}], cos_threshold=0.9, gamma_proj=4)  # as constructor options
    assert (ctor.param_groups[0]["lazy_threshold"], ctor.param_groups[0]["lazy_growth"]) == (0.9, 4)


@pytest.mark.parametrize("keys,match", [
    ({"correct_bias": False}, r"apollo-torch, fira's correct_bias=False cannot be honoured: Adam's bias is always "
                              r"corrected here"),
    ({"scale_type": "row"}, r"apollo-torch's scale_type='row': choose one of 'channel', 'tensor'"),
    ({"proj": "dct"}, r"apollo-torch's proj='dct': choose one of 'random', 'svd' \(it sets our 'projector'\)"),
    ({"quant": True, "quant_n_bit": 8}, r"q-galore-torch's quant_n_bit=8 cannot be honoured: .*proj_bits=4"),
    ({"quant_group_size": 128}, r"quant_group_size=128 cannot be honoured: .* per 256 elements"),
    ({"queue_size": 10}, r"queue_size=10 cannot be honoured: .* last 5 similarities"),
    ({"quant": 1}, r"quant=1: choose one of True, False"),
    ({"alpha": 0.5, "scale": 0.25}, r"fira's alpha=0.5 means scale=0.5, but scale=0.25 is given too"),
    ({"gamma_proj": 0}, r"invalid lazy_growth=0: .* integer >= 1"),
    ({"cos_threshold": float("nan")}, r"invalid lazy_threshold=nan"),
])
def test_reference_keys_we_cannot_honour_are_refused_by_name(keys, match):
    W = weight()
    opt = lro.QGaLoreAdamW([{"params": [W], "rank": 4}], lr=1e-3)
    before = [dict(g) for g in opt.param_groups]
    extra = torch.nn.Parameter(torch.randn(24, 16))
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [extra], "rank": 4, **keys})
    assert opt.param_groups == before  # nothing added


def test_reference_keys_reach_trainer_optim_args_and_checkpoints():
    assert parse_optim_args("proj=svd,scale_type=tensor,alpha=0.5,quant=True") == {
        "projector": "svd", "scaling": "tensor", "scale": 0.5, "proj_bits": 4}
    W = weight()
    opt = lro.APOLLO([{"params": [W], "rank": 4, "proj": "svd", "scale_type": "tensor"}], lr=1e-2)
    steps(opt, W, 2)
    again = lro.APOLLO([{"params": [weight()], "rank": 4, "projector": "svd", "scaling": "tensor"}], lr=1e-2)
    again.load_state_dict(opt.state_dict())  # stored under our keys: loads where ours are given
    assert again.param_groups[0]["scaling"] == "tensor"
