"""lowrank_optim.reductions: column sums of squares and norms by row tiles on CPU, against float64."""

from __future__ import annotations

import pytest
import torch

from lowrank_optim import reductions
from lowrank_optim.reductions import norms, sum_squares

SHAPES = [(1, 1), (3, 7), (512, 1376), (1376, 512), (5, 40, 30), (2000, 3)]


@pytest.mark.parametrize("tile", [reductions.TILE, 64])  # 64: many tiles and a short last one
@pytest.mark.parametrize("shape", SHAPES)
def test_norms_along_every_dimension_match_float64(monkeypatch, shape, tile):
    monkeypatch.setattr(reductions, "TILE", tile)
    torch.manual_seed(0)
    x = torch.randn(shape) * 3.0
    for dim in list(range(len(shape))) + [-1]:
        ref = x.double().norm(dim=dim, keepdim=True)
        got = norms(x, dim)
        assert got.shape == ref.shape and got.dtype == torch.float32
        # float32 sums of squares: pairwise within a tile, ≤ 2000/64 running additions across tiles,
        # each a relative rounding of 2^-24; 1e-6 leaves a margin of ~4x over that sequential bound
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(sum_squares(x, dim).double(), ref.square(), rtol=2e-6, atol=0)


def test_half_precision_is_summed_in_float32_and_returned_in_its_dtype():
    torch.manual_seed(0)
    x = torch.randn(300, 50).bfloat16()
    got = norms(x, 0)
    assert got.dtype == torch.bfloat16
    ref = x.double().norm(dim=0, keepdim=True)
    # one bf16 rounding of the result (2^-8 relative): a bf16 accumulation over 300 rows would be ~10x worse
    torch.testing.assert_close(got.double(), ref, rtol=2 ** -8, atol=0)
    assert norms(x, 0, torch.float32).dtype == torch.float32


def test_dtype_argument_computes_in_that_dtype():
    x = torch.full((4, 3), 1e20)  # float32 squares overflow to inf; float64 ones do not
    assert torch.isinf(sum_squares(x, 0)).all()
    torch.testing.assert_close(norms(x, 0, torch.float64), torch.full((1, 3), 2e20, dtype=torch.float64))


def test_empty_tensor():
    x = torch.zeros(0, 4)
    assert norms(x, 0).shape == (1, 4) and bool((norms(x, 0) == 0).all())
