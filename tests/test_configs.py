"""configs/: the GaLore paper's LLaMA sizes as Hugging Face LlamaConfig JSONs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
transformers = pytest.importorskip("transformers", reason="transformers is not installed (the dev or train extra)")

# parameter counts of the paper's models (embedding and head untied)
EXPECTED = {
    "llama_tiny": (0.5e6, 2e6),
    "llama_60m": (55e6, 60e6),
    "llama_130m": (130e6, 136e6),
    "llama_350m": (365e6, 370e6),
    "llama_1b": (1.33e9, 1.35e9),
    "llama_7b": (6.7e9, 6.8e9),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_builds_a_llama_of_the_paper_size(name):
    cfg = transformers.LlamaConfig.from_json_file(str(ROOT / "configs" / f"{name}.json"))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    lo, hi = EXPECTED[name]
    assert lo <= n <= hi, n
    if name == "llama_60m":  # the benchmark's shapes are the model's shapes
        # loaded from its file, not through sys.path: bench/ on the path would shadow tests/conftest.py for
        # every process a later test spawns (they unpickle their workers' `from conftest import ...`)
        spec = importlib.util.spec_from_file_location("bench_shapes", ROOT / "bench" / "shapes.py")
        shapes = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shapes)

        assert shapes.llama_shapes(name) == [(k, tuple(p.shape)) for k, p in model.named_parameters()]


def test_tiny_config_is_byte_level():
    cfg = json.loads((ROOT / "configs" / "llama_tiny.json").read_text())
    assert cfg["vocab_size"] >= 256 + 3 and {cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]} == {256, 257, 258}
