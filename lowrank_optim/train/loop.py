"""The pretraining loop: transformers' LlamaForCausalLM from a config, one optimizer, one data source.

:func:`pretrain` runs ``lowrank-optim pretrain`` (and each run of ``compare``): warmup then cosine
decay to ``min_lr_ratio`` of the peak, gradient clipping, gradient accumulation, held-out
perplexity every ``eval_every`` steps, ``DIR/metrics.jsonl`` (one JSON object a step), atomic
checkpoints that resume bit for bit on CPU, DDP (or FSDP2 with ``fsdp``) under ``torchrun``,
layer-wise updates, activation checkpointing and bf16 weights.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process takes ``batch_size`` sequences of every
micro-batch: step ``t`` consumes the global sequences ``position .. position + batch_size *
grad_accum * world_size - 1``, micro-batch ``m`` of rank ``r`` the ``batch_size`` of them starting at
``position + (m * world_size + r) * batch_size``; the loss is averaged over ranks for logging;
evaluation is sharded over ranks and summed; rank 0 writes the metrics and checkpoints.

With ``fsdp`` (``--fsdp``) the model is wrapped with FSDP2 instead of DDP: ``fully_shard`` on each
decoder layer, then on the root, over a 1-D mesh of all ranks (gloo on CPU, nccl on CUDA; without
torchrun a 1-rank group of this process). Every parameter, gradient and optimizer state is a DTensor
holding this rank's rows (``lowrank_optim.distributed``); the data, the schedule and the logged loss
are as under DDP. Gradients are reduce-scattered after every micro-batch's backward and accumulate
sharded (no unsharded gradient is kept between micro-batches); clipping takes the global norm of the
sharded gradients. Evaluation runs the same number of forward passes on every rank (FSDP2's forward is
collective). Checkpoints are ``torch.distributed.checkpoint`` folders (see :mod:`.checkpoint`), which
``--resume`` continues exactly. Not with ``layerwise``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt_io
from . import layer_sampling, outdir, preempt, saving
from .data import Corpus, c4_sources, local_corpus, stdlib_corpus
from .._console import stderr_line
from ..projectors import NonFiniteGradientError
from .errors import TrainError, require
from .optimizers import build_optimizer, optimizer_settings, state_bytes
from .references import PREFIX as REF_PREFIX

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METRICS_NAME = "metrics.jsonl"
#: Optimizers --fsdp refuses, and why (every other one steps FSDP2's row shards).
FSDP_REFUSED: dict[str, str] = {
    "adafactor": "the adafactor baseline (torch.optim.Adafactor) cannot step FSDP2's sharded (DTensor) parameters: its "
                 "factored second moment runs an in-place op that DTensor refuses; use adamw, muon or a low-rank preset, "
                 "or train adafactor without --fsdp",
}


@dataclass
class TrainArgs:
    """Settings of one training run; the CLI flags map one to one (``--batch-size`` is ``batch_size``)."""

    config: str | dict[str, Any]
    optimizer: str = "galore"
    options: dict[str, Any] = field(default_factory=dict)  # build_optimizer options: lr, rank, ...
    max_steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    data: str | None = None
    tokenizer: str | None = None
    layerwise: bool = False
    fsdp: bool = False  # FSDP2 (fully_shard per decoder layer, then the root) instead of DDP
    checkpointing: bool = False
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on CPU
    device: str | None = None  # None: cuda (this process's LOCAL_RANK) when available, else cpu
    eval_every: int | None = None  # None: a tenth of max_steps
    eval_tokens: int = 32768
    save_every: int | None = None  # None: as eval_every; 0: only at the end
    warmup: int | None = None  # None: a tenth of max_steps
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    stop_at: int | None = None  # stop (and save) after this step; the schedule still spans max_steps
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    save: bool = True  # False: no checkpoints (compare)
    label: str | None = None  # shown in the progress bar
    layer_sampling: str | None = None  # lisa | owl: lro.LayerSampler over the decoder layers (.layer_sampling)
    sample_every: int = 50
    sample_layers: int = 5
    owl_threshold: float = 13.0
    sltrain: str | None = None  # "RANK:DENSITY[:ALPHA]": lro.nn.to_sltrain on the model before the optimizer


@dataclass
class RunResult:
    """What a run measured (``compare`` tabulates these)."""

    label: str
    optimizer: str
    settings: dict[str, Any]
    steps: int
    curve: list[tuple[int, float]]  # (step, training loss) of the steps this invocation ran
    evals: list[tuple[int, float]]  # (step, held-out loss)
    final_eval_loss: float
    tokens_per_s: float
    state_bytes: int
    peak_memory: int | None  # CUDA peak allocated bytes; None on CPU
    train_seconds: float
    out: str | None

    @property
    def final_perplexity(self) -> float:
        return math.exp(self.final_eval_loss) if self.final_eval_loss < 700 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["final_perplexity"] = self.final_perplexity
        return d


# --------------------------------------------------------------------------- helpers
def check_args(a: TrainArgs) -> None:
    """Refuse flags this run cannot take (TrainError naming them), before anything is read or built."""
    def positive(name: str, v: Any, zero_ok: bool = False) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
            raise TrainError(f"--{name.replace('_', '-')} must be an integer >= {0 if zero_ok else 1}, got {v!r}")

    for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_tokens"):
        positive(name, getattr(a, name))
    for name in ("eval_every", "save_every", "warmup", "stop_at"):
        if getattr(a, name) is not None:
            positive(name, getattr(a, name), zero_ok=name in ("save_every", "warmup"))
    if a.stop_at is not None and a.stop_at > a.max_steps:
        raise TrainError(f"--stop-at {a.stop_at} is past --max-steps {a.max_steps}: the run would end first; give a "
                         "step within the run, or drop --stop-at")
    if a.eval_tokens < a.seq_len:
        raise TrainError(f"--eval-tokens {a.eval_tokens} is less than one sequence of --seq-len {a.seq_len}: the "
                         "held-out loss would come from one window, whatever was asked; give at least the sequence length")
    if not 0.0 <= a.min_lr_ratio <= 1.0:
        raise TrainError(f"--min-lr-ratio must be in [0, 1], got {a.min_lr_ratio}")
    if not (a.max_grad_norm >= 0 and math.isfinite(a.max_grad_norm)):
        raise TrainError(f"--max-grad-norm must be >= 0 (0: no clipping), got {a.max_grad_norm}")
    if a.dtype is not None and a.dtype not in DTYPES:
        raise TrainError(f"--dtype must be one of {', '.join(DTYPES)}, got {a.dtype!r}")
    if a.device is not None:
        _check_device(a.device)
    if a.resume and a.overwrite:
        raise TrainError("--resume and --overwrite contradict each other: pick one")
    if a.fsdp and a.layerwise:
        raise TrainError("--fsdp and --layerwise cannot be combined: FSDP2 reduce-scatters a layer's gradients "
                         "after its backward, where layer-wise updates would already have stepped; pick one")
    if a.fsdp and a.optimizer in FSDP_REFUSED:
        raise TrainError(f"--fsdp: {FSDP_REFUSED[a.optimizer]}")
    if a.optimizer.startswith(REF_PREFIX):
        _check_reference(a)
    layer_sampling.check_args(a)
    if a.sltrain is not None:
        _check_sltrain(a)


def _check_reference(a: TrainArgs) -> None:
    """A ``ref:PRESET`` run (the paper's package) is for ``compare``: its state holds the package's Python
    objects (no weights-only checkpoint), and it has no layer-wise, FSDP2 or SLTrain path."""
    compare = "use it in `lowrank-optim compare`, which trains without checkpoints"
    for flag, on, fix in (("checkpoints (pretrain saves them)", a.save, compare), ("--resume", a.resume, compare),
                          ("--layerwise", a.layerwise, "drop --layerwise"), ("--fsdp", a.fsdp, "drop --fsdp"),
                          ("--sltrain", a.sltrain is not None, "drop --sltrain")):
        if on:
            raise TrainError(f"{a.optimizer} (the reference package) does not run with {flag}; {fix}")


def _check_sltrain(a: TrainArgs) -> None:
    from ..nn import parse_sltrain

    if a.fsdp:
        raise TrainError("--sltrain and --fsdp cannot be combined: SLTrain's sparse values and CSR support are not "
                         "sharded by FSDP2; train it with DDP (torchrun without --fsdp)")
    try:
        parse_sltrain(a.sltrain)
    except ValueError as err:
        raise TrainError(f"--sltrain: {err}") from None


def schedule(warmup: int, max_steps: int, min_ratio: float) -> Callable[[int], float]:
    """The lr multiplier of update ``s`` (0-based): linear warmup ``(s+1)/warmup`` over the first
    ``warmup`` updates, then cosine from 1 down to ``min_ratio`` at the last update."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        span = max_steps - 1 - warmup
        if span <= 0:
            return 1.0
        progress = min(1.0, (s - warmup) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def lm_loss(model: Any, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (in float32) of a ``[batch, seq + 1]`` token tensor."""
    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction=reduction)


def build_model(config: dict[str, Any], seed: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """``LlamaForCausalLM(config)`` initialised from ``seed``, created on ``device`` in ``dtype``."""
    transformers = require("transformers", "training a LLaMA (LlamaForCausalLM)")
    try:
        cfg = transformers.LlamaConfig.from_dict(dict(config))
    except Exception as err:
        raise TrainError(f"not a valid LlamaConfig: {err}") from None
    cfg.use_cache = False
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model


def _memory_now(device: torch.device) -> tuple[int | None, str]:
    """(CUDA peak allocated bytes or None, a short text for the progress bar)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return peak, f"{peak / 2**20:.0f}MiB"
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = rss if sys.platform == "darwin" else rss * 1024
        return None, f"{rss / 2**20:.0f}MiB rss"
    except (ImportError, OSError):
        return None, "n/a"


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def process_group(single: bool = False) -> Any:
    """Initialise torch.distributed under torchrun (nccl for CUDA tensors, gloo for CPU ones) for the
    block, if it is not already; tear it down after if this block started it. ``single``: without
    torchrun too, as a group of this one process (FSDP2 needs a process group for its mesh)."""
    _, world, local = distributed()
    own = (world > 1 or single) and not (dist.is_available() and dist.is_initialized())
    if own:
        if not dist.is_available():
            raise TrainError("this torch is built without torch.distributed, which --fsdp and torchrun need")
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        if world > 1:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
        if own and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # on success, no rank tears the group down while another still talks to it
    finally:
        if own and dist.is_initialized():
            dist.destroy_process_group()


def load_data(a: TrainArgs, corpus: Corpus | None = None) -> tuple[Any, torch.Tensor, int, dict[str, Any], str]:
    """(training sequences, held-out windows, vocab needed, data spec, description)."""
    if a.data == "c4":
        seqs, held, vocab, spec = c4_sources(a.tokenizer, a.seq_len, a.seed, a.eval_tokens)
        return seqs, held, vocab, spec, f"allenai/c4 en (streamed), tokenizer {spec['tokenizer']}"
    if corpus is None:
        if a.data is None:
            if a.tokenizer not in (None, "bytes"):
                raise TrainError("--tokenizer applies to --data PATH or c4; the default corpus is byte-level")
            corpus = stdlib_corpus()
        else:
            corpus = local_corpus(a.data, a.tokenizer)
    return (corpus.sequences(a.seq_len, a.seed), corpus.heldout_sequences(a.seq_len, a.eval_tokens),
            corpus.vocab_needed, corpus.spec, corpus.name)


def _prepare_out(out: Path, a: TrainArgs) -> None:
    outdir.prepare(out)
    if a.save and not a.resume and not a.overwrite and ckpt_io.has_checkpoint(out):
        raise TrainError(f"--out {str(out)!r} already holds a checkpoint: pass --resume to continue that run, "
                         "--overwrite to start a new one there, or choose another --out")


@contextlib.contextmanager
def _holding_out(a: TrainArgs, log: Callable[[str], None] | None) -> Iterator[None]:
    """Rank 0 holds ``--out``'s lock for the run (:class:`.outdir.OutLock`: a second run there is refused
    naming this one) and removes what killed saves left there; every rank fails alike if it cannot."""
    lock = outdir.OutLock(Path(a.out)) if a.out is not None and distributed()[0] == 0 else None
    created = lock is not None and not lock.path.parent.exists()  # removed again if the run writes nothing
    error = None
    if lock is not None:
        try:
            outdir.prepare(lock.path.parent)
            lock.acquire()
            count, size = outdir.remove_temporaries(lock.path.parent)
            if count:
                (log or stderr_line)(
                    f"removed {count} temporary file(s) of interrupted saves ({size / 2**20:.1f} MiB) from {a.out}")
        except TrainError as err:
            error = str(err)
    try:
        saving.agree(error)
        yield
    finally:
        if lock is not None:
            lock.release()
            if created:  # a run refused before it wrote anything (a typo in a flag) leaves no empty --out
                with contextlib.suppress(OSError):
                    lock.path.parent.rmdir()


def _rewrite_metrics(path: Path, upto: int) -> None:
    """Keep the records of steps <= ``upto`` (those a resumed run does not repeat), atomically. A link in
    the file's place is not read: it is replaced by an empty file, its target left as it is."""
    if path.is_symlink():
        outdir.create_empty(path)
        return
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= upto:
            kept.append(line)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~ckpt_io.umask())
        with os.fdopen(fd, "w") as f:
            f.write("".join(k + "\n" for k in kept))
        os.replace(tmp, path)  # replaces a link itself, never its target
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise TrainError(f"could not rewrite {str(path)!r} ({err.strerror or err}); the checkpoint is intact") from None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


@torch.no_grad()
def evaluate(model: torch.nn.Module, heldout: torch.Tensor, batch: int, device: torch.device) -> float:
    """Mean next-token loss over the held-out windows (sharded over ranks under torchrun)."""
    rank, world, _ = distributed() if dist.is_available() and dist.is_initialized() else (0, 1, 0)
    collective = _is_fsdp(model)  # every rank must run every forward: a rank without windows runs a dummy one
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, len(heldout), world * batch):
        x = heldout[start + rank * batch: start + (rank + 1) * batch]
        if len(x) == 0 and not collective:
            continue
        loss = lm_loss(model, (x if len(x) else heldout[:1]).to(device), reduction="sum").double()
        if len(x):
            total[0] += loss
            total[1] += x[:, 1:].numel()
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (embeddings, final norm, head), over a
    1-D mesh of every rank of the process group. In place; returns ``model``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = getattr(getattr(model, "model", None), "layers", None)
    for layer in layers if layers is not None else ():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(t: Any) -> Any:
    """A DTensor's global value (a clipped gradient norm under FSDP2); anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# --------------------------------------------------------------------------- the run
def pretrain(a: TrainArgs, *, corpus: Corpus | None = None, log: Callable[[str], None] | None = None) -> RunResult:
    """Train as ``a`` says (see :class:`TrainArgs` and the module doc); returns what it measured.

    ``corpus`` reuses already-loaded data (``compare`` loads it once). Bad input raises
    :class:`TrainError` with a one-line message; SIGTERM or SIGINT during the steps raises
    :class:`.preempt.Stopped` after saving (see :mod:`.preempt`).
    """
    from ..models import load_config

    check_args(a)
    with process_group(single=a.fsdp), _holding_out(a, log):
        return _pretrain(a, load_config(a.config), corpus, log)


def _pretrain(a: TrainArgs, config: dict[str, Any], corpus: Corpus | None, log: Callable[[str], None] | None) -> RunResult:
    """:func:`pretrain` inside its process group: build the run, resume it if asked, train, report."""
    run = _build_run(a, config, corpus, log)
    run.sampler = layer_sampling.build(run)  # before resume, which restores its choice
    step, position = saving.resume(run)
    run.say(f"data: {run.data_name}")
    _start_metrics(run, step)
    wrapped = _wrap_model(run)
    progress = _Progress(step=step, position=position, saved_at=step if a.resume else None)
    _train(run, progress, wrapped)
    return _result(run, progress)


@dataclass
class _Run:
    """What one run fixes before its first step: the arguments, this process's place among the ranks,
    the data, the model with its optimizer and schedule, and where the files go."""

    a: TrainArgs
    rank: int
    world: int
    say: Callable[[str], None]  # prints on rank 0 only
    device: torch.device
    out: Path | None
    vocab: int
    seqs: Any
    heldout: torch.Tensor
    data_name: str
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    settings: dict[str, Any]
    run_spec: dict[str, Any]  # what a resumed run must match (checkpoint.check_same_run)
    eval_every: int
    save_every: int
    ckpt_path: Path | None
    metrics_path: Path | None
    sampler: Any = None  # lro.LayerSampler with --layer-sampling

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> int:
        """The step this invocation stops after (``stop_at`` cuts the run short, not its schedule)."""
        a = self.a
        return min(a.max_steps, a.stop_at) if a.stop_at is not None else a.max_steps

    @property
    def per_step(self) -> int:
        """Sequences one step consumes, over all ranks and micro-batches."""
        return self.a.batch_size * self.a.grad_accum * self.world

    @property
    def tokens_per_step(self) -> int:
        return self.per_step * self.a.seq_len

    @property
    def eval_batch(self) -> int:
        return max(1, self.a.batch_size)


@dataclass
class _Progress:
    """Where a run stands: the last step taken, the next sequence, and what this invocation measured."""

    step: int
    position: int
    saved_at: int | None = None  # the step of the checkpoint in --out (None: none yet)
    curve: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    trained_tokens: int = 0


@dataclass
class _Wrapped:
    """The model as the step loop drives it: ``forward`` is the module called (the DDP wrapper under
    DDP), ``handle`` the layer-wise updates' handle (None without ``layerwise``), ``params`` the
    optimizer's parameters in the model's order (the order clipping sums their norms in, as layerwise's)."""

    forward: Any
    ddp: Any
    handle: Any
    params: list[torch.nn.Parameter]


# ----------------------------------------------------------------- building the run
def _build_run(a: TrainArgs, config: dict[str, Any], corpus: Corpus | None,
               log: Callable[[str], None] | None) -> _Run:
    """Check the output folder and the data against the config, then build the model, optimizer and
    schedule; every check runs before the (slow) model is built."""
    rank, world, local = distributed()
    say = log if log is not None else stderr_line
    say = say if rank == 0 else (lambda s: None)
    device, dtype_name = _device_and_dtype(a, local)
    out = _output_folder(a)
    vocab, seqs, heldout, data_spec, data_name = _load_checked_data(a, config, corpus)
    model, opt, sched, settings, warmup = _build_training(a, config, DTYPES[dtype_name], device)
    eval_every = a.eval_every or max(1, a.max_steps // 10)
    save_every = a.save_every if a.save_every is not None else eval_every
    run_spec = _run_spec(a, config, settings, data_spec, world, warmup, dtype_name)
    ckpt_path = out / ckpt_io.CHECKPOINT_NAME if out is not None else None
    if a.fsdp and out is not None:
        ckpt_path = out / ckpt_io.DCP_NAME
    return _Run(
        a=a, rank=rank, world=world, say=say, device=device, out=out, vocab=vocab, seqs=seqs, heldout=heldout,
        data_name=data_name, model=model, opt=opt, sched=sched, settings=settings, run_spec=run_spec,
        eval_every=eval_every, save_every=save_every, ckpt_path=ckpt_path,
        metrics_path=out / METRICS_NAME if out is not None else None,
    )


def _check_device(name: str) -> None:
    """``--device`` names a device this torch can use: cpu, or cuda[:i] with that GPU present."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise TrainError(f"--device must be cpu or cuda[:i], got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device must be cpu or cuda[:i], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: this torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                         "use --device cpu, or install the torch build for your CUDA")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1})")


def _device_and_dtype(a: TrainArgs, local_rank: int) -> tuple[torch.device, str]:
    """The device (``--device``, else this process's GPU, else the CPU) and the name of the weights'
    dtype (``--dtype``, else bf16 on CUDA and fp32 on the CPU)."""
    if a.device is not None:
        device = torch.device(a.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return device, a.dtype or ("bf16" if device.type == "cuda" else "fp32")


def _output_folder(a: TrainArgs) -> Path | None:
    """``--out`` checked and created (None without it); a run that saves or resumes needs one."""
    out = Path(a.out) if a.out is not None else None
    if out is None and (a.save or a.resume):
        raise TrainError("give --out DIR for the metrics and checkpoints")
    if out is not None:
        _prepare_out(out, a)
    return out


def _load_checked_data(a: TrainArgs, config: dict[str, Any],
                       corpus: Corpus | None) -> tuple[int, Any, torch.Tensor, dict[str, Any], str]:
    """(the config's vocab size, training sequences, held-out windows, data spec, description), once
    the sequence length, the optimizer's name and the tokenizer's ids fit the config."""
    vocab = int(config["vocab_size"])
    max_pos = config.get("max_position_embeddings")
    if max_pos is not None and a.seq_len > int(max_pos):
        raise TrainError(f"--seq-len {a.seq_len} exceeds the config's max_position_embeddings {max_pos}")
    optimizer_settings(a.optimizer, None, **a.options)  # an unknown optimizer fails before the data loads
    seqs, heldout, vocab_needed, data_spec, data_name = load_data(a, corpus)
    if vocab < vocab_needed:
        raise TrainError(f"the config's vocab_size {vocab} does not fit the tokenizer "
                         f"({data_spec.get('tokenizer')}: ids up to {vocab_needed - 1}); use a config with "
                         f"vocab_size >= {vocab_needed}")
    return vocab, seqs, heldout, data_spec, data_name


def _build_training(a: TrainArgs, config: dict[str, Any], dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, dict[str, Any], int]:
    """(model, optimizer, lr scheduler, the optimizer's settings, warmup steps). Every generator is
    seeded from ``--seed`` first, so that every optimizer starts from the same model and data."""
    random.seed(a.seed)
    np.random.seed(a.seed)
    model = build_model(config, a.seed, dtype, device)
    if a.sltrain is not None:  # SLTrain's layers replace attention and MLP, initialized afresh from --seed
        from ..nn import parse_sltrain, to_sltrain

        rank, density, alpha = parse_sltrain(a.sltrain)
        to_sltrain(model, rank, density, alpha=alpha, seed=a.seed)
    if a.checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    if a.fsdp:
        shard_model(model, device)
    opt = build_optimizer(a.optimizer, model, max_steps=a.max_steps, **a.options)
    settings = _jsonable(optimizer_settings(a.optimizer, model, **a.options))
    warmup = a.warmup if a.warmup is not None else a.max_steps // 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(warmup, a.max_steps, a.min_lr_ratio))
    return model, opt, sched, settings, warmup


def _run_spec(a: TrainArgs, config: dict[str, Any], settings: dict[str, Any], data_spec: dict[str, Any],
              world: int, warmup: int, dtype_name: str) -> dict[str, Any]:
    """What a checkpoint records of its run, for ``--resume`` to refuse a different one."""
    run_spec = {
        "config": json.dumps(config, sort_keys=True),
        "optimizer": a.optimizer,
        "options": settings,
        "data": _jsonable(data_spec),
        "seed": a.seed,
        "batch_size": a.batch_size,
        "seq_len": a.seq_len,
        "grad_accum": a.grad_accum,
        "world_size": world,
        "max_steps": a.max_steps,
        "warmup": warmup,
        "min_lr_ratio": a.min_lr_ratio,
        "max_grad_norm": a.max_grad_norm,
        "dtype": dtype_name,
    }
    if a.eval_tokens != TrainArgs.eval_tokens:  # so, only then, checkpoints that predate it still resume
        run_spec["eval_tokens"] = a.eval_tokens  # the held-out set: a resumed run's losses are the same set's
    if a.fsdp:  # only then, so that checkpoints of earlier DDP runs still resume
        run_spec["fsdp"] = True
    run_spec.update(layer_sampling.run_spec(a))
    if a.sltrain is not None:
        run_spec["sltrain"] = a.sltrain
    return run_spec


# ----------------------------------------------------------------- metrics, wrapping
def _start_metrics(run: _Run, step: int) -> None:
    """Rank 0 empties the metrics file, or on ``--resume`` keeps its records up to ``step``; if it cannot,
    every rank stops with its reason (no rank goes on to the steps' collectives alone)."""
    error = None
    if run.metrics_path is not None and run.is_main:
        try:
            if run.a.resume:
                _rewrite_metrics(run.metrics_path, step)
            else:
                outdir.create_empty(run.metrics_path)  # not through a link: its target is never truncated
        except TrainError as err:
            error = str(err)
    saving.agree(error)


def _wrap_model(run: _Run) -> _Wrapped:
    """DDP around the model under torchrun (not with FSDP2, which sharded it already), then the
    layer-wise updates' hooks with ``layerwise``."""
    a = run.a
    ddp = None
    forward_model: Any = run.model
    if run.world > 1 and not a.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = run.device
        ddp = DDP(run.model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        forward_model = ddp
    handle = None
    if a.layerwise:
        from ..layerwise import layerwise

        handle = layerwise(forward_model, run.opt, accumulation_steps=a.grad_accum,
                           max_grad_norm=a.max_grad_norm if a.max_grad_norm > 0 else None)
    stepped = {id(p) for g in run.opt.param_groups for p in g["params"]}
    # the model's order: clip_grad_norm_ sums the norms in it, as lro.layerwise's clipping does
    params = [p for p in forward_model.parameters() if id(p) in stepped]
    return _Wrapped(forward=forward_model, ddp=ddp, handle=handle, params=params)


# ----------------------------------------------------------------- the step loop
def _train(run: _Run, progress: _Progress, wrapped: _Wrapped) -> None:
    """Step until ``run.last``: a metrics record a step (rank 0), held-out evaluation every
    ``eval_every`` steps and checkpoints every ``save_every`` (both at the last step too), and the
    progress bar. SIGTERM and SIGINT stop it at a step boundary with a checkpoint (:mod:`.preempt`).
    The layer-wise hooks are removed however it ends."""
    last = run.last
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    bar = _progress_bar(run, progress.step)
    metrics = _Metrics(run)
    try:
        with preempt.StopSignals() as stop:
            while progress.step < last:
                rec, mem_text = _train_step(run, progress, wrapped)
                step = progress.step
                if step % run.eval_every == 0 or step == last:
                    _evaluate_now(run, progress, rec, bar)
                failure = metrics.write(rec, progress.saved_at)
                if bar is not None:
                    bar.set_postfix_str(f"loss {rec['loss']:.3f} | {rec['tokens_per_s']:,.0f} tok/s | mem {mem_text}",
                                        refresh=False)
                    bar.update(1)
                saved = bool(run.save_every and step % run.save_every == 0) or step == last
                if saved and failure is None:
                    _save_now(run, stop, progress)
                _stop_if_asked(run, stop, progress, saved, failure)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        if wrapped.handle is not None:
            wrapped.handle.remove()


def _save_now(run: _Run, stop: preempt.StopSignals, progress: _Progress) -> None:
    """Checkpoint the step just taken; a signal waits until the save is complete."""
    with stop.saving():
        saving.save(run, progress.step, progress.position)
    if run.a.save and run.ckpt_path is not None:
        progress.saved_at = progress.step


def _stop_if_asked(run: _Run, stop: preempt.StopSignals, progress: _Progress, saved: bool,
                   failure: str | None) -> None:
    """At a step boundary, on every rank alike: stop with ``failure`` (rank 0 could not write the metrics),
    or, after a signal, save (unless this step just did) and raise :class:`.preempt.Stopped`."""
    signum, failed = stop.requested(run.world, run.device, failure is not None)
    if failed:
        raise TrainError(failure or "rank 0 could not write the metrics (see its message); stopping every rank")
    if signum:
        if not saved:
            _save_now(run, stop, progress)
        raise preempt.Stopped(signum, progress.step, saved=progress.saved_at == progress.step)


class _Metrics:
    """Rank 0's ``metrics.jsonl``, one record appended a step; a failed write (a full disk) is reported,
    not raised, so that every rank can stop alike at the step boundary."""

    def __init__(self, run: _Run) -> None:
        self.path = run.metrics_path if run.is_main else None
        self.file = None
        error = None
        if self.path is not None:
            try:
                self.file = open(self.path, "a", opener=_no_follow)  # noqa: SIM115 (closed by close())
            except OSError as err:
                error = f"cannot open {str(self.path)!r} to append the metrics: {err.strerror or err}"
        saving.agree(error)

    def write(self, rec: dict[str, Any], saved_at: int | None) -> str | None:
        if self.file is None:
            return None
        try:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        except OSError as err:
            kept = f"the checkpoint of step {saved_at} is intact" if saved_at is not None else "no checkpoint was saved yet"
            return (f"could not write the metrics to {str(self.path)!r} ({err.strerror or err}) after step "
                    f"{rec['step']}; {kept}: free space, then --resume")
        return None

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # a full disk fails the flush of what is left, again
                self.file.close()
            self.file = None


def _no_follow(path: str, flags: int) -> int:
    """``open``'s opener that never writes through a link in the file's place (ELOOP instead)."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o666)


def _progress_bar(run: _Run, step: int) -> Any:
    """Rank 0's tqdm bar from ``step`` to ``run.last`` when ``--progress`` asks for one (by default when
    stderr is a terminal) and a step is left to run; else None."""
    a = run.a
    show = a.progress if a.progress is not None else sys.stderr.isatty()
    if not (run.is_main and show and run.last > step):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.last, initial=step, desc=a.label or a.optimizer, dynamic_ncols=True, leave=True)


def _train_step(run: _Run, progress: _Progress, wrapped: _Wrapped) -> tuple[dict[str, Any], str]:
    """One optimizer step over ``grad_accum`` micro-batches, advancing ``progress``; returns the
    step's metrics record and the memory text for the progress bar."""
    t0 = time.perf_counter()
    lr = float(run.opt.param_groups[0]["lr"])
    try:
        loss_sum = _accumulate_gradients(run, wrapped, progress.position)
        loss_value = _step_loss(run, loss_sum, progress.step + 1)  # a diverged loss stops before the update
        grad_norm = _update(run, wrapped)
    except NonFiniteGradientError as err:  # the optimizer refused the step (layer-wise: the rest of it)
        raise TrainError(f"a gradient holds inf or NaN at step {progress.step + 1} ({str(err).split(';')[0]}); "
                         f"the checkpoint on disk is intact; lower --lr (now {_lr(run)})") from None
    run.sched.step()
    # no new draw after the last step, so the state the run reports is that of the layers it trained
    if run.sampler is not None and progress.step + 1 < run.a.max_steps:
        run.sampler.step()
    progress.step += 1
    progress.position += run.per_step
    elapsed = time.perf_counter() - t0
    progress.train_seconds += elapsed
    progress.trained_tokens += run.tokens_per_step
    peak, mem_text = _memory_now(run.device)
    rec: dict[str, Any] = {
        "step": progress.step, "loss": loss_value, "lr": lr, "tokens_per_s": run.tokens_per_step / elapsed,
        "tokens": progress.step * run.tokens_per_step,
        "grad_norm": None if grad_norm is None else float(grad_norm),
    }
    if peak is not None:
        rec["peak_memory_bytes"] = peak
    progress.curve.append((progress.step, loss_value))
    return rec, mem_text


def _accumulate_gradients(run: _Run, wrapped: _Wrapped, position: int) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches of the step starting at sequence
    ``position`` (each loss divided by ``grad_accum``); returns the sum of their losses.

    Under DDP only the last micro-batch all-reduces; with layer-wise updates the handle steps inside
    the last backward."""
    a, handle, ddp = run.a, wrapped.handle, wrapped.ddp
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for m in range(a.grad_accum):
        x = run.seqs.get(position + (m * run.world + run.rank) * a.batch_size, a.batch_size)
        if int(x.max()) >= run.vocab:
            raise TrainError(f"the data holds token id {int(x.max())}, outside the config's vocab_size {run.vocab}")
        x = x.to(run.device, non_blocking=True)
        if handle is not None:
            with handle.no_sync():
                loss = lm_loss(wrapped.forward, x)
                handle.backward(loss / a.grad_accum)
        else:
            sync = ddp is None or m == a.grad_accum - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                loss = lm_loss(wrapped.forward, x)
                (loss / a.grad_accum).backward()
        loss_sum += loss.detach().double()
    return loss_sum


def _update(run: _Run, wrapped: _Wrapped) -> Any:
    """Clip the gradients and step the optimizer, unless the layer-wise handle already did inside the
    backward; returns the gradient norm before clipping (None without clipping)."""
    if wrapped.handle is not None:
        return wrapped.handle.last_grad_norm
    max_norm = run.a.max_grad_norm
    grad_norm = _full(torch.nn.utils.clip_grad_norm_(wrapped.params, max_norm)) if max_norm > 0 else None
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return grad_norm


def _step_loss(run: _Run, loss_sum: torch.Tensor, step: int) -> float:
    """The step's training loss, averaged over micro-batches and ranks; a non-finite one stops the run."""
    a = run.a
    mean_loss = loss_sum / a.grad_accum
    if run.world > 1:
        dist.all_reduce(mean_loss)
        mean_loss /= run.world
    loss_value = float(mean_loss)
    if not math.isfinite(loss_value):
        raise TrainError(f"the training loss is {loss_value} at step {step}; lower --lr (now {_lr(run)})")
    return loss_value


def _lr(run: _Run) -> Any:
    return run.a.options.get("lr") or run.settings.get("lr")


def _evaluate_now(run: _Run, progress: _Progress, rec: dict[str, Any], bar: Any) -> None:
    """Held-out loss after this step: added to ``progress.evals`` and the step's record, and reported
    (through the progress bar when there is one, so that the bar stays whole)."""
    a, step = run.a, progress.step
    ev = evaluate(run.model, run.heldout, run.eval_batch, run.device)
    progress.evals.append((step, ev))
    rec["eval_loss"] = ev
    rec["eval_ppl"] = math.exp(ev) if ev < 700 else float("inf")
    msg = f"{a.label or a.optimizer} step {step}: loss {rec['loss']:.4f}, held-out loss {ev:.4f}, perplexity {rec['eval_ppl']:.2f}"
    if bar is not None:
        bar.write(msg)
    else:
        run.say(msg)


# ----------------------------------------------------------------- the report
def _result(run: _Run, progress: _Progress) -> RunResult:
    """What the run measured; evaluates once more if this invocation did not (it resumed at the end,
    or stopped before any evaluation)."""
    a = run.a
    evals = progress.evals
    if not evals:
        evals.append((progress.step, evaluate(run.model, run.heldout, run.eval_batch, run.device)))
    peak, _ = _memory_now(run.device)
    train_seconds = progress.train_seconds
    return RunResult(
        label=a.label or a.optimizer, optimizer=a.optimizer, settings=run.settings, steps=progress.step,
        curve=progress.curve, evals=evals, final_eval_loss=evals[-1][1],
        tokens_per_s=progress.trained_tokens / train_seconds if train_seconds > 0 else float("nan"),
        state_bytes=state_bytes(run.opt), peak_memory=peak, train_seconds=train_seconds,
        out=str(run.out) if run.out is not None else None,
    )


__all__ = ["DTYPES", "RunResult", "TrainArgs", "build_model", "evaluate", "lm_loss", "pretrain", "process_group", "schedule",
           "shard_model"]
