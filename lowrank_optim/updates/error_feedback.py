"""Error feedback: what the subspace drops this step is added to the next step's gradient.

DCT-AdamW (Modoranu et al. 2025, arXiv:2505.17967, ``ista_daslab_optimizers.DCTAdamW(use_ef=True)``)
keeps a buffer E shaped like the weight, zero at the start (LDAdam's differs, see below)::

    A = G + E                          prepare(): the projector refreshes from A and projects A
    R = project(A);  N = rule(R)
    E ← A − Π(A)                       what the step cannot apply, carried to the next step
    W ← (1 − lr·wd)·W − lr·scale·project_back(N)              as ``residual="drop"``

Π is the orthogonal projection onto the subspace. For a projector with an orthonormal basis
(``orthonormal_with`` its options: svd, rsvd, dct, sparse top-r, haar, online_pca) Π(A) = project_back(R):
the paper's E ← A − QQᵀA, the official code's ``E = A − from_lower_to_higher(a)``. For one without
(``random``'s Gaussian, ``coap`` between re-SVDs, Grass's sampled rows) project_back(R) is no projection:
with a Gaussian r×n Q, QᵀQ has eigenvalues near n/r on its range, so A − QᵀQA would grow E by about n/r per
step. There Π(A) = project_back(Γ⁺R) (left, Γ = PᵀP) or project_back(RΓ⁺) (right, Γ = QQᵀ): one r×r Gram
matrix and pseudo-inverse (r²·d + O(r³) beside the step's m·n·r), and ‖E‖ ≤ ‖A‖. (A basis that is nearly
orthonormal, online_pca's between SVDs or an INT4-stored one, keeps the direct form: its QᵀQ has eigenvalues
near 1, so E stays bounded.) lr, scale and weight decay never touch E: it is in gradient
units, as in the official code.

**Momentum in the buffer** (``ef_momentum`` μ, default 0): E ← A − (1 − μ)·Π(A) keeps μ of the applied part
as well. This is Dion's and Trion's error feedback on the momentum (Ahn et al. 2025, arXiv:2504.05295;
``ista_daslab_optimizers`` ``Trion``: M ← M + G, M ← M − (1 − μ)·m·Qᵀ with m the coordinates of M): E is
then their momentum M, A = M + G, and R = project(A) is the low-rank momentum the rule orthogonalizes. μ = 0
is DCT-AdamW's E.

**Not LDAdam's E.** LDAdam (Robert et al., ICLR 2025; IST-DASLab/LDAdam ``ldadamw.py``) also adds to E the
part of the first moment its change of subspace loses, β₁/(1 − β₁)·(PB_old(M) − PB_new(T·M)); this buffer
has no such term, so ``residual="error_feedback"`` with ``on_refresh="transfer"`` (LDAdam's moment transfer,
which equals the official code to 6e-16) parts from the official LDAdamW from the second refresh on (1e-2
to 3e-2 of the weight over 8 steps, a QA pass's float64 run; without that block of the official code the two
agree to 3e-16). LDAdam's subspace choice (power iteration on a blend of momentum and gradient) is not
offered either.

The buffer is kept, per ``ef_bits``, in float32 (float64 for float64 weights), or through the package's
storages (:mod:`lowrank_optim.quant.storage`): 8, blockwise INT8 (uint8 codes and a float32 absmax per
block of 256, the signed dynamic code book of the 8-bit moments); 4, INT4 (min–max codes packed two per
byte, float32 scale and zero point per group of 256, rounded to nearest). It is dequantized when added
(A = G + deq(E)) and requantized after the update, as MicroAdam's Algorithm 1 (steps 4 and 8) and the
official ``q_ef`` do.

Departures from the official code: its ``q_ef=8`` quantizer spends 15 levels (it divides the range by 15,
as its 4-bit one), so it is 4-bit precision in 8-bit storage; we spend all 256 codes. Its buckets are one
row of W, ours 256 elements (both min–max and round-to-nearest for 4 bits), which keeps the error bounded
on rows of any width. Its unquantized E is in the weight's dtype (bf16 for a bf16 model), ours float32.

Under ``nonfinite="ignore"`` a non-finite entry of A reaches the moments and the weight, as ``ignore`` says, but
is stored in E as 0 (otherwise every later refresh would see a non-finite gradient). On FSDP2 row shards E is
this rank's rows of G (a DTensor ``Shard(0)`` in the state, its INT8 absmax
padded to the largest piece); nothing is gathered. INT4 buffers are not built for shards (their packed
layout does not follow rows).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..distributed import Local, RowShard, local
from ..quant.storage import FLOAT, INT4, INT8, Storage, largest_piece_blocks, storage_of
from ..projectors import Projector
from .base import Context, Update, basis_gram_bytes, register

#: ``ef_bits`` values and the storage each keeps E in.
EF_STORAGES: dict[int, Storage] = {32: FLOAT, 8: INT8, 4: INT4}


@register
class ErrorFeedback(Update):
    """E ← A − Π(A) with A = G + E (module docstring); the weight's step is ``drop``'s."""

    name = "error_feedback"
    #: The buffer's state key (INT8 adds ``ef_absmax``; INT4 keeps ``ef_packed``, ``ef_scale``, ...).
    key = "ef"
    defaults = {"ef_bits": 32, "ef_momentum": 0.0}

    def kept_bytes(self, projector: Projector, group: dict[str, Any], p: Tensor) -> int:
        return 0 if self.orthonormal(projector, group) else basis_gram_bytes(projector, p)  # coordinates' Γ

    def check(self, group: dict[str, Any], fail: Any) -> None:
        bits = group.get("ef_bits", 32)
        if isinstance(bits, bool) or bits not in EF_STORAGES:
            fail("ef_bits", "the error-feedback buffer is kept in 32 (float32), 8 (blockwise INT8) or 4 (INT4) bits")
        mu = group.get("ef_momentum", 0.0)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0.0 <= float(mu) < 1.0:
            fail("ef_momentum", "the share of the applied part kept in the buffer must be a number in [0, 1) "
                 "(0: E = A − Π(A); Trion and Dion use their momentum, 0.95)")
        if group.get("residual") != self.name and group.get("rank") is not None:
            for key, default in self.defaults.items():
                if group.get(key, default) != default:
                    fail(key, f"it sets residual='error_feedback''s buffer, and this group's residual is "
                         f"{group.get('residual')!r}, which keeps none (nothing would change); drop it, or use "
                         "residual='error_feedback' (DCTAdamW, Trion)")
        if group.get("residual") == self.name and group.get("scaling") is not None:
            fail("scaling", "scaling replaces project_back(N) by the scaled raw gradient, which error feedback "
                 "would not see; use scaling=None with residual='error_feedback'")

    def shard_error(self, group: dict[str, Any]) -> str | None:
        if group.get("ef_bits") == 4:
            return "ef_bits=4 (the INT4 buffer's packed layout does not follow the rows; use ef_bits=8 or 32)"
        return None

    def init_rows(self, rows: Tensor, comm: Local | RowShard, group: dict[str, Any]) -> dict[str, Any]:
        """A zero E like ``rows`` (this rank's rows of G; float32, float64 for float64) in ``ef_bits``'s storage."""
        bits = group["ef_bits"]
        storage = EF_STORAGES[bits]
        dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        zero = torch.zeros(rows.shape, dtype=dtype, device=rows.device)
        blocks = largest_piece_blocks(comm.shape, 0, comm.world) if bits == 8 and not comm.whole else None
        entries = storage.zeros(self.key, zero, signed=True, blocks=blocks)
        if comm.whole:
            return entries
        out = {self.key: comm.wrap(entries[self.key], 0, comm.shape[0])}
        if storage is INT8:
            out[f"{self.key}_absmax"] = comm.wrap(entries[f"{self.key}_absmax"], 0, comm.world * blocks)
        return out

    def buffer(self, state: dict[str, Any]) -> Tensor | None:
        """E as a float tensor (this rank's rows), or None where the state keeps none yet."""
        view = {k: local(v) for k, v in state.items() if k != "projector"}
        try:
            storage = storage_of(view, self.key)
        except KeyError:
            return None
        return storage.load(view, self.key, signed=True)

    def prepare(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """A = G + E, a new tensor (E's dtype at least); G itself before the first step."""
        e = self.buffer(state)
        if e is None:
            return grad
        if e.shape != grad.shape:
            raise ValueError(f"error-feedback buffer 'ef' has shape {tuple(e.shape)} but the gradient is "
                             f"{tuple(grad.shape)}; the state was saved for another parameter or layout")
        return torch.add(e, grad.to(e.dtype)) if grad.dtype != e.dtype else grad + e

    def apply(self, ctx: Context) -> None:
        coords = ctx.low if self.orthonormal(ctx.projector, ctx.group) else self.coordinates(ctx)
        mu = float(ctx.group.get("ef_momentum", 0.0))
        if mu:  # E = A − (1 − μ)·Π(A): the residual of (1 − μ) times the coordinates
            coords = coords * (1.0 - mu)
        rest = ctx.projector.residual(ctx.grad, coords)  # A − Π(A): ctx.grad is A (prepare)
        ctx.apply_back(ctx.direction, -ctx.lr * ctx.scale, ctx.decay)
        # only under nonfinite="ignore" can A hold inf or NaN: it reaches N and W as ignore says, but E keeps 0
        # there, or every later refresh would see a non-finite gradient (and INT8/INT4 could not store it)
        self.store(ctx.state, torch.nan_to_num_(rest, nan=0.0, posinf=0.0, neginf=0.0))

    @staticmethod
    def orthonormal(projector: Projector, group: dict[str, Any]) -> bool:
        """Whether the projector, built with this group's options, has an orthonormal basis (Γ = I)."""
        cls = type(projector)
        return cls.orthonormal_with({**cls.options_from_group(group), **group["projector_options"]})

    @staticmethod
    def coordinates(ctx: Context) -> Tensor:
        """Γ⁺R (left) or RΓ⁺ (right), Γ the basis' Gram matrix: project_back of it is Π(A) for any basis, in
        float32 at least. The pseudo-inverse (eigh of the r×r Γ): a basis of repeated rows (Grass's sampling with
        replacement draws an index twice) has a singular Γ, and Bᵀ Γ⁺ B is still the projection onto its span.
        Γ is the projector's, computed once per basis (:meth:`Projector.basis_gram`); E accumulates what the
        projection misses, so Γ is used even where it is near the identity."""
        low = ctx.low
        gram, _ = ctx.projector.basis_gram(low.device, torch.float64 if low.dtype == torch.float64 else torch.float32)
        if ctx.side == "left":
            return (torch.linalg.pinv(gram, hermitian=True) @ low.to(gram.dtype)).to(low.dtype)
        return (low.to(gram.dtype) @ torch.linalg.pinv(gram, hermitian=True)).to(low.dtype)

    def store(self, state: dict[str, Any], value: Tensor) -> None:
        """Write E into its entries in place (on shards they are views of DTensors)."""
        view = {k: local(v) for k, v in state.items() if k != "projector"}
        storage = storage_of(view, self.key)
        if storage is FLOAT:
            view[self.key].copy_(value)
            return
        fresh = dict(view)
        storage.store(fresh, self.key, value.contiguous(), signed=True)
        for k in storage.keys(self.key):
            if isinstance(view.get(k), Tensor) and fresh[k] is not view[k]:
                view[k].copy_(fresh[k])
