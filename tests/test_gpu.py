"""What only a CUDA GPU shows (marker ``gpu``: conftest skips these without one).

``bash scripts/gpu_check.sh`` runs them (``pytest -m gpu``) and then benchmarks/bench_gpu.py.

- One layer per mode × 4/8-bit on a base quantized on the GPU, bf16 compute: output, adapter and
  input gradients against fp32 references on the dequantized weight. CUDA's 8-bit base is LLM.int8
  (int8 activations, outliers above 6.0 in fp16) in training and eval alike, so default/mini 8-bit
  are held to the base layer's own output plus the adapter term; bat computes x·W'ᵀ from the
  dequantized weight on every device and is held to the dequantized reference.
- The bf16 dtype flow of a model loaded in bf16: every decoder layer gets bf16, the loss is fp32.
- Models prepared on the CPU and moved, by hand or by the Trainer: bitsandbytes' quantization state
  follows the weights, the compute dtype follows the device, results equal a model prepared on the GPU.
- The QLoRA recipe through transformers' Trainer: bf16, gradient checkpointing, paged 8-bit AdamW.
- FlashAttention-2 (when installed) and ``qmiss-train`` under torchrun on two GPUs (when there are two).
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from typing import Iterator

import pytest
import torch
from torch import nn

import qmiss
from qmiss import MissLinear, ops, quant
from qmiss.prepare import is_checkpointing
from tests.helpers import free_port, make_base, randomize_adapters, tiny_llama, tiny_llama_config, train_args as args
from tests.helpers import BLOCK_MODES, MODES, randomize, reference

DEVICE = "cuda"  # one name for the device, so a test body can be read (and tried) against another
BF16 = torch.bfloat16
BITS, BIT_IDS = [4, 8], ["4bit", "8bit"]
N_IN, N_OUT, R = 256, 384, 32  # in % 64 == 0: bitsandbytes' fused 4-bit kernel and bat's row chunks both apply
BAT_CHUNK = 2 * N_IN * 2 * 64  # bat: 64 bf16 rows of W_c and W'_c, so 6 chunks (row-range dequantization on the GPU)
# bf16 keeps 8 significant bits (unit roundoff 2^-8 ≈ 3.9e-3). Relative to the output's largest magnitude,
# these layers' bf16 errors measured 2.5e-3 to 5.3e-3 (the same computation on the CPU); the bounds are 3-5× that.
OUT_TOL = 1.5e-2
GRAD_TOL = 2.5e-2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute error relative to the reference's largest magnitude (bf16 rounds relative to scale)."""
    want = want.detach().float()
    return ((got.detach().float() - want).abs().max() / want.abs().max()).item()


def rule_dtype() -> torch.dtype:
    """The compute dtype qmiss picks on this GPU when none is given: bf16, fp16 where bf16 is not native."""
    return BF16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def cuda_base(bits: int) -> nn.Module:
    """make_base's deterministic linear, quantized on the GPU by bitsandbytes' CUDA kernels (as prepare_qmiss
    quantizes a model loaded there): an 8-bit weight quantized on the CPU and then moved would test the move."""
    linear = make_base(None, N_IN, N_OUT).to(DEVICE)
    return quant.quantize_linear(linear, bits).requires_grad_(False)


