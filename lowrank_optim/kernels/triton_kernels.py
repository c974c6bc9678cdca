"""Triton kernels of every op in :mod:`.reference`: same names, signatures, results and errors.

The deterministic ops reproduce the reference bit for bit: the same float32 operations in the same
order, IEEE division and square root (``div_rn``, ``sqrt_rn``: Triton's plain ``/`` is approximate
on NVIDIA GPUs), no FMA contraction (every launch passes ``enable_fp_fusion=False``), rounding as
``floor(v + 0.5)``, and the nearest code as the number of midpoints strictly below a value, found
by an 8-step binary search over the 255 float32 midpoints of :func:`.reference.code_midpoints`.
bfloat16 is read and written through its bits (RTNE as torch rounds, NaN → 0x7FC0): Triton's
interpreter converts bfloat16 subnormals and rounding wrongly, the bit route is exact everywhere.

The stochastic ops draw from Triton's Philox (``tl.randint4x``) keyed by ``seed`` and counted by
the element's flat index, so a call is reproducible and independent of the launch shape: element e
of stochastic_round_bf16 adds half e % 2 of word (e % 8) // 2 of Philox(seed, e // 8), element e of
quantize_grouped(stochastic=True) adds word e % 4 of Philox(seed, e // 4) mapped to [0, 1) as
``tl.rand`` maps it (one Philox call serves 8 or 4 elements; the CUDA C++ kernels draw the same
streams). They are not bit-equal to the reference, which draws from a ``torch.Generator``, but have
its distribution: unbiased, never more than one grid step from the value.

Kernels that reduce over a block (the INT8 and min–max quantizers, the fused 8-bit Adam) run one
program per block or group. A block of up to ``MAX_TILE`` elements is held in registers and the
block is read once; a longer one (e.g. a group of a whole 11008-wide row) is walked twice in tiles,
once for its range and once to encode. Launch shapes (``num_warps``) are untuned: set without a GPU
to measure on.

Validation runs before any launch and reuses the reference's checks and messages; empty inputs
return empty results without launching. The module imports without a GPU (Triton's interpreter,
``TRITON_INTERPRET=1``, runs it on CPU tensors; that is how tests/test_kernels.py holds it to the
reference).
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from .reference import BLOCK, GROUP, _check_moments, _check_quantized

MAX_TILE = 4096  # longest block or group held in registers by one program
ELEMENTWISE_TILE = 1024  # elements per program of the elementwise kernels
_NO_FUSION = {"enable_fp_fusion": False}  # a*b + c stays two roundings, as in torch

# output kinds of _store_as
_OUT_F32, _OUT_BF16, _OUT_OTHER = 0, 1, 2


# ---------------------------------------------------------------- device helpers
@triton.jit
def _load_f32(ptr, offs, mask, BF16: tl.constexpr):
    """Load as float32; with BF16, ``ptr`` points at the int16 bits of a bfloat16 tensor."""
    if BF16:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)


@triton.jit
def _bf16_bits(x):
    """float32 → the int16 bits of bfloat16, round to nearest even, NaN → 0x7FC0 (as torch)."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _store_as(ptr, offs, val, mask, OUT: tl.constexpr):
    """Store float32 ``val`` as float32, as bfloat16 bits (``ptr`` int16), or cast to ``ptr``'s type."""
    if OUT == 0:
        tl.store(ptr + offs, val, mask=mask)
    elif OUT == 1:
        tl.store(ptr + offs, _bf16_bits(val), mask=mask)
    else:
        tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nearest(v, mid_ptr):
    """Number of the 255 sorted midpoints strictly below v (torch.searchsorted, right=False): an
    8-step binary search. NaN counts as above every midpoint (255), as searchsorted places it."""
    pos = tl.zeros(v.shape, dtype=tl.int32)
    for i in tl.static_range(8):  # steps 128, 64, …, 1; the index read is at most 127+63+…+0 = 254
        below = tl.load(mid_ptr + pos + ((128 >> i) - 1)) < v
        pos = tl.where(below, pos + (128 >> i), pos)
    return tl.where(v != v, 255, pos)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _absmax(x, mask):
    """max |x| over the unmasked lanes; NaN propagates, as torch.amax does."""
    return tl.reduce(tl.where(mask, tl.abs(x), 0.0), 0, _max_nan)


