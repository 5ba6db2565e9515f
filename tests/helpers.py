"""Helpers the tests share: tiny models built from a config (no download), quantized linears, references
written straight from DESIGN.md's formulas, and qmiss-train's arguments. Fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import socket
import urllib.request

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import qmiss
from qmiss import MissLinear, demo, quant

#: the MiSS modes: PEFT's three and qmiss's bat_row.
MODES = ["default", "mini", "bat", "bat_row"]
#: the modes whose adapter is folded into the weight (r×r blocks): a layer's whole output is the reference's.
BLOCK_MODES = ("bat", "bat_row")


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
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(**overrides):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).float().eval()


def load(path: str, bits: int | None):
    """The saved tiny model, loaded through transformers' BitsAndBytesConfig (4/8-bit) or in fp32."""
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


def ref_shard_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % r
    xp = F.pad(x, (0, pad))
    return sum(xp[..., j * r:(j + 1) * r] for j in range(xp.shape[-1] // r))


def ref_bat_delta(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """ΔW_ij = W_ij @ B_i + B_i, one r×r block at a time."""
    r = block.shape[-1]
    delta = torch.empty_like(weight)
    for i in range(weight.shape[0] // r):
        for j in range(weight.shape[1] // r):
            w_ij = weight[i * r:(i + 1) * r, j * r:(j + 1) * r]
            delta[i * r:(i + 1) * r, j * r:(j + 1) * r] = w_ij @ block[i] + block[i]
    return delta


def ref_bat_row_delta(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """ΔW_ij = W_ij @ B_j + B_j, one r×r block at a time (bat_row: B_j per input column-block j)."""
    r = block.shape[-1]
    delta = torch.empty_like(weight)
    for i in range(weight.shape[0] // r):
        for j in range(weight.shape[1] // r):
            w_ij = weight[i * r:(i + 1) * r, j * r:(j + 1) * r]
            delta[i * r:(i + 1) * r, j * r:(j + 1) * r] = w_ij @ block[j] + block[j]
    return delta


def ref_block_delta(mode: str, weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """bat's or bat_row's ΔW, written out block by block."""
    return ref_bat_delta(weight, block) if mode == "bat" else ref_bat_row_delta(weight, block)


def randomize(layer: MissLinear, scale: float = 0.05) -> torch.Tensor:
    with torch.no_grad():
        layer.miss_block.copy_(torch.randn_like(layer.miss_block) * scale)
    return layer.miss_block.detach().clone()


def reference(layer: MissLinear, x: torch.Tensor, block: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 reference: the adapter term (default/mini) or the whole output (bat, bat_row); autograd-able in ``block``."""
    block = layer.miss_block.detach() if block is None else block
    if layer.mode in BLOCK_MODES:
        weight = quant.dequantize(layer.base_layer)
        bias = layer.bias if layer.bias is not None else 0
        return x @ (weight + ref_block_delta(layer.mode, weight, block)).t() + bias
    if layer.mode == "mini":
        block = torch.cat([block] * (layer.out_features // block.shape[1]), dim=1)
    return ref_shard_sum(x, layer.r) @ block


def write_pairs(path, n: int = 20, seed: int = 3) -> str:
    """``n`` of the demo's arithmetic problems as ``question``/``answer`` JSON lines at ``path``."""
    rows = demo.arithmetic_problems(n, seed=seed)
    path.write_text("".join(json.dumps({"question": r["query"], "answer": r["response"]}) + "\n" for r in rows))
    return str(path)


def train_args(model_dir: str, data: str, out, *extra: str) -> list[str]:
    return ["--base_model_name_or_path", model_dir, "--data_path", data, "--dataset_field", "question", "answer",
            "--output_dir", str(out), "--miss_r", "16", "--bits", "4", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--report_to", "none", "--logging_steps", "1", "--use_cpu", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_moe(model_type: str, seed: int = 0, experts: int = 4, moe_intermediate_size: int = 32, **overrides):
    """A tiny mixture-of-experts causal LM of ``model_type`` (Mixtral, Qwen2-MoE, PhiMoE, gpt-oss …): 2 layers,
    ``experts`` experts (2 per token), hidden 64 unless ``overrides`` say otherwise (Mixtral, PhiMoE and gpt-oss
    size their experts by ``intermediate_size``, the others by ``moe_intermediate_size``)."""
    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    config = AutoConfig.for_model(model_type, **{**sizes, **overrides})
    for name, value in (("moe_intermediate_size", moe_intermediate_size), ("shared_expert_intermediate_size", 32),
                        ("num_local_experts", experts), ("num_experts", experts), ("num_experts_per_tok", 2),
                        ("n_routed_experts", experts), ("n_group", 1), ("topk_group", 1), ("first_k_dense_replace", 0),
                        ("qk_rope_head_dim", 16), ("qk_nope_head_dim", 16), ("v_head_dim", 16),
                        ("kv_lora_rank", 32), ("q_lora_rank", 32)):
        if hasattr(config, name):
            setattr(config, name, value)
    if hasattr(config, "kv_lora_rank"):  # multi-head latent attention (DeepSeek) has as many kv heads as heads
        config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def index_unreachable() -> str | None:
    """Why pip's package index cannot be reached (a reason to skip a test that downloads), or None."""
    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/") + "/dill/"
    try:
        urllib.request.urlopen(url, timeout=15).close()
    except OSError as exc:
        return f"the package index is unreachable ({url}: {exc})"
    return None
