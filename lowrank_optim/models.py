"""LLaMA parameter skeletons from a Hugging Face LlamaConfig, without transformers.

``llama_skeleton(config)`` builds an ``nn.Module`` whose parameters have the names and shapes of
``transformers.LlamaForCausalLM`` (``model.embed_tokens``, ``model.layers.{i}.self_attn.q_proj``,
..., ``lm_head``), typically on the meta device: enough for ``lro.param_groups`` and for measuring
optimizer state, with no forward pass. A test checks it against transformers' own model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def load_config(config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A LlamaConfig as a dict, from a JSON file path or a dict (or a transformers config)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {str(path)!r} (give a LlamaConfig JSON, e.g. configs/llama_7b.json)")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise TypeError(f"expected a config path or dict, got {type(config).__name__}")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"the config lacks {', '.join(missing)}: it is not a LlamaConfig")
    return config


class _Norm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))


def llama_skeleton(config: str | Path | dict[str, Any], *, device: str | torch.device = "meta",
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """An ``nn.Module`` with LlamaForCausalLM's parameter names and shapes (no forward)."""
    cfg = load_config(config)
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = h * cfg.get("num_key_value_heads", heads) // heads
    with torch.device(device):
        root = nn.Module()
        model = nn.Module()
        model.embed_tokens = nn.Embedding(vocab, h, dtype=dtype)
        model.layers = nn.ModuleList()
        for _ in range(cfg["num_hidden_layers"]):
            layer = nn.Module()
            attn = nn.Module()
            attn.q_proj = nn.Linear(h, h, bias=False, dtype=dtype)
            attn.k_proj = nn.Linear(h, kv, bias=False, dtype=dtype)
            attn.v_proj = nn.Linear(h, kv, bias=False, dtype=dtype)
            attn.o_proj = nn.Linear(h, h, bias=False, dtype=dtype)
            mlp = nn.Module()
            mlp.gate_proj = nn.Linear(h, inter, bias=False, dtype=dtype)
            mlp.up_proj = nn.Linear(h, inter, bias=False, dtype=dtype)
            mlp.down_proj = nn.Linear(inter, h, bias=False, dtype=dtype)
            layer.self_attn, layer.mlp = attn, mlp
            layer.input_layernorm = _Norm(h).to(dtype)
            layer.post_attention_layernorm = _Norm(h).to(dtype)
            model.layers.append(layer)
        model.norm = _Norm(h).to(dtype)
        root.model = model
        if cfg.get("tie_word_embeddings", False):
            root.lm_head = nn.Linear(h, vocab, bias=False, dtype=dtype)
            root.lm_head.weight = model.embed_tokens.weight
        else:
            root.lm_head = nn.Linear(h, vocab, bias=False, dtype=dtype)
    root.config = cfg  # as a model's config: the head width (shared_head) and width-dependent defaults read it
    return root
