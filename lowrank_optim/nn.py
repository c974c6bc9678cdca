"""SLTrain's sparse plus low-rank linear layer (Han et al. 2024, arXiv:2406.02214; andyjm3/SLTrain).

>>> model = lro.nn.to_sltrain(model, rank=128, density=0.03)   # attention and MLP linears replaced
>>> opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

Each replaced weight is ``W = (alpha / r) * B @ A + S``: a rank-``r`` factorization (``B`` out×r,
``A`` r×in) plus a sparse ``S`` whose support, a uniformly random ``density`` fraction of the
entries, is drawn once and never changes; only its values are trained. The layer never forms
``W``: the forward is ``y = (alpha / r) * (x @ Aᵀ) @ Bᵀ + x @ Sᵀ + b`` with ``S`` as a CSR sparse
tensor, and the backward (a custom autograd Function) computes

    dX = (alpha / r) * (dY @ B) @ A + dY @ S          dA = (alpha / r) * (dY @ B)ᵀ @ X
    dB = (alpha / r) * dYᵀ @ (X @ Aᵀ)                 dS[i, j] = (dYᵀ @ X)[i, j] on the support only

where ``dS`` is a sampled dense-dense product (``torch.sparse.sampled_addmm``), so no out×in tensor
exists in the forward or the backward. The official code (sparse-lora/sparse_linear.cpp) forms
``W = B @ A`` plus the scattered values in both its forward and backward, and ``dYᵀ @ X`` in full
before gathering the support: the same values to rounding, with an out×in temporary per layer.
It also saves only the layer's input, as we do (``X @ Aᵀ`` is recomputed in the backward).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch import nn as tnn

#: dtypes the CPU sparse kernels (MKL) lack; the sparse products run in float32 there
_CPU_UPCAST = (torch.bfloat16, torch.float16)


def _sparse_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "cpu" and t.dtype in _CPU_UPCAST else t.dtype


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch's "CSR support is in beta" notice, once per process
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values.to(_sparse_dtype(values)), shape, check_invariants=False)


def _sparse_times(s: Tensor, dense_t: Tensor, dtype: torch.dtype) -> Tensor:
    """``(s @ dense_t).T`` in ``dtype``: ``s`` a sparse (CSR, or its CSC transpose) matrix, ``dense_t`` k×N."""
    return torch.sparse.mm(s, dense_t.to(s.dtype)).T.to(dtype)


class _SparseLowRankMatmul(torch.autograd.Function):
    """``y = scale * (x @ Aᵀ) @ Bᵀ + x @ Sᵀ + bias`` with the gradients of the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, lora_a: Tensor, lora_b: Tensor, values: Tensor, crow: Tensor, col: Tensor,
                scale: float, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        shape = (lora_b.shape[0], lora_a.shape[1])
        y = (x2 @ lora_a.T) @ lora_b.T
        y.mul_(scale).add_(_sparse_times(_csr(crow, col, values, shape), x2.T, y.dtype))
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(x, lora_a, lora_b, values, crow, col)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return y.reshape(*x.shape[:-1], shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, lora_a, lora_b, values, crow, col = ctx.saved_tensors
        scale, (need_x, need_a, need_b, need_s) = ctx.scale, ctx.needs_input_grad[:4]
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad_y.reshape(-1, grad_y.shape[-1]).to(x.dtype)
        shape = (lora_b.shape[0], lora_a.shape[1])
        gb = g2 @ lora_b if (need_x or need_a) else None
        dx = da = db = ds = dbias = None
        if need_x or need_s:
            s = _csr(crow, col, values, shape)
        if need_x:
            dx = (gb @ lora_a).mul_(scale).add_(_sparse_times(s.t(), g2.T, x.dtype)).reshape(x.shape)
        if need_a:
            da = (gb.T @ x2).mul_(scale)
        if need_b:
            db = (g2.T @ (x2 @ lora_a.T)).mul_(scale)
        if need_s:
            # dYᵀ @ X only where S is supported: the SDDMM never forms the out×in product
            sampled = torch.sparse.sampled_addmm(s, g2.T.to(s.dtype), x2.to(s.dtype), beta=0.0)
            ds = sampled.values().to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[7]:
            dbias = g2.sum(0)
        return dx, da, db, ds, None, None, None, dbias


def _check_factor_args(rank: int, density: float, alpha: float) -> None:
    """rank, density and alpha, whatever the layer's shape."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density < 1:
        raise ValueError(f"density must be a fraction in (0, 1), e.g. 0.03 (the paper's), got {density!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a positive number (the low-rank part is scaled by alpha / rank), got {alpha!r}")


def _check_layer_args(in_features: int, out_features: int, rank: int, density: float, alpha: float) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    _check_factor_args(rank, density, alpha)
    if rank > min(in_features, out_features):
        raise ValueError(f"rank must be at most min(in_features, out_features) = {min(in_features, out_features)} "
                         f"(a larger factorization is no longer low-rank), got {rank}")
    if int(density * in_features * out_features) < 1:
        raise ValueError(f"density={density} keeps no entry of a {out_features}x{in_features} weight; raise it "
                         f"to at least {1 / (in_features * out_features):.3g}")


def random_support(out_features: int, in_features: int, density: float, *,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """SLTrain's fixed support as CSR (row pointers, column indices; int32): ``int(density * out * in)``
    entries drawn uniformly without replacement (``randperm`` of the flat indices, as the official
    ``_init_sparse_parameters``), sorted row-major."""
    total = out_features * in_features
    flat = torch.randperm(total, generator=generator)[: int(density * total)].sort().values
    rows = torch.div(flat, in_features, rounding_mode="floor")
    crow = torch.zeros(out_features + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    return crow.to(torch.int32), (flat % in_features).to(torch.int32)


class SparseLowRankLinear(tnn.Module):
    """``y = x @ ((alpha / rank) * B @ A + S)ᵀ + b``: SLTrain's replacement for ``nn.Linear``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        rank: the factorization's rank ``r`` (paper: 128 at LLaMA-60M, 512 at 1B).
        density: the fraction of the entries ``S`` keeps (paper: 0.03; 0.05 at 7B).
        alpha: the low-rank part's scale numerator (official default 32, the 60M script's; its 1B and
            7B scripts use 8).
        bias: add a bias (LLaMA has none).
        seed: seeds the support's draw (``None``: torch's global generator, as the official code).

    Parameters, initialized as the official ``SpLoRaLinear``: ``lora_A`` (r×in) Kaiming-uniform with
    ``a=sqrt(5)``, i.e. U(-1/sqrt(in), 1/sqrt(in)); ``lora_B`` (out×r) zeros; ``sparse_value`` (nnz)
    U(-1/sqrt(in), 1/sqrt(in)); ``bias`` U(-1/sqrt(out), 1/sqrt(out)) (the official bound, from the
    output width). The support is two int32 buffers, ``sparse_crow`` (out+1) and ``sparse_col`` (nnz),
    saved in the state dict, so a checkpoint carries it; the official code keeps int64 flat indices.
    Departs from the official code in not forming ``W`` (module docstring) and in having no
    trainable scaling (its ``trainable_scaling`` option, off in every script).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, density: float = 0.03, *,
                 alpha: float = 32.0, bias: bool = False, seed: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        _check_layer_args(in_features, out_features, rank, density, alpha)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.density, self.alpha, self.scale = density, float(alpha), float(alpha) / rank
        kw = {"device": device, "dtype": dtype}
        self.lora_A = tnn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = tnn.Parameter(torch.empty(out_features, rank, **kw))
        nnz = int(density * in_features * out_features)
        self.sparse_value = tnn.Parameter(torch.empty(nnz, **kw))
        self.bias = tnn.Parameter(torch.empty(out_features, **kw)) if bias else None
        if torch.device(device or torch.get_default_device()).type == "meta":
            crow = torch.empty(out_features + 1, dtype=torch.int32, device="meta")
            col = torch.empty(nnz, dtype=torch.int32, device="meta")
        else:
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            crow, col = random_support(out_features, in_features, density, generator=generator)
        self.register_buffer("sparse_crow", crow.to(device))
        self.register_buffer("sparse_col", col.to(device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialization (class docstring)."""
        if self.lora_A.is_meta:
            return
        tnn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        tnn.init.zeros_(self.lora_B)
        bound = 1 / math.sqrt(self.in_features)
        tnn.init.uniform_(self.sparse_value, -bound, bound)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.out_features)
            tnn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return _SparseLowRankMatmul.apply(x, self.lora_A, self.lora_B, self.sparse_value, self.sparse_crow,
                                          self.sparse_col, self.scale, self.bias)

    def dense_weight(self) -> Tensor:
        """``W = (alpha / r) * B @ A + S`` as a dense out×in tensor (for inspection and export; training
        never calls it)."""
        s = _csr(self.sparse_crow, self.sparse_col, self.sparse_value, (self.out_features, self.in_features))
        return self.scale * self.lora_B @ self.lora_A + s.to_dense().to(self.lora_A.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"density={self.density}, alpha={self.alpha}, bias={self.bias is not None}")


#: the official target_modules (torchrun_main.py): every linear whose name holds one of these
SLTRAIN_TARGETS = ("attn", "mlp", "attention")


def _targets(model: tnn.Module, target_modules: Iterable[str] | Callable[[str, tnn.Module], bool] | None,
             ) -> list[str]:
    """The qualified names of the ``nn.Linear`` layers :func:`to_sltrain` replaces: with None, those whose
    name holds one of :data:`SLTRAIN_TARGETS` (LLaMA's attention and MLP), or, in a model without such
    names, every linear but ``lm_head``; embeddings (and a head tied to them) never."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if target_modules is not None and not callable(target_modules):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"target_modules must be a non-empty list of name parts (e.g. {list(SLTRAIN_TARGETS)}), "
                             f"a callable (name, module) -> bool, or None, got {target_modules!r}")
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, tnn.Embedding)}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, tnn.Linear) and id(m.weight) not in embedding]
    if target_modules is None:
        official = [n for n, _ in linears if any(t in n for t in SLTRAIN_TARGETS)]
        return official or [n for n, _ in linears if n.rsplit(".", 1)[-1] != "lm_head"]
    if callable(target_modules):
        return [n for n, m in linears if target_modules(n, m)]
    return [n for n, _ in linears if any(t in n for t in target_modules)]


