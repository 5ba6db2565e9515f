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
A layer with a fused experts module (Mixtral, Qwen3-MoE, gpt-oss) counts qmiss's experts
block in place of the dense MLP: tokens sorted by expert (S = tokens · top_k routed rows),
one expert's weight chunk dequantized at a time (what it keeps is stated in
:mod:`qmiss.experts`); expert weights and adapters are lines of their own, each target
with its ``rank_pattern`` r. A model built with eager attention (gpt-oss: SDPA cannot take
its sinks) keeps batch × heads × seq² scores per layer.

Why one file of ~650 lines: it is one model of one training step. Each part (:func:`_weights`,
:func:`_adapters`, :func:`_optimizer`, :func:`_activations`, :func:`_layer_backward`, :func:`_loss`) is a
function that reads as the plan's printed lines, and they share the step's shapes and byte sizes
(:class:`_Step`); the rules they apply (adapter shapes, stored bytes, alignment, the fp32 up-cast, what an
experts block keeps) come from the modules that own them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from qmiss import experts, quant
from qmiss.config import AUTO, BLOCK_MODES, DEFAULTS, FRONT_END_DEFAULTS, QMissConfig
from qmiss.experts import expert_params, experts_shape, is_experts_module
from qmiss.inputs import InputError, few, spelled
from qmiss.layer import adapter_shape, expert_backward_bytes
from qmiss.loss import chunk_bytes_per_token, loss_chunk_tokens
from qmiss.model import check_targets, output_head, target_shape, unreachable_weights
from qmiss.offload import check_host_embeddings, host_bytes
from qmiss.ops import chunk_rows
from qmiss.prepare import fp32_upcast_modules
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
    #: pinned host memory per process: the pool offloaded activations are copied into (offload_activations)
    host_bytes: int = 0

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
        lines.append(f"  {'peak (' + self.peak_phase + ')':<{width}}{self.peak_bytes / GiB:8.3f} GiB")
        if self.host_bytes:
            lines.append(f"  {'pinned host memory (offload pool)':<{width}}{self.host_bytes / GiB:8.3f} GiB")
        lines.append("")
        lines.append(f"  cards in GiB (an \"8 GB\" card has 8 GiB; peak + {CUDA_CONTEXT_BYTES / GiB:.2f} GiB CUDA "
                     "context): " + "  ".join(f"{gib} {'yes' if ok else 'no'}" for gib, ok in self.cards().items()))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class _Step:
    """What every part of the plan reads: the settings, the meta model and its shapes, the byte sizes."""

    settings: QMissConfig
    bits: Optional[int]  # 4, 8 or None
    hf_config: object
    model: nn.Module
    targets: list[str]
    batch: int
    seq: int
    packing: bool
    compute_dtype: torch.dtype
    e_base: int  # bytes per value of the dtype the model is loaded in

    def __post_init__(self) -> None:
        c, s = self.hf_config, self.settings
        self.e = torch.finfo(self.compute_dtype).bits // 8  # bytes per value of the compute dtype
        self.modules = dict(self.model.named_modules())
        self.tokens = self.batch * self.seq
        self.layers = _decoder_layers(self.model)
        self.hidden, self.vocab = c.hidden_size, c.vocab_size
        n_heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or self.hidden // n_heads
        n_kv = getattr(c, "num_key_value_heads", None) or n_heads
        self.n_heads, self.n_kv, self.q_width, self.kv_width = n_heads, n_kv, n_heads * head_dim, n_kv * head_dim
        self.inter = getattr(c, "intermediate_size", None) or 4 * self.hidden
        upcast = self.bits is not None and s.fp32_norms
        self.norm_e = 4 if upcast else self.e_base  # upcast norms compute and return fp32
        self.e_stream = self.norm_e  # an fp32 norm returns fp32: every layer after the first gets an fp32 stream
        self.e_act = max(self.e, self.e_stream)  # bitsandbytes returns its input's dtype: an fp32 stream, fp32 acts
        self.head = output_head(self.model)
        self.tied = self.head is not None and self.head.weight is self.model.get_input_embeddings().weight
        self.e_head = self.e_base  # set by _weights: the head's bytes per value
        self.embed_host = 0  # set by _weights: the input table's bytes on the host (embeddings_on_host)
        # (in, out, experts) of every target: one expert's (in, out) for a fused expert parameter, experts None
        # for a linear
        self.shapes = {n: target_shape(self.modules, n) for n in self.targets}
        self.linears = [n for n in self.targets if self.shapes[n][2] is None]
        self.expert_targets = [n for n in self.targets if self.shapes[n][2] is not None]
        experts_modules = [n for n, m in self.modules.items() if is_experts_module(m)]
        # each decoder layer's experts modules (transformers' fused ones; none in a dense layer)
        self.blocks = {layer: [n for n in experts_modules if n.startswith(layer + ".")] for layer in self.layers}
        # the attention transformers picked when it built the model (config._attn_implementation, set by
        # PreTrainedModel._check_and_adjust_attn_implementation): SDPA where the model supports it, else eager
        # (gpt-oss, whose attention sinks SDPA cannot take)
        self.eager = getattr(self.model.config, "_attn_implementation", None) == "eager"
        self.sinks = any(isinstance(getattr(m, "sinks", None), nn.Parameter) for m in self.modules.values())

    def shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a target; one expert's for a fused expert parameter."""
        return self.shapes[name][:2]

    def rank(self, name: str) -> int:
        """The r ``prepare_qmiss`` gives the target ``name`` (``rank_pattern`` matches an expert target through its
        experts module too)."""
        return self.settings.rank_for(name, expert=self.shapes[name][2] is not None)

    def in_layer(self, names: list[str], layer: Optional[str]) -> list[str]:
        """The ``names`` under the decoder layer ``layer`` (none for None)."""
        return [n for n in names if layer is not None and n.startswith(layer + ".")]


