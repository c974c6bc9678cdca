"""``pretrain --layer-sampling {lisa,owl}``: the run's :class:`lowrank_optim.LayerSampler`.

LISA samples ``--sample-layers`` decoder layers uniformly every ``--sample-every`` steps; OwLore samples
them ∝ OWL's outlier ratios at ``--owl-threshold`` (M, default 13 as OwLore), measured once on the
freshly built model over the first :data:`CALIBRATION_SEQUENCES` training sequences (OWL: 128). The
optimizer is the one ``--optimizer`` names (``galore`` gives OwLore's GaLore inside the sampled layers).
Frozen layers' optimizer state is freed. The sampler's ``state_dict()`` goes into the checkpoint
(``sampler``), so ``--resume`` continues the same choices. One process only (not under torchrun: DDP's
buckets and FSDP2's shards are fixed when they are built).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import TrainError

CHOICES = ("lisa", "owl")
#: OWL's calibration set size (``--nsamples 128``); here of ``--seq-len`` tokens each.
CALIBRATION_SEQUENCES = 128


def check_args(a: Any) -> None:
    """Refuse bad ``--layer-sampling`` settings before anything is built."""
    if a.layer_sampling is None:
        return
    if a.layer_sampling not in CHOICES:
        raise TrainError(f"--layer-sampling must be one of {', '.join(CHOICES)}, got {a.layer_sampling!r}")
    for name in ("sample_every", "sample_layers"):
        v = getattr(a, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
    if not (isinstance(a.owl_threshold, (int, float)) and a.owl_threshold > 0 and math.isfinite(a.owl_threshold)):
        raise TrainError(f"--owl-threshold must be a positive number, got {a.owl_threshold!r}")
    if a.fsdp:
        raise TrainError("--layer-sampling and --fsdp cannot be combined: FSDP2's shards are fixed when it is built")


def run_spec(a: Any) -> dict[str, Any]:
    """What a resumed run must share (nothing without ``--layer-sampling``, so older checkpoints resume)."""
    if a.layer_sampling is None:
        return {}
    spec = {"mode": a.layer_sampling, "every": a.sample_every, "layers": a.sample_layers}
    if a.layer_sampling == "owl":
        spec["threshold"] = float(a.owl_threshold)
    return {"layer_sampling": spec}


def build(run: Any) -> Any:
    """The run's sampler (None without ``--layer-sampling``); ``--sample-layers`` is clamped to the
    model's number of decoder layers."""
    from ..sampling import LayerSampler, decoder_layers

    a = run.a
    if a.layer_sampling is None:
        return None
    if run.world > 1:
        raise TrainError("--layer-sampling runs in one process only: DDP's gradient buckets are fixed when it is "
                         "built, before the sampler freezes layers")
    n = len(decoder_layers(run.model))
    layers = min(a.sample_layers, n)
    if layers < a.sample_layers:
        run.say(f"layer sampling: --sample-layers {a.sample_layers} clamped to the model's {n} decoder layers"
                + (" (every layer trains: nothing is sampled)" if layers == n else ""))
    probs: Any = "uniform"
    if a.layer_sampling == "owl":
        probs = _owl_probs(run, layers)
    sampler = LayerSampler(run.model, run.opt, every=a.sample_every, layers=layers, probs=probs, seed=a.seed)
    run.say(f"layer sampling ({a.layer_sampling}): {layers} of {n} layers every {a.sample_every} steps, "
            f"probabilities {[round(p, 4) for p in sampler.probs.tolist()]}")
    return sampler


def _owl_probs(run: Any, layers: int) -> torch.Tensor:
    from ..sampling import owl_ratios

    a = run.a
    count = CALIBRATION_SEQUENCES
    batches = []
    for start in range(0, count, a.batch_size):
        x = run.seqs.get(start, min(a.batch_size, count - start))[:, :-1]
        batches.append({"input_ids": x.to(run.device)})
    ratios = owl_ratios(run.model, batches, threshold=a.owl_threshold)
    if int((ratios > 0).sum()) < layers:
        raise TrainError(f"--layer-sampling owl: only {int((ratios > 0).sum())} decoder layers have outliers at "
                         f"--owl-threshold {a.owl_threshold} (ratios {[round(r, 4) for r in ratios.tolist()]} %), "
                         f"fewer than the {layers} to sample; a model at random initialization has almost none "
                         "(OwLore is meant for pretrained models): lower --owl-threshold (OWL prunes with 5) or "
                         "use --layer-sampling lisa")
    return ratios
