"""Parameter shapes of the LLaMA models in configs/ (Hugging Face LlamaForCausalLM names),
without building a model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def llama_shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = hidden * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        shapes += [
            (f"{pre}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{pre}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{pre}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{pre}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{pre}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{pre}.mlp.up_proj.weight", (inter, hidden)),
            (f"{pre}.mlp.down_proj.weight", (hidden, inter)),
            (f"{pre}.input_layernorm.weight", (hidden,)),
            (f"{pre}.post_attention_layernorm.weight", (hidden,)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    if not cfg.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def make_params(name: str, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(name, parameter) pairs with random weights and gradients, and the names GaLore projects."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for pname, shape in llama_shapes(name):
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device=device, dtype=dtype)
        params.append((pname, p))
    return params, projected_names(name)


def projected_names(name: str) -> set[str]:
    """The names of the weights GaLore projects: the attention and MLP matrices."""
    return {n for n, s in llama_shapes(name) if ("self_attn" in n or "mlp" in n) and len(s) == 2}


def real_gradients(name: str, seed: int = 0, batch: int = 8, seq: int = 128) -> dict[str, torch.Tensor] | None:
    """The gradients of one backward pass of ``LlamaForCausalLM(configs/<name>.json)`` at initialization on
    the offline corpus (Python's standard library as bytes, ``lowrank_optim.train.data``), by parameter
    name, or None without transformers. A real network's gradients have steep spectra (the r-th squared
    singular value 3e-9 to 4e-6 of the first at LLaMA-60M's r = 128 here), which Gaussian ones (flat) are not."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    from lowrank_optim.train.data import stdlib_corpus
    from lowrank_optim.train.loop import build_model, lm_loss

    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    model = build_model(cfg, seed, torch.float32, torch.device("cpu"))
    lm_loss(model, stdlib_corpus().sequences(seq, seed).get(0, batch)).backward()
    return {n: p.grad for n, p in model.named_parameters()}