def _weights(step: _Step) -> dict[str, int]:
    """The frozen model: the packed weights and their quantization state (as :func:`qmiss.quant.stored_bytes`
    counts them), the embeddings and head, the norms, each in the dtype ``prepare_qmiss`` leaves it."""
    s, modules, e_base = step.settings, step.modules, step.e_base
    items: dict[str, int] = {}
    quantized = sum(quant.stored_bytes(*step.shape(n), step.bits, s.double_quant, e_base) for n in step.linears)
    biases = sum(modules[n].bias.numel() * e_base for n in step.linears if modules[n].bias is not None)
    label = {4: "4-bit weights + quant state", 8: "8-bit weights + row scales",
             None: "16-bit target weights"}[step.bits]
    items[label] = quantized + biases
    target_params = {id(p) for n in step.linears for p in modules[n].parameters()}
    if step.expert_targets:
        # quantize_experts stacks a parameter's experts as the rows of one (experts·out, in) layer
        stacked = sum(quant.stored_bytes(n_in, n_experts * n_out, step.bits, s.double_quant, e_base)
                      for n_in, n_out, n_experts in (step.shapes[n] for n in step.expert_targets))
        weights = [_parameter(step, n) for n in step.expert_targets]
        # the experts' biases (gpt-oss's gate_up_proj_bias, down_proj_bias) stay in the model's dtype beside them
        parents = (n.rpartition(".") for n in step.expert_targets)
        expert_biases = [b for parent, _, param in parents
                         if isinstance(b := getattr(modules[parent], f"{param}_bias", None), nn.Parameter)]
        label = {4: "4-bit experts + quant state", 8: "8-bit experts + row scales", None: "16-bit target experts"}
        items[label[step.bits] + (" + biases" if expert_biases else "")] = (
            stacked + sum(b.numel() * e_base for b in expert_biases))
        target_params |= {id(p) for p in weights + expert_biases}
    left_out = {id(_parameter(step, n)) for n in _experts_left_out(step)}

    upcast = set()
    if step.bits is not None and s.fp32_norms:  # the rule prepare_qmiss applies (QLoRA's habit, on request)
        upcast = {id(p) for m in fp32_upcast_modules(step.model, head=not s.chunked_loss)
                  for p in m.parameters(recurse=False)}
    head_ids = {id(p) for p in step.head.parameters()} if step.head is not None else set()
    e_head = 4 if (head_ids & upcast) else e_base
    if s.chunked_loss and not step.tied and step.e < 4:  # prepare_qmiss casts an fp32 head to a 16-bit compute dtype
        e_head = min(e_head, step.e)
    step.e_head = e_head
    seen, embed_head, norms, other, experts_16bit = set(), 0, 0, 0, 0
    for name, param in step.model.named_parameters(remove_duplicate=True):
        if id(param) in target_params or id(param) in seen:
            continue
        seen.add(id(param))
        size = param.numel() * (e_head if id(param) in head_ids else 4 if id(param) in upcast else e_base)
        if id(param) in left_out:
            experts_16bit += size
        elif "norm" in name:
            norms += size
        elif param.dim() == 2 and step.vocab in param.shape:
            embed_head += size
        else:
            other += size
    if s.embeddings_on_host:
        step.embed_host = check_host_embeddings(step.model).weight.numel() * e_base
        items["lm_head (input embeddings on the host)"] = embed_head - step.embed_host
    else:
        items["embeddings + lm_head" + (" (tied)" if step.tied else "")] = embed_head
    items["norms and other unquantized"] = norms + other
    if experts_16bit:
        items["experts left unquantized (not targets)"] = experts_16bit
    return items


