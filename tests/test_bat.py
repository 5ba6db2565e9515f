"""bat at scale: chunking is invisible in the results, and memory stays at one chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qmiss import MissLinear, ops, quant
from qmiss.memory import measure_peak
from tests.helpers import make_base
from tests.helpers import ref_bat_delta

N_IN, N_OUT, R = 128, 160, 16  # 10 row-blocks
ROW_BYTES = 2 * N_IN * 4  # a chunk holds W_c and W'_c in fp32
CHUNKS = {"one-row-block": R * ROW_BYTES, "3-blocks-not-dividing": 3 * R * ROW_BYTES, "whole-layer": 2**30}
QUANTS = {"nf4": (4, "nf4"), "fp4": (4, "fp4"), "int8": (8, "nf4")}


def run(layer: MissLinear, x: torch.Tensor, grad_out: torch.Tensor, use_checkpoint: bool):
    x = x.detach().clone().requires_grad_()
    layer.miss_block.grad = None
    y = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
    y.backward(grad_out)
    return y.detach(), x.grad, layer.miss_block.grad.clone()


@pytest.mark.parametrize("use_checkpoint", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_equals_unchunked(chunk: str, quant: str, use_checkpoint: bool) -> None:
    bits, qtype = QUANTS[quant]
    base = make_base(bits, N_IN, N_OUT, quant_type=qtype)
    whole = MissLinear(base, r=R, mode="bat", bat_chunk_bytes=2**30)
    chunked = MissLinear(base, r=R, mode="bat", bat_chunk_bytes=CHUNKS[chunk])
    with torch.no_grad():
        whole.miss_block.copy_(torch.randn_like(whole.miss_block) * 0.05)
        chunked.miss_block.copy_(whole.miss_block)
    x, grad_out = torch.randn(3, 7, N_IN), torch.randn(3, 7, N_OUT)
    for got, want in zip(run(chunked, x, grad_out, use_checkpoint), run(whole, x, grad_out, False)):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_gradients_match_the_naive_reference_in_fp64() -> None:
    """W' built in full and F.linear, autograd all the way: the textbook bat."""
    base = make_base(None, 64, 96).double()
    layer = MissLinear(base, r=16, mode="bat", compute_dtype=torch.float64, bat_chunk_bytes=2 * 64 * 8 * 32).double()
    with torch.no_grad():
        layer.miss_block.copy_(torch.randn_like(layer.miss_block) * 0.1)
    x = torch.randn(4, 5, 64, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(4, 5, 96, dtype=torch.float64)
    layer(x).backward(grad_out)

    block = layer.miss_block.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, base.weight + ref_bat_delta(base.weight, block), base.bias).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.miss_block.grad, block.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_7b_layer_memory_stays_at_one_chunk(bits: int) -> None:
    """4096→11008: saved ≤ 2 × (input + adapter); live peak ≤ chunk budget + activations + 10%."""
    budget = 64 * 2**20
    layer = MissLinear(make_base(bits, 4096, 11008, bias=False), r=64, mode="bat", bat_chunk_bytes=budget)
    with torch.no_grad():
        layer.miss_block.copy_(torch.randn_like(layer.miss_block) * 0.01)
    x = torch.randn(1, 256, 4096, requires_grad=True)
    grad_out = torch.randn(1, 256, 11008)
    report = measure_peak(lambda: layer(x).backward(grad_out), exclude=layer.parameters())
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    adapter = nbytes(layer.miss_block)
    assert report.saved_bytes <= 2 * (nbytes(x) + adapter)
    # alive at the worst moment besides one chunk: y, dL/dx, dL/dB (the activations and the adapter's gradient)
    activations = nbytes(grad_out) + nbytes(x) + adapter
    assert report.peak_bytes <= 1.1 * (budget + activations), report
    assert report.peak_bytes >= budget // 2  # the tracker did see the chunks