def snapshot(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a (possibly bitsandbytes) parameter's values. ``Params4bit.cpu()`` would move the
    layer's shared QuantState to the CPU in place, so the values are read as a plain tensor."""
    return tensor.detach().as_subclass(torch.Tensor).to("cpu", copy=True)


def token_rows(n: int, seq: int = 16, vocab: int = 256, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """A Trainer dataset of random token rows (labels = inputs)."""
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


def checkpointing_kwargs() -> dict[str, bool]:
    """TrainingArguments' checkpointing switch under its current name (transformers 5 renamed it)."""
    from transformers import TrainingArguments

    name = "activation_checkpointing"
    return {name: True} if name in TrainingArguments.__dataclass_fields__ else {"gradient_checkpointing": True}


def assert_quant_state_on_device(model: nn.Module) -> None:
    """Every tensor bitsandbytes keeps for a wrapped layer is on the GPU (``DEVICE``): the packed weight and,
    8-bit, the int8 matrix and row scales on the weight (CB/SCB) and on ``layer.state`` (where the first
    forward moves them); 4-bit, the QuantState reached through the weight and through the layer."""
    for name, layer in qmiss.miss_layers(model):
        base = layer.base_layer
        parts = {"weight": base.weight.data}
        if layer.bits == 8:
            parts |= {"weight.CB": base.weight.CB, "weight.SCB": base.weight.SCB,
                      "state.CB": base.state.CB, "state.SCB": base.state.SCB}
            assert base.weight.SCB is not None or base.state.SCB is not None, f"{name}: no row scales at all"
        else:
            states = {"weight.quant_state": base.weight.quant_state, "layer.quant_state": base.quant_state}
            for where, state in states.items():
                parts |= {f"{where}.absmax": state.absmax, f"{where}.code": state.code}
                if state.nested:
                    parts |= {f"{where}.offset": state.offset, f"{where}.state2.absmax": state.state2.absmax}
        wrong = {part: str(t.device) for part, t in parts.items() if t is not None and t.device.type != DEVICE}
        assert not wrong, f"{name}: left behind: {wrong}"


def assert_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Each adapter computes in ``dtype``, and so does each 4-bit base matmul (bitsandbytes' compute_dtype)."""
    for name, layer in qmiss.miss_layers(model):
        assert layer.compute_dtype == dtype, (name, layer.compute_dtype)
        if layer.bits == 4:
            assert layer.base_layer.compute_dtype == dtype, (name, layer.base_layer.compute_dtype)


@contextlib.contextmanager
def layer_input_dtypes(model: nn.Module) -> Iterator[list[torch.dtype]]:
    """The dtype of the hidden states each decoder layer receives, in call order, while the block runs."""
    seen: list[torch.dtype] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).dtype)

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in model.model.layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


# --- one layer on a CUDA base -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
@pytest.mark.parametrize("mode", MODES)
def test_layer_on_cuda_matches_fp32_reference(mode: str, bits: int) -> None:
    base = cuda_base(bits)
    layer = MissLinear(base, r=R, mode=mode, mini_r=16 if mode == "mini" else None, compute_dtype=BF16,
                       bat_chunk_bytes=BAT_CHUNK)
    block = randomize(layer)
    x = torch.randn(4, 16, N_IN, device=DEVICE, dtype=BF16, requires_grad=True)
    grad_out = torch.randn(4, 16, N_OUT, device=DEVICE, dtype=BF16)
    y = layer(x)
    y.backward(grad_out)
    assert y.dtype == BF16 and base.weight.grad is None

    # fp32 references through the textbook formulas on the dequantized weight, differentiable in x and B
    xr = x.detach().float().requires_grad_()
    br = block.clone().requires_grad_()
    base_ref = xr @ quant.dequantize(base).t() + base.bias.float()
    full_ref = reference(layer, xr, br) if mode in BLOCK_MODES else base_ref + reference(layer, xr, br)
    full_ref.backward(grad_out.float())
    assert rel_err(full_ref, base_ref) > 10 * OUT_TOL  # the adapter moves the output far past the tolerance

    if bits == 8 and mode == "bat_row":
        with torch.no_grad():  # LLM.int8 on the turned input, plus the tiled shard sum: the layer adds exactly that
            z = ops.bat_row_turn(x, block.to(BF16))
            base_out = base(x + z)
            want = base_out.float() + ops.tile_out(ops.shard_sum(z, R), N_OUT).float()
        assert rel_err(want, full_ref) <= 5e-2  # int8 activations cost ~1% against the dequantized W' product
    elif bits == 8 and mode != "bat":
        with torch.no_grad():  # LLM.int8's own output, plus the adapter term: the layer adds exactly that
            base_out = base(x)
            want = base_out.float() + reference(layer, x.detach().float(), block)
        # and LLM.int8 stays near the dequantized matmul (its int8 activations cost ~1%; stale or misplaced
        # row scales would not)
        assert rel_err(base_out, base_ref) <= 5e-2
    else:
        want = full_ref
    assert rel_err(y, want) <= OUT_TOL
    # dB through bf16 compute; dx through bitsandbytes' backward (4-bit and 8-bit alike multiply by the
    # dequantized weight) plus the adapter's part, or through bat's chunked backward
    assert rel_err(layer.miss_block.grad, br.grad) <= GRAD_TOL
    assert rel_err(x.grad, xr.grad) <= GRAD_TOL

    layer.eval()  # inference takes other bitsandbytes paths (no autograd Function for 4-bit): same result
    with torch.no_grad():
        assert rel_err(layer(x), want) <= OUT_TOL


# --- the bf16 dtype flow ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
@pytest.mark.parametrize("mode", ["default", "bat", "bat_row"])
def test_bf16_model_on_cuda_keeps_a_bf16_stream(mode: str, bits: int, autocast: bool) -> None:
    if rule_dtype() != BF16:
        pytest.skip("this GPU has no native bf16: the compute-dtype rule picks fp16 here")
    model = qmiss.prepare_qmiss(tiny_llama(num_hidden_layers=3).to(DEVICE, BF16), r=16, bits=bits, mode=mode)
    model.train()
    assert_compute_dtype(model, BF16)  # no compute_dtype given: the rule's choice for CUDA
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    assert frozen == {BF16}  # nothing upcast: embeddings, norms and head stay as loaded
    ids = torch.randint(0, 256, (2, 16), device=DEVICE)
    with layer_input_dtypes(model) as seen, torch.autocast(DEVICE, dtype=BF16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    assert seen == [BF16] * 3
    assert loss.dtype == torch.float32  # transformers upcasts the logits for the loss
    loss.backward()
    grads = [layer.miss_block.grad for _, layer in qmiss.miss_layers(model)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.gpu
def test_fp32_norms_trains_on_cuda() -> None:
    """QLoRA's fp32 norms and head (``fp32_norms=True``): an fp32 stream into bf16 4-bit matmuls and SDPA in fp32."""
    model = qmiss.prepare_qmiss(tiny_llama().to(DEVICE, BF16), r=16, bits=4, fp32_norms=True)
    model.train()
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    assert model.lm_head.weight.dtype == torch.float32
    assert_compute_dtype(model, rule_dtype())  # the base matmuls still run in 16 bits
    ids = torch.randint(0, 256, (2, 16), device=DEVICE)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(layer.miss_block.grad).all() for _, layer in qmiss.miss_layers(model))


# --- prepared on the CPU, moved to the GPU ----------------------------------------------------------------------


def train_forward(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, logits, adapter gradients) of one training forward and backward."""
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: layer.miss_block.grad for name, layer in qmiss.miss_layers(model)}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.gpu
@pytest.mark.parametrize("cpu_forward", [False, True], ids=["fresh", "after-a-cpu-forward"])
@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
def test_prepared_on_cpu_and_moved_equals_prepared_on_cuda(bits: int, cpu_forward: bool) -> None:
    ids = torch.randint(0, 256, (2, 16))
    moved = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=bits)
    randomize_adapters(moved)
    assert_compute_dtype(moved, torch.float32)  # the CPU's choice, until the move
    if cpu_forward:  # bitsandbytes' 8-bit forward moves CB/SCB from the weight onto layer.state
        with torch.no_grad():
            moved(ids)
    moved.to(DEVICE)
    assert_quant_state_on_device(moved)
    assert_compute_dtype(moved, rule_dtype())  # no compute_dtype given: it follows the device

    direct = qmiss.prepare_qmiss(tiny_llama().to(DEVICE), r=16, bits=bits)  # the same fp32 weights, on the GPU
    randomize_adapters(direct)  # the same adapter values
    assert_compute_dtype(direct, rule_dtype())

    loss_m, logits_m, grads_m = train_forward(moved, ids.to(DEVICE))
    loss_d, logits_d, grads_d = train_forward(direct, ids.to(DEVICE))
    assert_quant_state_on_device(moved)  # the 8-bit forward writes state.CB back onto the weight: still here
    # Both compute in 16 bits from weights quantized by two devices' kernels (which may round a rare tie
    # differently), so the bound is bf16's, not equality.
    assert abs(loss_m.item() - loss_d.item()) <= 1e-2 * abs(loss_d.item())
    assert rel_err(logits_m, logits_d) <= 2e-2
    for name, grad in grads_d.items():
        assert grads_m[name] is not None and rel_err(grads_m[name], grad) <= 5e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
def test_an_explicit_compute_dtype_survives_the_move(bits: int) -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=bits, compute_dtype=torch.float32).to(DEVICE)
    assert_quant_state_on_device(model)
    assert_compute_dtype(model, torch.float32)
    loss, _, grads = train_forward(model, torch.randint(0, 256, (2, 16), device=DEVICE))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
def test_trainer_moves_a_cpu_prepared_model_and_trains_it(tmp_path, bits: int) -> None:
    from transformers import Trainer, TrainingArguments

    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=bits)
    frozen = {n: snapshot(p) for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="no", report_to=[], logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=token_rows(8))
    assert {p.device.type for p in model.parameters()} == {DEVICE}  # the Trainer's own model.to(args.device)
    assert_quant_state_on_device(model)
    assert_compute_dtype(model, rule_dtype())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert_quant_state_on_device(model)
    assert all(layer.miss_block.abs().sum() > 0 for _, layer in qmiss.miss_layers(model))
    assert all(torch.equal(snapshot(p), frozen[n]) for n, p in model.named_parameters() if n in frozen)


# --- the QLoRA recipe through the Trainer -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "bat", "bat_row"])
def test_trainer_bf16_checkpointing_paged_adamw_8bit(tmp_path, mode: str) -> None:
    from transformers import Trainer, TrainingArguments

    # wide enough that bitsandbytes really keeps 8-bit (>= 4096 values) and paged (>= 1e5 values) states:
    # gate/up's adapter is 64 × 2048 in either mode
    config = dict(hidden_size=256, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=2)
    model = qmiss.prepare_qmiss(tiny_llama(**config).to(DEVICE, BF16), r=64, bits=4, mode=mode)
    start = {n: layer.miss_block.detach().clone() for n, layer in qmiss.miss_layers(model)}
    frozen = {n: snapshot(p) for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             bf16=True, optim="paged_adamw_8bit", save_strategy="no", report_to=[], logging_steps=1,
                             **checkpointing_kwargs())
    trainer = Trainer(model=model, args=args, train_dataset=token_rows(12, seq=32))
    mlp_calls = []  # a checkpointed layer's MLP runs twice a step: in forward and again in backward's recompute
    handle = model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: mlp_calls.append(1))
    try:
        trainer.train()
    finally:
        handle.remove()
    assert is_checkpointing(model) and len(mlp_calls) == 2 * 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    states = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    assert any(v.dtype == torch.uint8 for v in states)  # 8-bit moments
    assert any(getattr(v, "is_paged", False) for v in states)  # in paged (unified) memory
    assert all(not torch.equal(layer.miss_block, start[n]) for n, layer in qmiss.miss_layers(model))
    assert all(torch.equal(snapshot(p), frozen[n]) for n, p in model.named_parameters() if n in frozen)


# --- FlashAttention-2 -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "bat"])
def test_flash_attention_2_gets_bf16_qkv_and_trains(mode: str) -> None:
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation="flash_attention_2", dtype=BF16)
    model = qmiss.prepare_qmiss(model.to(DEVICE), r=16, bits=4, mode=mode)
    model.train()
    assert model.config._attn_implementation == "flash_attention_2"
    start = {n: layer.miss_block.detach().clone() for n, layer in qmiss.miss_layers(model)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    # transformers' flash_attention_forward casts fp32 q/k/v to a guessed dtype before the kernel, which would
    # hide an fp32 stream; a probe registered under the same name sees what reaches attention
    flash = ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
    seen: list[tuple[torch.dtype, ...]] = []

    def probe(module, query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return flash(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("flash_attention_2", probe)
    try:
        ids = torch.randint(0, 256, (2, 16), device=DEVICE)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
    finally:
        AttentionInterface.register("flash_attention_2", flash)
    assert seen == [(BF16, BF16, BF16)] * model.config.num_hidden_layers
    assert torch.isfinite(loss)
    assert all(not torch.equal(layer.miss_block, start[n]) for n, layer in qmiss.miss_layers(model))


# --- two GPUs ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_qmiss_train_on_two_gpus(tmp_path, tiny_model_dir: str, jsonl: str) -> None:
    """``torchrun --nproc_per_node 2 -m qmiss.train``: each rank on its own GPU, both train, rank 0 writes."""

    out = tmp_path / "run"
    flags = [a for a in args(tiny_model_dir, jsonl, out, "--max_steps", "3", "--per_device_train_batch_size", "2",
                             "--save_strategy", "steps", "--save_steps", "3", "--bf16") if a != "--use_cpu"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "qmiss.train", *flags]
    proc = subprocess.run(command, capture_output=True, timeout=600, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["peak_memory_kind"] == "cuda max_memory_allocated"
    assert qmiss.read_adapter(out)[0].r == 16
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(0.6)  # 3 steps × 2 ranks × 2 rows = 12 of 20 rows: both ranks trained


@pytest.mark.gpu
@pytest.mark.parametrize("leave_free", [None, 2 * 2**30], ids=["all-free", "2GiB-free"])
def test_the_loss_chunk_follows_the_head_and_cudas_free_memory(leave_free) -> None:
    """Llama-3-8B's head (128,256 × 4,096 bf16, 1 GiB) on 4,096 tokens: with the card free, chunks as large as the
    head (1,344 rows); with 2 GiB left free, at most a quarter of that (640 rows). The peak the loss adds is one
    chunk plus the hidden gradient, as the planner counts it."""
    from qmiss.loss import auto_chunk_tokens, chunk_bytes_per_token, chunked_cross_entropy, free_memory

    vocab, hidden, tokens = 128256, 4096, 4096
    device = torch.device(DEVICE)
    gen = torch.Generator(device).manual_seed(0)
    w = torch.randn(vocab, hidden, device=device, dtype=BF16, generator=gen) * hidden**-0.5
    h = torch.randn(tokens, hidden, device=device, dtype=BF16, generator=gen).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    blocker = None
    if leave_free is not None:  # take all but leave_free of what is free
        torch.cuda.empty_cache()
        blocker = torch.empty(free_memory(device) - leave_free, dtype=torch.uint8, device=device)
    free = free_memory(device)
    total = torch.cuda.mem_get_info(device)[1]
    assert 0 < free <= total
    rows = auto_chunk_tokens(vocab, hidden, 2, free_bytes=free)
    assert rows == auto_chunk_tokens(vocab, hidden, 2, free_bytes=None if leave_free is None else leave_free)
    chunk = rows * chunk_bytes_per_token(vocab, 2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    chunked_cross_entropy(h, w, shift_labels=labels).backward()
    added = torch.cuda.max_memory_allocated(device) - before
    assert chunk <= added <= chunk + 4 * tokens * hidden * 2, (added, chunk)
    del blocker


@pytest.mark.gpu
def test_8bit_on_cuda_says_its_fp16_cast_once(caplog) -> None:
    """bitsandbytes logs its fp16 cast at every 8-bit call: a training step of a bf16 model logs it once."""
    import logging

    quant.INT8_CAST_NOTICE.said = False
    model = qmiss.prepare_qmiss(tiny_llama().to(torch.bfloat16).cuda(), r=16, bits=8)
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.autograd._functions"):
        model(input_ids=ids, labels=ids).loss.backward()
    casts = [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert len(casts) == 1 and "65,504" in casts[0].getMessage()
