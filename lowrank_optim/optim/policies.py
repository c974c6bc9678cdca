"""The pieces a method is composed of, besides its projector and inner rule.

* moments on refresh (``on_refresh``): ``keep`` (GaLore, APOLLO), ``reset`` (FRUGAL, Grass), ``rotate``
  (DCTAdamW: M ← map(M), V ← |map(V)| with the change of basis between the old and new subspace);
* refresh schedule (``refresh``): ``fixed`` every ``update_proj_gap`` steps, or ``lazy`` (Q-GaLore):
  a layer whose subspace stops moving refreshes less and less often;
* per-channel scale factors ‖N‖/‖R‖ (APOLLO's scaling, Fira's residual scaling);
* the norm-growth limiter (APOLLO, Fira).

Everything here works on one parameter's tensors; the optimizer decides when to call what.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import kernels
from ..projectors import Projector

ON_REFRESH = ("keep", "reset", "rotate")
REFRESH = ("fixed", "lazy")
SCALING = (None, "channel", "tensor")
RESIDUAL = ("drop", "sign", "sgd", "fira")
#: Every per-parameter state entry that is a moment (or a moment's quantization scale), for any rule.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax", "row_var", "col_var", "variance",
               "momentum_buffer")

# Q-GaLore's lazy refresh: a queue of 5 similarities, doubling the gap when their mean reaches 0.4.
LAZY_QUEUE = 5
LAZY_THRESHOLD = 0.4
LAZY_GROWTH = 2


def change_of_basis(old: Projector, new: Projector, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The r×r map from old low-rank coordinates to new ones (float32 or wider).

    Left side (R = Pᵀ G): a moment M in old coordinates stands for P_old M in full space, whose new
    coordinates are P_newᵀ P_old M, so the map is applied as ``T @ M`` with T = P_newᵀ P_old.
    Right side (R = G Qᵀ): M Q_old in full space, new coordinates M Q_old Q_newᵀ, applied as
    ``M @ T`` with T = Q_old Q_newᵀ.
    """
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    a = old.basis(device=device, dtype=dtype)
    b = new.basis(device=device, dtype=dtype)
    return b.T @ a if new.side == "left" else a @ b.T


def is_8bit(state: dict[str, Any]) -> bool:
    """Whether the moments are stored as blockwise INT8 (``state_bits=8``)."""
    m = state.get("exp_avg")
    return m is not None and m.dtype == torch.uint8


