"""Layer sampling: train a few decoder layers at a time, chosen at random every ``every`` steps.

LISA (Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient LLM Fine-Tuning",
arXiv:2403.17919) samples the layers uniformly; OwLore (Li et al. 2024, "OwLore: Outlier-weighed
Layerwise Sampled Low-Rank Projection", arXiv:2405.18380; official code pixeli99/OwLore,
``DynamicLayerActivationCallback``) samples them with probability proportional to each layer's outlier
ratio (OWL's metric, :func:`owl_ratios`) and trains the sampled layers with GaLore (:func:`OwLore`).

>>> opt = lro.GaLoreAdamW(lro.param_groups(model, rank=128), lr=1e-2)
>>> sampler = lro.LayerSampler(model, opt, every=50, layers=2)    # LISA; probs="owl" for OwLore
>>> for tokens in loader:
...     lm_loss(model, tokens).backward()
...     opt.step(); opt.zero_grad()
...     sched.step()
...     sampler.step()       # after the optimizer's step, like a scheduler: every 50th call resamples

What it does, as the official code does it:

* **Which parameters.** Only the decoder layers are sampled (found as ``model.model.layers``,
  ``model.layers``, ``model.transformer.h`` or the longest ``nn.ModuleList``; or pass
  ``decoder_layers=``). Everything outside them (embeddings, the final norm, the head) stays as the
  user left it, trainable in both official codes (LISA's paper: "the embedding and head layers are
  always trained"). Inside a sampled layer every parameter that required grad when the sampler was
  built is unfrozen; one frozen by the user stays frozen.
* **The schedule.** The first choice is made when the sampler is built (the official callback switches
  at step 0), then after every ``every``-th :meth:`LayerSampler.step`. Each choice freezes every decoder
  layer and unfreezes ``layers`` of them drawn without replacement with probabilities ``probs``
  (successive draws, each proportional to the remaining layers' probabilities: what
  ``numpy.random.choice(replace=False, p=...)`` in the official code and ``torch.multinomial`` do), from
  the sampler's own ``torch.Generator`` (seeded by ``seed``; the global generators are not touched).
* **Frozen parameters** get ``requires_grad=False`` and ``grad=None``, so every optimizer here (and
  ``torch.optim.AdamW``) skips them: no update and no weight decay. Their optimizer state is freed
  (``keep_state=False``, the default: the optimizer then holds the state of the sampled layers only, the
  memory LISA and OwLore report), or kept (``keep_state=True``: what the official callbacks do, which
  never touch the optimizer). A layer that is sampled again after it was freed starts from fresh state
  (zero moments, a new projection at its first step); one sampled twice in a row keeps its state.
* **Checkpoints**: :meth:`LayerSampler.state_dict` holds the step count, the current choice and the
  generator's state (tensors and plain values, ``torch.load(weights_only=True)`` reads it). Build the
  sampler, then load the model's, the optimizer's and the sampler's state: the run goes on bit for bit.
* **Layer-wise updates** (``lro.layerwise``) hook every parameter of the optimizer, frozen or not, so
  they may be built before or after the sampler; a frozen parameter's hook never fires.

Not under DDP or FSDP (their gradient buckets and shards are fixed when the wrapper is built).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["LayerSampler", "OwLore", "decoder_layers", "owl_ratios"]

#: Where the decoder layers live in the models the official callback knows (LLaMA, Mistral, Qwen2,
#: Gemma, Mixtral: ``model.layers``; GPT-2: ``transformer.h``), and in a bare stack.
_LAYER_PATHS = ("model.layers", "transformer.h", "layers", "model.decoder.layers")
#: OwLore's outlier threshold M: the official code reads its probabilities from
#: ``metric_cache/llama2_7b_ratio_13.txt``, OWL's ratios at M = 13.
OWL_THRESHOLD = 13.0


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the first of ``model.model.layers``, ``model.transformer.h``,
    ``model.layers``, ``model.model.decoder.layers`` that is a ``ModuleList``, else the longest
    ``ModuleList`` in the model. Raises ValueError when there is none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for path in _LAYER_PATHS:
        found: Any = model
        for part in path.split("."):
            found = getattr(found, part, None)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return list(found)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"found no decoder layers (no nn.ModuleList) in {type(model).__name__}; pass "
                         "decoder_layers=[...] (the list of layer modules) explicitly")
    return list(max(lists, key=len))


def _layer_list(model: nn.Module, given: Iterable[nn.Module] | None) -> list[nn.Module]:
    if given is None:
        return decoder_layers(model)
    if isinstance(given, nn.Module) and not isinstance(given, nn.ModuleList):
        raise TypeError("decoder_layers must be a list (or nn.ModuleList) of layer modules, not one module")
    layers = list(given)
    bad = [type(m).__name__ for m in layers if not isinstance(m, nn.Module)]
    if bad or not layers:
        raise TypeError(f"decoder_layers must be a non-empty list of nn.Module, got {bad[:3] or 'an empty list'}")
    return layers


# ----------------------------------------------------------------------------- OWL's outlier ratios
def owl_ratios(model: nn.Module, calibration: Tensor | Iterable[Any], *, threshold: float = OWL_THRESHOLD,
               decoder_layers: Iterable[nn.Module] | None = None) -> Tensor:
    """Each decoder layer's outlier ratio in percent (OWL, Yin et al. 2023), as float64 tensor.

    As OWL's official code computes it (``prune_wanda_outlier`` with ``check_outlier_mean``): run the
    calibration batches through the model; for every ``nn.Linear`` of layer ``l`` with weight W
    (out × in) and inputs x, the Wanda score A_ij = |W_ij| · ‖X_j‖, where ‖X_j‖² is the sum of x_j² over
    all tokens divided by the number of sequences; then

        D_l = 100 · #{A_ij > M · mean(A)} / #A       over all the layer's linears' scores together.

    ``calibration`` is one batch (a tensor of token ids, or a dict of model inputs) or an iterable of
    them, each fed as ``model(batch)`` (``model(**batch)`` for a dict). OWL uses 128 C4 sequences of
    2048 tokens and M = 5 for pruning; OwLore's probabilities are these ratios at M = 13 (the default),
    normalized to sum to one. The official code feeds each layer the previous layer's outputs, which is
    the model's own forward; we run the model's forward, in eval mode and without gradients, and
    accumulate the squares in float64 (OWL: float32). A model at random initialization has almost no
    outliers at M = 13 (its scores are near Gaussian): the method is meant for pretrained models.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number (OWL's M), got {threshold!r}")
    layers = _layer_list(model, decoder_layers)
    linears = [[m for m in layer.modules() if isinstance(m, nn.Linear)] for layer in layers]
    empty = [i for i, mods in enumerate(linears) if not mods]
    if empty:
        raise ValueError(f"decoder layers {empty[:5]} hold no nn.Linear, so they have no outlier ratio")
    sums, counts = _input_square_sums(model, [m for mods in linears for m in mods], calibration)
    out = []
    for mods in linears:
        scores = torch.cat([(m.weight.detach().double().abs() * (sums[m] / counts[m]).sqrt()).flatten()
                            for m in mods])
        out.append(100.0 * float((scores > threshold * scores.mean()).sum()) / scores.numel())
    return torch.tensor(out, dtype=torch.float64)


def _batches(calibration: Any) -> list[Any]:
    if isinstance(calibration, (Tensor, dict)):
        return [calibration]
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError("calibration must be a tensor of token ids, a dict of model inputs, or an iterable of "
                        f"them; got {type(calibration).__name__}")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty; give at least one batch of inputs")
    return batches


def _input_square_sums(model: nn.Module, modules: list[nn.Linear],
                       calibration: Any) -> tuple[dict[nn.Module, Tensor], dict[nn.Module, int]]:
    """Per linear: the sum over all calibration tokens of each input feature's square, and the number
    of sequences seen (OWL's ``WrappedGPT.scaler_row`` is their ratio)."""
    batches = _batches(calibration)
    sums: dict[nn.Module, Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        x = inputs[0].detach()
        seqs = x.shape[0] if x.dim() >= 3 else 1
        x = x.reshape(-1, x.shape[-1]).double()
        sums[module] = sums.get(module, 0) + (x * x).sum(dim=0)
        counts[module] = counts.get(module, 0) + seqs

    handles = [m.register_forward_hook(hook) for m in modules]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, dict):
                    model(**batch)
                else:
                    model(batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missed = [i for i, m in enumerate(modules) if m not in sums]
    if missed:
        raise ValueError(f"{len(missed)} linear layers of the decoder saw no input in the calibration forward; "
                         "is the model's forward using them?")
    return sums, counts


# ----------------------------------------------------------------------------- the sampler
def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _probabilities(probs: Any, n: int, k: int, model: nn.Module, layers: list[nn.Module],
                   calibration: Any, threshold: float) -> Tensor:
    """``probs`` as a float64 tensor of ``n`` probabilities summing to one, with at least ``k`` positive."""
    if isinstance(probs, str):
        if probs == "uniform":
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        if probs != "owl":
            raise ValueError(f"probs must be 'uniform', 'owl' or a sequence of {n} weights, got {probs!r}")
        if calibration is None:
            raise ValueError("probs='owl' needs calibration= (batches of inputs) to measure the layers' "
                             "outlier ratios; or pass probs=lro.owl_ratios(model, batches)")
        probs = owl_ratios(model, calibration, threshold=threshold, decoder_layers=layers)
    try:
        p = torch.as_tensor(probs, dtype=torch.float64).flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"probs must be 'uniform', 'owl' or a sequence of numbers, got {type(probs).__name__}") from None
    if p.numel() != n:
        raise ValueError(f"probs has {p.numel()} entries, but the model has {n} decoder layers")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError(f"probs must be finite and non-negative, got {p.tolist()}")
    if int((p > 0).sum()) < k:
        raise ValueError(f"probs has {int((p > 0).sum())} positive entries, fewer than layers={k} to draw "
                         f"without replacement ({p.tolist()}); with probs='owl' lower the threshold")
    return p / p.sum()


class LayerSampler:
    """Freeze all decoder layers and train ``layers`` of them, resampled every ``every`` steps.

    Args:
        model: the model (its decoder layers are found by :func:`decoder_layers`).
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters (our presets,
            ``torch.optim.AdamW``, ...).
        every: K, the steps between choices (OwLore: 50).
        layers: γ, how many layers train at a time (OwLore: 5; LISA's scripts: 2).
        probs: ``"uniform"`` (LISA), ``"owl"`` (OwLore: ∝ :func:`owl_ratios`, needs ``calibration``),
            or one non-negative weight per layer.
        keep_state: keep the optimizer state of frozen layers (default: free it).
        seed: seeds the sampler's own generator.
        decoder_layers: the layer modules to sample from, when they cannot be found.
        calibration, threshold: for ``probs="owl"``: the batches and OWL's M (see :func:`owl_ratios`).

    Call :meth:`step` once after every optimizer step (see the module doc).
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer, *, every: int = 50, layers: int = 5,
                 probs: str | Sequence[float] | Tensor = "uniform", keep_state: bool = False, seed: int = 0,
                 decoder_layers: Iterable[nn.Module] | None = None, calibration: Any = None,
                 threshold: float = OWL_THRESHOLD) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        every = _check_int("every", every)
        layers = _check_int("layers", layers)
        if not isinstance(keep_state, bool):
            raise TypeError(f"keep_state must be True or False, got {keep_state!r}")
        seed = _check_int("seed", seed, low=0)
        modules = _layer_list(model, decoder_layers)
        if layers > len(modules):
            raise ValueError(f"layers={layers} exceeds the model's {len(modules)} decoder layers; "
                             f"choose 1..{len(modules)}")
        params = _layer_params(modules)
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in in_opt for ps in params for p in ps):
            raise ValueError("the optimizer holds no parameter of the decoder layers; build it over this model")
        self.probs = _probabilities(probs, len(modules), layers, model, modules, calibration, threshold)
        self.optimizer = optimizer
        self.every, self.layers, self.keep_state, self.seed = every, layers, keep_state, seed
        self._params = params
        self._generator = torch.Generator().manual_seed(seed)
        self._step = 0
        self._active: list[int] = []
        self._choose()

    @property
    def num_layers(self) -> int:
        return len(self._params)

    @property
    def active(self) -> list[int]:
        """The indices of the layers training now, ascending."""
        return sorted(self._active)

    @property
    def steps(self) -> int:
        return self._step

    def step(self) -> bool:
        """Count one optimizer step; every ``every``-th call draws new layers. Returns True when it did."""
        self._step += 1
        if self._step % self.every:
            return False
        self._choose()
        return True

    def _choose(self) -> None:
        drawn = torch.multinomial(self.probs, self.layers, replacement=False, generator=self._generator)
        self._apply([int(i) for i in drawn])

    def _apply(self, chosen: list[int]) -> None:
        """Unfreeze the ``chosen`` layers, freeze the others (their gradients dropped, their state freed
        unless ``keep_state``)."""
        on = set(chosen)
        for i, params in enumerate(self._params):
            for p in params:
                p.requires_grad_(i in on)
                if i not in on:
                    p.grad = None
                    if not self.keep_state:
                        _free_state(self.optimizer, p)
        self._active = list(chosen)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The step count, the current choice (in draw order) and the generator's state, with the
        settings a resumed run must share: tensors and plain values only."""
        return {"step": self._step, "active": torch.tensor(self._active, dtype=torch.int64),
                "generator": self._generator.get_state(), "probs": self.probs.clone(), "every": self.every,
                "layers": self.layers, "num_layers": self.num_layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s choice and generator; everything is checked before anything changes."""
        if not isinstance(state, dict):
            raise TypeError(f"LayerSampler.load_state_dict takes a dict, got {type(state).__name__}")
        missing = [k for k in ("step", "active", "generator", "probs", "every", "layers", "num_layers")
                   if k not in state]
        if missing:
            raise ValueError(f"the sampler state lacks {missing}; it is not a LayerSampler.state_dict()")
        for key in ("every", "layers", "num_layers"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the sampler state has {key}={state[key]!r}, this sampler {getattr(self, key)!r}")
        probs = torch.as_tensor(state["probs"], dtype=torch.float64)
        if probs.shape != self.probs.shape or not torch.equal(probs, self.probs):
            raise ValueError("the sampler state was drawn with other probabilities (probs) than this sampler's")
        active = [int(i) for i in torch.as_tensor(state["active"]).flatten()]
        if len(active) != self.layers or len(set(active)) != self.layers or \
                not all(0 <= i < self.num_layers for i in active):
            raise ValueError(f"the sampler state's active layers {active} are not {self.layers} distinct "
                             f"indices below {self.num_layers}")
        step = _check_int("the sampler state's step", state["step"], low=0)
        generator = torch.Generator()
        generator.set_state(state["generator"])
        self._generator, self._step = generator, step
        self._apply(active)

    def __repr__(self) -> str:
        return (f"LayerSampler(every={self.every}, layers={self.layers} of {self.num_layers}, active={self.active}, "
                f"keep_state={self.keep_state}, steps={self._step})")


def _layer_params(modules: list[nn.Module]) -> list[list[Tensor]]:
    """Each layer's parameters that require grad now (each parameter once, in its first layer)."""
    seen: set[int] = set()
    out = []
    for m in modules:
        ps = []
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                ps.append(p)
        out.append(ps)
    if not any(out):
        raise ValueError("no parameter of the decoder layers requires grad; nothing to sample")
    return out


def _free_state(optimizer: Optimizer, p: Tensor) -> None:
    """Drop ``p``'s optimizer state, and the projector our optimizers derive from it."""
    optimizer.state.pop(p, None)
    derived = optimizer.__dict__.get("_derived")
    if isinstance(derived, dict):
        derived.get("projectors", {}).pop(id(p), None)


# ----------------------------------------------------------------------------- the OwLore recipe
def OwLore(model: nn.Module, calibration: Any, *, lr: float = 3e-4, rank: int = 256, update_proj_gap: int = 100,
           scale: float = 1.0, every: int = 50, layers: int = 5, threshold: float = OWL_THRESHOLD,
           keep_state: bool = False, seed: int = 0, decoder_layers: Iterable[nn.Module] | None = None,
           **optimizer_options: Any) -> tuple[Optimizer, LayerSampler]:
    """OwLore as its official scripts run it: ``(GaLoreAdamW, LayerSampler)``.

    GaLore (rank 256, refresh gap 100, scale 1, ``proj_type="std"``) on every linear layer except the
    head, AdamW on the rest, lr 3e-4 (``owlore_scripts/run_owlore_low_rank.sh``); γ = 5 layers sampled
    every K = 50 steps with probabilities ∝ OWL's outlier ratios at M = 13 over ``calibration``.
    ``layers`` is clamped to the number of decoder layers, and ``rank`` to the smallest short side of
    the projected weights (a weight whose short side is the rank trains at full rank, as GaLore does
    there). Further keyword arguments go to ``GaLoreAdamW`` (``weight_decay``, ``betas``, ...).

    Call ``sampler.step()`` after every ``optimizer.step()``.
    """
    from .groups import param_groups
    from .optim import GaLoreAdamW, RankFallbackWarning

    modules = _layer_list(model, decoder_layers)
    _check_int("rank", rank)
    short = [min(m.weight.shape) for layer in modules for m in layer.modules() if isinstance(m, nn.Linear)]
    rank = min(rank, min(short)) if short else rank
    groups = param_groups(model, rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type="std")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankFallbackWarning)
        opt = GaLoreAdamW(groups, lr=lr, **optimizer_options)
    sampler = LayerSampler(model, opt, every=every, layers=min(_check_int("layers", layers), len(modules)),
                           probs="owl", keep_state=keep_state, seed=seed, decoder_layers=modules,
                           calibration=calibration, threshold=threshold)
    return opt, sampler

