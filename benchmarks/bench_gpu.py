"""qmiss against PEFT MiSS and QLoRA on a whole Llama-2-7B-shaped 4-bit model, on one CUDA GPU; then the
chunked loss against transformers' at Llama-3-8B's vocabulary, and FSDP2 in one process.

    python benchmarks/bench_gpu.py                      # 32 decoder layers (the 7B shape), 1×512, 5 timed rounds
    python benchmarks/bench_gpu.py --layers 8 --rounds 3

Nothing is downloaded. Three sections, each printed and written to the report as it is measured:

1. The adapters. Each variant gets its own model, built from Llama-2-7B's config on the meta device
   and then materialised one part at a time on the GPU: random bf16 weights (std 0.02, norms 1) from
   one seeded generator, each decoder projection replaced by an nf4 double-quant bitsandbytes layer
   (``qmiss.quant.quantize_linear``) as soon as its layer exists, so no more than one decoder layer is
   ever in bf16; embeddings, norms and head stay bf16. Every variant thus adapts the same quantized
   weights (checked by a fingerprint of the packed bytes): qmiss default, mini and bat, PEFT MiSS
   default, mini and bat (mini_r 64), PEFT LoRA r=64 (alpha 16, QLoRA's recipe), r=64 on every decoder
   projection. A step is one 1×512 batch, forward + backward with transformers' (non-reentrant)
   gradient checkpointing, then bitsandbytes' PagedAdamW8bit. Steps are interleaved: one warm-up step
   per variant, then --rounds rounds of one step each, the first to go rotating, every step between two
   ``torch.cuda.synchronize()``. Time and memory are reported as ratios to PEFT LoRA's, and each qmiss
   variant's memory against ``qmiss.plan_memory``.
2. The loss (:func:`compare_losses`, after the variants are freed): forward + backward of
   ``qmiss.loss.chunked_cross_entropy`` (chunk rows by its automatic rule) and of transformers' own path
   (``lm_head`` logits in bf16, then ``ForCausalLMLoss``) on a frozen 128,256 × 4,096 bf16 head (Llama-3-8B's)
   and 1×2,048 and 1×4,096 tokens: both losses and the hidden gradients' agreement, tokens/s and the
   allocator's peak above the inputs, --loss-rounds interleaved rounds.
3. FSDP2 (:func:`fsdp2_steps`): qmiss default on the quantized weights and batch of section 1, each decoder layer
   and then the model under ``fully_shard`` (what accelerate's FSDP2 plugin does), in an NCCL group of one
   process made in memory; --fsdp-rounds timed steps with torch AdamW beside the unsharded qmiss default's.
   It shows the route runs on the GPU and what sharding costs with nothing to shard across; a real
   several-GPU run needs several GPUs (tests/test_distributed.py runs 2 CPU processes under gloo).

The measuring functions of sections 2 and 3 take a device; tests/test_bench_gpu.py runs them on the CPU.

Memory of a variant in section 1, with all seven variants resident at once (what the table's notes repeat):
- resident: ``torch.cuda.memory_allocated()`` growth while its model was built and adapted (packed
  weights, quantization state, bf16 embeddings/norms/head, adapters) plus the bytes of its optimizer's
  state tensors in the allocator (counted tensor by tensor, so kernel workspaces that the first steps
  allocate once for the whole process are charged to no variant);
- step peak: ``torch.cuda.max_memory_allocated()`` during its step, after ``reset_peak_memory_stats()``,
  minus what was allocated just before the step (everything resident, all variants' included): the
  most the step itself held, largest over the timed rounds;
- paged: its optimizer states that bitsandbytes keeps in CUDA unified memory (tensors of 10⁵ values and
  more), which the allocator's counters never see;
- measured peak = resident + step peak + paged: what the variant alone would need, comparable to
  ``plan_memory``'s peak (which counts paged states as on the GPU).

Without a CUDA GPU it prints one line saying so and exits 0, measuring nothing.
Writes results/bench_gpu.md.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from transformers.loss.loss_utils import ForCausalLMLoss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    LINEAR_NAMES,
    MB,
    Report,
    llama2_7b_config,
    peft_lora_variant,
    peft_miss_variant,
)
from qmiss import quant  # noqa: E402
from qmiss.loss import chunked_cross_entropy, free_memory, loss_chunk_tokens  # noqa: E402
from qmiss.memory import measure_peak  # noqa: E402

GiB = 2**30
BATCH, SEQ, R, MINI_R, LR = 1, 512, 64, 64, 1e-4  # mini: a (r, mini_r) block tiled along out_features
REFERENCE = "PEFT LoRA r=64"


# --- the model --------------------------------------------------------------------------------------------------


def _materialise(module: nn.Module, device: torch.device, generator: torch.Generator, std: float,
                 done: dict[int, nn.Parameter]) -> None:
    """Give every parameter of ``module`` still on the meta device storage on ``device`` and a value:
    norm weights 1, everything else N(0, std²). ``done`` maps replaced meta parameters to their new ones,
    so a parameter shared by two modules (tied embeddings) stays one parameter."""
    for sub in module.modules():
        is_norm = "norm" in type(sub).__name__.lower()
        for name, param in list(sub.named_parameters(recurse=False)):
            if id(param) in done:
                sub.register_parameter(name, done[id(param)])
                continue
            if param.device.type != "meta":
                continue
            data = torch.empty(param.shape, dtype=param.dtype, device=device)
            if is_norm:
                data.fill_(1.0)
            else:
                data.normal_(0.0, std, generator=generator)
            done[id(param)] = nn.Parameter(data, requires_grad=False)
            sub.register_parameter(name, done[id(param)])


def _quantize_projections(layer: nn.Module) -> None:
    """Replace the decoder layer's projections by 4-bit nf4 double-quant layers, quantized where they are."""
    for name, module in list(layer.named_modules()):
        parent, _, child = name.rpartition(".")
        if child in LINEAR_NAMES and type(module) is nn.Linear:
            packed = quant.quantize_linear(module, 4, "nf4", double_quant=True, compute_dtype=torch.bfloat16)
            setattr(layer.get_submodule(parent), child, packed)