def _parameter(step: _Step, name: str) -> nn.Parameter:
    """The fused expert parameter at ``name`` (``<experts module>.<parameter>``)."""
    parent, _, param = name.rpartition(".")
    return getattr(step.modules[parent], param)


def _experts_left_out(step: _Step) -> list[str]:
    """Fused expert weights no target holds: excluded by the settings, or of an experts module transformers does
    not route through its experts interface (DBRX's); they stay in the model's dtype, frozen. (Linears with a
    forward of their own and raw weight parameters, which :func:`~qmiss.model.unreachable_weights` names too,
    count with the other 16-bit weights.)"""
    return sorted(n for n in unreachable_weights(step.model)
                  if n not in step.shapes and "Experts" in type(step.modules[n.rpartition(".")[0]]).__name__)


def _adapters(step: _Step) -> tuple[dict[str, int], list[int]]:
    """The fp32 adapters (each the shape :func:`qmiss.layer.adapter_shape` gives for the target's r, one per
    expert for a fused expert parameter) and their sizes in values, one per tensor."""
    s = step.settings

    def size(name: str) -> int:
        n_in, n_out, n_experts = step.shapes[name]
        return (n_experts or 1) * math.prod(adapter_shape(n_in, n_out, step.rank(name), s.mode, s.mini_r))

    linears, experts = [size(n) for n in step.linears], [size(n) for n in step.expert_targets]
    items = {"adapters (fp32)": 4 * sum(linears)}
    if experts:
        items["expert adapters (fp32)"] = 4 * sum(experts)
    return items, linears + experts


def _optimizer(sizes: list[int], optimizer: str) -> dict[str, int]:
    """The optimizer's states; bitsandbytes' 8-bit optimizers keep small tensors in fp32."""
    per_value = OPTIMIZERS[optimizer]
    if "8bit" in optimizer:
        states = sum(int(n * per_value) if n >= BNB_MIN_8BIT_SIZE else 8 * n for n in sizes)
    else:
        states = int(sum(sizes) * per_value)
    return {f"optimizer states ({optimizer})": states}


def _layer_activations(step: _Step, layer: Optional[str]) -> int:
    """What one decoder layer saves for backward (autograd and bitsandbytes), Llama-style; in a layer with an
    experts module, the mixture-of-experts block's (:func:`_moe_activations`) in place of the dense MLP's."""
    s, tokens, hidden, e, e_act = step.settings, step.tokens, step.hidden, step.e, step.e_act
    q_width, kv_width = step.q_width, step.kv_width
    blocks = step.blocks.get(layer, [])
    inter = _dense_width(step, layer) if blocks else step.inter
    norms_saved = 2 * tokens * (hidden * 4 + 4)  # each RMSNorm keeps its input in fp32 and the inverse rms
    names = [n for n in step.modules if layer is not None and n.startswith(layer + ".")]
    if any(n.endswith(".q_norm") for n in names):  # Qwen3's per-head norms of q and k: the same, per head
        norms_saved += tokens * 4 * (q_width + step.n_heads + kv_width + step.n_kv)
    if step.eager:
        # transformers' eager_attention_forward: q, k and v repeated to every query head, the output, and the
        # probabilities, in fp32 and in q's dtype (with attention sinks, gpt-oss's: one softmax in q's dtype)
        attention = tokens * e_act * 4 * q_width + _attention_scores(step) * (
            e_act if step.sinks else 4 + (e_act if e_act < 4 else 0))
    else:
        # q, k, v, the output and the log-sum-exp
        attention = tokens * e_act * (2 * q_width + 2 * kv_width) + 4 * step.batch * step.n_heads * step.seq
        if step.packing:
            # with a mask, SDPA saves it as a float mask of the compute dtype, and transformers repeats k and v to
            # every query head (it uses SDPA's own grouped-query path only without a mask; sdpa_attention.py)
            attention += step.batch * step.seq * step.seq * e_act + 2 * tokens * e_act * (q_width - kv_width)
    mlp = _mlp_activations(step, layer)
    extra = 0
    if s.mode in BLOCK_MODES or step.bits == 8:  # inputs kept (bat's, bat_row's turns', 8-bit's): the norms' outputs
        # (shared by their projections), down's input
        # (the MLP's norm output is no linear's input where experts alone read it: the router keeps nothing of it
        # and the experts keep their own sorted copy)
        norm_outputs = 2 if inter else 1
        # bat_row rebuilds down's input act(gate)·up from the product's own saved factors, except under
        # checkpointing's or offloading's saved-tensor hooks (qmiss.ops.product_source)
        rebuilt = s.mode == "bat_row" and not s.gradient_checkpointing and not s.offload_activations
        extra = tokens * (norm_outputs * hidden * (4 if step.bits == 8 else e_act) + (0 if rebuilt else inter) * e_act)
        if s.mode in BLOCK_MODES and step.bits is not None and e != step.norm_e:  # each projection casts the fp32
            extra += tokens * hidden * e * 3  # norm output
    if s.mode == "bat_row" and step.bits == 8:  # bitsandbytes' 8-bit matmul keeps its input, here each turned x + z
        extra += _bnb_8bit_held(step, layer)
    if s.mode in ("default", "mini"):  # the shard sums Σ_j x_j each adapter keeps
        extra += tokens * e * sum(step.rank(n) for n in step.in_layer(step.linears, layer))
    return norms_saved + attention + mlp + extra


