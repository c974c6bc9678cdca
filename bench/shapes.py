"""Parameter shapes of the LLaMA models in the GaLore paper (Hugging Face LlamaForCausalLM names)."""

from __future__ import annotations

import torch

LLAMA = {
    # name: (hidden, intermediate, layers, vocab)
    "llama_60m": (512, 1376, 8, 32000),
    "llama_130m": (768, 2048, 12, 32000),
    "llama_350m": (1024, 2736, 24, 32000),
    "llama_1b": (2048, 5461, 24, 32000),
}


def llama_shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter, layers, vocab = LLAMA[name]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append((f"{pre}.self_attn.{proj}.weight", (hidden, hidden)))
        shapes.append((f"{pre}.mlp.gate_proj.weight", (inter, hidden)))
        shapes.append((f"{pre}.mlp.up_proj.weight", (inter, hidden)))
        shapes.append((f"{pre}.mlp.down_proj.weight", (hidden, inter)))
        shapes.append((f"{pre}.input_layernorm.weight", (hidden,)))
        shapes.append((f"{pre}.post_attention_layernorm.weight", (hidden,)))
    shapes.append(("model.norm.weight", (hidden,)))
    shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def make_params(name: str, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(name, parameter) pairs with random weights and gradients, and the names that GaLore projects."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for pname, shape in llama_shapes(name):
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device=device, dtype=dtype)
        params.append((pname, p))
    projected = {n for n, s in llama_shapes(name) if ("self_attn" in n or "mlp" in n) and len(s) == 2}
    return params, projected
