"""bat at scale: chunking is invisible in the results, and memory stays at one chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qmiss import MissLinear
from qmiss.memory import measure_peak
from tests.conftest import make_base
from tests.test_ops import ref_bat_delta

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
    from qmiss import quant

    weight = quant.dequantize(base).float()
    ref = x.detach() @ (weight + ref_bat_delta(weight, layer.miss_block.detach())).t() + base.bias.float()
    assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert layer.miss_block.grad is not None and torch.isfinite(layer.miss_block.grad).all()
