"""How much GPU memory a qmiss fine-tune needs, before any weight is loaded.

:func:`plan_memory` builds the model on the meta device (accelerate's
``init_empty_weights``: shapes, no storage), picks the layers ``prepare_qmiss``
would adapt, and adds up what a training step holds at its worst moment:

- static: the packed 4/8-bit weights and their quantization state, the parts left
  unquantized (embeddings, norms and head, in the dtypes ``prepare_qmiss`` leaves
  them), the fp32 adapters and the optimizer states;
- transient: the adapter gradients and the larger of two peaks of a step: the
  loss's backward (the logits' log-softmax and two logits-sized gradients, on top of
  every saved activation) and a decoder layer's backward (with checkpointing: the
  saved layer inputs, one recomputed layer and its gradients; bat: plus its
  dequantized weight chunks).

The activation counts follow transformers' Llama-family decoder layer (RMSNorm,
rotary attention through SDPA, gated MLP), which Llama, Mistral, Qwen2 and SmolLM
share; they are checked against :func:`qmiss.measure_peak` in the tests.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from qmiss.config import QMissConfig
from qmiss.inputs import InputError, spelled
from qmiss.loss import chunk_bytes_per_token, chunk_tokens
from qmiss.model import check_targets, output_head
from qmiss.offload import check_host_embeddings
from qmiss.ops import chunk_rows
from qmiss.sources import load_hf_config, meta_model

GiB = 2**30
MiB = 2**20

#: bytes per trainable value held by each optimizer (beyond the fp32 weight and gradient).
OPTIMIZERS = {
    "adamw": 8.0,  # two fp32 moments (torch AdamW)
    "adamw_torch": 8.0,
    "adamw_8bit": 2.0 + 8 / 256,  # bitsandbytes: two uint8 moments + one fp32 absmax per 256 values each
    "paged_adamw_8bit": 2.0 + 8 / 256,  # the same bytes; paged to the host only under memory pressure
    "paged_adamw": 8.0,
    "sgd": 0.0,
}
#: bitsandbytes' 8-bit optimizers keep tensors smaller than this in fp32.
BNB_MIN_8BIT_SIZE = 4096
#: common cards. GPU memory is binary: an "8 GB" card has 8 GiB (8192 MiB, what nvidia-smi shows).
CARDS_GIB = (6, 8, 12, 16, 24, 48, 80)
#: allowance for what the CUDA context and kernels take before any tensor (typical, bf16 kernels loaded).
CUDA_CONTEXT_BYTES = 600 * MiB


@dataclass
class MemoryPlan:
    """A planned training step. Every figure is bytes; ``items`` maps each part to its bytes."""

    model: str
    settings: dict
    items: dict[str, int]
    static_bytes: int
    peak_bytes: int
    peak_phase: str
    trainable_parameters: int
    notes: list[str] = field(default_factory=list)

    def fits(self, gpu_gib: float, context_bytes: int = CUDA_CONTEXT_BYTES) -> bool:
        """Whether the peak plus the CUDA context fits a card of ``gpu_gib`` GiB (an "8 GB" card has 8 GiB)."""
        return self.peak_bytes + context_bytes <= gpu_gib * GiB

    def cards(self, context_bytes: int = CUDA_CONTEXT_BYTES) -> dict[int, bool]:
        """Whether the step fits each of :data:`CARDS_GIB` (GiB), the CUDA context counted."""
        return {gib: self.fits(gib, context_bytes) for gib in CARDS_GIB}

    def verdict(self, gpu_gib: float, context_bytes: int = CUDA_CONTEXT_BYTES) -> str:
        """One line: whether it fits a ``gpu_gib`` GiB card, and what it needs, in GiB."""
        need = self.peak_bytes + context_bytes
        return (f"fits a card of {gpu_gib:g} GiB: {'yes' if self.fits(gpu_gib, context_bytes) else 'no'} "
                f"({need / GiB:.2f} GiB needed: peak {self.peak_bytes / GiB:.2f} GiB + CUDA context "
                f"{context_bytes / GiB:.2f} GiB; {gpu_gib * GiB / MiB:.0f} MiB on the card)")

    def table(self) -> str:
        """The breakdown as aligned text in GiB, ending with the card list."""
        width = max(len(k) for k in self.items) + 2
        lines = [f"qmiss memory plan: {self.model}",
                 "  " + ", ".join(f"{k}={v}" for k, v in self.settings.items()), ""]
        for key, value in self.items.items():
            lines.append(f"  {key:<{width}}{value / GiB:8.3f} GiB")
        lines += [f"  {'peak (' + self.peak_phase + ')':<{width}}{self.peak_bytes / GiB:8.3f} GiB", ""]
        lines.append(f"  cards in GiB (an \"8 GB\" card has 8 GiB; peak + {CUDA_CONTEXT_BYTES / GiB:.2f} GiB CUDA "
                     "context): " + "  ".join(f"{gib} {'yes' if ok else 'no'}" for gib, ok in self.cards().items()))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _quantized_bytes(n_in: int, n_out: int, bits: Optional[int], double_quant: bool, base_itemsize: int) -> int:
    """Bytes of one linear's weight as qmiss stores it (bitsandbytes' layouts, blocksize 64)."""
    values = n_in * n_out
    if bits == 4:
        blocks = math.ceil(values / 64)
        if double_quant:  # uint8 absmax per block, fp32 absmax per 256 of those, a 256-entry code, an offset
            return values // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4
        return values // 2 + 4 * blocks
    if bits == 8:
        return values + 4 * n_out  # int8 + one fp32 scale per row
    return values * base_itemsize


def _adapter_values(n_out: int, r: int, mode: str, mini_r: Optional[int]) -> int:
    """Values of one layer's adapter: (r, out) default, (r, mini_r) mini, (out/r, r, r) bat."""
    return {"default": r * n_out, "mini": r * (mini_r or 0), "bat": n_out * r}[mode]


