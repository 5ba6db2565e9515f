"""Shared pieces of the benchmarks: models, adapter variants on one quantized base, and measurement.

Every variant of a case starts from a deep copy of the *same* quantized model, so
qmiss and PEFT adapt identical 4-bit/8-bit weights. Steps of the variants run
interleaved (one step of each in turn) so that drift of a shared, noisy machine
falls on all of them alike, and figures are reported as ratios.
"""

from __future__ import annotations

import copy
import ctypes
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import qmiss
from qmiss import quant
from qmiss.memory import measure_peak

LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MB = 2**20


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 compute when there is a GPU; the CPU with fp32 (bf16 matmuls are slow there)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def machine_line() -> str:
    """Where a benchmark ran: device, its name, threads and compute dtype."""
    device, dtype = device_and_dtype()
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:  # which of torch's CPU kernels run here (AVX2, AVX512): machines differ
        name = f"{platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()} kernels"
    return f"device {device} ({name}, {torch.get_num_threads()} threads), compute {dtype}"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks write PNGs, never open windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class DecoderLayerModel(nn.Module):
    """One Llama decoder layer (plus its rotary embedding), fed hidden states directly."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return self.layer(hidden, position_embeddings=self.rotary(hidden, positions))


def llama2_7b_config(num_hidden_layers: int = 1):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=num_hidden_layers, vocab_size=32000, max_position_embeddings=4096,
                       attn_implementation="sdpa")


def quantize_targets(model: nn.Module, bits: int, compute_dtype: torch.dtype) -> nn.Module:
    """Replace every decoder linear by its bitsandbytes version (nf4 + double quant, or int8), in place."""
    for name, module in list(model.named_modules()):
        if name.split(".")[-1] in LINEAR_NAMES and type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            layer = quant.quantize_linear(module, bits, compute_dtype=compute_dtype)
            # every variant, PEFT's too, keeps the canonical 4-bit layout: bitsandbytes' CPU repacking on an
            # eval-mode forward would route later training through a kernel without autograd
            quant.prepare_for_adapter(layer)
            setattr(model.get_submodule(parent), child, layer)
    return model.requires_grad_(False)


@dataclass
class Case:
    """A quantized model and a batch maker; ``loss(model, batch)`` is what a step minimises."""

    name: str
    model: nn.Module
    make_batch: Callable[[int, int], dict]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    shapes: list[tuple[int, int]] = field(default_factory=lambda: [(1, 256), (2, 512)])


def layer7b_case(bits: int) -> Case:
    """One decoder layer of Llama-2-7B's shape (hidden 4096, intermediate 11008, 32 heads), random weights."""
    device, dtype = device_and_dtype()
    torch.manual_seed(0)
    model = DecoderLayerModel(llama2_7b_config()).to(dtype)
    model = quantize_targets(model, bits, dtype).to(device)

    def make_batch(batch: int, seq: int) -> dict:
        gen = torch.Generator().manual_seed(batch * 10_000 + seq)
        hidden = torch.randn(batch, seq, 4096, generator=gen).to(device, dtype)
        return {"hidden": hidden.requires_grad_()}  # a mid-stack layer also computes dL/dx

    return Case("Llama-2-7B decoder layer", model, make_batch, lambda m, b: m(b["hidden"]).float().pow(2).mean())


def llama7b_two_layer_case(bits: int) -> Case:
    """A whole causal LM of Llama-2-7B's shapes cut to 2 decoder layers (embeddings, head, vocab 32000)."""
    from transformers import AutoModelForCausalLM

    device, dtype = device_and_dtype()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama2_7b_config(num_hidden_layers=2), dtype=dtype)
    model = quantize_targets(model, bits, dtype).to(device)
    model.enable_input_require_grads()

    def make_batch(batch: int, seq: int) -> dict:
        gen = torch.Generator().manual_seed(batch * 10_000 + seq)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device)
        return {"input_ids": ids, "labels": ids}

    return Case("Llama-2-7B shape, 2 decoder layers", model, make_batch, lambda m, b: m(**b).loss)


def smollm2_case(bits: int) -> Case:
    """SmolLM2-135M-Instruct (30 layers, real weights), its decoder linears quantized."""
    from transformers import AutoModelForCausalLM

    from qmiss.smollm import smollm2_path

    device, dtype = device_and_dtype()
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype)
    model = quantize_targets(model, bits, dtype).to(device)
    model.enable_input_require_grads()  # as QLoRA's k-bit preparation does, for every variant alike

    def make_batch(batch: int, seq: int) -> dict:
        gen = torch.Generator().manual_seed(batch * 10_000 + seq)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device)
        return {"input_ids": ids, "labels": ids}

    return Case("SmolLM2-135M-Instruct", model, make_batch, lambda m, b: m(**b).loss)


