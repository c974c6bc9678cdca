"""Shared fixtures: a tiny LLaMA-shaped model, deterministic gradients, and a training helper."""

from __future__ import annotations

import importlib.util
import io
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before the kernels
# are defined, so here, before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from torch import nn

import lowrank_optim as lro


class TinyLM(nn.Module):
    """Embedding, two blocks of (norm, attention-like and MLP linears), a final norm and a head."""

    def __init__(self, vocab: int = 40, dim: int = 32, hidden: int = 48, blocks: int = 2, bias: bool = True):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList()
        for _ in range(blocks):
            block = nn.Module()
            block.norm = nn.LayerNorm(dim)
            block.q_proj = nn.Linear(dim, dim, bias=False)
            block.up_proj = nn.Linear(dim, hidden, bias=bias)
            block.down_proj = nn.Linear(hidden, dim, bias=False)
            self.layers.append(block)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for b in self.layers:
            h = b.norm(x)
            x = x + torch.tanh(b.q_proj(h)) + b.down_proj(torch.nn.functional.gelu(b.up_proj(h)))
        return self.lm_head(self.norm(x))


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kw).to(dtype)


def batches(n: int, seed: int = 1, vocab: int = 40, batch: int = 4, seq: int = 12) -> list[torch.Tensor]:
    """Learnable sequences: each token follows from the last by a fixed rule, with 10% noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for i in range(seq):
            nxt = (7 * tokens[:, i] + 3) % vocab
            noise = torch.rand(batch, generator=g) < 0.1
            tokens[:, i + 1] = torch.where(noise, torch.randint(0, vocab, (batch,), generator=g), nxt)
        out.append(tokens)
    return out


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor], sched=None) -> list[float]:
    losses = []
    for tokens in data:
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, tokens)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def roundtrip(obj) -> object:
    """torch.save then torch.load(weights_only=True), as a checkpoint on disk would go."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def train_and_resume(build, data: list[torch.Tensor], split: int, make=None):
    """The resume check: ``build(model) -> optimizer`` trains a fresh model on ``data[:split]``, is checkpointed
    (through :func:`roundtrip`) and trains on; a twin model of another seed loads the checkpoint, gets a new
    optimizer from ``build`` that loads its state, and trains on ``data[split:]`` too. Returns
    (model, opt, twin, twin_opt): bit-identical resume means the two models' parameters are equal.
    ``make(seed=...)`` builds the models (default :func:`make_model`)."""
    make = make or make_model
    model = make()
    opt = build(model)
    train(model, opt, data[:split])
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, data[split:])
    twin = make(seed=9)
    twin.load_state_dict(ckpt["model"])
    twin_opt = build(twin)
    twin_opt.load_state_dict(ckpt["opt"])
    train(twin, twin_opt, data[split:])
    return model, opt, twin, twin_opt


def assert_same_parameters(model: nn.Module, twin: nn.Module) -> None:
    """Bit-for-bit equal parameters (a resumed run against the uninterrupted one), naming the first that differs."""
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name


def same(a, b) -> bool:
    """Bit-for-bit equality of nested state (tensors by dtype, shape and value; NaN floats equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def ista_module(name: str, **stand_ins: types.ModuleType) -> types.ModuleType:
    """``ista_daslab_optimizers.<name>`` imported without the package's ``__init__`` (it imports wandb and
    the package's CUDA-only optimizers; DCTAdamW and Trion themselves are torch only and run on CPU), with
    ``stand_ins`` for modules the imported one names but the tests never use. Skips, with the reason, when
    the package (installed by .ci/run with --no-deps) is missing or the module does not import."""
    spec = importlib.util.find_spec("ista_daslab_optimizers")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ista-daslab-optimizers is not installed (pip install --no-deps ista-daslab-optimizers)")
    package = types.ModuleType("ista_daslab_optimizers")
    package.__path__ = list(spec.submodule_search_locations)
    stand_ins = {"ista_daslab_optimizers": package, **stand_ins}
    saved = {k: sys.modules.get(k) for k in stand_ins}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module(f"ista_daslab_optimizers.{name}")
    except ImportError as err:
        pytest.skip(f"ista_daslab_optimizers.{name} does not import: {err}")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def decaying_matrix(m: int, n: int, seed: int = 0, decay: float = 0.7, dtype=torch.float64) -> torch.Tensor:
    """A random m×n matrix whose singular values fall geometrically (distinct, well separated)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(k, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype)



def projector_keys(name: str, head_dim: int = 8) -> dict:
    """The group keys a registry-wide test gives projector ``name``: the name, and ``head_dim`` for one that
    splits attention heads (``shared_head``: by default the test model's head axes, 16, 24 and 32, split into
    8-wide heads)."""
    cls = lro.projectors.REGISTRY[name]
    return {"projector": name, **({"head_dim": head_dim} if getattr(cls, "splits_heads", False) else {})}


