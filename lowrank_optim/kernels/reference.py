"""Plain-torch reference of every kernel: the specification the Triton kernels are tested against.

Every function takes and returns flat, contiguous tensors (callers reshape); blocks and groups run
over the flattened elements in order, the last one possibly partial. The deterministic functions are
written so that a kernel can reproduce them bit for bit: float32 arithmetic in a fixed order, rounding
as ``floor(v + 0.5)``, nearest-code search by counting midpoints. The stochastic ones draw from a
``torch.Generator`` seeded with ``seed``; a kernel draws its own numbers and is held to the same
distribution (unbiased, never more than one grid step away).

Blockwise INT8 (optimizer moments; Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"): per block of ``block`` elements, absmax = max|x|, and each x/absmax is replaced by
the index of the nearest of 256 code values (uint8). Two code books:

* ``dynamic``: dynamic-exponent values. The signed book has 0, ±127 magnitudes in (1e-6, 1] whose
  spacing is linear within a decade and halves in count per decade down (64 in [0.1, 1], 32 in
  [0.01, 0.1], ... 1 at 1e-6), so small moments keep their relative precision; the unsigned book
  (for Adam's V ≥ 0) spends the sign bit on one more decade (255 magnitudes down to 1e-7).
* ``linear``: equally spaced values, k/127 for k in -127..127 (signed), k/255 (unsigned).

Each book has exactly 256 sorted entries; a signed book has 255 distinct values and repeats +1 at
index 255, which the nearest search never picks.

Grouped min–max (Q-GaLore's projections and weights): per group of ``group`` elements,
x ≈ zero + scale·q with q an integer in [0, 2^bits − 1], scale = (max − min)/(2^bits − 1) and
zero = min, a float zero point: the value code 0 stands for. Nothing is clamped, so a group whose
values share one sign ([1, 2]) keeps its range; q-galore-torch's integer zero point clamped into
[0, 2^bits − 1] maps such a group to one value. A constant group (max = min) gets scale 1 and
decodes exactly. INT4 codes are packed two per byte, element 2i in the low nibble.

Non-finite input to a quantizer is an error (a NaN scale would silently poison the whole block).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK = 256  # elements per absmax block of the INT8 moments
GROUP = 256  # elements per scale/zero group of the min–max quantizers
CODES = ("dynamic", "linear")


# ---------------------------------------------------------------- code books
@functools.cache
def _code_book(code: str, signed: bool) -> tuple[float, ...]:
    if code == "linear":
        if signed:
            values = [k / 127 for k in range(-127, 128)]
            return tuple(values + [1.0])
        return tuple(k / 255 for k in range(256))
    if code != "dynamic":
        raise ValueError(f"code must be one of {CODES}, got {code!r}")
    decades = 7 if signed else 8  # decade d holds 2^(decades-1-d) values in (0.1, 1]·10^-d
    mags: list[float] = []
    for d in range(decades):
        count = 2 ** (decades - 1 - d)
        mags += [(0.1 + 0.9 * (k + 1) / count) * 10.0**-d for k in range(count)]
    mags.sort()
    if signed:
        values = [-m for m in reversed(mags)] + [0.0] + mags  # 255 values
        return tuple(values + [1.0])
    return tuple([0.0] + mags)  # 256 values


def code_book(code: str = "dynamic", signed: bool = True, device: torch.device | str | None = None) -> Tensor:
    """The 256 sorted float32 values a uint8 code stands for (times the block's absmax)."""
    return torch.tensor(_code_book(code, signed), dtype=torch.float32, device=device)


def code_midpoints(code: str = "dynamic", signed: bool = True, device: torch.device | str | None = None) -> Tensor:
    """The 255 float32 midpoints between neighbouring code values; a value's code is the number of
    midpoints strictly below it."""
    book = code_book(code, signed)
    return ((book[:-1] + book[1:]) / 2).to(device)


def _nearest(v: Tensor, midpoints: Tensor) -> Tensor:
    """The number of ``midpoints`` strictly below each value of ``v`` (``searchsorted``, right=False), from
    two table lookups instead of an 8-level binary search (see :func:`_cells`); values beyond [-1, 1] fall
    in the outermost cells, which count them as searchsorted does, and NaN counts as above every midpoint."""
    base, threshold, shift = _cells(midpoints)
    half = base.numel() // 2
    flat = v.reshape(-1)
    bits = flat.contiguous().view(torch.int32)
    cell = (bits & 0x7FFFFFFF).bitwise_right_shift_(shift).clamp_(max=half - 1)
    cell += (bits >> 31) & half  # negative values (sign bit set): the second half of the tables
    out = base.index_select(0, cell).add_(flat > threshold.index_select(0, cell))
    if bool(flat.isnan().any()):  # searchsorted places NaN above every midpoint (a poisoned block)
        out.masked_fill_(flat.isnan(), midpoints.numel())
    return out.view(v.shape)


@functools.lru_cache(maxsize=16)
def _cells_cached(points: tuple[float, ...], device: str) -> tuple[Tensor, Tensor, int]:
    mids = torch.tensor(points, dtype=torch.float32)
    mags = mids.abs().view(torch.int32).long()  # |m|'s bits: ordered like the magnitudes
    pos, neg = mids >= 0, mids < 0
    for shift in range(22, -1, -1):  # the coarsest cells that hold at most one midpoint of each sign
        if all(bool(((mags[side] >> shift).diff() != 0).all()) for side in (pos, neg)):
            break
    half = (int(torch.tensor([1.0]).view(torch.int32)) >> shift) + 1  # cells of |v| in [0, 1]
    lower = torch.arange(half, dtype=torch.int64) << shift  # each cell's first |v| bits
    lo = lower.to(torch.int32).view(torch.float32)
    up = (lower + (1 << shift)).clamp(max=0x7F7FFFFF).to(torch.int32).view(torch.float32)
    base = torch.empty(2 * half, dtype=torch.int64)
    threshold = torch.full((2 * half,), float("inf"))
    # v ≥ 0 in a cell [lo, up): the midpoints below lo, and the one in [lo, up) is passed when v > it
    base[:half] = torch.searchsorted(mids, lo, right=False)
    # v < 0 with |v| in [lo, up): the midpoints ≤ −up, and the one in (−up, −lo] is passed when v > it
    base[half:] = torch.searchsorted(mids, -up, right=True)
    threshold[mags[pos] >> shift] = mids[pos]
    threshold[half + (mags[neg] >> shift)] = mids[neg]
    return base.to(torch.uint8).to(device), threshold.to(device), shift


def _cells(midpoints: Tensor) -> tuple[Tensor, Tensor, int]:
    """Lookup tables of ``midpoints`` over |v| ∈ [0, 1]: ranges of float32 bit patterns so fine that each
    holds at most one midpoint of each sign (2^16 patterns each for the dynamic unsigned book, whose
    densest levels are 0.7% apart), with, per range and sign, the number of midpoints below and the one
    midpoint inside it (+inf if none). A value's count is then ``base[cell] + (v > threshold[cell])``:
    exactly ``searchsorted``'s (the tests check every midpoint and its float32 neighbours)."""
    return _cells_cached(tuple(midpoints.tolist()), str(midpoints.device))


def _check_finite(x: Tensor, what: str) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"cannot quantize {what}: it holds inf or NaN values (a scale computed from them "
                         "would turn the whole block into NaN); check the values before storing them")