def _mlp_activations(step: _Step, layer: Optional[str]) -> int:
    """What a layer's MLP saves: gate, up and act(gate) of a dense (or shared experts') MLP, and the
    mixture-of-experts block's (:func:`_moe_activations`)."""
    blocks = step.blocks.get(layer, [])
    inter = _dense_width(step, layer) if blocks else step.inter
    return step.tokens * step.e_act * 3 * inter + sum(_moe_activations(step, block) for block in blocks)


def _attention_scores(step: _Step) -> int:
    """Values of one layer's attention scores, batch × heads × seq² (eager attention makes them)."""
    return step.batch * step.n_heads * step.seq * step.seq


def _dense_width(step: _Step, layer: Optional[str]) -> int:
    """The gated MLP width beside a layer's experts: its shared experts' ``up_proj`` linears (Qwen2-MoE's
    ``shared_expert``, DeepSeek's ``shared_experts``), 0 where the experts are the whole MLP (Mixtral)."""
    return sum(m.out_features for n, m in step.modules.items()
               if layer is not None and n.startswith(layer + ".") and n.endswith("up_proj") and quant.is_linear(m))


def _top_k(step: _Step, block: str) -> int:
    """Experts per token in the block of the experts module ``block``: the config's ``num_experts_per_tok``, else the
    ``top_k`` of the block's router."""
    k = getattr(step.hf_config, "num_experts_per_tok", None)
    if not k:
        parent = step.modules[block.rpartition(".")[0]]
        k = next((m.top_k for m in parent.modules() if isinstance(getattr(m, "top_k", None), int)), 1)
    return k


def _moe_shapes(step: _Step, block: str) -> tuple[int, int]:
    """(experts, routed rows S = tokens · top_k) of an experts module."""
    module = step.modules[block]
    return experts_shape(module, expert_params(module)[0])[0], step.tokens * _top_k(step, block)


def _moe_activations(step: _Step, block: str) -> int:
    """What the mixture-of-experts block of the experts module ``block`` saves (:func:`qmiss.experts.saved_bytes`),
    each adapted projection with its r."""
    module = step.modules[block]
    ranks = {p: step.rank(f"{block}.{p}") for p in expert_params(module)
             if f"{block}.{p}" in step.shapes}
    return experts.saved_bytes(module, step.tokens, _top_k(step, block), step.compute_dtype, ranks, step.settings.mode)


def _expert_chunk_bytes(step: _Step, name: str) -> int:
    """What one expert of the fused target ``name`` holds at once in backward
    (:func:`qmiss.layer.expert_backward_bytes`), for as many rows as there are tokens: the most one expert can get
    (each token at most once)."""
    s = step.settings
    n_in, n_out, _ = step.shapes[name]
    return expert_backward_bytes(n_in, n_out, step.rank(name), s.mode, step.bits, s.bat_chunk_bytes, step.e,
                                 step.tokens)


def _moe_backward(step: _Step, block: str) -> int:
    """The most the block's backward holds beyond what it saved (:func:`qmiss.experts.backward_bytes`)."""
    module = step.modules[block]
    held = {p: _expert_chunk_bytes(step, f"{block}.{p}") for p in expert_params(module)
            if f"{block}.{p}" in step.shapes}
    return experts.backward_bytes(module, step.tokens, _top_k(step, block), step.compute_dtype, held)


