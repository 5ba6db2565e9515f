"""MissLinear against fp32 references on the dequantized weight (DESIGN.md's formulas)."""

from __future__ import annotations

import pytest
import torch

import qmiss
from qmiss import MissLinear, ops, quant
from tests.helpers import make_base
from tests.helpers import BLOCK_MODES, MODES, randomize, ref_block_delta, reference

BITS = [4, 8, None]
BIT_IDS = ["4bit", "8bit", "16bit"]


def make_layer(mode: str, bits: int | None, n_in: int = 128, n_out: int = 192, r: int = 32, **kw) -> MissLinear:
    return MissLinear(make_base(bits, n_in, n_out), r=r, mode=mode, mini_r=16 if mode == "mini" else None, **kw)


@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
@pytest.mark.parametrize("mode", MODES)
def test_output_matches_fp32_reference(mode: str, bits: int | None) -> None:
    layer = make_layer(mode, bits)
    randomize(layer)
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        y = layer(x)
        expected = reference(layer, x)
        got = y if mode in BLOCK_MODES else y - layer.base_layer(x)
    scale = y.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("n_in", [100, 30], ids=["in=100", "in<r"])
def test_default_pads_ragged_inputs(n_in: int) -> None:
    layer = MissLinear(make_base(None, n_in, 64), r=32 if n_in >= 32 else 16)
    randomize(layer)
    x = torch.randn(3, n_in)
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), reference(layer, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
@pytest.mark.parametrize("mode", MODES)
def test_zero_adapter_is_the_base_model(mode: str, bits: int | None) -> None:
    layer = make_layer(mode, bits)
    x = torch.randn(4, 128)
    with torch.no_grad():
        base, y = layer.base_layer(x), layer(x)
        if mode == "bat":  # rebuilt from the dequantized weight: equal up to fp32 rounding (bat_row: z = 0, exact)
            assert (y - base).abs().max() <= 1e-5 * base.abs().max()
        else:
            assert torch.equal(y, base)
        randomize(layer)
        assert (layer(x) - base).abs().max() > 1e-2


@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
@pytest.mark.parametrize("mode", MODES)
def test_adapter_gradient_matches_reference(mode: str, bits: int | None) -> None:
    layer = make_layer(mode, bits)
    block = randomize(layer).requires_grad_()
    x = torch.randn(3, 4, 128)
    grad_out = torch.randn(3, 4, 192)
    (layer(x) * grad_out).sum().backward()

    (reference(layer, x, block) * grad_out).sum().backward()  # autograd through the naive formulas
    err = (layer.miss_block.grad - block.grad).abs().max() / block.grad.abs().max()
    assert err <= 1e-4


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
@pytest.mark.parametrize("mode", MODES)
def test_input_gradient_flows_through_the_layer(mode: str, bits: int) -> None:
    layer = make_layer(mode, bits)
    randomize(layer)
    x = torch.randn(6, 128, requires_grad=True)
    grad_out = torch.randn(6, 192)
    (layer(x) * grad_out).sum().backward()
    weight = quant.dequantize(layer.base_layer)
    block = layer.miss_block.detach()
    if mode in BLOCK_MODES:
        weight = weight + ref_block_delta(mode, weight, block)
    expected = grad_out @ weight
    if mode not in BLOCK_MODES:
        xr = x.detach().clone().requires_grad_()
        (reference(layer, xr) * grad_out).sum().backward()
        expected = expected + xr.grad
    assert (x.grad - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
@pytest.mark.parametrize("mode", MODES)
def test_base_is_frozen_and_unchanged_by_training(mode: str, bits: int | None) -> None:
    layer = make_layer(mode, bits)
    before = quant.dequantize(layer.base_layer).clone()
    packed = layer.base_layer.weight.data.clone()
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert trainable == [layer.miss_block]
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(3):
        layer(torch.randn(4, 128)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert layer.base_layer.weight.grad is None
    assert torch.equal(layer.base_layer.weight.data, packed)
    assert torch.equal(quant.dequantize(layer.base_layer), before)
    assert layer.miss_block.abs().sum() > 0


def test_bias_is_applied_once_in_bat() -> None:
    layer = make_layer("bat", 4)
    x = torch.randn(2, 128)
    with torch.no_grad():
        assert layer.bias is not None
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=1e-5)


def test_dropout_only_touches_the_adapter_input() -> None:
    layer = make_layer("default", None, dropout=0.5)
    randomize(layer)
    x = torch.randn(8, 128)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), reference(layer, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_in,n_out,r,mode,kw,match", [
    (128, 64, 0, "default", {}, "r=0"),
    (32, 64, 64, "default", {}, "r=64 must be in 1..in_features=32"),
    (96, 64, 64, "bat", {}, "not both divisible by r=64"),
    (128, 96, 64, "bat_row", {}, "not both divisible by r=64; bat_row needs r×r blocks"),
    (64, 100, 16, "mini", {"mini_r": 16}, "out_features=100 is not divisible by mini_r=16"),
    (64, 64, 16, "lora", {}, "mode='lora'"),
], ids=["r=0", "r>in", "bat-indivisible", "bat_row-out-indivisible", "mini-indivisible", "bad-mode"])
def test_layer_rejects_bad_shapes(n_in, n_out, r, mode, kw, match) -> None:
    with pytest.raises(ValueError, match=match) as info:
        MissLinear(make_base(None, n_in, n_out), r=r, mode=mode, name="model.layers.3.mlp.down_proj", **kw)
    assert "model.layers.3.mlp.down_proj" in str(info.value)