def to_sltrain(model: tnn.Module, rank: int, density: float = 0.03, *, alpha: float = 32.0,
               target_modules: Iterable[str] | Callable[[str, tnn.Module], bool] | None = None,
               seed: int | None = None) -> tnn.Module:
    """Replace ``model``'s attention and MLP ``nn.Linear`` layers by :class:`SparseLowRankLinear`, in place.

    As the official ``SpLoRaModel``: the new layers are freshly initialized (nothing of the dense
    weights is copied; SLTrain is for pretraining), on the old weight's device and dtype, with a bias
    where the old layer had one. ``target_modules``: name parts (default :data:`SLTRAIN_TARGETS`, the
    official list), or a callable ``(name, module) -> bool``. ``seed`` seeds every layer's support
    (layer ``i`` of the replaced ones from ``seed + i``); None draws from torch's global generator, as
    the official code. Every argument is checked against every target before any layer is replaced.
    Returns ``model``.
    """
    if not isinstance(model, tnn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    names = _targets(model, target_modules)
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, tnn.Linear)]
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear of the model; its linear layers "
                         f"are named like {linear[:5]}")
    modules = [model.get_submodule(n) for n in names]
    for m in modules:
        _check_layer_args(m.in_features, m.out_features, rank, density, alpha)
    for i, (name, old) in enumerate(zip(names, modules)):
        new = SparseLowRankLinear(old.in_features, old.out_features, rank, density, alpha=alpha,
                                  bias=old.bias is not None, seed=None if seed is None else seed + i,
                                  device=old.weight.device, dtype=old.weight.dtype)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def parse_sltrain(spec: str | tuple) -> tuple[int, float, float]:
    """``"RANK:DENSITY[:ALPHA]"`` (the CLI's ``--sltrain``; e.g. ``128:0.03:32``) or a tuple of the same,
    as ``(rank, density, alpha)``; alpha defaults to 32, the official default. Checked as the layer checks."""
    parts = spec.split(":") if isinstance(spec, str) else list(spec)
    if not 2 <= len(parts) <= 3:
        raise ValueError(f"sltrain must be RANK:DENSITY or RANK:DENSITY:ALPHA (e.g. 128:0.03), got {spec!r}")
    if isinstance(spec, str):
        try:
            parts = [int(parts[0])] + [float(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(f"sltrain must be RANK:DENSITY[:ALPHA] with an integer rank and numbers, got {spec!r}") from None
    rank, density, alpha = (*parts, 32.0)[:3]
    _check_factor_args(rank, density, alpha)
    return rank, density, alpha


__all__ = ["SLTRAIN_TARGETS", "SparseLowRankLinear", "parse_sltrain", "random_support", "to_sltrain"]