def _activations(step: _Step) -> tuple[dict[str, int], int, int, int]:
    """The activations a step holds: returns the items, what stays saved through the loss, what is saved while
    one layer is differentiated, and the host pool's bytes (offload_activations; :func:`_offload_pool`)."""
    s, tokens, hidden = step.settings, step.tokens, step.hidden
    items: dict[str, int] = {}
    n_layers = len(step.layers)
    per_layer = [_layer_activations(step, layer) for layer in step.layers]
    layer_acts = max(per_layer, default=_layer_activations(step, None))  # the largest layer's
    layer_input = tokens * hidden * step.e_stream  # the residual stream, which checkpointing keeps per layer
    embed_out = tokens * hidden * (step.e_stream if step.tied else step.e_base)  # a tied, upcast head upcasts it
    host = 0
    if s.gradient_checkpointing:
        saved = n_layers * layer_input + embed_out
        if s.offload_activations:  # the layer inputs wait on the host; backward brings back one at a time
            host, saved = _offload_pool(step), 0
            items["activations: one checkpointed layer input (the rest on the host)"] = layer_input
        else:
            items["activations: checkpointed layer inputs"] = saved
        if step.bits == 8 and s.mode != "bat" and step.linears:
            # bitsandbytes' 8-bit matmul keeps its input on ctx, out of checkpointing's reach (and out of the
            # offload hooks'): every layer's norm outputs, attention output and down_proj input stay alive, and
            # bat_row's turned inputs, one per projection (experts, which qmiss's own Function computes, keep
            # nothing past checkpointing)
            held = sum(_bnb_8bit_held(step, layer) for layer in step.layers)
            items["8-bit: matmul inputs kept past checkpointing"] = held
            saved += held
        # while one layer is recomputed and differentiated
        in_layer = saved + layer_acts + (layer_input if s.offload_activations else 0)
    else:
        saved = sum(per_layer) + embed_out
        if s.offload_activations:  # every saved activation on the host; one layer's worth back at a time
            # (the pool: the per-layer model, not tensor by tensor, within 10% of the allocated pool in
            # tests/test_offload.py; plus, without the chunked loss, the log-softmax copied out as _offload_pool says)
            host, saved = saved + (0 if s.chunked_loss else step.tokens * step.vocab * 4), 0
            items["activations: one layer's (the rest on the host)"] = layer_acts
            in_layer = layer_acts
        else:
            items["activations: all layers"] = saved
            in_layer = saved
    return items, saved, in_layer, host


def _offload_pool(step: _Step) -> int:
    """The host pool a checkpointed step fills (qmiss.offload.HostPool), tensor by tensor as offload.py takes
    them (:func:`qmiss.offload.host_bytes`: none under 1 MiB, the rest aligned): what autograd saves outside the
    checkpointed layers, with the output head frozen (its input and the final norm's output are not saved):

    - each layer's input, kept by checkpointing: the embedding output, then the residual stream;
    - the final RMSNorm's input, in fp32 (transformers' Llama-family norm upcasts; the last layer's output
      itself when the stream is fp32), and its (tokens, 1) fp32 reciprocal root;
    - without the chunked loss, transformers' loss inside the model's forward: the fp32 log-softmax of the
      logits, (tokens × vocabulary), copied out and straight back at the loss's backward.
    """
    width = step.tokens * step.hidden
    embed_out = width * (step.e_stream if step.tied else step.e_base)
    tensors = [embed_out] + [width * step.e_stream] * (len(step.layers) - 1) + [width * 4, step.tokens * 4]
    if not step.settings.chunked_loss:
        tensors.append(step.tokens * step.vocab * 4)
    return sum(host_bytes(n) for n in tensors)


def _bnb_8bit_held(step: _Step, layer: Optional[str]) -> int:
    """The inputs one layer's 8-bit linears keep on ctx: the norm outputs that feed linears, the attention output,
    the dense (or shared experts') down_proj input; with bat_row each projection's own turned input."""
    if step.settings.mode == "bat_row":  # the turned inputs x + z, one per projection, in the stream's dtype
        return step.tokens * step.e_act * sum(step.shape(n)[0] for n in step.in_layer(step.linears, layer))
    inter = _dense_width(step, layer) if step.blocks.get(layer) else step.inter
    return step.tokens * ((2 if inter else 1) * step.hidden * step.norm_e + (step.q_width + inter) * step.e)