def plan_memory(
    config,
    bits: Optional[int] = 4,
    r: int = 64,
    mode: str = "default",
    mini_r: Optional[int] = None,
    batch_size: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = True,
    optimizer: str = "paged_adamw_8bit",
    compute_dtype: torch.dtype = torch.bfloat16,
    base_dtype: Optional[torch.dtype] = None,
    target_modules: Union[str, list[str]] = "all-linear",
    exclude_modules: Optional[Union[str, list[str]]] = None,
    double_quant: bool = True,
    bat_chunk_bytes: int = 64 * MiB,
    fp32_norms: bool = False,
    chunked_loss: bool = False,
    loss_chunk_bytes: int = 64 * MiB,
    offload_activations: bool = False,
    embeddings_on_host: bool = False,
    packing: bool = False,
) -> MemoryPlan:
    """Plan the memory of one training step of a qmiss model, without loading weights.

    Args:
        config: a transformers config, a ``config.json`` path, a model folder, or a hub id.
        bits: 4, 8 or None (16-bit base).
        r, mode, mini_r, target_modules, exclude_modules, double_quant, bat_chunk_bytes:
            as in :func:`qmiss.prepare_qmiss`.
        batch_size, seq_len: tokens of one micro-batch.
        gradient_checkpointing: transformers' (non-reentrant) checkpointing per decoder layer.
        optimizer: one of :data:`OPTIMIZERS` (Trainer ``--optim`` names).
        compute_dtype: dtype of the base matmuls and adapter math (bf16 on GPUs).
        base_dtype: dtype the model is loaded in (embeddings, norms, head, the residual stream);
            default ``compute_dtype``.
        fp32_norms: as in :func:`qmiss.prepare_qmiss`: norms and head upcast to fp32, which also
            turns the residual stream fp32 after the first norm.
        chunked_loss, loss_chunk_bytes: as in :func:`qmiss.prepare_qmiss`: the loss holds one chunk
            of logits and gradient instead of three (tokens × vocabulary) fp32 tensors, and the head
            stays in the compute dtype.
        offload_activations: as in :func:`qmiss.prepare_qmiss`: what is saved outside the
            checkpointed layers waits in host memory; one layer's worth is back on the GPU at a time.
        embeddings_on_host: as in :func:`qmiss.prepare_qmiss`: the input embedding table is not on
            the GPU (refused for tied embeddings, as there).
        packing: the micro-batch is ``batch_size`` packed sequences of ``seq_len`` tokens (qmiss-train's
            default): with no attention mask given, transformers builds a (batch, 1, seq, seq) boolean
            block-diagonal mask for SDPA, alive through the step, and each layer's attention saves it as a
            float mask and keeps k and v repeated to every query head (FlashAttention's varlen path needs
            none of it; a padded batch that has padding pays the same).

    Returns:
        A :class:`MemoryPlan`.

    Raises:
        ValueError: bad settings (unknown optimizer, non-positive sizes, r that does not fit).
        FileNotFoundError: no config where ``config`` points.
    """
    if optimizer not in OPTIMIZERS:
        raise InputError(f"{spelled('optimizer')}={optimizer!r} is not one the planner knows; use one of "
                         f"{sorted(OPTIMIZERS)}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("r", r), ("loss_chunk_bytes", loss_chunk_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"{spelled(name)}={value!r} must be a positive integer")
    qconfig = QMissConfig(r=r, mode=mode, mini_r=mini_r, bits=bits, target_modules=target_modules,
                          exclude_modules=exclude_modules, double_quant=double_quant)  # validates mode, bits, mini_r
    bits = qconfig.bits  # 16 means None
    hf_config = load_hf_config(config, spelled("config"))
    base_dtype = base_dtype or compute_dtype
    model = meta_model(hf_config)
    targets = check_targets(model, qconfig)
    modules = dict(model.named_modules())

    e = torch.finfo(compute_dtype).bits // 8  # bytes per activation value
    e_base = torch.finfo(base_dtype).bits // 8
    items: dict[str, int] = {}

    # --- static: weights, adapters, optimizer -----------------------------------------------------------------
    target_params = {id(p) for n in targets for p in modules[n].parameters()}
    quantized = sum(_quantized_bytes(modules[n].in_features, modules[n].out_features, bits, double_quant, e_base)
                    for n in targets)
    biases = sum(modules[n].bias.numel() * e_base for n in targets if modules[n].bias is not None)
    label = {4: "4-bit weights + quant state", 8: "8-bit weights + row scales", None: "16-bit target weights"}[bits]
    items[label] = quantized + biases

    head = output_head(model)
    upcast = set()
    if bits is not None and fp32_norms:  # QLoRA's habit, on request: norms and the head in fp32
        upcast = {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(False)}
        if head is not None and not chunked_loss:  # the chunked loss keeps the head in the compute dtype
            upcast |= {id(p) for p in head.parameters()}
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    e_head = 4 if (head_ids & upcast) else e_base
    if chunked_loss and not tied and e < 4:  # prepare_qmiss casts an fp32 head to a 16-bit compute dtype
        e_head = min(e_head, e)
    seen, embed_head, norms, other = set(), 0, 0, 0
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in target_params or id(param) in seen:
            continue
        seen.add(id(param))
        size = param.numel() * (e_head if id(param) in head_ids else 4 if id(param) in upcast else e_base)
        if "norm" in name:
            norms += size
        elif param.dim() == 2 and hf_config.vocab_size in param.shape:
            embed_head += size
        else:
            other += size
    embed_host = 0
    if embeddings_on_host:
        table = check_host_embeddings(model).weight
        embed_host = table.numel() * e_base
        items["lm_head (input embeddings on the host)"] = embed_head - embed_host
    else:
        items["embeddings + lm_head" + (" (tied)" if tied else "")] = embed_head
    items["norms and other unquantized"] = norms + other

    adapter_sizes = [_adapter_values(modules[n].out_features, r, mode, mini_r) for n in targets]
    trainable = sum(adapter_sizes)
    items["adapters (fp32)"] = 4 * trainable
    per_value = OPTIMIZERS[optimizer]
    if "8bit" in optimizer:
        optim_bytes = sum(int(n * per_value) if n >= BNB_MIN_8BIT_SIZE else 8 * n for n in adapter_sizes)
    else:
        optim_bytes = int(trainable * per_value)
    items[f"optimizer states ({optimizer})"] = optim_bytes
    static = sum(items.values())

    # --- transient: gradients and activations ------------------------------------------------------------------
    tokens = batch_size * seq_len
    layers = _decoder_layers(model)
    n_layers = len(layers)
    hidden = hf_config.hidden_size
    n_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // n_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
    inter = getattr(hf_config, "intermediate_size", None) or 4 * hidden
    vocab = hf_config.vocab_size
    q_width, kv_width = n_heads * head_dim, n_kv * head_dim
    norm_e = 4 if bits is not None and fp32_norms else e_base  # upcast norms compute and return fp32
    e_stream = norm_e  # an fp32 norm returns fp32: every layer after the first then gets an fp32 residual stream
    e_act = max(e, e_stream)  # bitsandbytes returns its input's dtype, so an fp32 stream makes fp32 activations
    per_layer_targets = [n for n in targets if n.startswith(layers[0] + ".")] if layers else []

    # one decoder layer's saved activations (what autograd and bitsandbytes keep for backward)
    norms_saved = 2 * tokens * (hidden * 4 + 4)  # each RMSNorm keeps its input in fp32 and the inverse rms
    attention = tokens * e_act * (2 * q_width + 2 * kv_width) + 4 * batch_size * n_heads * seq_len  # q, k, v, out, lse
    if packing:
        # with a mask, SDPA saves it as a float mask of the compute dtype, and transformers repeats k and v to
        # every query head (it uses SDPA's own grouped-query path only without a mask; sdpa_attention.py)
        attention += batch_size * seq_len * seq_len * e_act + 2 * tokens * e_act * (q_width - kv_width)
    mlp = tokens * e_act * 3 * inter  # gate, up, act(gate)
    extra = 0
    if mode == "bat" or bits == 8:  # inputs kept: the norms' outputs (shared by their projections) and down's input
        extra = tokens * (2 * hidden * (4 if bits == 8 else e_act) + inter * e_act)
        if mode == "bat" and bits is not None and e != norm_e:  # each projection casts the fp32 norm output itself
            extra += tokens * hidden * e * 3
    if mode != "bat":
        extra += tokens * e * r * len(per_layer_targets)  # the shard sums Σ_j x_j each adapter keeps
    layer_acts = norms_saved + attention + mlp + extra
    layer_input = tokens * hidden * e_stream  # the residual stream, which checkpointing keeps per layer

    logits = tokens * vocab * 4  # the head runs in fp32 on the fp32 final norm; loss in fp32
    grads = 4 * trainable
    embed_out = tokens * hidden * (e_stream if tied else e_base)  # a tied, upcast head upcasts the embeddings too

    host = 0  # bytes waiting in host memory (offload_activations)
    if gradient_checkpointing:
        saved = n_layers * layer_input + embed_out
        if offload_activations:  # the layer inputs wait on the host; backward brings back one at a time
            host, saved = saved, 0
            items["activations: one checkpointed layer input (the rest on the host)"] = layer_input
        else:
            items["activations: checkpointed layer inputs"] = saved
        if bits == 8 and mode != "bat":
            # bitsandbytes' 8-bit matmul keeps its input on ctx, out of checkpointing's reach (and out of the
            # offload hooks'): every layer's norm outputs, attention output and down_proj input stay alive
            held = n_layers * tokens * (2 * hidden * norm_e + (q_width + inter) * e)
            items["8-bit: matmul inputs kept past checkpointing"] = held
            saved += held
        # while one layer is recomputed and differentiated
        in_layer = saved + layer_acts + (layer_input if offload_activations else 0)
    else:
        saved = n_layers * layer_acts + embed_out
        if offload_activations:  # every saved activation on the host; one layer's worth back at a time
            host, saved = saved, 0
            items["activations: one layer's (the rest on the host)"] = layer_acts
            in_layer = layer_acts
        else:
            items["activations: all layers"] = saved
            in_layer = saved
    # A layer's backward peaks either inside its MLP (the gradients of gate, up and their product) or where
    # a projection's input gradient is formed from its dequantized weight: bitsandbytes dequantizes the
    # whole weight for that (4-bit: in the compute dtype; 8-bit: in the input's dtype, fp32 after a norm),
    # bat one chunk pair at a time.
    if mode == "bat":
        weight_buffer = _bat_chunk_bytes(modules, targets, r, bat_chunk_bytes, e)
        if e < 4:  # 16-bit dx is summed over the chunks in fp32: an accumulator, and on CUDA each chunk's fp32 product
            weight_buffer += 8 * tokens * max(modules[n].in_features for n in targets)
        items["bat: dequantized weight chunk (+ fp32 dx sum)" if e < 4 else "bat: dequantized weight chunk"] = weight_buffer
    elif bits is not None:
        largest = max(modules[n].in_features * modules[n].out_features for n in targets)
        weight_buffer = largest * (e if bits == 4 else 4)
        items["backward: one dequantized weight"] = weight_buffer
    else:
        weight_buffer = 0
    mlp_grads = tokens * e_act * (3 * inter + 2 * hidden)
    at_projection = weight_buffer + tokens * e_act * (inter + 2 * hidden)
    mask = batch_size * seq_len * seq_len if packing else 0  # bool; every layer is handed the same one
    if packing:
        items["attention mask: packed sequences (bool, batch × seq²)"] = mask
    layer_phase = in_layer + mask + max(mlp_grads, at_projection) + grads
    if chunked_loss:
        softcap = getattr(hf_config, "final_logit_softcapping", None) is not None
        rows = min(tokens, chunk_tokens(vocab, loss_chunk_bytes, e, softcap))
        # one chunk's logits and gradient; the head's input (N, H), its copy in the matmul dtype, its gradient
        chunk = rows * chunk_bytes_per_token(vocab, e, softcap)
        loss_bytes = chunk + tokens * hidden * (e_stream + e + (e if e_stream != e else 0))
        items[f"chunked loss: {rows}-token chunk of logits + gradient, hidden gradient"] = loss_bytes
    else:
        loss_bytes = 3 * logits
        items["logits + loss (fp32)"] = loss_bytes
    loss_phase = saved + mask + loss_bytes
    if e_head == 4 and e < 4 and head is not None:
        # under 16-bit autocast (a bf16 Trainer step) the fp32 head runs on a 16-bit copy of its weight,
        # which autograd keeps for the head's backward (the chunked loss only while its forward runs)
        items["autocast: 16-bit copy of the fp32 head"] = head.weight.numel() * e
        loss_phase += head.weight.numel() * e
    items["adapter gradients (fp32)"] = grads
    optimizer_phase = grads + (trainable * 4 if optimizer in ("adamw", "adamw_torch") else 0)  # foreach temporaries

    phases = {"loss backward": loss_phase, "decoder-layer backward": layer_phase, "optimizer step": optimizer_phase}
    phase = max(phases, key=phases.get)
    notes = [f"activations modelled on a Llama-style decoder layer ({n_layers} layers, SDPA attention, "
             f"{'checkpointing' if gradient_checkpointing else 'no checkpointing'})"]
    if "paged" in optimizer:
        notes.append("paged optimizer states counted as on the GPU (they are, unless memory runs short)")
    if embeddings_on_host:
        notes.append(f"input embeddings on the host: {embed_host / GiB:.2f} GiB of host memory")
    if offload_activations:
        notes.append(f"offloaded activations: {host / GiB:.2f} GiB of pinned host memory, copied over PCIe twice a "
                     "step")
    settings = dict(bits=bits, mode=mode, r=r, batch=batch_size, seq=seq_len, checkpointing=gradient_checkpointing,
                    optimizer=optimizer, compute_dtype=str(compute_dtype).removeprefix("torch."),
                    chunked_loss=chunked_loss, offload_activations=offload_activations,
                    embeddings_on_host=embeddings_on_host)
    if mode == "mini":
        settings["mini_r"] = mini_r
    if packing:
        settings["packing"] = True
    return MemoryPlan(
        model=_describe_model(config, hf_config),
        settings=settings,
        items=items,
        static_bytes=static,
        peak_bytes=static + phases[phase],
        peak_phase=phase,
        trainable_parameters=trainable,
        notes=notes,
    )


def _describe_model(config, hf_config) -> str:
    """"llama, folder /models/SmolLM2": the model type and where the config came from."""
    if isinstance(config, (str, os.PathLike)):
        path = Path(os.fspath(config)).expanduser()
        if path.is_file():
            path = path.parent if path.name == "config.json" else path
        where = f"folder {path.resolve()}" if path.is_dir() else (
            f"file {path.resolve()}" if path.exists() else f"hub {os.fspath(config)}")
    else:
        where = getattr(hf_config, "_name_or_path", "") or "a config object"
    return f"{hf_config.model_type}, {where}"


def _decoder_layers(model: nn.Module) -> list[str]:
    """Names of the decoder layers (the model's ``_no_split_modules`` classes)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [n for n, m in model.named_modules() if type(m).__name__ in names]


def _bat_chunk_bytes(modules: dict, targets: list[str], r: int, budget: int, e: int) -> int:
    """The largest pair of dequantized chunk buffers bat holds at once (see qmiss.ops.chunk_rows)."""
    worst = 0
    for name in targets:
        n_in, n_out = modules[name].in_features, modules[name].out_features
        alignment = 1 if n_in % 64 == 0 else n_out
        rows = chunk_rows(n_out, n_in, r, alignment, budget, e)
        worst = max(worst, 2 * rows * n_in * e)
    return worst