def build_quantized_model(config, device: torch.device | str, seed: int = 0, std: float = 0.02) -> nn.Module:
    """A causal LM of ``config``'s shapes with random weights and 4-bit decoder projections, frozen.

    The model is laid out on the meta device (accelerate's ``init_empty_weights``: shapes, no storage),
    then materialised in model order on ``device``: the input embeddings, each decoder layer (whose
    projections are quantized at once, so only one layer's bf16 weights ever exist), the final norm and
    the head. The same ``seed`` on the same device gives the same weights.

    Args:
        config: a transformers Llama-family config (``model.model.layers``, ``model.model.norm``).
        device: where to build it.
        seed: seed of the one generator every weight is drawn from.
        std: standard deviation of the weights (norm weights are 1).

    Returns:
        The model in bf16 (packed weights uint8), every parameter frozen.

    Raises:
        RuntimeError: if a parameter or buffer is left on the meta device.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) are real, on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(seed)
    done: dict[int, nn.Parameter] = {}
    _materialise(model.get_input_embeddings(), device, generator, std, done)
    for layer in model.model.layers:
        _materialise(layer, device, generator, std, done)
        _quantize_projections(layer)
    _materialise(model.model.norm, device, generator, std, done)
    _materialise(model.get_output_embeddings(), device, generator, std, done)
    for module in model.modules():  # the rotary embedding's frequencies, built on the CPU
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.device.type != device.type and not buffer.is_meta:
                persistent = name not in module._non_persistent_buffers_set
                module.register_buffer(name, buffer.to(device), persistent=persistent)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"still on the meta device after building: {', '.join(left[:5])}")
    return model.requires_grad_(False)


def fingerprint(model: nn.Module) -> int:
    """A checksum of every packed 4-bit weight and float parameter: equal for equally built models."""
    total = torch.zeros((), dtype=torch.int64, device=next(model.parameters()).device)
    for param in model.parameters():
        if not param.requires_grad:
            total += param.detach().view(torch.uint8).sum(dtype=torch.int64)
    return int(total.item())


# --- the variants -----------------------------------------------------------------------------------------------


def _qmiss(mode: str) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        import qmiss

        return qmiss.prepare_qmiss(model, r=R, mode=mode, mini_r=MINI_R if mode == "mini" else None,
                                   target_modules=LINEAR_NAMES, compute_dtype=torch.bfloat16,
                                   gradient_checkpointing=True)

    return build


def _peft(inject: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        from qmiss.prepare import enable_checkpointing

        model = inject(model)
        enable_checkpointing(model)  # the transformers call prepare_qmiss(gradient_checkpointing=True) makes
        model.enable_input_require_grads()  # as prepare_qmiss (and QLoRA's k-bit preparation) does
        return model

    return build


VARIANTS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "qmiss default": _qmiss("default"),
    "qmiss mini": _qmiss("mini"),
    "qmiss bat": _qmiss("bat"),
    "PEFT MiSS default": _peft(peft_miss_variant("default", r=R)),
    "PEFT MiSS mini": _peft(peft_miss_variant("mini", r=R, mini_r=MINI_R)),
    "PEFT MiSS bat": _peft(peft_miss_variant("bat", r=R)),
    REFERENCE: _peft(peft_lora_variant(r=R, alpha=16)),
}


@dataclass
class Run:
    """One variant's model, optimizer and measurements."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: int
    build_bytes: int  # allocator growth while the model was built and adapted
    fingerprint: int
    times: list[float] = field(default_factory=list)
    step_peaks: list[int] = field(default_factory=list)  # allocator peak of a step above what was allocated before it
    losses: list[float] = field(default_factory=list)
    first_loss: float = math.nan  # the warm-up step's: before any update, equal for equal weights and batch

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # every variant under the same bf16 autocast: PEFT casts its input to its fp32 adapters' dtype otherwise,
        # and would run its adapter products in fp32 where qmiss runs them in bf16
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def state_bytes(self) -> tuple[int, int]:
        """(allocator, paged) bytes of the optimizer's state tensors."""
        allocator = paged = 0
        for state in self.optimizer.state.values():
            for value in state.values():
                if not isinstance(value, torch.Tensor):
                    continue
                size = value.numel() * value.element_size()
                if getattr(value, "is_paged", False):  # bitsandbytes' paged state: a CPU tensor over managed memory
                    paged += size
                elif value.device.type == "cuda":
                    allocator += size
        return allocator, paged

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