def _layer_backward(step: _Step) -> tuple[dict[str, int], int]:
    """A layer's backward peaks either inside its MLP (the gradients of gate, up and their product) or where a
    projection's input gradient is formed from its dequantized weight: bitsandbytes dequantizes the whole weight
    for that (4-bit: in the compute dtype; 8-bit: in the input's dtype, fp32 after a norm), bat one chunk pair at
    a time; or, in a layer with experts, inside the mixture-of-experts block (:func:`_moe_backward`), one
    expert's weight chunk at a time. Returns the items (with the packed-sequence mask) and the bytes on top of
    what is saved, for the layer where they are most."""
    s, tokens, e = step.settings, step.tokens, step.e
    items: dict[str, int] = {}
    if not step.linears:
        weight_buffer = 0
    elif s.mode == "bat":
        weight_buffer = _bat_chunk_bytes(step, s.bat_chunk_bytes)
        if e < 4:  # 16-bit dx is summed over the chunks in fp32: an accumulator, and on CUDA each chunk's fp32 product
            weight_buffer += 8 * tokens * max(step.shape(n)[0] for n in step.linears)
        label = "bat: dequantized weight chunk (+ fp32 dx sum)" if e < 4 else "bat: dequantized weight chunk"
        items[label] = weight_buffer
    elif step.bits is not None:
        largest = max(math.prod(step.shape(n)) for n in step.linears)
        weight_buffer = largest * (e if step.bits == 4 else 4)
        items["backward: one dequantized weight"] = weight_buffer
    else:
        weight_buffer = 0
    if step.expert_targets:
        items["experts: one expert's weight chunk + input gradients"] = max(
            _expert_chunk_bytes(step, n) for n in step.expert_targets)
    worst = 0
    for layer in step.layers or [None]:
        blocks = step.blocks.get(layer, [])
        inter = _dense_width(step, layer) if blocks else step.inter
        mlp_grads = tokens * step.e_act * (3 * inter + 2 * step.hidden)
        at_projection = weight_buffer + tokens * step.e_act * (inter + 2 * step.hidden)
        in_experts = tokens * step.e_act * 2 * step.hidden + max((_moe_backward(step, b) for b in blocks), default=0)
        worst = max(worst, mlp_grads, at_projection, in_experts)
        if step.eager:
            # eager attention's backward (its recomputed forward holds no more): the probabilities' and the
            # scores' gradients (fp32 and q's dtype; with sinks, two in q's dtype); the MLP's tensors are freed by then
            per_score = 2 * step.e_act if step.sinks else 4 + step.e_act
            at_attention = (_attention_scores(step) * per_score + tokens * step.e_act * 2 * step.hidden
                            - _mlp_activations(step, layer))
            worst = max(worst, at_attention)
    if step.eager:
        items["attention masks: eager (float, batch × seq², one per kind of layer)"] = _mask_bytes(step)
    elif step.packing:
        items["attention mask: packed sequences (bool, batch × seq²)"] = _mask_bytes(step)
    return items, worst


def _mask_bytes(step: _Step) -> int:
    """The attention masks transformers builds once a step and hands every layer: packed sequences under SDPA, a
    bool (batch, 1, seq, seq); eager attention, a float one in the model's dtype, one per kind of layer (gpt-oss:
    full and sliding-window)."""
    if step.eager:
        kinds = len(set(getattr(step.hf_config, "layer_types", None) or ["full_attention"]))
        return kinds * step.batch * step.seq * step.seq * step.e_base
    return step.batch * step.seq * step.seq if step.packing else 0


def _loss(step: _Step) -> tuple[dict[str, int], int]:
    """The loss's backward on top of what is saved: one chunk of logits and gradient (chunked loss) or the
    fp32 logits, their log-softmax and gradient; plus, under 16-bit autocast, the 16-bit copy of an fp32 head.
    With no ``loss_chunk_bytes`` the chunk is the rule's with no free-memory bound, the most it picks: on a GPU
    short of memory the chunk is smaller, never larger."""
    s, tokens, e = step.settings, step.tokens, step.e
    items: dict[str, int] = {}
    if s.chunked_loss:
        softcap = getattr(step.hf_config, "final_logit_softcapping", None) is not None
        hidden = step.head.weight.shape[1] if step.head is not None else step.hidden
        rows = min(tokens, loss_chunk_tokens(step.vocab, hidden, e, softcap, s.loss_chunk_bytes))
        # one chunk's logits and gradient; the head's input (N, H), its copy in the matmul dtype, its gradient
        chunk = rows * chunk_bytes_per_token(step.vocab, e, softcap)
        loss_bytes = chunk + tokens * step.hidden * (step.e_stream + e + (e if step.e_stream != e else 0))
        items[f"chunked loss: {rows}-token chunk of logits + gradient, hidden gradient"] = loss_bytes
    else:
        loss_bytes = 3 * tokens * step.vocab * 4  # the head runs in fp32 on the fp32 final norm; loss in fp32
        items["logits + loss (fp32)"] = loss_bytes
    if step.e_head == 4 and e < 4 and step.head is not None:
        # under 16-bit autocast (a bf16 Trainer step) the fp32 head runs on a 16-bit copy of its weight,
        # which autograd keeps for the head's backward (the chunked loss only while its forward runs)
        items["autocast: 16-bit copy of the fp32 head"] = step.head.weight.numel() * e
        loss_bytes += step.head.weight.numel() * e
    return items, loss_bytes