def qmiss_variant(mode: str, r: int = 64, mini_r: int = 64) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        _, dtype = device_and_dtype()
        return qmiss.prepare_qmiss(model, r=r, mode=mode, mini_r=mini_r if mode == "mini" else None,
                                   target_modules=LINEAR_NAMES, compute_dtype=dtype)

    return build


def peft_miss_variant(mode: str, r: int = 64, mini_r: int = 64) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        from peft import MissConfig, inject_adapter_in_model

        init = {"default": True, "mini": "mini", "bat": "bat"}[mode]
        return inject_adapter_in_model(MissConfig(r=r, init_weights=init, mini_r=mini_r, target_modules=LINEAR_NAMES),
                                       model)

    return build


def peft_lora_variant(r: int = 64, alpha: int = 16) -> Callable[[nn.Module], nn.Module]:
    """QLoRA's recipe: LoRA r=64 on every decoder linear of the 4-bit base."""

    def build(model: nn.Module) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        return inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                  target_modules=LINEAR_NAMES), model)

    return build


def _status_mb(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024


def step_rss_mb(step: Callable[[], None]) -> float:
    """Process RSS growth over one call: peak (VmHWM, reset just before) minus RSS before, in MiB (Linux)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so the step's growth is visible
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _status_mb("VmRSS")
    step()
    return _status_mb("VmHWM") - before


@dataclass
class Result:
    variant: str
    trainable: int
    times: list[float] = field(default_factory=list)
    saved_bytes: int = 0
    peak_bytes: int = 0
    rss_mb: float = float("nan")

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


def timed(fn: Callable[[], None]) -> float:
    """Seconds ``fn()`` takes, waiting for the GPU's queue to drain when there is one."""
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if on_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def variants(*names: str) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """The named adapter variants, e.g. variants("qmiss bat", "PEFT LoRA r=64"), in the order given."""
    every = {
        "qmiss default": qmiss_variant("default"),
        "qmiss mini": qmiss_variant("mini"),
        "qmiss bat": qmiss_variant("bat"),
        "qmiss bat_row": qmiss_variant("bat_row"),
        "PEFT MiSS default": peft_miss_variant("default"),
        "PEFT MiSS mini": peft_miss_variant("mini"),
        "PEFT MiSS bat": peft_miss_variant("bat"),
        "PEFT LoRA r=64": peft_lora_variant(),
    }
    return {name: every[name] for name in names}


def run_case(case: Case, variants: dict[str, Callable], batch: int, seq: int, warmup: int = 2, steps: int = 5,
             lr: float = 1e-4) -> list[Result]:
    """Median step time (forward + backward + AdamW), saved-for-backward bytes, live peak and RSS growth."""
    device, _ = device_and_dtype()
    runners, results = [], []
    for name, build in variants.items():
        model = build(copy.deepcopy(case.model))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        data = case.make_batch(batch, seq)

        def step(model=model, optimizer=optimizer, data=data) -> None:
            case.loss(model, data).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        runners.append((step, model))
        results.append(Result(name, sum(p.numel() for p in params)))

    pairs = list(zip(runners, results))
    for i in range(warmup + steps):  # interleaved: one step of every variant per round,
        for (step, _), result in pairs[i % len(pairs):] + pairs[:i % len(pairs)]:  # who goes first rotates
            elapsed = timed(step)
            if i >= warmup:
                result.times.append(elapsed)
    for (step, model), result in zip(runners, results):
        report = measure_peak(step, exclude=model.parameters())  # parameters exist with or without backward
        result.saved_bytes, result.peak_bytes = report.saved_bytes, report.peak_bytes
        result.rss_mb = step_rss_mb(step)
    return results


def table(results: list[Result], reference: str, title: str) -> str:
    """A markdown table with ratios against the ``reference`` variant and against each other's."""
    ref = next(r for r in results if r.variant == reference)
    lines = [f"**{title}**", "",
             f"| variant | trainable | step s (median) | × {reference} | saved for backward MB | live peak MB | RSS growth MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.variant} | {r.trainable:,d} | {r.median_s:.3f} | {r.median_s / ref.median_s:.2f} | "
                     f"{r.saved_bytes / MB:.1f} | {r.peak_bytes / MB:.1f} | {r.rss_mb:.0f} |")
    return "\n".join(lines)


#: the packages whose versions a benchmark's figures depend on (constraints.txt pins them).
PACKAGES = ("torch", "transformers", "bitsandbytes", "accelerate", "datasets", "peft", "trl")


def versions_line() -> str:
    """"Packages: torch 2.13.0+cpu, transformers 5.25.0, ...": what made the figures (absent ones are skipped)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return f"Packages: {', '.join(found)}; Python {platform.python_version()}."


class Report:
    """Prints each part as it is measured and rewrites the markdown file after each (atomically). The first part
    (a benchmark's title and command) is followed by :func:`versions_line`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        print(text, flush=True)
        self.parts.append(text)
        if len(self.parts) == 1:
            self.parts.append(versions_line() + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("\n".join(self.parts) + "\n")
        os.replace(tmp, self.path)
