"""Memory accounting: what training a model with one of our optimizers keeps, beside AdamW.

>>> report = lro.memory.estimate("configs/llama_7b.json", optimizer="galore", rank=1024)
>>> print(report.table())

Optimizer states are *measured*, not computed from a formula that could drift from the code: the
model's parameters are recreated on the meta device (no memory), the real optimizer is built on
them, and ``LowRankAdamW.init_state()`` allocates exactly the state its first step would; AdamW's is
torch's own, from a real ``torch.optim.AdamW.step()`` on the meta device, and so is the ``muon``
baseline's (``torch.optim.Muon`` on the hidden 2-D weights, AdamW on the rest: one real step of
:class:`lowrank_optim.train.optimizers.MuonWithAdamW` on the meta device). ``torch.optim.Adafactor``
cannot step on the meta device (its step reads norms with ``.item()``), so the ``adafactor``
baseline's state is computed from the shapes its ``_init_group`` allocates (a test checks them
against a real CPU step). Weights and gradients are
the parameters' bytes. Activations, given a batch and sequence length, are an estimate for a LLaMA
block (see :func:`llama_activation_bytes`). On CUDA, :func:`measure_peak` runs real training steps
and reports the peak memory torch allocated, to set beside the estimate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .groups import param_groups, rank_fallbacks
from .models import llama_skeleton, load_config
from .quant.weights import Int8Weight

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHT_CHOICES = ("bf16", "fp32", "int8")
#: torch's own optimizers, measured beside ours: AdamW, Adafactor, and Muon (+ AdamW on the rest).
BASELINES = {"adamw": "AdamW", "adafactor": "Adafactor", "muon": "Muon"}
GIB = 2**30


@dataclass
class Breakdown:
    """Bytes, by what they hold."""

    weights: int
    gradients: int
    optimizer_states: int
    projections: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.projections + self.activations

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


@dataclass
class MemoryReport:
    ours: Breakdown
    adamw: Breakdown
    optimizer: str
    settings: dict[str, Any]
    #: what the table should say beside the numbers (weights a rank leaves unprojected, ...)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, dict[str, int]]:
        """``{"ours": {...}, "adamw": {...}}``, each with the five parts and ``total`` in bytes."""
        return {"ours": self.ours.to_dict(), "adamw": self.adamw.to_dict()}

    def table(self) -> str:
        """The report in GiB, ours beside AdamW."""
        rows = ["weights", "gradients", "optimizer_states", "projections", "activations", "total"]
        ours, adamw = self.ours.to_dict(), self.adamw.to_dict()
        setup = ", ".join(f"{k}={v}" for k, v in self.settings.items() if v not in (None, False))
        baseline = "adamw8bit" if self.settings.get("state_bits") == 8 else "adamw"
        lines = [f"memory ({setup})", "", f"| {'GiB':<17} | {self.optimizer:>12} | {baseline:>12} |",
                 f"|{'-' * 19}|{'-' * 14}|{'-' * 14}|"]
        for r in rows:
            if r == "activations" and not self.settings.get("batch"):
                a = b = "n/a"
            else:
                a, b = f"{ours[r] / GIB:.2f}", f"{adamw[r] / GIB:.2f}"
            lines.append(f"| {r:<17} | {a:>12} | {b:>12} |")
        notes = list(self.notes)
        if not self.settings.get("batch"):
            notes.append("The totals leave out activations, which depend on the batch: give --batch and --seq "
                         "(and --checkpointing) to estimate them.")
        if self.settings.get("weights") == "int8":
            notes.append("The adamw column keeps bf16 weights: AdamW cannot update INT8 weights without a master copy.")
        notes.append("Not counted: the CUDA context, and the step's own temporaries, freed as each weight is done "
                     "(measured on CPU: 2.3x a bf16 weight for GaLore, 6x for a plain AdamW step, 12x for an INT8 "
                     "weight), so keep 1-2 GiB of margin at 7B.")
        return "\n".join(lines + ([""] if notes else []) + notes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def llama_activation_bytes(config: dict[str, Any], batch: int, seq: int, checkpointing: bool = False,
                           itemsize: int = 2) -> int:
    """Activations kept for the backward pass of a LLaMA model, estimated per token.

    Per block (SDPA/flash attention, so no s×s scores): the block input and its norm (2h), q, k, v
    and rotated q, k (2h + 3kv), the attention output and the residual sum (2h), the second norm's
    input and output (2h), gate, up, SiLU(gate) and the product fed to down_proj (4i): about
    8h + 3kv + 4i values, in the activation dtype. After the blocks, the final norm (2h) and the
    logits in bf16 plus the float32 copy the loss reads (6 bytes each of V). With per-block
    checkpointing only each block's input (h) is kept, plus one block's activations while it is
    recomputed. An estimate to within tens of percent, not a measurement.
    """
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = h * config.get("num_key_value_heads", heads) // heads
    layers = config["num_hidden_layers"]
    per_block = (8 * h + 3 * kv + 4 * inter) * itemsize
    kept = layers * h * itemsize + per_block if checkpointing else layers * per_block
    head = 2 * h * itemsize + vocab * (2 + 4)
    return batch * seq * (kept + head)


def _meta_groups(groups: list[dict[str, Any]], dtype: torch.dtype | None) -> list[dict[str, Any]]:
    """The same groups over meta-device parameters of the same names and shapes."""
    out = []
    for g in groups:
        params = []
        for item in g["params"]:
            name, p = item if isinstance(item, tuple) else (None, item)
            meta = nn.Parameter(torch.empty(p.shape, dtype=dtype or p.dtype, device="meta"),
                                requires_grad=p.requires_grad)
            if isinstance(p, Int8Weight):  # already INT8 (quantize_model_int8): its codes, scales and zeros
                meta._held_bytes = p.nbytes_stored()
            params.append((name, meta) if name is not None else meta)
        out.append({**g, "params": params})
    return out


def _golore_before_its_switch() -> type:
    """GoLore with its switch beyond any run: the state it keeps until the switch is GaLore's, the larger (after
    it, a seed replaces each basis)."""
    from .optim import GoLore

    class GoLoreBeforeItsSwitch(GoLore):
        def __init__(self, params: Any, **kwargs: Any) -> None:
            groups = [g if not isinstance(g, dict) else
                      {**g, "projector_options": {"switch_step": 10**9, **(g.get("projector_options") or {})}}
                      for g in params]
            super().__init__(groups, **kwargs)

    return GoLoreBeforeItsSwitch


def _resolve_optimizer(optimizer: str | type) -> tuple[str, type | None]:
    from . import PRESETS

    if isinstance(optimizer, type):
        return optimizer.__name__, optimizer
    if optimizer in BASELINES:
        return optimizer, None
    if optimizer == "golore":
        return optimizer, _golore_before_its_switch()
    if optimizer not in PRESETS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose {', '.join(BASELINES)} or one of {', '.join(PRESETS)}")
    return optimizer, PRESETS[optimizer]


def _check_baseline(name: str, int8: bool, state_bits: int | None) -> None:
    """Refuse what torch's own optimizers cannot do: update INT8 weights, keep 8-bit state (but
    for AdamW, whose 8-bit column is our plain 8-bit AdamW)."""
    if int8:
        raise ValueError(f"{BASELINES[name]} cannot update INT8 weights (no master copy); use --weights bf16 for "
                         f"{name}, or one of our presets, which update INT8 weights by stochastic rounding")
    if state_bits == 8 and name != "adamw":
        raise ValueError(f"state_bits=8 is for adamw and our presets; torch.optim.{BASELINES[name]} keeps its "
                         "state in the weights' dtype")


def estimate(
    model_or_config: nn.Module | str | Path | dict[str, Any],
    optimizer: str | type = "galore",
    *,
    rank: int | None = None,
    weights: str | None = None,
    layerwise: bool = False,
    batch: int | None = None,
    seq: int | None = None,
    checkpointing: bool = False,
    target_modules: list[str] | None = None,
    state_bits: int | None = None,
    sample_layers: int | None = None,
    accumulation_steps: int = 1,
    **keys: Any,
) -> MemoryReport:
    """Bytes of weights, gradients, optimizer states, projections and activations, ours and AdamW's.

    Args:
        model_or_config: an ``nn.Module`` (its parameters are mirrored on the meta device; nothing
            of it is copied), or a LlamaConfig (JSON path or dict).
        optimizer: a preset name (``galore``, ``apollo``, ``apollo_mini``, ``frugal``, ``fira``,
            ``lowrank``), a baseline (``adamw``; ``adafactor``, torch.optim.Adafactor: a row and a
            column factor per 2-D weight, a full second moment for the rest; ``muon``: one momentum
            buffer per hidden 2-D weight, AdamW's two moments for the embeddings, head, norms and
            biases), or an optimizer class.
        rank: the low-rank groups' rank (default: the preset's for this width, a quarter of the hidden
            size; 1 for ``apollo_mini``).
        weights: ``bf16``, ``fp32`` or ``int8`` (default: bf16 for a config, the module's own
            dtypes for a module, whose INT8 weights, from ``lro.quantize_model_int8``, count as stored; its
            buffers are counted with the weights). Gradients take the weights' dtype; ``int8`` stores the projected
            linear weights as ``lro.quantize_model_int8`` does (1 byte each plus 8 per group of 256,
            the rest bf16, gradients bf16) and leaves AdamW's column at bf16, which it needs.
        state_bits: 8 for INT8 moments (our preset's ``state_bits=8``, and bitsandbytes-style
            8-bit AdamW in the baseline column: our plain 8-bit AdamW, measured the same way);
            None leaves the preset's own default (``galore8bit``, ``qgalore``: 8).
        layerwise: updates from gradient hooks (``lro.layerwise``): one parameter's gradient at a
            time instead of all of them; applied to both columns.
        accumulation_steps: micro-batches per step. With ``layerwise`` and more than 1 the first k − 1
            backward passes accumulate every gradient (``lro.layerwise``), so all of them are counted.
        batch, seq, checkpointing: for the activation estimate (left at 0 without batch and seq).
        sample_layers: layer sampling (``lro.LayerSampler``): only this many decoder layers hold gradients
            and optimizer state, in both columns (embeddings, head and norms train as always).
        target_modules, **keys: passed to ``lro.param_groups`` (``update_proj_gap``, ``projector``...).
    """
    name, cls = _resolve_optimizer(optimizer)
    _check_estimate_args(name, cls, weights, state_bits, batch, seq)
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
    int8 = weights == "int8"
    # INT8 holds only the projected weights: the others keep bf16 for a config, their own dtype for a module
    model, config, dtype = _estimated_model(model_or_config, None if int8 else weights)
    built = param_groups(model, rank="auto" if rank is None else rank, target_modules=target_modules, **keys)
    if rank is None:
        rank = _default_rank(cls, built)
    groups = _sampled(model, built, _meta_groups([{**g, "rank": rank} if g.get("rank") is not None else g
                                                  for g in built], dtype), sample_layers)
    one_gradient = layerwise and accumulation_steps == 1
    trainable, weight_bytes, adamw_weight_bytes, grad_bytes = _weight_and_gradient_bytes(groups, int8, one_gradient)
    buffers = sum(_nbytes(b) for b in model.buffers())  # held beside the weights (SLTrain's indices, RoPE's table)
    weight_bytes, adamw_weight_bytes = weight_bytes + buffers, adamw_weight_bytes + buffers
    activations = _estimated_activations(config, batch, seq, checkpointing, dtype)
    adamw = Breakdown(adamw_weight_bytes, grad_bytes, _adamw_state_bytes(trainable, state_bits == 8), 0, activations)
    ours = adamw if name == "adamw" and cls is None else Breakdown(
        weight_bytes, grad_bytes, *_optimizer_state_bytes(name, cls, groups, trainable, state_bits), activations)
    settings = dict(rank=rank if cls is not None else None, sample_layers=sample_layers,
                    weights="int8" if int8 else (weights or ("bf16" if config else None)), state_bits=state_bits,
                    layerwise=layerwise, accumulation_steps=accumulation_steps if accumulation_steps > 1 else None,
                    batch=batch, seq=seq,
                    checkpointing=checkpointing and batch is not None)
    notes = (_unprojected_note(groups, rank) if cls is not None else []) + _layerwise_note(layerwise, accumulation_steps)
    return MemoryReport(ours, adamw, name, settings, notes)


def _layerwise_note(layerwise: bool, accumulation_steps: int) -> list[str]:
    """Layer-wise gradients are one at a time only without accumulation: say which case the table counts."""
    if not layerwise:
        return []
    if accumulation_steps == 1:
        return ["layer-wise gradients counted one at a time: one micro-batch per step. With gradient accumulation "
                "the first k - 1 backward passes hold every gradient (accumulation_steps=, --grad-accum)."]
    return [f"layer-wise with {accumulation_steps} micro-batches per step: the first {accumulation_steps - 1} "
            "backward passes hold every gradient, so all of them are counted."]


def _sampled(model: nn.Module, built: list[dict[str, Any]], groups: list[dict[str, Any]],
             sample_layers: int | None) -> list[dict[str, Any]]:
    """``groups`` with the meta copies of all but ``sample_layers`` decoder layers' parameters frozen (all
    layers of a LLaMA are alike, so which ones does not matter); ``model`` itself is not touched. A layer
    frozen whole (a sampler's draw left it out: the model is mid-run) counts as trainable among the first
    ``sample_layers``, so the estimate is a draw's whatever the flags are now."""
    from .sampling import decoder_layers

    if sample_layers is None:
        return groups
    layers = decoder_layers(model)
    if isinstance(sample_layers, bool) or not isinstance(sample_layers, int) or not 1 <= sample_layers <= len(layers):
        raise ValueError(f"sample_layers must be an integer in 1..{len(layers)} (the model's decoder layers), "
                         f"got {sample_layers!r}")
    trains: dict[int, bool] = {}
    for i, layer in enumerate(layers):
        params = list(layer.parameters())
        left_out = not any(p.requires_grad for p in params)
        trains.update((id(p), i < sample_layers and (p.requires_grad or left_out)) for p in params)
    for g, mg in zip(built, groups):
        for item, meta in zip(g["params"], mg["params"]):
            p = item[1] if isinstance(item, tuple) else item
            if id(p) in trains:
                (meta[1] if isinstance(meta, tuple) else meta).requires_grad_(trains[id(p)])
    return groups


def estimate_sltrain(config: str | Path | dict[str, Any], sltrain: str | tuple, *, weights: str | None = None,
                     state_bits: int | None = None, layerwise: bool = False, batch: int | None = None,
                     seq: int | None = None, checkpointing: bool = False, accumulation_steps: int = 1) -> MemoryReport:
    """SLTrain's memory (``lro.nn.to_sltrain`` on the config's LLaMA) under AdamW, beside dense AdamW.

    ``sltrain``: ``"RANK:DENSITY[:ALPHA]"`` or a tuple (alpha only scales, it costs nothing).
    ``state_bits=8``: 8-bit AdamW in both columns (the paper's 7B run uses 8-bit Adam). The weights
    count the support's int32 CSR indices (4 bytes per kept entry and per row). The other arguments
    are :func:`estimate`'s, whose ``adamw`` report gives the dense column.
    """
    from .nn import parse_sltrain

    spec = parse_sltrain(sltrain)
    if weights == "int8":
        raise ValueError("sltrain with weights='int8' is not counted: use --weights bf16 or fp32")
    if isinstance(config, nn.Module):
        raise ValueError("sltrain estimates start from a LlamaConfig (a path or dict), not a module; pass the config")
    dense = estimate(config, "adamw", weights=weights, state_bits=state_bits, layerwise=layerwise, batch=batch,
                     seq=seq, checkpointing=checkpointing, accumulation_steps=accumulation_steps)
    cfg, dtype = load_config(config), WEIGHT_DTYPES[weights or "bf16"]
    ours = _sltrain_breakdown(cfg, dtype, spec, layerwise and accumulation_steps == 1, state_bits == 8,
                              dense.adamw.activations)
    settings = {**dense.settings, "sltrain": ":".join(f"{v:g}" for v in spec)}
    return MemoryReport(ours, dense.adamw, "sltrain", settings, dense.notes)


def _sltrain_breakdown(config: dict[str, Any], dtype: torch.dtype, sltrain: tuple[int, float, float],
                       layerwise: bool, eight_bit: bool, activations: int) -> Breakdown:
    """SLTrain's model (a meta-device skeleton through ``lro.nn.to_sltrain``) under the AdamW baseline:
    its parameters and int32 support indices, their gradients and AdamW's state. The activations
    are the dense model's: the layer saves only its input, as ``nn.Linear`` does."""
    from .nn import to_sltrain

    rank, density, alpha = sltrain
    model = to_sltrain(llama_skeleton(config, dtype=dtype), rank, density, alpha=alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = sum(_nbytes(p) for p in model.parameters()) + sum(_nbytes(b) for b in model.buffers())
    grads = max((_nbytes(p) for p in params), default=0) if layerwise else sum(_nbytes(p) for p in params)
    return Breakdown(weights, grads, _adamw_state_bytes(params, eight_bit), 0, activations)


def _default_rank(cls: type | None, groups: list[dict[str, Any]]) -> int:
    """The low-rank groups' rank when none is given: the preset's own for this width (``rank="auto"``: a
    quarter of the weights' short side, APOLLO-Mini 1); a quarter of it for the baselines' columns."""
    from .optim import LowRankAdamW
    from .optim.groups import _short_side, auto_rank

    low = [p for g in groups if g.get("rank") is not None for p in g["params"]]
    return auto_rank(cls or LowRankAdamW, _short_side(low))


def _unprojected_note(groups: list[dict[str, Any]], rank: int) -> list[str]:
    """A note naming how many of the weights the groups would project a ``rank`` leaves as plain AdamW."""
    shapes, full = rank_fallbacks(groups)
    if not full:
        return []
    return [f"rank {rank} leaves {len(full)} of the {len(shapes)} linear weights unprojected: their short side "
            f"is not larger than the rank, so they are stepped as plain AdamW with full-size moments. Use a "
            f"rank below {min(min(s) for s in full)} to project them all."]


def _check_estimate_args(name: str, cls: type | None, weights: str | None, state_bits: int | None,
                         batch: int | None, seq: int | None) -> None:
    """Refuse, before anything is built, what :func:`estimate` cannot estimate."""
    if weights is not None and weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    if state_bits not in (None, 32, 8):
        raise ValueError(f"state_bits must be 32 or 8, got {state_bits!r}")
    if cls is None:
        _check_baseline(name, weights == "int8", state_bits)
    if (batch is None) != (seq is None):
        raise ValueError("give both batch and seq for an activation estimate, or neither")
    for arg, value in (("batch", batch), ("seq", seq)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")


def _estimated_model(model_or_config: nn.Module | str | Path | dict[str, Any],
                     weights: str | None) -> tuple[nn.Module, dict[str, Any] | None, torch.dtype | None]:
    """(the model to mirror, its LlamaConfig, the weights' dtype): a module as it is (no config; dtype
    None keeps its own dtypes), or a config's meta-device skeleton (bf16 unless ``weights`` says)."""
    dtype = WEIGHT_DTYPES[weights] if weights else None
    if isinstance(model_or_config, nn.Module):
        return model_or_config, None, dtype
    config = load_config(model_or_config)
    dtype = dtype or torch.bfloat16
    return llama_skeleton(config, dtype=dtype), config, dtype


def _weight_and_gradient_bytes(groups: list[dict[str, Any]], int8: bool,
                               layerwise: bool) -> tuple[list[nn.Parameter], int, int, int]:
    """(the trainable parameters, our weights' bytes, AdamW's weights' bytes, gradient bytes). With
    ``layerwise`` only the largest gradient exists at a time."""
    flat = [p for g in groups for p in (x[1] if isinstance(x, tuple) else x for x in g["params"])]
    trainable = [p for p in flat if p.requires_grad]
    adamw_weight_bytes = sum(_nbytes(p) for p in flat)  # AdamW trains float weights: a quantized one's dtype
    weight_bytes = sum(getattr(p, "_held_bytes", _nbytes(p)) for p in flat)
    if int8:
        # the layers quantize_model_int8 targets are param_groups' low-rank ones (those not INT8 already)
        quantized = [x[1] if isinstance(x, tuple) else x for g in groups if g.get("rank") is not None for x in g["params"]]
        weight_bytes += sum(Int8Weight.stored_bytes(p.numel()) - _nbytes(p) for p in quantized
                            if not hasattr(p, "_held_bytes"))
    grad_bytes = max((_nbytes(p) for p in trainable), default=0) if layerwise else sum(_nbytes(p) for p in trainable)
    return trainable, weight_bytes, adamw_weight_bytes, grad_bytes


def _estimated_activations(config: dict[str, Any] | None, batch: int | None, seq: int | None,
                           checkpointing: bool, dtype: torch.dtype | None) -> int:
    """:func:`llama_activation_bytes` in the weights' dtype; 0 without ``batch`` (and ``seq``)."""
    if batch is None:
        return 0
    if config is None:
        raise ValueError("activation estimates need a LlamaConfig; pass the config rather than a module")
    itemsize = torch.finfo(dtype).bits // 8
    return llama_activation_bytes(config, batch, seq, checkpointing, itemsize)


def _optimizer_state_bytes(name: str, cls: type | None, groups: list[dict[str, Any]],
                           trainable: list[nn.Parameter], state_bits: int | None) -> tuple[int, int]:
    """(optimizer states, projections) of the ``adafactor`` or ``muon`` baseline, or of our optimizer
    ``cls`` built on the meta-device ``groups`` and measured after ``init_state()``."""
    if cls is None and name == "adafactor":
        return _adafactor_state_bytes(trainable), 0
    if cls is None and name == "muon":
        return _muon_state_bytes(groups), 0
    import warnings

    from .optim import RankFallbackWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankFallbackWarning)
        opt = cls(groups, **({} if state_bits is None else {"state_bits": state_bits}))
    opt.init_state()
    for p in [p for p in opt.state if not p.requires_grad]:  # layer sampling frees the frozen layers' state
        del opt.state[p]
    nb = opt.state_nbytes()
    return nb["moments"] + nb["other"], nb["projectors"] + _shared_dct_bytes(opt)


def _adamw_state_bytes(params: list[torch.Tensor], eight_bit: bool = False) -> int:
    """torch.optim.AdamW's own state, from one real step on meta-device copies; with ``eight_bit``,
    our plain 8-bit AdamW's (INT8 moments of 4096 elements and more, as bitsandbytes keeps them)."""
    if eight_bit:
        import warnings

        from .optim import LowRankAdamW, RankFallbackWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RankFallbackWarning)
            opt8 = LowRankAdamW([nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta")) for p in params],
                                state_bits=8)
        opt8.init_state()
        nb = opt8.state_nbytes()
        return nb["moments"] + nb["other"]
    meta = []
    for p in params:
        q = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"))
        q.grad = torch.empty(p.shape, dtype=p.dtype, device="meta")
        meta.append(q)
    if not meta:
        return 0
    opt = torch.optim.AdamW(meta)
    opt.step()
    return sum(_nbytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def _adafactor_state_bytes(params: list[torch.Tensor]) -> int:
    """torch.optim.Adafactor's state, from the shapes its ``_init_group`` allocates (it cannot step on
    the meta device): per parameter a ``step`` scalar (float32; float64 under a float64 default
    dtype) and, in the gradient's dtype, for 2 or more dimensions a row factor (the shape with the
    last dimension 1) and a column factor (the shape with the second-to-last 1), else a full
    ``variance``. tests/test_baselines.py checks this against a real step."""
    scalar = 8 if torch.get_default_dtype() == torch.float64 else 4
    total = 0
    for p in params:
        if p.dim() > 1:
            *lead, rows, cols = p.shape
            total += math.prod(lead) * (rows + cols) * p.element_size()
        else:
            total += _nbytes(p)
        total += scalar
    return total


def _muon_state_bytes(groups: list[dict[str, Any]]) -> int:
    """The ``muon`` baseline's state from one real step on the meta device: torch.optim.Muon on the
    weights ``param_groups`` projects (the hidden linear layers), AdamW on the rest, as
    ``lowrank-optim pretrain --optimizer muon`` splits them."""
    from .train.optimizers import MuonWithAdamW

    split: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for g in groups:
        for item in g["params"]:
            p = item[1] if isinstance(item, tuple) else item
            if p.requires_grad:
                p.grad = torch.empty_like(p)
                split[g.get("rank") is not None].append(p)
    parts = [{"params": ps, "use_muon": use_muon} for use_muon, ps in split.items() if ps]
    if not parts:
        return 0
    opt = MuonWithAdamW(parts)
    opt.step()
    for ps in split.values():
        for p in ps:
            p.grad = None
    return sum(_nbytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def _shared_dct_bytes(opt: Any) -> int:
    """The DCT bases shared by layers of one size, counted once: d×d per distinct side and compute dtype
    (float64 for float64 weights, float32 otherwise, as ``projectors.dct`` keeps them)."""
    sizes = {
        (opt.state[p]["projector"]["dim"], 8 if p.dtype == torch.float64 else 4)
        for g in opt.param_groups
        if g.get("projector") == "dct"
        for p in g["params"]
        if "projector" in opt.state.get(p, {})
    }
    return sum(d * d * itemsize for d, itemsize in sizes)


def train_steps(
    config: str | Path | dict[str, Any],
    optimizer: str | type = "galore",
    *,
    rank: int | None = None,
    weights: str = "bf16",
    layerwise: bool = False,
    batch: int = 1,
    seq: int = 256,
    checkpointing: bool = False,
    steps: int = 3,
    device: str | torch.device = "cuda",
    state_bits: int | None = None,
    **keys: Any,
) -> list[float]:
    """Real training steps of transformers' LlamaForCausalLM built from ``config`` (random tokens),
    set up as :func:`estimate` describes it; returns the losses. The model is created on ``device``
    directly, in the weights' dtype."""
    try:  # only whether it is installed: _real_model imports it where it builds the model
        import transformers  # noqa: F401
    except ImportError:
        raise RuntimeError("real steps need transformers' LlamaForCausalLM: pip install 'lowrank-optim[train]'") from None
    from .layerwise import layerwise as make_layerwise

    name, cls = _resolve_optimizer(optimizer)
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    int8 = weights == "int8"
    if cls is None:
        _check_baseline(name, int8, state_bits)
    weights = "bf16" if int8 else weights
    cfg = load_config(config)
    if rank is None:
        rank = "auto"  # the preset's own for this width
    model = _real_model(cfg, WEIGHT_DTYPES[weights], int8, checkpointing, device)
    opt = _real_optimizer(model, name, cls, rank, state_bits, keys)
    handle = make_layerwise(model, opt) if layerwise else None
    try:
        return _random_token_steps(model, opt, handle, cfg["vocab_size"], batch, seq, steps, device)
    finally:
        if handle is not None:
            handle.remove()


def _real_model(cfg: dict[str, Any], dtype: torch.dtype, int8: bool, checkpointing: bool,
                device: str | torch.device) -> nn.Module:
    """transformers' LlamaForCausalLM of ``cfg``, created on ``device`` in ``dtype``; with ``int8`` its
    linear weights quantized as ``lro.quantize_model_int8`` does, with ``checkpointing`` activation
    checkpointing on."""
    import transformers

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(cfg))
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    if int8:
        from .quant import quantize_model_int8

        quantize_model_int8(model)
    if checkpointing:  # transformers 5 renamed it; 4.x has only the old name
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model


def _real_optimizer(model: nn.Module, name: str, cls: type | None, rank: int, state_bits: int | None,
                    keys: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer :func:`estimate` measures, on the real ``model``: our plain 8-bit AdamW for the
    ``adamw`` baseline with ``state_bits=8``, torch's own AdamW, the ``adafactor`` or ``muon`` baseline
    as ``pretrain`` builds it, or ``cls`` over ``lro.param_groups``."""
    if cls is None and state_bits == 8:
        from .optim import LowRankAdamW

        return LowRankAdamW(model.parameters(), lr=1e-5, state_bits=8)
    if cls is None and name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-5)
    if cls is None:
        from .train.optimizers import build_optimizer

        return build_optimizer(name, model, lr=1e-5)
    import warnings

    from .optim import RankFallbackWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankFallbackWarning)
        return cls(param_groups(model, rank=rank, **keys), lr=1e-5,
                   **({} if state_bits is None else {"state_bits": state_bits}))


def _random_token_steps(model: nn.Module, opt: torch.optim.Optimizer, handle: Any, vocab: int, batch: int,
                        seq: int, steps: int, device: str | torch.device) -> list[float]:
    """``steps`` training steps on random ``batch`` × ``seq`` tokens (the same ones every call: the
    generator is seeded), stepped inside the backward by the layer-wise ``handle`` if there is one;
    returns the losses."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
        loss = model(input_ids=tokens, labels=tokens).loss
        if handle is not None:
            handle.backward(loss)
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def measure_peak(config: str | Path | dict[str, Any], optimizer: str | type = "galore", *,
                 cap_gib: float | None = None, **kw: Any) -> int:
    """Peak CUDA memory (bytes allocated by torch) over a few real training steps, set up as
    :func:`estimate` describes it (same keyword arguments, plus ``steps``). ``cap_gib`` caps this
    process's CUDA memory (``torch.cuda.set_per_process_memory_fraction``) so that a setup which would
    not fit a card of that size fails with out-of-memory instead of borrowing a bigger card's memory."""
    if not torch.cuda.is_available():
        raise RuntimeError("--measure runs real training steps on a CUDA GPU, and none is available here; "
                           "the estimate itself needs none")
    if cap_gib is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        if not 0 < cap_gib * 2**30 <= total:
            raise ValueError(f"cap_gib must be in (0, {total / 2**30:.1f}] (this device's memory), got {cap_gib}")
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    train_steps(config, optimizer, device="cuda", **kw)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


__all__ = ["Breakdown", "MemoryReport", "estimate", "estimate_sltrain", "llama_activation_bytes", "measure_peak", "train_steps"]