def saved_for_backward(fn) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The tensors autograd saves for backward while ``fn`` runs, and fn's output."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    setattr(pack, ops.REPEATABLE_UNPACK, True)  # an identity unpack: bat_row may rebuild a product input under it
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_bat_saves_no_weight_for_backward(bits: int) -> None:
    """A 4096→11008 layer: what backward keeps is x and B, never a dequantized (out×in) weight."""
    layer = MissLinear(make_base(bits, 4096, 11008, bias=False), r=64, mode="bat")
    randomize(layer, 0.01)
    x = torch.randn(1, 256, 4096, requires_grad=True)
    saved, y = saved_for_backward(lambda: layer(x))
    own = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    foreign = sum(n for ptr, n in storages.items() if ptr not in own)
    budget = 2 * (x.numel() * x.element_size() + layer.miss_block.numel() * layer.miss_block.element_size())
    assert foreign <= budget, [(tuple(t.shape), t.dtype) for t in saved]
    assert foreign >= x.numel() * x.element_size()  # the hook did see what bat saves
    y.sum().backward()
    assert layer.miss_block.grad is not None and x.grad is not None


@pytest.mark.parametrize("mode", ["default", "bat", "bat_row"])
@pytest.mark.parametrize("training", [True, False])
def test_an_8bit_layer_takes_4d_inputs(mode: str, training: bool) -> None:
    """DeepSeek-V3 feeds kv_b_proj a (batch, 1, seq, rank) input; bitsandbytes' 8-bit matmul flattens 3-D
    inputs only, and its eval path failed on 4-D ones ("size of tensor a must match")."""
    torch.manual_seed(0)
    layer = MissLinear(make_base(8, 64, 48), r=16, mode=mode).train(training)
    x = torch.randn(2, 1, 5, 64)
    with torch.no_grad():
        y = layer(x)
        flat = layer(x.reshape(10, 64))
        with qmiss.disable_adapter(layer):
            base = layer(x)
    assert y.shape == (2, 1, 5, 48) and torch.equal(y.reshape(10, 48), flat)
    assert base.shape == (2, 1, 5, 48)


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_bat_row_saves_no_weight_and_no_turned_input(bits: int) -> None:
    """bat_row keeps x (for dB) and B, as default keeps its shard sums: never a dequantized weight, and not the
    turned input x + z the base is called on (bitsandbytes keeps no input for a frozen weight)."""
    layer = MissLinear(make_base(bits, 1024, 2048, bias=False), r=64, mode="bat_row")
    randomize(layer, 0.01)
    x = torch.randn(1, 128, 1024, requires_grad=True)
    saved, y = saved_for_backward(lambda: layer(x))
    own = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    foreign = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
               if t.untyped_storage().data_ptr() not in own}
    assert x.untyped_storage().data_ptr() in foreign
    assert sum(foreign.values()) <= x.numel() * x.element_size() + 2 * 2048 * 1024 * (bits / 8) / 2, \
        [(tuple(t.shape), t.dtype) for t in saved]
    y.sum().backward()
    assert layer.miss_block.grad is not None and x.grad is not None


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_bat_row_rebuilds_a_product_input(bits: int) -> None:
    """A gated MLP's down input h = act(gate)·up: autograd keeps act(gate) and up for the product's backward,
    so bat_row rebuilds h from them in backward instead of keeping it; the gradients are those of a layer that
    kept h (the same h, the same products: bitwise)."""
    layer = MissLinear(make_base(bits, 1024, 256, bias=False), r=64, mode="bat_row")
    randomize(layer, 0.01)
    gate, up = (torch.randn(1, 128, 1024, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(1, 128, 256)

    def run(h_of):
        gate.grad = up.grad = layer.miss_block.grad = None
        h = h_of(torch.nn.functional.silu(gate), up)
        saved, y = saved_for_backward(lambda: layer(h))
        kept_h = h.untyped_storage().data_ptr() in {t.untyped_storage().data_ptr() for t in saved}
        y.backward(grad_out)
        return kept_h, y.detach(), [t.grad.clone() for t in (gate, up, layer.miss_block)]

    kept, y_kept, grads_kept = run(lambda a, u: (a * u).clone())  # a clone is no product: h is kept
    rebuilt, y, grads = run(lambda a, u: a * u)
    assert kept and not rebuilt
    assert torch.equal(y, y_kept)
    for got, want in zip(grads, grads_kept):
        assert torch.equal(got, want)


@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant"])
def test_bat_row_product_input_under_checkpointing(checkpointing: str) -> None:
    """Checkpointing recomputes the MLP: the rebuilt down input comes from the recomputed factors (non-reentrant
    checkpointing unpacks the original product's saved tensors into their recomputed values)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    down = MissLinear(make_base(4, 512, 128, bias=False), r=64, mode="bat_row")
    randomize(down, 0.01)
    x = torch.randn(2, 16, 512, requires_grad=True)
    w = torch.randn(512, requires_grad=True)

    def mlp(x: torch.Tensor) -> torch.Tensor:
        return down(torch.nn.functional.silu(x * 2) * (x * w))

    grads = []
    for wrap in (mlp, lambda x: checkpoint(mlp, x, use_reentrant=checkpointing == "reentrant")):
        x.grad = w.grad = down.miss_block.grad = None
        wrap(x).square().sum().backward()
        grads.append([t.grad.clone() for t in (x, w, down.miss_block)])
    for got, want in zip(*grads):
        assert torch.equal(got, want)


def test_bat_row_is_the_fp64_dense_reference() -> None:
    """Forward, dx and dB of a bat_row layer on an fp64 base equal autograd through W' built block by block."""
    torch.manual_seed(0)
    base = torch.nn.Linear(96, 64, dtype=torch.float64).requires_grad_(False)
    layer = MissLinear(base, r=32, mode="bat_row", compute_dtype=torch.float64)
    with torch.no_grad():
        layer.miss_block.copy_(torch.randn(3, 32, 32, dtype=torch.float64) * 0.1)
    block = layer.miss_block.detach().clone().requires_grad_()
    x = torch.randn(2, 7, 96, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    grad_out = torch.randn(2, 7, 64, dtype=torch.float64)
    (layer(x) * grad_out).sum().backward()
    weight = base.weight + ref_block_delta("bat_row", base.weight, block.double())  # the adapter is kept in fp32
    (torch.nn.functional.linear(xr, weight, base.bias) * grad_out).sum().backward()
    for got, want, tol in ((layer(x).detach(), torch.nn.functional.linear(xr, weight, base.bias).detach(), 1e-12),
                           (x.grad, xr.grad, 1e-12), (layer.miss_block.grad, block.grad, 1e-6)):  # dB: fp32, rounded
        assert (got - want).abs().max() <= tol * want.abs().max()
