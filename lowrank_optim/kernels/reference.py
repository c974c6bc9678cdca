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

import numpy as np
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
    two table lookups instead of an 8-level binary search (see :func:`_cells`): values beyond [-1, 1] count
    as searchsorted counts them, and NaN as above every midpoint."""
    base, threshold, shift = _cells(midpoints)
    flat = v.reshape(-1)
    bits = flat.contiguous().view(torch.int32)
    # the cell is the top 32 − shift bits of the pattern, sign included (a logical shift of the pattern)
    cell = bits.bitwise_right_shift(shift).bitwise_and_(base.numel() - 1)
    return base.index_select(0, cell).add_(flat > threshold.index_select(0, cell)).view(v.shape)


@functools.lru_cache(maxsize=16)
def _cells_cached(points: tuple[float, ...], device: str) -> tuple[Tensor, Tensor, int]:
    mids = torch.tensor(points, dtype=torch.float32)
    mags = mids.abs().view(torch.int32).long()  # |m|'s bits: ordered like the magnitudes
    pos, neg = mids >= 0, mids < 0
    for shift in range(22, -1, -1):  # the coarsest cells that hold at most one midpoint of each sign
        if all(bool(((mags[side] >> shift).diff() != 0).all()) for side in (pos, neg)):
            break
    half = (int(torch.tensor([1.0]).view(torch.int32)) >> shift) + 1  # cells of |v| in [0, 1]
    cells = 1 << (31 - shift)  # cells of one sign over every bit pattern
    lower = torch.arange(half, dtype=torch.int64) << shift  # each cell's first |v| bits
    lo = lower.to(torch.int32).view(torch.float32)
    up = (lower + (1 << shift)).clamp(max=0x7F7FFFFF).to(torch.int32).view(torch.float32)
    # beyond |v| = 1 every midpoint lies below a positive value and none below a negative one; NaN (any
    # pattern past infinity's cell) lies above them all. The quiet bit (bit 22 ≥ shift) puts every NaN an
    # operation makes in a cell of its own; only a signalling NaN with a payload under 2^shift would share
    # −inf's cell and count as −inf.
    base = torch.full((2 * cells,), mids.numel(), dtype=torch.int64)
    base[cells + half: cells + (0x7F800000 >> shift) + 1] = 0
    threshold = torch.full((2 * cells,), float("inf"), dtype=torch.float32)
    # v ≥ 0 in a cell [lo, up): the midpoints below lo, and the one in [lo, up) is passed when v > it
    base[:half] = torch.searchsorted(mids, lo, right=False)
    # v < 0 with |v| in [lo, up): the midpoints ≤ −up, and the one in (−up, −lo] is passed when v > it
    base[cells: cells + half] = torch.searchsorted(mids, -up, right=True)
    threshold[mags[pos] >> shift] = mids[pos]
    threshold[cells + (mags[neg] >> shift)] = mids[neg]
    return base.to(torch.uint8).to(device), threshold.to(device), shift


def _cells(midpoints: Tensor) -> tuple[Tensor, Tensor, int]:
    """Lookup tables of ``midpoints`` over every float32 bit pattern, cut into cells by its top 32 − shift
    bits, so fine that each cell holds at most one midpoint (2^16 patterns per cell for the dynamic unsigned
    book, whose densest levels are 0.7% apart): per cell, the number of midpoints below it and the one
    midpoint inside it (+inf if none). A value's count is then ``base[cell] + (v > threshold[cell])``:
    exactly ``searchsorted``'s (the tests check every midpoint and its float32 neighbours)."""
    return _cells_cached(tuple(midpoints.tolist()), str(midpoints.device))


def _absmax(rows: Tensor) -> Tensor:
    """max |x| of each row, without a |x| temporary; NaN where a row holds one."""
    if not rows.numel():
        return rows.new_zeros(rows.shape[0])
    # amax and amin along the rows, not aminmax nor |x|: 20x less time on a CPU
    return torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_()).abs_()  # abs_: +0 for a row of −0


def _check_quantized(x: Tensor, *stats: Tensor) -> None:
    """Refuse a quantization of ``x`` that holds inf or NaN (a scale computed from them would turn the whole
    block into NaN), or whose per-block statistics ``stats`` overflowed float32: finite values whose range
    (max − min) or magnitude is beyond float32's (±3.4e38; a float64 tensor can hold such values) give an inf
    scale or zero point, and the block would decode to NaN. Called after the statistics are computed and
    before anything is returned or stored, with one device sync for both checks (the kernels' min and max
    need not propagate NaN, so the input is checked itself)."""
    if not x.numel():
        return
    ok = torch.stack([torch.isfinite(x).all(), *(torch.isfinite(t).all() for t in stats)]).tolist()
    if not ok[0]:
        raise ValueError("cannot quantize the tensor: it holds inf or NaN values (a scale computed from them "
                         "would turn the whole block into NaN); check the values before storing them")
    if not all(ok[1:]):
        raise ValueError("cannot quantize the tensor: its values span more than float32 holds (a block's range "
                         "or magnitude beyond 3.4e38 gives an inf scale, and the block would decode to NaN); "
                         "scale the values down before storing them")