# Every preset with its defaults, and GaLore with every other projector: (id, class, group keys).
PRESET_CASES = [
    ("galore", lro.GaLoreAdamW, {}),
    ("apollo", lro.APOLLO, {}),
    ("apollo_mini", lro.APOLLOMini, {"rank": 1}),
    ("frugal", lro.FRUGAL, {}),
    ("fira", lro.Fira, {}),
] + [(f"galore-{p}", lro.GaLoreAdamW, {"projector": p}) for p in ("rsvd", "dct", "random", "sparse", "online_pca")] + [
    # quantized storage; min_8bit_size=0 so the tiny test model's moments are INT8 too
    ("galore8bit", lro.GaLoreAdamW8bit, {"min_8bit_size": 0}),
    ("qgalore", lro.QGaLoreAdamW, {"min_8bit_size": 0}),
    ("apollo-8bit", lro.APOLLO, {"state_bits": 8, "min_8bit_size": 0}),
    ("frugal-8bit-rsvd4", lro.FRUGAL, {"state_bits": 8, "min_8bit_size": 0, "projector": "rsvd", "proj_bits": 4}),
    ("galore-8bit-rotate", lro.GaLoreAdamW, {"state_bits": 8, "min_8bit_size": 0, "on_refresh": "rotate"}),
    # inner rules beyond Adam
    ("galore_adafactor", lro.GaLoreAdafactor, {}),
    ("adafactor-momentum-rotate", lro.GaLoreAdafactor, {"momentum": 0.9, "on_refresh": "rotate"}),
    ("sumo", lro.SUMO, {}),
    ("sumo-newton-schulz", lro.SUMO, {"orthogonalize": "newton_schulz", "nesterov": True}),
    ("apollo-adafactor", lro.APOLLO, {"rule": "adafactor"}),
    # COAP with its re-SVD every second refresh (so short runs see both kinds), GWT with its defaults
    ("coap", lro.COAP, {"projector_options": {"reproject_factor": 2}}),
    ("coap-8bit", lro.COAP, {"state_bits": 8, "min_8bit_size": 0, "projector_options": {"reproject_factor": 2}}),
    ("gwt", lro.GWT, {}),
    # Grass: rows drawn ∝ norm² with replacement (repeated indices, ρ), moments reset at each draw
    ("grass", lro.Grass, {}),
    # Online Subspace Descent: AdamW on P (its default), and the 8-bit recipe (INT8 moments for the weights)
    ("osd", lro.OnlineSubspaceDescent, {}),
    ("osd-8bit-lion", lro.OnlineSubspaceDescent, {"state_bits": 8, "min_8bit_size": 0,
                                                  "projector_options": {"pca_optimizer": "lion"}}),
    # DCT-AdamW: the official basis, a refresh every step, error feedback (float32, and an 8-bit buffer)
    ("dct_adamw", lro.DCTAdamW, {}),
    ("dct_adamw-ef8-rotate", lro.DCTAdamW, {"ef_bits": 8, "on_refresh": "rotate", "min_8bit_size": 0}),
    # Trion: DCT columns of the momentum, error feedback on the momentum, Newton-Schulz
    ("trion", lro.Trion, {}),
]


# ---------------------------------------------------------------- the training CLI under torchrun
ROOT = Path(__file__).resolve().parent.parent
#: A 4-step llama_tiny run of `lowrank-optim pretrain` small enough for 2 CPU processes.
TRAIN_FLAGS = ["--config", str(ROOT / "configs" / "llama_tiny.json"), "--seq-len", "32", "--eval-tokens", "256",
               "--no-progress", "--optimizer", "galore", "--lr", "0.01", "--update-proj-gap", "2", "--grad-accum", "2",
               "--max-steps", "4", "--eval-every", "2", "--device", "cpu"]


def torchrun(tmp_path: Path, worker: str, *args: str) -> subprocess.CompletedProcess:
    """Run the script ``worker`` under ``torchrun`` with 2 CPU processes, in ``tmp_path``, with this
    checkout first on the path; returns the finished process (stdout and stderr captured)."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def spawn_two(worker, args: tuple, results: list[Path]) -> None:
    """``mp.spawn`` of ``worker(rank, *args)`` on two ranks, tolerating only a rank's abort in gloo's teardown:
    seen in CI ("terminate called without an active exception", SIGABRT) after every collective had run.
    ``results`` are the files the ranks write once their work is complete (before the final barrier); with
    all of them present the work is done and the caller checks it in full; without them the failure is the
    test's, and so is any other exit."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        mp.spawn(worker, args=(2, *args), nprocs=2, join=True)
    except mp.ProcessExitedException as err:
        if err.signal_name != "SIGABRT" or not all(path.exists() for path in results):
            raise