def _blocks(x: Tensor, block: int, fill: float = 0.0) -> Tensor:
    """x (flat) as rows of ``block``, the last row padded with ``fill``."""
    n = x.numel()
    rows = -(-n // block)
    pad = rows * block - n
    if pad:
        x = torch.cat([x, x.new_full((pad,), fill)])
    return x.view(rows, block)


def _sqrt_rn(x: Tensor) -> Tensor:
    """float32 √x correctly rounded (IEEE), as a kernel's ``sqrt_rn`` computes it. torch.sqrt on the
    CPU goes through MKL's vector math for long tensors and is an ulp off for about 1 value in 150;
    the float64 root rounded once to float32 is the correctly rounded float32 root."""
    return torch.sqrt(x.double()).float()


# ---------------------------------------------------------------- blockwise INT8
def quantize_blockwise(
    x: Tensor, *, code: str = "dynamic", signed: bool = True, block: int = BLOCK
) -> tuple[Tensor, Tensor]:
    """(codes uint8 like x, absmax float32 of ceil(numel/block)) for a flat tensor x."""
    _check_finite(x, "the tensor")
    x = x.float()
    rows = _blocks(x, block)
    absmax = rows.abs().amax(dim=1) if x.numel() else x.new_zeros(0)
    return _encode(rows, absmax, code, signed)[: x.numel()], absmax


def _encode(rows: Tensor, absmax: Tensor, code: str, signed: bool) -> Tensor:
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    v = rows / safe[:, None]
    return _nearest(v, code_midpoints(code, signed, rows.device)).view(-1)


def dequantize_blockwise(
    codes: Tensor, absmax: Tensor, *, code: str = "dynamic", signed: bool = True, block: int = BLOCK,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The flat float tensor the codes stand for: book[code] · absmax of its block."""
    return _scaled(code_book(code, signed, codes.device), codes, absmax, block).to(dtype)


def _scaled(book: Tensor, codes: Tensor, absmax: Tensor, block: int) -> Tensor:
    """book[code] · absmax of its block, for flat ``codes`` (float32, flat)."""
    values = book.index_select(0, codes.reshape(-1).int())
    n = values.numel()
    if n % block == 0:
        return values.view(-1, block).mul_(absmax[: n // block, None]).view(-1)
    return values.mul_(absmax.repeat_interleave(block)[:n])


def second_moment_book(code: str = "dynamic", device: torch.device | str | None = None) -> Tensor:
    """The unsigned book with which the 8-bit Adam step reads V: code 0 stands for half the smallest
    level (the middle of the values that round to it) instead of 0.

    An element whose V fell below the smallest level of its block (V is a square: it underflows long
    before M does) would otherwise be read as V = 0 while M is not, and a step where its gradient is
    exactly 0 (an embedding row absent from the batch) would divide M by ε alone: updates of 100× lr.
    A block whose absmax is 0 still reads 0."""
    book = code_book(code, False, device)
    book[0] = book[1] / 2
    return book


def adam8bit_direction(
    low: Tensor,
    m_codes: Tensor, m_absmax: Tensor,
    v_codes: Tensor, v_absmax: Tensor,
    *, beta1: float, beta2: float, eps: float, step: int, code: str = "dynamic", block: int = BLOCK,
) -> Tensor:
    """One Adam step on INT8 moments, in place, returning N = M̂/(√V̂ + ε) (float32, flat).

    M (signed book) and V (unsigned book, code 0 read as half the smallest level:
    :func:`second_moment_book`) are dequantized, updated in float32 as
    M ← β₁M + (1 − β₁)g, V ← β₂V + (1 − β₂)g², N is computed from these float32 values, and the
    moments are requantized with fresh absmax per block. ``step`` counts this step (1 on the first).
    """
    g = low.float().view(-1)
    m = dequantize_blockwise(m_codes, m_absmax, code=code, signed=True, block=block)
    v = _scaled(second_moment_book(code, v_codes.device), v_codes, v_absmax, block)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * (g * g)
    bias1 = 1.0 - beta1**step
    bias2_sqrt = (1.0 - beta2**step) ** 0.5
    direction = m / (_sqrt_rn(v) / bias2_sqrt + eps) / bias1
    for x, codes, absmax, signed in ((m, m_codes, m_absmax, True), (v, v_codes, v_absmax, False)):
        rows = _blocks(x, block)
        new_max = rows.abs().amax(dim=1) if x.numel() else x.new_zeros(0)
        codes.copy_(_encode(rows, new_max, code, signed)[: x.numel()])
        absmax.copy_(new_max)
    return direction


# ---------------------------------------------------------------- grouped min–max (INT8 / INT4)
def _group_ranges(rows: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    lo = rows.amin(dim=1)
    hi = rows.amax(dim=1)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, lo


def _grouped_rows(x: Tensor, group: int) -> Tensor:
    # the padding of the last group must not widen its range: pad with one of its own values
    return _blocks(x, group, float(x[-1]) if x.numel() else 0.0)


def quantize_grouped(
    x: Tensor, *, bits: int = 8, group: int = GROUP, stochastic: bool = False, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """(codes uint8 like x (one per element, in [0, 2^bits − 1]), scale float32, zero float32 per
    group) for a flat tensor x: x ≈ zero + scale·code.

    Rounding: ``floor(v + 0.5)`` with v = (x − zero)/scale, or with ``stochastic`` ``floor(v + u)``,
    u ~ U[0, 1) from a generator seeded with ``seed``: up with probability equal to v's fractional
    part, so the expected code is v (unbiased).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    _check_finite(x, "the tensor")
    levels = 2**bits - 1
    x = x.float()
    n = x.numel()
    if n == 0:
        empty = x.new_zeros(0)
        return torch.zeros(0, dtype=torch.uint8, device=x.device), empty, empty.clone()
    rows = _grouped_rows(x, group)
    scale, zero = _group_ranges(rows, levels)
    v = (rows - zero[:, None]) / scale[:, None]
    if stochastic:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        u = torch.rand(v.shape, generator=gen, device=x.device, dtype=torch.float32)
        q = torch.floor(v + u)
    else:
        q = torch.floor(v + 0.5)
    q = q.clamp_(0, levels).to(torch.uint8).view(-1)[:n]
    return q, scale, zero


def dequantize_grouped(codes: Tensor, scale: Tensor, zero: Tensor, *, group: int = GROUP,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """zero + scale·code per group, flat, in ``dtype``."""
    n = codes.numel()
    s = scale.repeat_interleave(group)[:n]
    z = zero.repeat_interleave(group)[:n]
    return (z + s * codes.float()).to(dtype)


def pack_int4(codes: Tensor) -> Tensor:
    """uint8 codes in [0, 15] → ceil(n/2) bytes: element 2i in the low nibble, 2i+1 in the high."""
    n = codes.numel()
    if n % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_int4(packed: Tensor, n: int) -> Tensor:
    """The ``n`` uint8 codes that :func:`pack_int4` packed."""
    out = torch.stack([packed & 0xF, packed >> 4], dim=1).view(-1)
    return out[:n].contiguous()


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, n: int, *, group: int = GROUP,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Unpack and dequantize in one: the flat float tensor of ``n`` elements."""
    return dequantize_grouped(unpack_int4(packed, n), scale, zero, group=group, dtype=dtype)


# ---------------------------------------------------------------- stochastic rounding to bf16
def stochastic_round_bf16(x: Tensor, *, seed: int = 0) -> Tensor:
    """float32 → bfloat16, rounding the magnitude up with probability equal to the part of it below
    bf16's last bit (unbiased); inf and NaN pass through, a value past bf16's largest may round to inf.

    The 16 bits bf16 drops get a uniform random integer in [0, 2^16) added before they are cut off.
    """
    x = x.float().contiguous()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randint(0, 1 << 16, x.shape, generator=gen, device=x.device, dtype=torch.int32)
    bits = x.view(torch.int32)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    out = torch.where(torch.isfinite(x), rounded, x)
    return out.to(torch.bfloat16)  # exact: the low 16 bits are zero
