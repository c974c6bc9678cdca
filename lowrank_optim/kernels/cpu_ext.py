"""A C kernel for the 8-bit Adam step on a CPU (``csrc/lro_cpu.c``), built on first use, called by ctypes.

The reference's 8-bit Adam step (:func:`.reference.adam8bit_direction`) is about twenty passes of torch ops
over every element (dequantize, the update, absmax, the nearest-code lookup), 4–5x torch AdamW's step
on a CPU. The C kernel makes one pass per block of 256, in cache, with the same float32 operations in the
same order and the reference's code tables (:func:`.reference._cells`): the same bits (tested against the
reference, and so against the Triton kernel, which is tested against it too).

It is plain C with no torch headers, compiled once per machine by the system's C compiler (``$CC``, else
``cc``) in about a second, into ``$LRO_CACHE_DIR`` (default ``~/.cache/lowrank_optim``) under a name keyed
by the source's and the flags' hash, written atomically (a second process waits for nothing: it builds its
own copy under a unique temporary name and the rename is atomic). Blocks are independent, so a call runs
disjoint block ranges on ``torch.get_num_threads()`` threads (ctypes releases the GIL). :func:`load`
returns None, and never raises, when no compiler works or ``LRO_CPU_KERNELS=0``; the reference then runs
and :func:`unavailable_reason` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from . import reference
from .reference import BLOCK

SOURCE = Path(__file__).resolve().parent / "csrc" / "lro_cpu.c"
#: No contraction into FMAs and no fast-math: every operation rounds on its own, as torch's do.
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno")
OPS = ("adam8bit_direction",)  # what the C kernel implements
MAX_BLOCK = 4096  # the kernel's per-block buffers (lro_cpu.c)
#: Elements below which one thread does the whole call (thread start-up would cost more than it saves).
PARALLEL_MIN = 1 << 16

_why_not: list[str] = []
_f, _u8, _i64 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint8), ctypes.c_int64


def cache_dir() -> Path:
    return Path(os.environ.get("LRO_CACHE_DIR") or Path.home() / ".cache" / "lowrank_optim")


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler,) + FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"lro_cpu-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lro_cpu-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first call; None when it cannot be built here."""
    if os.environ.get("LRO_CPU_KERNELS", "1") == "0":
        _why_not[:] = ["LRO_CPU_KERNELS=0"]
        return None
    if not sys.platform.startswith(("linux", "darwin")):
        _why_not[:] = [f"the C kernel is built for Linux and macOS, not {sys.platform}"]
        return None
    try:
        lib = ctypes.CDLL(str(_build(os.environ.get("CC", "cc"))))
    except Exception as exc:  # no compiler, a failing one, an unwritable cache: fall back, say why
        _why_not[:] = [f"building the C kernel failed: {type(exc).__name__}: {exc}"]
        return None
    lib.lro_adam8bit.restype = ctypes.c_int
    lib.lro_adam8bit.argtypes = [_f, _f, _i64, _i64, _i64, _i64, _u8, _f, _f, _u8, _f, _f,
                                 _u8, _f, ctypes.c_int, _u8, _f, ctypes.c_int, _f]
    return lib


def available() -> bool:
    """Whether the kernel library is built (building it now if it can be)."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None (None if it did not, or was not called)."""
    return _why_not[0] if _why_not else None


def usable(*tensors: Tensor) -> bool:
    """Whether the C kernel serves these tensors: all on the CPU, and the library builds."""
    return all(t.device.type == "cpu" for t in tensors) and available()


def _ptr(t: Tensor, kind):  # noqa: ANN001, ANN202
    return ctypes.cast(t.data_ptr(), kind)


@functools.lru_cache(maxsize=8)
def _tables(code: str) -> tuple[Tensor, ...]:
    """Books and cell tables of both moments, contiguous on the CPU (kept alive by the cache)."""
    m_book, v_book = reference.code_book(code, True), reference.second_moment_book(code)
    m_cells = reference._cells(reference.code_midpoints(code, True))
    v_cells = reference._cells(reference.code_midpoints(code, False))
    return m_book, v_book, m_cells, v_cells


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lro-cpu")


def adam8bit_direction(
    low: Tensor,
    m_codes: Tensor, m_absmax: Tensor,
    v_codes: Tensor, v_absmax: Tensor,
    *, beta1: float, beta2: float, eps: float, step: int, code: str = "dynamic", block: int = BLOCK,
) -> Tensor:
    """:func:`.reference.adam8bit_direction` (same arguments, same bits) in the C kernel; the reference
    runs where the kernel does not apply (a library that does not build, non-contiguous state, a block
    over :data:`MAX_BLOCK`)."""
    lib = load()
    g = low.float().reshape(-1).contiguous()
    n = g.numel()
    blocks = -(-n // block) if isinstance(block, int) and not isinstance(block, bool) and block > 0 else 0
    if blocks:
        reference._check_moments(n, block, m_codes, m_absmax, v_codes, v_absmax)
    state = (m_codes, m_absmax, v_codes, v_absmax)
    plain = all(t.is_contiguous() and t.device.type == "cpu" for t in state) \
        and m_codes.dtype == v_codes.dtype == torch.uint8 and m_absmax.dtype == v_absmax.dtype == torch.float32
    if lib is None or not plain or not 0 < blocks or block > MAX_BLOCK or g.device.type != "cpu":
        return reference.adam8bit_direction(low, m_codes, m_absmax, v_codes, v_absmax, beta1=beta1, beta2=beta2,
                                            eps=eps, step=step, code=code, block=block)
    m_book, v_book, (m_base, m_thr, m_shift), (v_base, v_thr, v_shift) = _tables(code)
    consts = torch.tensor([beta1, beta2, eps, 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5, 1.0 - beta1,
                           1.0 - beta2], dtype=torch.float64).float()
    out = torch.empty(n, dtype=torch.float32)
    fixed = (_ptr(g, _f), _ptr(out, _f), n, block)
    rest = (_ptr(m_codes, _u8), _ptr(m_absmax, _f), _ptr(m_book, _f), _ptr(v_codes, _u8), _ptr(v_absmax, _f),
            _ptr(v_book, _f), _ptr(m_base, _u8), _ptr(m_thr, _f), m_shift, _ptr(v_base, _u8), _ptr(v_thr, _f),
            v_shift, _ptr(consts, _f))
    workers = max(1, min(torch.get_num_threads(), n // PARALLEL_MIN))
    bounds = [blocks * k // workers for k in range(workers + 1)]
    calls = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    if len(calls) == 1:
        codes = [lib.lro_adam8bit(*fixed, 0, blocks, *rest)]
    else:
        codes = list(_pool(workers).map(lambda ab: lib.lro_adam8bit(*fixed, ab[0], ab[1], *rest), calls))
    if any(codes):
        raise RuntimeError(f"lro_adam8bit returned {codes}: block={block} is outside (0, {MAX_BLOCK}]")
    return out