def load_moments(state: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(M, V) as float tensors: the stored ones, or dequantized copies of INT8 ones."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if not is_8bit(state):
        return m, v
    return (
        kernels.dequantize_blockwise(m.reshape(-1), state["exp_avg_absmax"], signed=True).view(m.shape),
        kernels.dequantize_blockwise(v.reshape(-1), state["exp_avg_sq_absmax"], signed=False).view(v.shape),
    )


def store_moments(state: dict[str, Any], m: Tensor, v: Tensor) -> None:
    """Store new (M, V), requantized when the state keeps INT8 moments."""
    if not is_8bit(state):
        state["exp_avg"], state["exp_avg_sq"] = m.to(state["exp_avg"].dtype), v.to(state["exp_avg_sq"].dtype)
        return
    for key, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        codes, absmax = kernels.quantize_blockwise(x.reshape(-1).contiguous(), signed=signed)
        state[key] = codes.view(x.shape)
        state[f"{key}_absmax"] = absmax


def rotate_moments(state: dict[str, Any], old: Projector, new: Projector, eps: float = 1e-8) -> None:
    """Carry the moments into the new subspace (DCTAdamW's rotation), whatever the inner rule keeps:

    * Adam: M ← map(M), V ← |map(V)| (V stays a non-negative second moment), INT8 ones dequantized
      and requantized;
    * orthogonal: the momentum M ← map(M);
    * Adafactor: the first moment, if any, M ← map(M); the factored V̂ = r cᵀ/mean(r) is rebuilt,
      mapped as |map(V̂)| and factored again into row and column means (a rank-1 factorisation cannot
      be rotated exactly; this is the statistic Adafactor would keep for the rotated estimate).
    """
    if "exp_avg_sq" in state:
        m, v = load_moments(state)
        t = change_of_basis(old, new, m.device, m.dtype)
        store_moments(state, _apply_map(t, m, new.side), _apply_map(t, v, new.side).abs_())
        return
    for key in ("momentum_buffer", "exp_avg"):
        if key in state:
            x = state[key]
            t = change_of_basis(old, new, x.device, x.dtype)
            state[key] = _apply_map(t, x, new.side).to(x.dtype)
    if "row_var" in state:
        from ..rules import adafactor

        v_hat = adafactor.estimate(state, eps)
        t = change_of_basis(old, new, v_hat.device, v_hat.dtype)
        adafactor.refactor(state, _apply_map(t, v_hat, new.side).abs_())


def _apply_map(t: Tensor, x: Tensor, side: str) -> Tensor:
    return t @ x.to(t.dtype) if side == "left" else x.to(t.dtype) @ t


def reset_moments(state: dict[str, Any]) -> None:
    """Zero every moment the rule keeps (INT8 ones: zero codes and a zero absmax, which decode to 0)."""
    for key in MOMENT_KEYS:
        if key in state:
            state[key] = torch.zeros_like(state[key])


def top_vector(proj: Projector, device: torch.device) -> Tensor:
    """The subspace's first basis vector (for SVD-like projectors, the top singular vector)."""
    b = proj.basis(device=device)
    return (b[:, 0] if proj.side == "left" else b[0]).float()


def lazy_refresh_record(state: dict[str, Any], old: Projector, new: Projector, gap: int) -> None:
    """Q-GaLore's layer-adaptive schedule, after a refresh from ``old`` to ``new``.

    Push |cos(old top vector, new top vector)| into a queue of 5 (the absolute value: a singular
    vector's sign is arbitrary, which the reference code ignores); once the queue is full and its
    mean is at least 0.4, double this layer's gap. The queue is not cleared, so a layer whose
    subspace keeps still keeps doubling at each refresh, as in the reference.
    """
    device = next(v.device for k, v in state.items() if k in MOMENT_KEYS)
    cos = torch.nn.functional.cosine_similarity(top_vector(old, device), top_vector(new, device), dim=0).abs()
    lazy_push(state, cos, gap)


def lazy_push(state: dict[str, Any], cos: Tensor, gap: int) -> None:
    """Q-GaLore's queue and gap update from one refresh's |cos| (see :func:`lazy_refresh_record`)."""
    queue = state.get("lazy_queue", torch.zeros(0, dtype=torch.float32))
    queue = torch.cat([queue, cos.reshape(1).cpu()])[-LAZY_QUEUE:]
    state["lazy_queue"] = queue
    if queue.numel() == LAZY_QUEUE and float(queue.mean()) >= LAZY_THRESHOLD:
        state["proj_gap"] = torch.tensor(int(state.get("proj_gap", gap)) * LAZY_GROWTH)


def current_gap(state: dict[str, Any], group: dict[str, Any]) -> int:
    if group["refresh"] == "lazy" and "proj_gap" in state:
        return int(state["proj_gap"])
    return group["update_proj_gap"]


def scale_factors(direction: Tensor, low: Tensor, side: str, mode: str) -> Tensor:
    """‖N‖ / (‖R‖ + 1e-8), per channel or for the whole tensor.

    Channels are the dimension the projection keeps (rows of W for a right-side projection, columns
    for a left-side one); the norms run along the projected dimension. The result broadcasts against
    the m×n gradient: (m, 1), (1, n) or a scalar.
    """
    if mode == "tensor":
        return direction.norm() / (low.norm() + 1e-8)
    dim = 1 if side == "right" else 0
    return direction.norm(dim=dim, keepdim=True) / (low.norm(dim=dim, keepdim=True) + 1e-8)


def growth_factor(norm: Tensor, state: dict[str, Any], gamma: float) -> Tensor:
    """The norm-growth limiter as a factor: 1, or γ‖U_{t−1}‖/‖U_t‖ when ‖U_t‖ > γ‖U_{t−1}‖.

    ``norm`` is ‖U_t‖ before limiting; ``state["limiter_norm"]`` keeps ‖U_t‖ after it, one scalar
    per parameter (NaN, as eagerly built state holds it, means no previous step). 1e-8 guards the
    division, as both reference packages write it. Tensor arithmetic throughout: no host sync.
    """
    prev = state.get("limiter_norm")
    if prev is None:
        factor = torch.ones_like(norm)
    else:
        prev = prev.to(norm)
        factor = gamma / torch.clamp(norm / (prev + 1e-8), min=gamma)
        factor = torch.where(torch.isnan(prev), torch.ones_like(factor), factor)
    state["limiter_norm"] = norm * factor
    return factor
