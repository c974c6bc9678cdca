"""INT8 weights without a full-precision master copy (Q-GaLore, Zhang et al. 2024, arXiv:2407.08296).

``lro.quantize_model_int8(model)`` replaces the weight of every target ``nn.Linear`` with an
:class:`Int8Weight`: a ``torch.Tensor`` subclass that *looks* like the original weight (same shape,
dtype and device, ``requires_grad``, an ``nn.Parameter`` of the same module) but stores uint8 codes
with a float32 scale and zero point per group of 256 elements (x ≈ zero + scale·q). So the model,
``lro.param_groups`` and a plain ``loss.backward(); opt.step()`` loop need no change:

* forward: ``F.linear`` with an ``Int8Weight`` runs a custom autograd function that dequantizes the
  weight on the fly and saves only the INT8 weight (not a dequantized copy) for the backward;
* backward: the weight's ``.grad`` is an ordinary dense tensor of the weight's dtype;
* step: our optimizers (``QGaLoreAdamW``, any ``LowRankAdamW``) dequantize one weight, apply the
  update in float32 and requantize it with stochastic rounding (``stochastic_rounding``, on by
  default for INT8 weights): each code rounds up with probability equal to its fractional part, so
  an update smaller than one grid step still moves the weight in expectation. Rounding to nearest
  would drop every such update (the Q-GaLore paper's ablation; a test measures it).

An ``Int8Weight`` is read-only to everything else: an in-place op on it (``torch.optim.AdamW``
would try ``param.mul_``) raises an error instead of silently updating a temporary. Other ops see
the dequantized tensor.

``model.state_dict()`` stores each such weight as plain tensors, ``weight_codes`` (uint8),
``weight_scale`` and ``weight_zero`` (float32) and ``weight_group`` (a 0-d int64, the group size), so
checkpoints load with ``weights_only=True``; loading one into an unquantized model fails on the missing
``weight`` instead of reading codes as numbers, and loading one into a model quantized with another group
size fails instead of decoding the codes with the wrong scales.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._pytree import tree_map

from .. import kernels

aten = torch.ops.aten
GROUP = kernels.GROUP


class Int8Weight(Tensor):
    """A weight stored as INT8 codes with per-group scale and zero point (see the module docstring)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    group: int

    @staticmethod
    def __new__(cls, codes: Tensor, scale: Tensor, zero: Tensor, shape: torch.Size, dtype: torch.dtype,
                group: int = GROUP, requires_grad: bool = False) -> "Int8Weight":
        return Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=codes.device, requires_grad=requires_grad
        )

    def __init__(self, codes: Tensor, scale: Tensor, zero: Tensor, shape: torch.Size, dtype: torch.dtype,
                 group: int = GROUP, requires_grad: bool = False) -> None:
        self.codes, self.scale, self.zero, self.group = codes, scale, zero, group

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_float(cls, weight: Tensor, group: int = GROUP) -> "Int8Weight":
        """Quantize ``weight`` (rounding to nearest) into a new Int8Weight of its shape and dtype."""
        w = weight.detach()
        codes, scale, zero = kernels.quantize_grouped(w.reshape(-1).contiguous(), bits=8, group=group)
        return cls(codes.view(w.shape), scale, zero, w.shape, w.dtype, group)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight as a dense tensor (in its own dtype unless ``dtype`` is given)."""
        flat = kernels.dequantize_grouped(
            self.codes.reshape(-1), self.scale, self.zero, group=self.group, dtype=dtype or self.dtype
        )
        return flat.view(self.shape)

    @torch.no_grad()
    def requantize_(self, values: Tensor, *, stochastic: bool = True, seed: int = 0) -> "Int8Weight":
        """Store ``values`` (a float tensor of this shape) in place: new codes, scales and zero
        points per group, rounded stochastically (from ``seed``) or to nearest."""
        if tuple(values.shape) != tuple(self.shape):
            raise ValueError(f"requantize_: values of shape {tuple(values.shape)} for a weight of shape {tuple(self.shape)}")
        codes, scale, zero = kernels.quantize_grouped(
            values.detach().reshape(-1).contiguous(), bits=8, group=self.group, stochastic=stochastic, seed=seed
        )
        self.codes.copy_(codes.view(self.codes.shape))
        self.scale.copy_(scale)
        self.zero.copy_(zero)
        return self

    def nbytes_stored(self) -> int:
        """Bytes this weight keeps: 1 per element plus 8 per group."""
        return self.codes.numel() + 4 * (self.scale.numel() + self.zero.numel())

    @staticmethod
    def stored_bytes(numel: int, group: int = GROUP) -> int:
        """What :meth:`nbytes_stored` is for a weight of ``numel`` elements."""
        return numel + 8 * -(-numel // group)

    def __repr__(self) -> str:  # type: ignore[override]
        return (f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, group={self.group}, "
                f"device={self.device})")

    # ---------------------------------------------------------------- subclass protocol
    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        return ["codes", "scale", "zero"], (self.shape, self.dtype, self.group)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, Tensor], meta: tuple[Any, ...], outer_size: Any, outer_stride: Any) -> "Int8Weight":
        shape, dtype, group = meta
        return Int8Weight(inner["codes"], inner["scale"], inner["zero"], shape, dtype, group)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            inp, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(weight, Int8Weight) and not isinstance(inp, Int8Weight):
                return _Int8Linear.apply(inp, weight, bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            w = args[0]
            return Int8Weight(w.codes, w.scale, w.zero, w.shape, w.dtype, w.group)
        if func in (aten._to_copy.default, aten.clone.default):
            w = args[0]
            device = kwargs.get("device") or w.device
            dtype = kwargs.get("dtype") or w.dtype
            copy = func is aten.clone.default
            move = (lambda t: t.clone()) if copy else (lambda t: t.to(device, copy=True))
            return Int8Weight(move(w.codes), move(w.scale), move(w.zero), w.shape, dtype, w.group)
        if func is aten.copy_.default and isinstance(args[0], Int8Weight):
            dst, src = args[0], args[1]
            if isinstance(src, Int8Weight):
                if src.group != dst.group or src.scale.shape != dst.scale.shape:
                    raise ValueError(f"copy_: INT8 weight with {src.scale.numel()} groups of {src.group} into "
                                     f"one with {dst.scale.numel()} groups of {dst.group}")
                dst.codes.copy_(src.codes)
                dst.scale.copy_(src.scale)
                dst.zero.copy_(src.zero)
            else:  # a float tensor: quantize it, to nearest
                dst.requantize_(src.expand(dst.shape), stochastic=False)
            return dst
        schema = getattr(func, "_schema", None)
        if schema is not None and (schema.is_mutable or func.__name__.split(".")[0].endswith("_")):
            raise RuntimeError(
                f"{func.__name__} would write into an INT8-stored weight, which holds no float values to "
                "write into. Update it with lowrank_optim's optimizers (QGaLoreAdamW or any LowRankAdamW "
                "group), which requantize with stochastic rounding, or call weight.requantize_(values)."
            )

        def plain(t: Any) -> Any:
            return t.dequantize() if isinstance(t, Int8Weight) else t

        return func(*tree_map(plain, args), **tree_map(plain, kwargs))


class _Int8Linear(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantized on the fly; only the INT8 weight is saved for the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Int8Weight, bias: Tensor | None) -> Tensor:
        w = weight.dequantize(x.dtype)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.dequantize(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = (g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


# -------------------------------------------------------------------- model conversion
def _save_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    key = prefix + "weight"
    w = state_dict.pop(key, None)
    if isinstance(w, Int8Weight):
        state_dict[prefix + "weight_codes"] = w.codes
        state_dict[prefix + "weight_scale"] = w.scale
        state_dict[prefix + "weight_zero"] = w.zero
        state_dict[prefix + "weight_group"] = torch.tensor(w.group, dtype=torch.int64)
    elif w is not None:
        state_dict[key] = w


def _load_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any,
                   strict: bool, missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    keys = [prefix + k for k in ("weight_codes", "weight_scale", "weight_zero")]
    if not all(k in state_dict for k in keys):
        if prefix + "weight" in state_dict:
            error_msgs.append(
                f"{prefix}weight: the checkpoint holds a float weight but the model stores it as INT8; "
                "load the checkpoint into the model before lro.quantize_model_int8(model)"
            )
            state_dict.pop(prefix + "weight")
        return
    codes, scale, zero = (state_dict.pop(k) for k in keys)
    w = module.weight
    saved = state_dict.pop(prefix + "weight_group", None)
    group = GROUP if saved is None else int(saved)
    if group != w.group:
        recorded = f"was quantized with group={group}" if saved is not None else (
            f"does not record its group (written before lowrank-optim recorded it), so it is taken as the "
            f"default {GROUP}; if it was written with another group N, set "
            f"state_dict['{prefix}weight_group'] = torch.tensor(N) before loading")
        error_msgs.append(
            f"{prefix}weight: the checkpoint's INT8 weight {recorded}, but this model's uses group={w.group}: "
            f"the codes would decode with the wrong scales. Quantize the model with "
            f"lro.quantize_model_int8(model, group={group}) before loading"
        )
        return
    if tuple(codes.shape) != tuple(w.shape) or codes.dtype != torch.uint8 or scale.shape != w.scale.shape \
            or zero.shape != w.zero.shape:
        error_msgs.append(
            f"{prefix}weight: the checkpoint's INT8 weight (codes {tuple(codes.shape)}, {scale.numel()} groups) "
            f"does not fit this model's ({tuple(w.shape)}, {w.scale.numel()} groups)"
        )
        return
    # as an Int8Weight under the usual key: torch's loader checks it and copies it in (copy_ above)
    state_dict[prefix + "weight"] = Int8Weight(codes, scale, zero, w.shape, w.dtype, w.group)


#: The attribute :func:`quantize_model_int8` sets on each float weight it replaces (the weight's name): an
#: optimizer built before it still holds that tensor, and refuses to step it (``optim.step.plan``).
QUANTIZED_AWAY = "_lro_quantized_into"


def quantize_model_int8(
    model: nn.Module,
    target_modules: Iterable[str] | None = None,
    group: int = GROUP,
) -> nn.Module:
    """Store the weights of ``model``'s linear layers as INT8 in place, and return the model.

    Targets: every ``nn.Linear`` (or Hugging Face ``Conv1D``) whose qualified name contains one of
    ``target_modules`` (default: every linear layer except the output head and layers whose weight is tied to
    an embedding, the same layers ``lro.param_groups`` projects). Each weight keeps its shape, dtype, device and
    ``requires_grad``; its storage falls to 1 byte per element plus 8 per group of ``group``.
    Biases, embeddings and norms are untouched. Each weight becomes a new Parameter, so build the
    optimizer afterwards: one of ours built before refuses to step the float weights it still holds.
    """
    from ..groups import is_linear, param_groups

    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be an integer >= 1, got {group!r}")
    groups = param_groups(model, rank=1, target_modules=target_modules)
    chosen = {id(p) for g in groups if g.get("rank") is not None for _, p in g["params"]}
    count = 0
    for name, module in model.named_modules():
        if not is_linear(module) or id(module.weight) not in chosen:
            continue
        w = module.weight
        if isinstance(w, Int8Weight):
            continue
        if w.device.type == "meta":
            raise ValueError(f"{name}.weight is on the meta device; materialize the model before quantizing it")
        q = Int8Weight.from_float(w, group)
        module.weight = nn.Parameter(q, requires_grad=w.requires_grad)
        setattr(w, QUANTIZED_AWAY, f"{name}.weight")  # an optimizer built before this step refuses it
        module._register_state_dict_hook(_save_hook)
        module._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
        count += 1
    if count == 0 and target_modules is not None:
        raise ValueError(f"target_modules={list(target_modules)} matches no linear layer to quantize")
    return model


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters keep, counting INT8 weights at their stored size."""
    total = 0
    for p in model.parameters():
        total += p.nbytes_stored() if isinstance(p, Int8Weight) else p.numel() * p.element_size()
    return total