def build_run(name: str, config, device: torch.device) -> Run:
    """Build the quantized model, adapt it as ``name`` and give it a paged 8-bit AdamW, measuring the growth."""
    import bitsandbytes as bnb

    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = build_quantized_model(config, device)
    mark = fingerprint(model)
    model = VARIANTS[name](model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=LR)
    gc.collect()
    torch.cuda.synchronize()
    return Run(name, model, optimizer, sum(p.numel() for p in params), torch.cuda.memory_allocated() - before, mark)


def measured_step(run: Run, batch: dict[str, torch.Tensor]) -> None:
    """One step of ``run`` between two synchronizations, recording its time and its allocator peak."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = run.step(batch)
    torch.cuda.synchronize()
    run.times.append(time.perf_counter() - start)
    run.step_peaks.append(torch.cuda.max_memory_allocated() - before)
    run.losses.append(loss.item())


# --- device-generic measuring (the CPU tests run these on tiny shapes) -----------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queue to drain (CUDA); nothing to wait for elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_on(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes on ``device``, between two synchronizations."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_bytes_on(device: torch.device, fn: Callable[[], object]) -> int:
    """Most bytes ``fn()`` held above what was allocated before it: the CUDA allocator's peak on CUDA, else the
    live-tensor peak ``qmiss.memory.measure_peak`` counts (what a GPU's allocator would have to hold)."""
    if device.type != "cuda":
        return measure_peak(fn).peak_bytes
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# --- the chunked loss against transformers' ---------------------------------------------------------------------

#: Llama-3-8B's head: vocabulary 128,256 × hidden 4,096, bf16; one sequence of each length.
LOSS_VOCAB, LOSS_HIDDEN, LOSS_TOKENS = 128256, 4096, (2048, 4096)
LOSSES = ("transformers", "chunked")


def transformers_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What a transformers causal LM does with its final hidden states: the head's logits in the weight's dtype
    (``lm_head``), then ``ForCausalLMLoss`` (fp32 logits, labels shifted by one)."""
    return ForCausalLMLoss(nn.functional.linear(hidden, weight), labels, weight.shape[0])


@dataclass
class LossComparison:
    """The two losses on one frozen head and one sequence: values, agreement, time and memory."""

    vocab: int
    hidden: int
    tokens: int
    dtype: torch.dtype
    chunk_rows: int  # tokens per chunk by qmiss.loss's automatic rule on this device, just before the runs
    losses: dict[str, float]  # name -> loss value
    grad_rel_diff: float  # ‖dh_chunked − dh_transformers‖ / ‖dh_transformers‖, in fp32
    times: dict[str, list[float]]  # name -> seconds of each timed forward + backward
    peaks: dict[str, int]  # name -> bytes the forward + backward held above what existed before it

    @property
    def loss_rel_diff(self) -> float:
        return abs(self.losses["chunked"] - self.losses["transformers"]) / abs(self.losses["transformers"])

    def tokens_per_s(self, name: str) -> float:
        return self.tokens / statistics.median(self.times[name])


def compare_losses(device: torch.device | str, vocab: int, hidden: int, tokens: int,
                   dtype: torch.dtype = torch.bfloat16, rounds: int = 3, seed: int = 0) -> LossComparison:
    """Forward + backward of ``transformers_loss`` and ``qmiss.loss.chunked_cross_entropy`` on a frozen (V, H)
    head and a (1, tokens, H) hidden state that wants its gradient, as in adapter training.

    One warm-up call of each, then ``rounds`` rounds of one call each, interleaved with the first rotating;
    then one more call of each for its memory peak (:func:`peak_bytes_on`).

    Args:
        device: where to run; CUDA or the CPU.
        vocab, hidden, tokens: the head's (V, H) and the sequence's length.
        dtype: of the head and the hidden states (the matmuls run in it; both losses' softmax in fp32).
        rounds: timed calls of each loss.
        seed: of the weights (N(0, 0.02²)), hidden states (N(0, 1)) and labels.

    Returns:
        A :class:`LossComparison`.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=generator, device=device, dtype=dtype).mul_(0.02)  # (V, H)
    states = torch.randn(1, tokens, hidden, generator=generator, device=device, dtype=dtype)  # (1, T, H)
    labels = torch.randint(0, vocab, (1, tokens), generator=generator, device=device)  # (1, T)
    fns = {"transformers": lambda h: transformers_loss(h, weight, labels),
           "chunked": lambda h: chunked_cross_entropy(h, weight, labels)}
    results: dict[str, tuple[float, torch.Tensor]] = {}

    def call(name: str) -> None:
        h = states.detach().requires_grad_(True)
        loss = fns[name](h)
        loss.backward()
        results[name] = (loss.detach(), h.grad)

    rows = loss_chunk_tokens(vocab, hidden, weight.element_size(), False, None, free_memory(device))
    times: dict[str, list[float]] = {name: [] for name in LOSSES}
    for name in LOSSES:  # warm-up: kernels load, the allocator grows
        call(name)
    for i in range(rounds):
        for name in LOSSES[i % 2:] + LOSSES[:i % 2]:
            times[name].append(timed_on(device, lambda: call(name)))
    peaks = {}
    for name in LOSSES:
        results.pop(name)  # the last call's gradient is not counted in the next one's peak
        peaks[name] = peak_bytes_on(device, lambda: call(name))
    ref, got = results["transformers"][1].float(), results["chunked"][1].float()
    return LossComparison(vocab, hidden, tokens, dtype, rows,
                          {name: float(results[name][0]) for name in LOSSES},
                          float((got - ref).norm() / ref.norm()), times, peaks)


def loss_table(comparisons: list[LossComparison], rounds: int) -> str:
    first = comparisons[0]
    lines = [f"**The chunked loss against transformers'**: head {first.vocab:,d} × {first.hidden:,d} "
             f"{str(first.dtype).removeprefix('torch.')}, frozen; forward + backward to the hidden states; "
             f"median of {rounds} interleaved rounds; peak above the inputs", "",
             "| tokens | chunk rows | loss rel. diff | d hidden rel. diff | tokens/s, transformers | chunked | × | "
             "peak MiB, transformers | chunked | × |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in comparisons:
        speed = {name: c.tokens_per_s(name) for name in LOSSES}
        lines.append(f"| 1×{c.tokens:,d} | {c.chunk_rows:,d} | {c.loss_rel_diff:.1e} | {c.grad_rel_diff:.1e} | "
                     f"{speed['transformers']:,.0f} | {speed['chunked']:,.0f} | "
                     f"{speed['chunked'] / speed['transformers']:.2f} | {c.peaks['transformers'] / MB:,.0f} | "
                     f"{c.peaks['chunked'] / MB:,.0f} | {c.peaks['chunked'] / c.peaks['transformers']:.2f} |")
    return "\n".join(lines)


# --- FSDP2 in one process ---------------------------------------------------------------------------------------


@dataclass
class FsdpRun:
    """Steps of a model sharded by FSDP2 over a group of one process."""

    losses: list[float]  # the warm-up step's first, then each timed step's
    times: list[float]  # seconds of each timed step
    step_peak: int  # bytes one step held above what was allocated before it (after the timed steps)


def fsdp2_steps(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device | str, backend: str,
                rounds: int = 3, lr: float = LR) -> FsdpRun:
    """Shard a prepared qmiss model as accelerate's FSDP2 plugin does (``fully_shard`` on each decoder layer, then
    on the model) in a process group of one, and train it: one warm-up step, ``rounds`` timed steps, one step
    measured for memory (:func:`peak_bytes_on`). The group lives in memory (a ``HashStore``: no port, no
    launcher) and is destroyed on return. The optimizer is torch's AdamW: FSDP2's parameters are DTensors.

    Args:
        model: a prepared qmiss model on ``device`` (``model.model.layers``), in training mode.
        batch: keyword arguments of a training forward (``input_ids``, ``labels``).
        device: where the model is; backend: ``"nccl"`` on CUDA, ``"gloo"`` on the CPU.

    Returns:
        An :class:`FsdpRun`.

    Raises:
        RuntimeError: a process group already exists in this process.
    """
    device = torch.device(device)
    if dist.is_initialized():
        raise RuntimeError("fsdp2_steps: a process group already exists in this process; it makes its own group "
                           "of one and destroys it on return")
    if device.type == "cuda" and device.index is None:  # init_process_group's device_id needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    try:
        for layer in model.model.layers:  # each decoder layer a unit; 4-bit weights sharded as uint8
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        losses: list[float] = []

        def step() -> None:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())

        step()  # warm-up: the optimizer creates its state
        times = [timed_on(device, step) for _ in range(rounds)]
        return FsdpRun(losses, times, peak_bytes_on(device, step))
    finally:
        dist.destroy_process_group()


# --- the report -------------------------------------------------------------------------------------------------


def machine_line() -> str:
    import bitsandbytes
    import peft
    import transformers

    props = torch.cuda.get_device_properties(0)
    return (f"GPU {props.name} ({props.total_memory / GiB:.0f} GiB), torch {torch.__version__} (CUDA "
            f"{torch.version.cuda}), bitsandbytes {bitsandbytes.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, {time.strftime('%Y-%m-%d')}")


def time_table(runs: list[Run], ref: Run, rounds: int) -> str:
    lines = [f"**Step time** (median of {rounds} interleaved rounds, {BATCH}×{SEQ} tokens)", "",
             f"| variant | trainable | step s | × {REFERENCE} | tokens/s |", "|---|---:|---:|---:|---:|"]
    for run in runs:
        lines.append(f"| {run.name} | {run.trainable:,d} | {run.median_s:.3f} | {run.median_s / ref.median_s:.2f} | "
                     f"{BATCH * SEQ / run.median_s:,.0f} |")
    return "\n".join(lines)


def memory_table(runs: list[Run], ref: Run, plans: dict[str, object]) -> str:
    def total(run: Run) -> int:
        allocator, paged = run.state_bytes()
        return run.build_bytes + allocator + max(run.step_peaks) + paged

    lines = ["**Memory** (GiB unless marked; see the notes below for what each column counts)", "",
             f"| variant | resident | step peak | paged optimizer MiB | measured peak | × {REFERENCE} | "
             "planned (plan_memory) | measured ÷ planned |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        allocator, paged = run.state_bytes()
        plan = plans.get(run.name)
        planned = f"{plan.peak_bytes / GiB:.2f}" if plan else "—"
        ratio = f"{total(run) / plan.peak_bytes:.2f}" if plan else "—"
        lines.append(f"| {run.name} | {(run.build_bytes + allocator) / GiB:.2f} | {max(run.step_peaks) / GiB:.2f} | "
                     f"{paged / MB:.0f} | {total(run) / GiB:.2f} | {total(run) / total(ref):.2f} | {planned} | "
                     f"{ratio} |")
    return "\n".join(lines)


def fsdp_table(fsdp: FsdpRun, first_loss: float, step_s: float, step_peak: int) -> str:
    """FSDP2's steps beside qmiss default's unsharded ones (same weights, same batch)."""
    fsdp_s = statistics.median(fsdp.times)
    return "\n".join([
        f"**FSDP2 in one process** (`fully_shard` on each decoder layer, then the model, as accelerate's FSDP2 "
        f"plugin wraps; NCCL group of one): qmiss default, torch AdamW (FSDP2's parameters are DTensors), median "
        f"of {len(fsdp.times)} steps after one warm-up; beside it qmiss default unsharded with PagedAdamW8bit, "
        "from the tables above", "",
        "| | first loss | step s | tokens/s | step peak GiB |", "|---|---:|---:|---:|---:|",
        f"| FSDP2, qmiss default | {fsdp.losses[0]:.4f} | {fsdp_s:.3f} | {BATCH * SEQ / fsdp_s:,.0f} | "
        f"{fsdp.step_peak / GiB:.2f} |",
        f"| qmiss default | {first_loss:.4f} | {step_s:.3f} | {BATCH * SEQ / step_s:,.0f} | {step_peak / GiB:.2f} |",
        f"| FSDP2 ÷ unsharded | | {fsdp_s / step_s:.2f} | | {fsdp.step_peak / step_peak:.2f} |",
        "", f"FSDP2 losses, warm-up first: {', '.join(f'{loss:.4f}' for loss in fsdp.losses)}. The first losses "
        "come before any update, from the same weights and batch: they should agree to bf16 rounding."])


NOTES = """Notes on the memory columns (all seven variants are resident at once; each figure is one variant's own):

- **resident**: `torch.cuda.memory_allocated()` growth while the variant's model was built and adapted (packed
  4-bit weights and quantization state, bf16 embeddings/norms/head, adapters; qmiss's as `prepare_qmiss` leaves
  them), plus its optimizer's state tensors in the allocator, counted tensor by tensor.
- **step peak**: `torch.cuda.max_memory_allocated()` during one of its steps (after
  `torch.cuda.reset_peak_memory_stats()`) minus what was allocated just before that step: activations,
  checkpointed layer inputs, gradients, dequantized weights, the optimizer's temporaries. Largest over the
  timed rounds.
- **paged optimizer**: optimizer states bitsandbytes keeps in CUDA unified memory (`cudaMallocManaged`, tensors
  of 10⁵ values and more), outside the allocator's counters; on the GPU unless memory runs short.
- **measured peak** = resident + step peak + paged: what the variant would need alone, comparable to
  `qmiss.plan_memory(config, bits=4, r=64, mode=..., batch_size=1, seq_len=512, gradient_checkpointing=True,
  optimizer="paged_adamw_8bit", compute_dtype=torch.bfloat16)`, which counts the same parts (paged states as on
  the GPU) and plans for qmiss only. Not counted anywhere: the CUDA context and kernel workspaces allocated once
  per process (the planner's card check adds an allowance for them).
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B shape (Llama-2-7B has 32)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up step per variant")
    parser.add_argument("--loss-rounds", type=int, default=5, help="timed rounds of each loss, after one warm-up")
    parser.add_argument("--fsdp-rounds", type=int, default=3, help="timed FSDP2 steps, after one warm-up step")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_gpu.md"))
    args = parser.parse_args()
    if min(args.layers, args.rounds, args.loss_rounds, args.fsdp_rounds) < 1:
        parser.error("--layers and every --*rounds must be at least 1")
    if not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA GPU visible to torch {torch.__version__}; nothing was measured")
        return 0

    import qmiss

    device = torch.device("cuda")
    config = llama2_7b_config(num_hidden_layers=args.layers)
    runs = []
    for name in VARIANTS:
        print(f"bench_gpu: building {name} ({args.layers} layers)", flush=True)
        runs.append(build_run(name, config, device))
    if len({run.fingerprint for run in runs}) != 1:
        raise RuntimeError(f"the variants' base weights differ: {[(r.name, r.fingerprint) for r in runs]}")
    batch_ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": batch_ids.to(device), "labels": batch_ids.to(device)}

    for run in runs:  # warm-up: kernels load, the optimizers create their state
        run.first_loss = run.step(batch).item()
    for i in range(args.rounds):
        first = i % len(runs)
        for run in runs[first:] + runs[:first]:
            measured_step(run, batch)
    bad = [run.name for run in runs if not all(math.isfinite(loss) for loss in run.losses)]
    if bad:
        raise RuntimeError(f"non-finite loss in {', '.join(bad)}: {[(r.name, r.losses) for r in runs]}")

    plans = {f"qmiss {mode}": qmiss.plan_memory(llama2_7b_config(num_hidden_layers=args.layers), bits=4, r=R,
                                                mode=mode, mini_r=MINI_R if mode == "mini" else None,
                                                batch_size=BATCH, seq_len=SEQ, gradient_checkpointing=True,
                                                optimizer="paged_adamw_8bit", compute_dtype=torch.bfloat16)
             for mode in ("default", "mini", "bat")}
    ref = next(run for run in runs if run.name == REFERENCE)
    report = Report(args.out)
    report.add(f"# bench_gpu: `python {' '.join(sys.argv)}`\n")
    report.add(f"{machine_line()}\n")
    report.add(f"Llama-2-7B shape with {args.layers} decoder layers (hidden 4096, intermediate 11008, vocab 32000), "
               f"random bf16 weights, decoder projections nf4 + double quant; r={R} on {', '.join(LINEAR_NAMES)} "
               f"(LoRA alpha 16); {BATCH}×{SEQ} tokens, gradient checkpointing, bitsandbytes PagedAdamW8bit "
               f"(lr {LR}); bf16 compute. One warm-up step per variant, then {args.rounds} rounds of one step each, "
               f"interleaved, the first variant rotating. Last losses: "
               + ", ".join(f"{r.name} {r.losses[-1]:.3f}" for r in runs) + ".\n")
    report.add(time_table(runs, ref, args.rounds) + "\n")
    report.add(memory_table(runs, ref, plans) + "\n")
    report.add(NOTES)
    report.add(f"Process-wide after the variants: {torch.cuda.memory_allocated() / GiB:.2f} GiB allocated, "
               f"{torch.cuda.max_memory_reserved() / GiB:.2f} GiB reserved at most by the caching allocator.\n")
    default = next(run for run in runs if run.name == "qmiss default")
    default_figures = (default.first_loss, default.median_s, max(default.step_peaks))
    del runs, ref, default, run  # the next sections start from an empty GPU (`run`: the loops' last)
    gc.collect()
    torch.cuda.empty_cache()

    comparisons = []
    for tokens in LOSS_TOKENS:
        print(f"bench_gpu: losses at {LOSS_VOCAB:,d} × {LOSS_HIDDEN:,d}, 1×{tokens:,d} tokens", flush=True)
        comparisons.append(compare_losses(device, LOSS_VOCAB, LOSS_HIDDEN, tokens, rounds=args.loss_rounds))
    report.add(loss_table(comparisons, args.loss_rounds) + "\n")

    print(f"bench_gpu: FSDP2 in one process, qmiss default ({args.layers} layers)", flush=True)
    model = _qmiss("default")(build_quantized_model(config, device)).train()
    fsdp = fsdp2_steps(model, batch, device, "nccl", rounds=args.fsdp_rounds)
    report.add(fsdp_table(fsdp, *default_figures) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