@triton.jit
def _encode(x, absmax, mid_ptr):
    """Code of x / absmax (absmax 0 → divide by 1), as reference._encode."""
    safe = tl.where(absmax > 0, absmax, 1.0)
    return _nearest(tl.math.div_rn(x, safe), mid_ptr).to(tl.uint8)


# ---------------------------------------------------------------- random streams
@triton.jit
def _uniform(r):
    """uint32 → float32 uniform in [0, 1), as tl.rand converts (31 bits; the largest maps below 1)."""
    x = r.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _interleave4(a, b, c, d):
    """[a0, b0, c0, d0, a1, b1, …]"""
    return tl.interleave(tl.interleave(a, c), tl.interleave(b, d))


@triton.jit
def _group_uniform(seed, first, offs, TILE: tl.constexpr, ALIGNED: tl.constexpr):
    """u of element e = _uniform(word e % 4 of Philox(seed, counter e // 4)): one Philox call serves
    four elements. ALIGNED: offs = first + arange(TILE) with first a multiple of 4."""
    if ALIGNED:
        r0, r1, r2, r3 = tl.randint4x(seed, first // 4 + tl.arange(0, TILE // 4))
        r = _interleave4(r0, r1, r2, r3)
    else:
        r0, r1, r2, r3 = tl.randint4x(seed, offs // 4)
        word = offs % 4
        r = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return _uniform(r)


@triton.jit
def _offsets(TILE: tl.constexpr, WIDE: tl.constexpr):
    """This program's TILE element indices, int64 only where n ≥ 2^31 needs it."""
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    return pid * TILE + tl.arange(0, TILE)


# ---------------------------------------------------------------- blockwise INT8
@triton.jit
def _quantize_blockwise_kernel(x_ptr, codes_ptr, absmax_ptr, mid_ptr, n,
                               SIZE: tl.constexpr, TILE: tl.constexpr, X_BF16: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * SIZE
    lanes = tl.arange(0, TILE)
    if SIZE <= TILE:  # the block in registers: read once
        offs = start + lanes
        mask = (lanes < SIZE) & (offs < n)
        x = _load_f32(x_ptr, offs, mask, X_BF16)
        absmax = _absmax(x, mask)
        tl.store(codes_ptr + offs, _encode(x, absmax, mid_ptr), mask=mask)
    else:  # a long block: its absmax first, then encode tile by tile
        absmax = tl.zeros((), dtype=tl.float32)
        for t in range(0, SIZE, TILE):
            offs = start + t + lanes
            mask = (t + lanes < SIZE) & (offs < n)
            absmax = _max_nan(absmax, _absmax(_load_f32(x_ptr, offs, mask, X_BF16), mask))
        for t in range(0, SIZE, TILE):
            offs = start + t + lanes
            mask = (t + lanes < SIZE) & (offs < n)
            x = _load_f32(x_ptr, offs, mask, X_BF16)
            tl.store(codes_ptr + offs, _encode(x, absmax, mid_ptr), mask=mask)
    tl.store(absmax_ptr + pid, absmax)


@triton.jit
def _dequantize_blockwise_kernel(codes_ptr, absmax_ptr, book_ptr, out_ptr, n,
                                 SIZE: tl.constexpr, TILE: tl.constexpr, WIDE: tl.constexpr, OUT: tl.constexpr):
    offs = _offsets(TILE, WIDE)
    mask = offs < n
    code = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    value = tl.load(book_ptr + code, mask=mask, other=0.0)
    scale = tl.load(absmax_ptr + offs // SIZE, mask=mask, other=0.0)
    _store_as(out_ptr, offs, value * scale, mask, OUT)


@triton.jit
def _adam_tile(g_ptr, mc_ptr, vc_ptr, sbook_ptr, ubook_ptr, offs, mask, m_absmax, v_absmax,
               beta1, one_minus_beta1, beta2, one_minus_beta2, bias1, bias2_sqrt, eps,
               G_BF16: tl.constexpr):
    """The updated M, V and the direction N of one tile, in the reference's operation order."""
    g = _load_f32(g_ptr, offs, mask, G_BF16)
    mc = tl.load(mc_ptr + offs, mask=mask, other=0).to(tl.int32)
    vc = tl.load(vc_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(sbook_ptr + mc, mask=mask, other=0.0) * m_absmax
    v = tl.load(ubook_ptr + vc, mask=mask, other=0.0) * v_absmax
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + (one_minus_beta2 * g) * g  # g * g first would overflow from |g| ~ 1.8e19 (reference.py)
    direction = tl.math.div_rn(tl.math.div_rn(m, tl.math.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps), bias1)
    return m, v, direction


@triton.jit
def _adam8bit_kernel(g_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr, dir_ptr, sbook_ptr, ubook_ptr, smid_ptr, umid_ptr,
                     n, beta1, one_minus_beta1, beta2, one_minus_beta2, bias1, bias2_sqrt, eps,
                     SIZE: tl.constexpr, TILE: tl.constexpr, G_BF16: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * SIZE
    lanes = tl.arange(0, TILE)
    m_absmax = tl.load(ma_ptr + pid)
    v_absmax = tl.load(va_ptr + pid)
    if SIZE <= TILE:  # the block in registers: one read, one write
        offs = start + lanes
        mask = (lanes < SIZE) & (offs < n)
        m, v, direction = _adam_tile(g_ptr, mc_ptr, vc_ptr, sbook_ptr, ubook_ptr, offs, mask, m_absmax, v_absmax,
                                     beta1, one_minus_beta1, beta2, one_minus_beta2, bias1, bias2_sqrt, eps,
                                     G_BF16)
        tl.store(dir_ptr + offs, direction, mask=mask)
        new_m = _absmax(m, mask)
        new_v = _absmax(v, mask)
        tl.store(mc_ptr + offs, _encode(m, new_m, smid_ptr), mask=mask)
        tl.store(vc_ptr + offs, _encode(v, new_v, umid_ptr), mask=mask)
    else:  # a long block: the new absmax first, then recompute each tile (same numbers) and encode
        new_m = tl.zeros((), dtype=tl.float32)
        new_v = tl.zeros((), dtype=tl.float32)
        for t in range(0, SIZE, TILE):
            offs = start + t + lanes
            mask = (t + lanes < SIZE) & (offs < n)
            m, v, direction = _adam_tile(g_ptr, mc_ptr, vc_ptr, sbook_ptr, ubook_ptr, offs, mask, m_absmax,
                                         v_absmax, beta1, one_minus_beta1, beta2, one_minus_beta2, bias1,
                                         bias2_sqrt, eps, G_BF16)
            tl.store(dir_ptr + offs, direction, mask=mask)
            new_m = _max_nan(new_m, _absmax(m, mask))
            new_v = _max_nan(new_v, _absmax(v, mask))
        for t in range(0, SIZE, TILE):  # each tile's old codes are read before they are overwritten
            offs = start + t + lanes
            mask = (t + lanes < SIZE) & (offs < n)
            m, v, direction = _adam_tile(g_ptr, mc_ptr, vc_ptr, sbook_ptr, ubook_ptr, offs, mask, m_absmax,
                                         v_absmax, beta1, one_minus_beta1, beta2, one_minus_beta2, bias1,
                                         bias2_sqrt, eps, G_BF16)
            tl.store(mc_ptr + offs, _encode(m, new_m, smid_ptr), mask=mask)
            tl.store(vc_ptr + offs, _encode(v, new_v, umid_ptr), mask=mask)
    tl.store(ma_ptr + pid, new_m)
    tl.store(va_ptr + pid, new_v)


# ---------------------------------------------------------------- grouped min–max
@triton.jit
def _round_code(x, lo, scale, levels, seed, first, offs,
                TILE: tl.constexpr, STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr):
    v = tl.math.div_rn(x - lo, scale)
    if STOCHASTIC:  # u in [0, 1): up with probability frac(v)
        q = tl.floor(v + _group_uniform(seed, first, offs, TILE, ALIGNED))
    else:
        q = tl.floor(v + 0.5)
    return tl.minimum(tl.maximum(q, 0.0), levels).to(tl.uint8)


@triton.jit
def _quantize_grouped_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, n, levels, seed,
                             SIZE: tl.constexpr, TILE: tl.constexpr, STOCHASTIC: tl.constexpr,
                             X_BF16: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * SIZE
    lanes = tl.arange(0, TILE)
    ALIGNED: tl.constexpr = SIZE % 4 == 0  # every tile starts on a Philox counter boundary
    # masked lanes stay out of the range: the reference pads with the group's own last value instead
    if SIZE <= TILE:
        offs = start + lanes
        mask = (lanes < SIZE) & (offs < n)
        x = _load_f32(x_ptr, offs, mask, X_BF16)
        lo = tl.min(tl.where(mask, x, float("inf")), 0)
        hi = tl.max(tl.where(mask, x, -float("inf")), 0)
    else:
        lo = tl.full((), float("inf"), tl.float32)
        hi = tl.full((), -float("inf"), tl.float32)
        for t in range(0, SIZE, TILE):
            offs = start + t + lanes
            mask = (t + lanes < SIZE) & (offs < n)
            x = _load_f32(x_ptr, offs, mask, X_BF16)
            lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), 0))
            hi = tl.maximum(hi, tl.max(tl.where(mask, x, -float("inf")), 0))
    scale = tl.math.div_rn(hi - lo, levels)
    scale = tl.where(scale > 0, scale, 1.0)
    if SIZE <= TILE:
        q = _round_code(x, lo, scale, levels, seed, start, offs, TILE, STOCHASTIC, ALIGNED)
        tl.store(codes_ptr + offs, q, mask=mask)
    else:
        for t in range(0, SIZE, TILE):
            offs = start + t + lanes
            mask = (t + lanes < SIZE) & (offs < n)
            x = _load_f32(x_ptr, offs, mask, X_BF16)
            q = _round_code(x, lo, scale, levels, seed, start + t, offs, TILE, STOCHASTIC, ALIGNED)
            tl.store(codes_ptr + offs, q, mask=mask)
    tl.store(scale_ptr + pid, scale)
    tl.store(zero_ptr + pid, lo + 0.0)  # -0 + 0 = +0: the zero point does not depend on where a -0 sits


@triton.jit
def _dequantize_grouped_kernel(codes_ptr, scale_ptr, zero_ptr, out_ptr, n, SIZE: tl.constexpr,
                               TILE: tl.constexpr, WIDE: tl.constexpr, PACKED: tl.constexpr, OUT: tl.constexpr):
    """zero + scale·code; with PACKED, code j is nibble j % 2 of byte j // 2 (fused unpack_int4)."""
    offs = _offsets(TILE, WIDE)
    mask = offs < n
    if PACKED:
        byte = tl.load(codes_ptr + offs // 2, mask=mask, other=0)
        code = tl.where((offs & 1) == 0, byte & 0xF, byte >> 4)
    else:
        code = tl.load(codes_ptr + offs, mask=mask, other=0)
    group = offs // SIZE
    s = tl.load(scale_ptr + group, mask=mask, other=0.0)
    z = tl.load(zero_ptr + group, mask=mask, other=0.0)
    _store_as(out_ptr, offs, z + s * code.to(tl.float32), mask, OUT)


@triton.jit
def _pack_int4_kernel(codes_ptr, out_ptr, n, n_bytes, TILE: tl.constexpr, WIDE: tl.constexpr):
    i = _offsets(TILE, WIDE)
    lo = tl.load(codes_ptr + 2 * i, mask=i < n_bytes, other=0)
    hi = tl.load(codes_ptr + 2 * i + 1, mask=2 * i + 1 < n, other=0)  # odd n: the last high nibble is 0
    tl.store(out_ptr + i, lo | (hi << 4), mask=i < n_bytes)  # in the codes' own dtype, as the reference


@triton.jit
def _unpack_int4_kernel(packed_ptr, out_ptr, n, TILE: tl.constexpr, WIDE: tl.constexpr):
    j = _offsets(TILE, WIDE)
    mask = j < n
    byte = tl.load(packed_ptr + j // 2, mask=mask, other=0)
    tl.store(out_ptr + j, tl.where((j & 1) == 0, byte & 0xF, byte >> 4), mask=mask)


# ---------------------------------------------------------------- stochastic rounding to bf16
@triton.jit
def _stochastic_round_bf16_kernel(x_ptr, out_ptr, n, seed, TILE: tl.constexpr, WIDE: tl.constexpr):
    """x_ptr: the int32 bits of float32 values; out_ptr: the int16 bits of the bfloat16 result.
    Element e's noise is half e % 2 (low first) of word (e % 8) // 2 of Philox(seed, counter e // 8):
    one Philox call serves eight elements."""
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offs = pid * TILE + tl.arange(0, TILE)
    mask = offs < n
    bits = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    r0, r1, r2, r3 = tl.randint4x(seed, pid * (TILE // 8) + tl.arange(0, TILE // 8))
    noise = tl.interleave(_interleave4(r0 & 0xFFFF, r1 & 0xFFFF, r2 & 0xFFFF, r3 & 0xFFFF),
                          _interleave4(r0 >> 16, r1 >> 16, r2 >> 16, r3 >> 16))
    rounded = (bits + noise) >> 16  # the magnitude rounds up when the dropped bits carry
    finite = (bits & 0x7F800000) != 0x7F800000
    nan = ~finite & ((bits & 0x007FFFFF) != 0)
    out = tl.where(finite, rounded, bits >> 16)  # ±inf pass through
    out = tl.where(nan, 0x7FC0, out)  # NaN as torch's float → bfloat16 writes it
    tl.store(out_ptr + offs, out.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


# ---------------------------------------------------------------- host side
@functools.cache
def _table(kind: str, code: str, signed: bool, device: torch.device) -> Tensor:
    """The code book or midpoints on ``device``, built once (the reference builds them per call)."""
    if kind == "adam_v_book":
        return reference.second_moment_book(code, device).contiguous()
    make = reference.code_book if kind == "book" else reference.code_midpoints
    return make(code, signed, device).contiguous()


def _tables(code: str, signed: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    return _table("book", code, signed, device), _table("mid", code, signed, device)


def _f32(x: float) -> float:
    """x rounded to float32, as torch rounds a Python scalar multiplying a float32 tensor."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _seed(seed: int) -> int:
    """The seed as the 64-bit key Philox takes (torch.Generator also takes it modulo 2^64)."""
    return int(seed) % 2**64


def _check_size(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_per_group(what: str, t: Tensor, per: int, n: int, name: str) -> None:
    """Guard the kernel's reads: the reference fails on a short ``t`` by broadcasting."""
    need = -(-n // per)
    if t.numel() < need:
        raise ValueError(f"{what}: {n} elements in {name}s of {per} need {need} values, got {t.numel()}")


def _as_input(x: Tensor) -> tuple[Tensor, bool]:
    """x flat and contiguous as the kernel reads it: float32/float16 as they are, bfloat16 as its
    int16 bits (flagged), anything else converted with .float() as the reference does."""
    x = x.reshape(-1)
    if x.dtype == torch.bfloat16:
        return x.contiguous().view(torch.int16), True
    if x.dtype not in (torch.float32, torch.float16):
        x = x.float()
    return x.contiguous(), False


def _output(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """(what the caller gets, what the kernel writes, the kernel's OUT kind)."""
    if dtype == torch.float32:
        out = torch.empty(n, dtype=dtype, device=device)
        return out, out, _OUT_F32
    if dtype == torch.bfloat16:
        out = torch.empty(n, dtype=dtype, device=device)
        return out, out.view(torch.int16), _OUT_BF16
    if dtype in (torch.float16, torch.float64):
        out = torch.empty(n, dtype=dtype, device=device)
        return out, out, _OUT_OTHER
    out = torch.empty(n, dtype=torch.float32, device=device)  # e.g. an integer dtype: cast as torch does
    return out, out, _OUT_F32


def _finish(out: Tensor, dtype: torch.dtype) -> Tensor:
    return out if out.dtype == dtype else out.to(dtype)


def _tile(size: int) -> tuple[int, int]:
    """(TILE, num_warps) for one program per block/group of ``size`` elements."""
    tile = min(max(triton.next_power_of_2(size), 8), MAX_TILE)
    return tile, max(1, min(8, tile // 128))


def _wide(n: int) -> bool:
    """Whether element indices need int64 (32-bit index math is cheaper, divisions above all)."""
    return n + ELEMENTWISE_TILE >= 2**31


def _grid(n: int, per: int) -> tuple[int]:
    return (-(-n // per),)


# ---------------------------------------------------------------- blockwise INT8
def quantize_blockwise(
    x: Tensor, *, code: str = "dynamic", signed: bool = True, block: int = BLOCK
) -> tuple[Tensor, Tensor]:
    """(codes uint8 like x, absmax float32 of ceil(numel/block)) for a flat tensor x."""
    _check_size("block", block)
    _, mid = _tables(code, signed, x.device)
    src, bf16 = _as_input(x)
    n = src.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // block), dtype=torch.float32, device=x.device)
    if n:
        tile, warps = _tile(block)
        _quantize_blockwise_kernel[_grid(n, block)](src, codes, absmax, mid, n, SIZE=block, TILE=tile, X_BF16=bf16,
                                                    num_warps=warps, **_NO_FUSION)
    _check_quantized(x, absmax)
    return codes, absmax


def dequantize_blockwise(
    codes: Tensor, absmax: Tensor, *, code: str = "dynamic", signed: bool = True, block: int = BLOCK,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The flat float tensor the codes stand for: book[code] · absmax of its block."""
    _check_size("block", block)
    book, _ = _tables(code, signed, codes.device)
    n = codes.numel()
    _check_per_group("dequantize_blockwise", absmax, block, n, "block")
    out, dst, kind = _output(n, dtype, codes.device)
    if n:
        _dequantize_blockwise_kernel[_grid(n, ELEMENTWISE_TILE)](
            codes.reshape(-1).contiguous(), absmax.reshape(-1).float().contiguous(), book, dst, n,
            SIZE=block, TILE=ELEMENTWISE_TILE, WIDE=_wide(n), OUT=kind, num_warps=4, **_NO_FUSION)
    return _finish(out, dtype)


def adam8bit_direction(
    low: Tensor,
    m_codes: Tensor, m_absmax: Tensor,
    v_codes: Tensor, v_absmax: Tensor,
    *, beta1: float, beta2: float, eps: float, step: int, code: str = "dynamic", block: int = BLOCK,
) -> Tensor:
    """One Adam step on INT8 moments, in place, returning N = M̂/(√V̂ + ε) (float32, flat).

    One fused kernel, one program per block: dequantize M and V, update them, compute N, requantize
    with the block's new absmax (see :func:`.reference.adam8bit_direction`).
    """
    _check_size("block", block)
    sbook, smid = _tables(code, True, low.device)
    _, umid = _tables(code, False, low.device)
    ubook = _table("adam_v_book", code, False, low.device)  # code 0 read as half the smallest level
    g, bf16 = _as_input(low)
    n = g.numel()
    _check_moments(n, block, m_codes, m_absmax, v_codes, v_absmax)
    direction = torch.empty(n, dtype=torch.float32, device=low.device)
    if not n:
        return direction
    # the kernel updates contiguous buffers in place; anything else goes through a copy
    work = [t if t.is_contiguous() and t.dtype == dt else t.reshape(-1).to(dt).contiguous()
            for t, dt in ((m_codes, torch.uint8), (m_absmax, torch.float32),
                          (v_codes, torch.uint8), (v_absmax, torch.float32))]
    mc, ma, vc, va = work
    tile, warps = _tile(block)
    bias1 = 1.0 - beta1**step
    bias2_sqrt = (1.0 - beta2**step) ** 0.5
    scalars = [_f32(s) for s in (beta1, 1.0 - beta1, beta2, 1.0 - beta2, bias1, bias2_sqrt, eps)]
    _adam8bit_kernel[_grid(n, block)](g, mc, ma, vc, va, direction, sbook, ubook, smid, umid, n, *scalars,
                                      SIZE=block, TILE=tile, G_BF16=bf16, num_warps=warps, **_NO_FUSION)
    for original, updated in zip((m_codes, m_absmax, v_codes, v_absmax), work):
        if original is not updated:
            original.copy_(updated.view(original.shape))
    return direction


# ---------------------------------------------------------------- grouped min–max (INT8 / INT4)
def quantize_grouped(
    x: Tensor, *, bits: int = 8, group: int = GROUP, stochastic: bool = False, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """(codes uint8 like x (one per element, in [0, 2^bits − 1]), scale float32, zero float32 per
    group) for a flat tensor x: x ≈ zero + scale·code.

    Stochastic rounding adds u = word e % 4 of Philox(seed, counter e // 4), mapped to [0, 1) as
    ``tl.rand`` maps it, to element e (see :func:`.reference.quantize_grouped`).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    _check_size("group", group)
    src, bf16 = _as_input(x)
    n = src.numel()
    groups = -(-n // group)
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    zero = torch.empty(groups, dtype=torch.float32, device=x.device)
    if n:
        tile, warps = _tile(group)
        _quantize_grouped_kernel[(groups,)](src, codes, scale, zero, n, float(2**bits - 1), _seed(seed), SIZE=group,
                                            TILE=tile, STOCHASTIC=bool(stochastic), X_BF16=bf16, num_warps=warps,
                                            **_NO_FUSION)
    _check_quantized(x, scale, zero)
    return codes, scale, zero


def _dequantize_grouped(codes: Tensor, scale: Tensor, zero: Tensor, n: int, group: int, dtype: torch.dtype,
                        packed: bool, what: str) -> Tensor:
    _check_size("group", group)
    for name, t in (("scale", scale), ("zero", zero)):
        _check_per_group(f"{what} ({name})", t, group, n, "group")
    out, dst, kind = _output(n, dtype, codes.device)
    if n:
        _dequantize_grouped_kernel[_grid(n, ELEMENTWISE_TILE)](
            codes.reshape(-1).contiguous(), scale.reshape(-1).float().contiguous(),
            zero.reshape(-1).float().contiguous(), dst, n, SIZE=group, TILE=ELEMENTWISE_TILE, WIDE=_wide(n),
            PACKED=packed, OUT=kind, num_warps=4, **_NO_FUSION)
    return _finish(out, dtype)


def dequantize_grouped(codes: Tensor, scale: Tensor, zero: Tensor, *, group: int = GROUP,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """zero + scale·code per group, flat, in ``dtype``."""
    return _dequantize_grouped(codes, scale, zero, codes.numel(), group, dtype, False, "dequantize_grouped")


def _unpacked_length(packed: Tensor, n: int) -> int:
    """How many codes unpack_int4(packed, n) returns: the reference slices 2·bytes codes with [:n]."""
    return len(range(2 * packed.numel())[: int(n)])


def pack_int4(codes: Tensor) -> Tensor:
    """uint8 codes in [0, 15] → ceil(n/2) bytes: element 2i in the low nibble, 2i+1 in the high."""
    src = codes.reshape(-1).contiguous()
    n = src.numel()
    n_bytes = -(-n // 2)
    out = torch.empty(n_bytes, dtype=codes.dtype, device=codes.device)
    if n:
        _pack_int4_kernel[_grid(n_bytes, ELEMENTWISE_TILE)](src, out, n, n_bytes, TILE=ELEMENTWISE_TILE,
                                                             WIDE=_wide(n), num_warps=4)
    return out


def unpack_int4(packed: Tensor, n: int) -> Tensor:
    """The ``n`` uint8 codes that :func:`pack_int4` packed."""
    count = _unpacked_length(packed, n)
    out = torch.empty(count, dtype=packed.dtype, device=packed.device)
    if count:
        _unpack_int4_kernel[_grid(count, ELEMENTWISE_TILE)](packed.reshape(-1).contiguous(), out, count,
                                                              TILE=ELEMENTWISE_TILE, WIDE=_wide(count), num_warps=4)
    return out


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, n: int, *, group: int = GROUP,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Unpack and dequantize in one kernel: the flat float tensor of ``n`` elements."""
    count = _unpacked_length(packed, n)
    return _dequantize_grouped(packed, scale, zero, count, group, dtype, True, "dequantize_int4")


# ---------------------------------------------------------------- stochastic rounding to bf16
def stochastic_round_bf16(x: Tensor, *, seed: int = 0) -> Tensor:
    """float32 → bfloat16, rounding the magnitude up with probability equal to the part of it below
    bf16's last bit (unbiased); inf and NaN pass through, a value past bf16's largest may round to inf.

    A uniform 16-bit integer from Philox (half e % 2 of word (e % 8) // 2 of Philox(seed, counter
    e // 8) for element e) is added to the 16 bits bfloat16 drops before they are cut off.
    """
    src = x.float().reshape(-1).contiguous()
    n = src.numel()
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    if n:
        _stochastic_round_bf16_kernel[_grid(n, ELEMENTWISE_TILE)](
            src.view(torch.int32), out.view(-1).view(torch.int16), n, _seed(seed), TILE=ELEMENTWISE_TILE,
            WIDE=_wide(n), num_warps=4)
    return out
