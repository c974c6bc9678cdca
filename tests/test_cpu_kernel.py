"""The C kernel of the 8-bit Adam step on a CPU (lowrank_optim/kernels/cpu_ext.py) against the reference,
bit for bit: the reference is the specification the Triton kernel is held to (tests/test_kernels.py), so
equal bits here are equal bits with Triton too."""

from __future__ import annotations

import pytest
import torch

from lowrank_optim import kernels
from lowrank_optim.kernels import cpu_ext, reference

pytestmark = pytest.mark.skipif(not cpu_ext.available(), reason=f"no C compiler: {cpu_ext.unavailable_reason()}")


def _state(n, block, seed, zero_blocks=(0,)):
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-n // block)
    m_codes = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    v_codes = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    m_absmax = torch.rand(blocks, generator=gen) * 1e-2
    v_absmax = torch.rand(blocks, generator=gen) * 1e-5
    for b in zero_blocks:
        if b < blocks:
            m_absmax[b] = 0.0  # a block that was all zeros
            v_absmax[min(b + 1, blocks - 1)] = 0.0
    return [m_codes, m_absmax, v_codes, v_absmax]


def _bits(t):
    """The bit patterns, every NaN as one: the absmax of a block holding NaN is NaN on both sides, but its
    payload is torch's reduction's (0x7FFFFFFF from amax on this CPU, by its vector blend), not a value."""
    if t.dtype != torch.float32:
        return t
    return torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t).view(torch.int32)


def _both(g, state, **kw):
    ref = [t.clone() for t in state]
    ours = [t.clone() for t in state]
    want = reference.adam8bit_direction(g, *ref, **kw)
    got = cpu_ext.adam8bit_direction(g, *ours, **kw)
    return (want, ref), (got, ours)


def assert_same(a, b):
    (want, ref), (got, ours) = a, b
    assert torch.equal(_bits(got), _bits(want)), "direction differs"
    for name, x, y in zip(("m_codes", "m_absmax", "v_codes", "v_absmax"), ours, ref):
        assert torch.equal(_bits(x), _bits(y)), f"{name} differs"


@pytest.mark.parametrize("n,block", [(1, 256), (256, 256), (1000, 256), (300_001, 256), (5000, 64), (9000, 2048)])
@pytest.mark.parametrize("step", [1, 7, 1000])
def test_same_bits_as_the_reference(n, block, step):
    g = torch.randn(n, generator=torch.Generator().manual_seed(n)) * torch.logspace(-8, 0, n)
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step=step, block=block)
    assert_same(*_both(g, _state(n, block, seed=step), **kw))


@pytest.mark.parametrize("code", ["dynamic", "linear"])
def test_same_bits_for_both_code_books_and_other_betas(code):
    n = 70_000
    g = torch.randn(n) * 3e-4
    kw = dict(beta1=0.8, beta2=0.95, eps=1e-6, step=3, code=code)
    assert_same(*_both(g, _state(n, 256, seed=1), **kw))


def test_same_bits_with_non_finite_and_signed_zero_gradients():
    n = 4096
    g = torch.randn(n) * 1e-3
    g[5], g[300], g[301], g[700] = float("nan"), float("inf"), float("-inf"), -0.0
    g[1024:1280] = -0.0  # a block of negative zeros (with zero moments: absmax +0)
    state = _state(n, 256, seed=2, zero_blocks=(4,))
    assert_same(*_both(g, state, beta1=0.9, beta2=0.999, eps=1e-8, step=2))


def test_a_huge_finite_gradient_keeps_its_block_s_second_moment_finite():
    """(1 − β₂)g² computed as ((1 − β₂)g)·g: g·g alone overflows float32 from |g| ≈ 1.8e19, and the inf V made
    the block's absmax inf, every direction of the block 0 and β₂·inf = inf ever after, silently (found by a
    QA pass). 2e19 squared is 4e38 > float32's 3.4e38; times 1e-3 first it is 4e35. Same bits on both sides."""
    n = 1000
    g = torch.randn(n, generator=torch.Generator().manual_seed(3))
    g[5] = 2e19
    a, b = _both(g, _state(n, 256, seed=4), beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    assert_same(a, b)
    (direction, (_, m_absmax, _, v_absmax)) = a
    assert torch.isfinite(v_absmax).all() and torch.isfinite(m_absmax).all() and torch.isfinite(direction).all()


def test_two_threads_give_the_bits_of_one():
    n = 5 * cpu_ext.PARALLEL_MIN + 77  # several block ranges, the last one partial
    g = torch.randn(n) * 1e-3
    state = _state(n, 256, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _both(g, state, beta1=0.9, beta2=0.999, eps=1e-8, step=5)
        torch.set_num_threads(2)
        two = _both(g, state, beta1=0.9, beta2=0.999, eps=1e-8, step=5)
    finally:
        torch.set_num_threads(threads)
    assert_same(*one)
    assert_same(one[1], two[1])


def test_the_dispatcher_picks_it_on_cpu(monkeypatch):
    monkeypatch.delenv("LRO_KERNELS", raising=False)
    g = torch.zeros(10)
    assert kernels.backend(g, op="adam8bit_direction") is cpu_ext
    assert kernels.backend(g, op="quantize_blockwise") is reference
    monkeypatch.setenv("LRO_KERNELS", "reference")
    assert kernels.backend(g, op="adam8bit_direction") is reference


def test_a_strided_state_goes_to_the_reference_and_sizes_are_checked():
    n = 2048
    g = torch.randn(n) * 1e-3
    state = _state(n, 256, seed=4)
    wide = torch.zeros(2 * n, dtype=torch.uint8)
    wide[::2] = state[0]
    strided = [wide[::2], state[1].clone(), state[2].clone(), state[3].clone()]
    ref = [t.clone() for t in state]
    got = cpu_ext.adam8bit_direction(g, *strided, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    want = reference.adam8bit_direction(g, *ref, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    assert torch.equal(_bits(got), _bits(want)) and torch.equal(wide[::2], ref[0])
    with pytest.raises(ValueError, match="m_absmax holds 7 values for 8 blocks"):
        cpu_ext.adam8bit_direction(g, state[0], state[1][:7], state[2], state[3], beta1=0.9, beta2=0.999,
                                   eps=1e-8, step=1)


def test_no_compiler_falls_back_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("LRO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    cpu_ext.load.cache_clear()
    try:
        assert cpu_ext.load() is None
        assert "building the C kernel failed" in cpu_ext.unavailable_reason()
        assert kernels.backend(torch.zeros(3), op="adam8bit_direction") is reference
        assert not list(tmp_path.iterdir())  # no half-written library left behind
        monkeypatch.setenv("LRO_CPU_KERNELS", "0")
        cpu_ext.load.cache_clear()
        assert cpu_ext.load() is None and cpu_ext.unavailable_reason() == "LRO_CPU_KERNELS=0"
    finally:
        cpu_ext.load.cache_clear()
    monkeypatch.undo()
    assert cpu_ext.load() is not None