def _check_moments(n: int, block: int, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor, v_absmax: Tensor) -> None:
    """The 8-bit Adam kernels' size check: a code per gradient element and an absmax per block of ``block``."""
    for name, codes in (("m_codes", m_codes), ("v_codes", v_codes)):
        if codes.numel() != n:
            raise ValueError(f"adam8bit_direction: {name} holds {codes.numel()} codes for {n} gradient elements")
    for name, absmax in (("m_absmax", m_absmax), ("v_absmax", v_absmax)):
        if absmax.numel() != -(-n // block):
            raise ValueError(f"adam8bit_direction: {name} holds {absmax.numel()} values for "
                             f"{-(-n // block)} blocks of {block}")


def _blocks(x: Tensor, block: int, fill: float = 0.0) -> Tensor:
    """x (flat) as rows of ``block``, the last row padded with ``fill``."""
    n = x.numel()
    rows = -(-n // block)
    pad = rows * block - n
    if pad:
        x = torch.cat([x, x.new_full((pad,), fill)])
    return x.view(rows, block)


def _sqrt_rn(x: Tensor, out: Tensor | None = None) -> Tensor:
    """float32 √x correctly rounded (IEEE), as a kernel's ``sqrt_rn`` computes it. torch.sqrt on the
    CPU is not: on AVX-512 it is an ulp off for about 1 value in 5. NumPy's float32 root (the hardware's
    IEEE square root) is exact and 5x cheaper than the float64 root rounded once to float32, which serves
    tensors NumPy cannot see (other devices, tensors that need grad)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad and x.is_contiguous():
        out = torch.empty_like(x) if out is None else out
        np.sqrt(x.numpy(), out=out.numpy())
        return out
    root = torch.sqrt(x.double()).float()
    return root if out is None else out.copy_(root)


# ---------------------------------------------------------------- blockwise INT8
def quantize_blockwise(
    x: Tensor, *, code: str = "dynamic", signed: bool = True, block: int = BLOCK
) -> tuple[Tensor, Tensor]:
    """(codes uint8 like x, absmax float32 of ceil(numel/block)) for a flat tensor x."""
    rows = _blocks(x.float(), block)
    absmax = _absmax(rows)
    _check_quantized(x, absmax)  # x as given: a float64 value past float32's range is named as such
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
    values = book.index_select(0, codes.reshape(-1).long())
    _times_absmax(values, absmax, block)
    return values


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


#: Blocks per piece of :func:`adam8bit_direction`: 512 × 256 elements keep every temporary at 512 KiB, in
#: cache and off the allocator's mmap path (whole-tensor temporaries made it 4x slower on a CPU).
PIECE_BLOCKS = 512


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
    Blocks are independent, so the work runs over pieces of :data:`PIECE_BLOCKS` blocks (the same numbers).
    """
    g = low.float().view(-1)
    n = g.numel()
    out = torch.empty(n, dtype=torch.float32, device=g.device)
    dev = m_codes.device
    moments = ((m_codes, m_absmax, code_book(code, True, dev), code_midpoints(code, True, dev)),
               (v_codes, v_absmax, second_moment_book(code, dev), code_midpoints(code, False, dev)))
    consts = (beta1, beta2, eps, 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5)
    piece = PIECE_BLOCKS * block
    work = torch.empty(3, min(n, piece), dtype=torch.float32, device=g.device)
    for start in range(0, n, piece):
        stop = min(n, start + piece)
        _adam8bit_piece(g[start:stop], out[start:stop], moments, slice(start, stop),
                        slice(start // block, -(-stop // block)), work[:, : stop - start], consts, block)
    return out


def _adam8bit_piece(g: Tensor, out: Tensor, moments, span: slice, blocks: slice, work: Tensor,  # noqa: ANN001
                    consts: tuple[float, ...], block: int) -> None:
    """:func:`adam8bit_direction` on one piece: ``span`` of the elements, ``blocks`` of the absmax."""
    beta1, beta2, eps, bias1, bias2_sqrt = consts
    m, v, tmp = work
    for x, (codes, absmax, book, _) in ((m, moments[0]), (v, moments[1])):
        torch.index_select(book, 0, codes[span].long(), out=x)
        _times_absmax(x, absmax[blocks], block)
    m.mul_(beta1).add_(torch.mul(g, 1.0 - beta1, out=tmp))  # β₁M + (1 − β₁)g, each product rounded
    # ((1 − β₂)g)·g, not (g·g)(1 − β₂): g² alone overflows float32 from |g| ≈ 1.8e19, and an inf V would
    # make its block's absmax inf and every direction of the block 0, for good (kernels and C alike)
    v.mul_(beta2).add_(torch.mul(g, 1.0 - beta2, out=tmp).mul_(g))
    d = _sqrt_rn(v, out=tmp).div_(bias2_sqrt).add_(eps)
    torch.div(m, d, out=out).div_(bias1)
    for x, (codes, absmax, _, mids) in ((m, moments[0]), (v, moments[1])):
        rows = _blocks(x, block)
        new_max = _absmax(rows)
        safe = torch.where(new_max > 0, new_max, torch.ones_like(new_max))
        codes[span] = _nearest(rows.div_(safe[:, None]), mids).view(-1)[: x.numel()]
        absmax[blocks] = new_max


def _times_absmax(values: Tensor, absmax: Tensor, block: int) -> None:
    """values (flat, book entries) times the absmax of their block, in place."""
    n = values.numel()
    if n % block == 0:
        values.view(-1, block).mul_(absmax[: n // block, None])
    else:
        values.mul_(absmax.repeat_interleave(block)[:n])


# ---------------------------------------------------------------- grouped min–max (INT8 / INT4)
def _group_ranges(rows: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    lo = rows.amin(dim=1)
    hi = rows.amax(dim=1)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # -0 + 0 = +0: which zero amin returns for a group of ±0 depends on their order (and differs between
    # torch and the kernels); the stored zero point is always +0 there
    return scale, lo.add_(0.0)


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
    levels = 2**bits - 1
    given, x = x, x.float()
    n = x.numel()
    if n == 0:
        empty = x.new_zeros(0)
        return torch.zeros(0, dtype=torch.uint8, device=x.device), empty, empty.clone()
    rows = _grouped_rows(x, group)
    scale, zero = _group_ranges(rows, levels)
    _check_quantized(given, scale, zero)
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