@pytest.mark.gpu
def test_bat_under_cuda_autocast_matches_bf16_reference() -> None:
    base = make_base(4, 256, 512, quant_type="nf4").to("cuda")
    layer = MissLinear(base, r=64, mode="bat", compute_dtype=torch.bfloat16, bat_chunk_bytes=2 * 256 * 2 * 128)
    with torch.no_grad():
        layer.miss_block.copy_(torch.randn_like(layer.miss_block) * 0.05)
    x = torch.randn(4, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.float().pow(2).mean().backward()
    weight = quant.dequantize(base).float()
    ref = x.detach() @ (weight + ref_bat_delta(weight, layer.miss_block.detach())).t() + base.bias.float()
    assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert layer.miss_block.grad is not None and torch.isfinite(layer.miss_block.grad).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_input_gradient_error_does_not_grow_with_chunks(device: str) -> None:
    """dx over 32 chunks is as close to fp64 as dx from one chunk (3.3e-3; summed in bf16 it was 7.4e-3)."""
    n, r, tokens = 1024, 32, 64
    base = make_base(4, n, n, bias=False).to(device)
    block = torch.randn(n // r, r, r) * 0.05
    grad_out = torch.randn(tokens, n).bfloat16()
    weight = quant.dequantize(base).cpu().double()
    ref = grad_out.double() @ ops.bat_weight(weight, block.double())  # (N, in)
    errors = {}
    for chunks in (1, 32):
        budget = 2 * n * 2 * (n // chunks)  # W_c and W'_c of n/chunks rows in bf16
        layer = MissLinear(base, r=r, mode="bat", compute_dtype=torch.bfloat16, bat_chunk_bytes=budget)
        with torch.no_grad():
            layer.miss_block.copy_(block)
        x = torch.randn(tokens, n, dtype=torch.bfloat16, device=device, requires_grad=True)
        layer(x).backward(grad_out.to(device))
        assert x.grad.dtype == torch.bfloat16
        errors[chunks] = ((x.grad.cpu().double() - ref).norm() / ref.norm()).item()
    assert errors[32] <= 1.1 * errors[1], errors


@pytest.mark.parametrize("double_quant", [True, False], ids=["nf4-dq", "nf4"])
def test_forward_keeps_nothing_but_its_output(double_quant: bool) -> None:
    """Between forward and backward bat holds x, B and the packed weight; no absmax or weight copy of its own."""
    layer = MissLinear(make_base(4, 512, 1024, double_quant=double_quant), r=32, mode="bat")
    x = torch.randn(4, 512, requires_grad=True)
    report = measure_peak(lambda: layer(x))
    y = report.result
    assert report.end_bytes == y.untyped_storage().nbytes(), report
    y.sum().backward()  # and the closure it kept still dequantizes
    assert x.grad is not None and layer.miss_block.grad is not None


def test_8bit_bf16_peak_stays_at_one_chunk() -> None:
    """int8 rows are widened to fp32 a part at a time: no fp32 copy of a whole bf16 chunk (2× the budget)."""
    n_in, n_out, r, tokens = 1024, 2048, 16, 32
    budget = 2 * 2**20  # 512 rows of W_c and W'_c in bf16: 4 chunks
    layer = MissLinear(make_base(8, n_in, n_out, bias=False), r=r, mode="bat", compute_dtype=torch.bfloat16,
                       bat_chunk_bytes=budget)
    with torch.no_grad():
        layer.miss_block.copy_(torch.randn_like(layer.miss_block) * 0.05)
    x = torch.randn(tokens, n_in, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(tokens, n_out, dtype=torch.bfloat16)
    report = measure_peak(lambda: layer(x).backward(grad_out), exclude=layer.parameters())
    # y; dx in bf16 and its fp32 accumulator; B in bf16, dB in bf16 and fp32
    activations = tokens * n_out * 2 + tokens * n_in * (2 + 4) + layer.miss_block.numel() * (2 + 2 + 4)
    assert report.peak_bytes <= 1.1 * budget + activations, (report, budget, activations)
    assert report.peak_bytes >= budget  # the tracker did see the chunks


def test_delta_weight_in_fp64_on_a_4bit_base() -> None:
    """bitsandbytes' CPU 4-bit kernel has no fp64 output: ΔW in fp64 is the fp32 one widened, not garbage."""
    layer = MissLinear(make_base(4, 128, 160), r=R, mode="bat")
    with torch.no_grad():
        layer.miss_block.copy_(torch.randn_like(layer.miss_block) * 0.05)
    want = ref_bat_delta(quant.dequantize(layer.base_layer).double(), layer.miss_block.detach().double())
    got = layer.delta_weight(torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.float(), layer.delta_weight(torch.float32), rtol=1e-6, atol=1e-7)


def test_bat_output_may_be_modified_in_place() -> None:
    """Falcon adds to a projection's output in place; bat's output must not be a view made inside its Function."""
    torch.manual_seed(0)
    layer = MissLinear(make_base(4, 64, 32), r=16, mode="bat")
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = layer(x)
    y += 1.0
    y.sum().backward()
    assert x.grad is not None and layer.miss_block.grad is not None