def plan_memory(
    config,
    *,
    settings: Optional[QMissConfig] = None,
    batch_size: int = 1,
    seq_len: int = 512,
    optimizer: str = "paged_adamw_8bit",
    base_dtype: Optional[torch.dtype] = None,
    packing: bool = False,
    **qmiss_settings,
) -> MemoryPlan:
    """Plan the memory of one training step of a qmiss model, without loading weights.

    Args:
        config: a transformers config, a ``config.json`` path, a model folder, or a hub id.
        settings: a :class:`~qmiss.QMissConfig`; ``qmiss_settings`` given as well replace its fields.
        batch_size, seq_len: tokens of one micro-batch.
        optimizer: one of :data:`OPTIMIZERS` (Trainer ``--optim`` names).
        base_dtype: dtype the model is loaded in (embeddings, norms, head, the residual stream);
            default the compute dtype.
        packing: the micro-batch is ``batch_size`` packed sequences of ``seq_len`` tokens (qmiss-train's
            default): with no attention mask given, transformers builds a (batch, 1, seq, seq) boolean
            block-diagonal mask for SDPA, alive through the step, and each layer's attention saves it as a
            float mask and keeps k and v repeated to every query head (FlashAttention's varlen path needs
            none of it; a padded batch that has padding pays the same).
        **qmiss_settings: :func:`qmiss.prepare_qmiss`'s settings (``r``, ``bits``, ``mode``, ``mini_r``,
            ``target_modules``, ``chunked_loss``, ``offload_activations``, ``embeddings_on_host``, …) with
            their meanings there; ``bits`` "auto" is 4, and where no ``settings`` object is given the planner
            assumes checkpointing and bf16 compute (``FRONT_END_DEFAULTS["plan_memory"]`` says why).

    Returns:
        A :class:`MemoryPlan`.

    Raises:
        ValueError: bad settings (unknown optimizer, non-positive sizes, r that does not fit).
        FileNotFoundError: no config where ``config`` points.
    """
    if optimizer not in OPTIMIZERS:
        raise InputError(f"{spelled('optimizer')}={optimizer!r} is not one the planner knows; use one of "
                         f"{sorted(OPTIMIZERS)}")
    if settings is not None and not isinstance(settings, QMissConfig):
        raise TypeError(f"plan_memory(settings={settings!r}): pass a qmiss.QMissConfig, or the settings as keywords "
                        "(r=64, bits=4, mode='bat', …)")
    given = dataclasses.asdict(settings) if settings is not None else dict(FRONT_END_DEFAULTS["plan_memory"])
    given.update(qmiss_settings)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("r", given.get("r", DEFAULTS.r)),
                        ("loss_chunk_bytes", given.get("loss_chunk_bytes", DEFAULTS.loss_chunk_bytes))):
        if value is None and name == "loss_chunk_bytes":  # the chunk sized from the head
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"{spelled(name)}={value!r} must be a positive integer")
    s = QMissConfig.from_settings(given, "plan_memory")  # validates mode, bits, mini_r
    bits = 4 if s.bits == AUTO else s.bits
    compute_dtype = s.compute_dtype or FRONT_END_DEFAULTS["plan_memory"]["compute_dtype"]
    hf_config = load_hf_config(config, spelled("config"))
    model = meta_model(hf_config)
    step = _Step(s, bits, hf_config, model, check_targets(model, s), batch_size, seq_len, packing,
                 compute_dtype=compute_dtype, e_base=torch.finfo(base_dtype or compute_dtype).bits // 8)

    # static: the frozen model, the adapters, the optimizer
    items = _weights(step)
    adapter_items, sizes = _adapters(step)
    items.update(adapter_items)
    items.update(_optimizer(sizes, optimizer))
    static = sum(items.values())
    trainable = sum(sizes)
    grads = 4 * trainable

    # transient: activations, the two backward peaks, the gradients
    activation_items, saved, in_layer, host = _activations(step)
    items.update(activation_items)
    backward_items, in_backward = _layer_backward(step)
    items.update(backward_items)
    mask = _mask_bytes(step)
    loss_items, loss_bytes = _loss(step)
    items.update(loss_items)
    items["adapter gradients (fp32)"] = grads
    phases = {
        "loss backward": saved + mask + loss_bytes,
        "decoder-layer backward": in_layer + mask + in_backward + grads,
        # foreach temporaries of torch's AdamW
        "optimizer step": grads + (trainable * 4 if optimizer in ("adamw", "adamw_torch") else 0),
    }
    phase = max(phases, key=phases.get)
    return MemoryPlan(
        model=_describe_model(config, hf_config),
        settings=_printed_settings(s, bits, compute_dtype, batch_size, seq_len, optimizer, packing),
        items=items,
        static_bytes=static,
        peak_bytes=static + phases[phase],
        peak_phase=phase,
        trainable_parameters=trainable,
        notes=_notes(step, optimizer),
        host_bytes=host,
    )


def _printed_settings(s: QMissConfig, bits: Optional[int], compute_dtype: torch.dtype, batch_size: int,
                      seq_len: int, optimizer: str, packing: bool) -> dict:
    settings = dict(bits=bits, mode=s.mode, r=s.r, batch=batch_size, seq=seq_len,
                    checkpointing=s.gradient_checkpointing, optimizer=optimizer,
                    compute_dtype=str(compute_dtype).removeprefix("torch."), chunked_loss=s.chunked_loss,
                    offload_activations=s.offload_activations, embeddings_on_host=s.embeddings_on_host)
    if s.mode == "mini":
        settings["mini_r"] = s.mini_r
    if s.rank_pattern:
        settings["rank_pattern"] = s.rank_pattern
    if packing:
        settings["packing"] = True
    return settings


def _notes(step: _Step, optimizer: str) -> list[str]:
    s = step.settings
    impl = getattr(step.model.config, "_attn_implementation", None) or "sdpa"
    attention = {"sdpa": "SDPA attention", "eager": "eager attention: batch × heads × seq² scores"}.get(
        impl, f"{impl} attention, counted as SDPA's")
    notes = [f"activations modelled on a Llama-style decoder layer ({len(step.layers)} layers, {attention}, "
             f"{'checkpointing' if s.gradient_checkpointing else 'no checkpointing'})"]
    moe = [(layer, block) for layer in step.layers for block in step.blocks[layer]]
    if moe:
        n_experts, rows = _moe_shapes(step, moe[0][1])
        notes.append(f"mixture of experts in {len({layer for layer, _ in moe})} layers: each token goes to "
                     f"{rows // step.tokens} of {n_experts} experts ({rows} routed rows a layer); "
                     f"{len(step.expert_targets)} fused expert weights adapted, dequantized one expert chunk at a time")
    left = _experts_left_out(step)
    if left:
        notes.append(f"{len(left)} fused expert weights no target holds (excluded, or of an experts module "
                     f"transformers does not route through its experts interface): {few(left, 2)}, counted "
                     f"unquantized and frozen, activations not modelled for the latter")
    if s.mode == "bat_row":
        notes.append("bat_row: default's memory — the untouched 4/8-bit base on a turned input, bitsandbytes' own "
                     "dequantization in backward, no W' chunk; it keeps each projection's input (shared by q/k/v; "
                     "down's is rebuilt from act(gate) and up without checkpointing) where default keeps shard "
                     "sums, adapters of in/r × r × r")
    if "paged" in optimizer:
        notes.append("paged optimizer states counted as on the GPU (they are, unless memory runs short)")
    if s.embeddings_on_host:
        notes.append(f"input embeddings on the host: {step.embed_host / GiB:.2f} GiB of host memory")
    if s.offload_activations:
        notes.append("offloaded activations: copied over PCIe twice a step, into one pinned host pool per process "
                     "(the pinned host memory line)")
    return notes


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


def _bat_chunk_bytes(step: _Step, budget: int) -> int:
    """The largest pair of dequantized chunk buffers bat holds at once (see qmiss.ops.chunk_rows)."""
    worst = 0
    for name in step.linears:
        n_in, n_out = step.shape(name)
        alignment = quant.row_alignment_of(n_in, n_out, step.bits)
        rows = chunk_rows(n_out, n_in, step.rank(name), alignment, budget, step.e)
        worst = max(worst, 2 * rows * n_in * step.e)
    return worst
