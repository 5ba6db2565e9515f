"""The GPU's regime, reproduced on the CPU: the compute-dtype rule, the bf16 dtype flow, device moves,
and what an 8-bit base computes per device (the CPU's eval path runs CUDA's LLM.int8 algorithm)."""

from __future__ import annotations

import pytest
import torch

import qmiss
from qmiss import MissLinear
from tests.helpers import load, make_base, mode_kwargs, tiny_llama
from tests.helpers import MODES, randomize, reference


def _layer_inputs(model, ids: torch.Tensor, autocast: bool) -> tuple[list[torch.dtype], torch.Tensor]:
    """The dtype of every decoder layer's hidden-state input, and the loss, of one training forward."""
    seen: list[torch.dtype] = []
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).dtype), with_kwargs=True)
        for layer in model.model.layers]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
    finally:
        for hook in hooks:
            hook.remove()
    return seen, loss


# --- the bf16 dtype flow ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_bf16_model_keeps_a_bf16_residual_stream(bits: int, autocast: bool) -> None:
    model = qmiss.prepare_qmiss(tiny_llama(num_hidden_layers=3).to(torch.bfloat16), r=16, bits=bits,
                                compute_dtype=torch.bfloat16)
    model.train()
    seen, loss = _layer_inputs(model, torch.randint(0, 256, (2, 8)), autocast)
    assert seen == [torch.bfloat16] * 3
    assert loss.dtype == torch.float32  # transformers upcasts the logits for the loss
    loss.backward()
    assert all(layer.miss_block.grad.dtype == torch.float32 for _, layer in qmiss.miss_layers(model))
    assert {p.dtype for n, p in model.named_parameters() if "norm" in n} == {torch.bfloat16}


def test_fp32_norms_is_qloras_upcast_and_widens_the_stream() -> None:
    model = qmiss.prepare_qmiss(tiny_llama(num_hidden_layers=3).to(torch.bfloat16), r=16, bits=4,
                                compute_dtype=torch.bfloat16, fp32_norms=True)
    seen, loss = _layer_inputs(model, torch.randint(0, 256, (2, 8)), autocast=False)
    assert seen == [torch.bfloat16, torch.float32, torch.float32]  # documented: the stream turns fp32
    assert model.lm_head.weight.dtype == torch.float32 and torch.isfinite(loss)


def test_bf16_flow_matches_fp32_loss() -> None:
    """The same 4-bit model and adapters, run in the bf16 flow and in fp32: the losses agree to bf16 precision."""
    ids = torch.randint(0, 256, (2, 16))
    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        model = qmiss.prepare_qmiss(tiny_llama().to(dtype), r=16, bits=4, compute_dtype=dtype)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, layer in qmiss.miss_layers(model):
                layer.miss_block.copy_(torch.randn(layer.miss_block.shape, generator=gen) * 0.02)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    assert abs(losses[1] - losses[0]) <= 2e-2 * abs(losses[0])


# --- the compute-dtype rule -------------------------------------------------------------------------------------


def test_compute_dtype_follows_the_device_after_a_move(monkeypatch) -> None:
    """A model prepared on the CPU and moved (here: a move the rule sees as a GPU) computes in the rule's dtype there;
    a compute dtype the user gave stays."""
    free = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4)
    fixed = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, compute_dtype=torch.float32)
    assert all(layer.compute_dtype == torch.float32 for _, layer in qmiss.miss_layers(free))
    monkeypatch.setattr("qmiss.layer.default_compute_dtype", lambda device: torch.bfloat16)
    free.to("cpu"), fixed.to("cpu")  # nn.Module._apply: what .to("cuda") and the Trainer's move run
    for _, layer in qmiss.miss_layers(free):
        assert layer.compute_dtype == torch.bfloat16 and layer.base_layer.compute_dtype == torch.bfloat16
    for _, layer in qmiss.miss_layers(fixed):
        assert layer.compute_dtype == torch.float32 and layer.base_layer.compute_dtype == torch.float32


def test_bitsandbytes_default_compute_dtype_does_not_pin_fp32(tiny_dir: str) -> None:
    """BitsAndBytesConfig turns an unset bnb_4bit_compute_dtype into fp32; that must not pin a GPU run to fp32."""
    model = qmiss.prepare_qmiss(load(tiny_dir, 4), r=16)
    assert model.qmiss_config.compute_dtype is None
    assert all(layer.requested_compute_dtype is None for _, layer in qmiss.miss_layers(model))


def test_from_pretrained_does_not_replay_a_recorded_compute_dtype(tmp_path) -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, compute_dtype=torch.float32)
    qmiss.save_adapter(model, tmp_path)
    loaded = qmiss.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.qmiss_config.compute_dtype is None
    assert all(layer.requested_compute_dtype is None for _, layer in qmiss.miss_layers(loaded))
    again = qmiss.from_pretrained(tiny_llama(), tmp_path, compute_dtype=torch.bfloat16)  # an override still wins
    assert all(layer.compute_dtype == torch.bfloat16 for _, layer in qmiss.miss_layers(again))


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_dtypes_that_cannot_be_right_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match=r"q: compute_dtype=torch.float64 on a \d-bit base"):
        MissLinear(make_base(bits, 64, 64), r=16, compute_dtype=torch.float64, name="q")
    with pytest.raises(TypeError, match="torch.int8 is not a floating-point"):
        MissLinear(make_base(bits, 64, 64), r=16, compute_dtype=torch.int8, name="q")
    with pytest.raises(ValueError, match="compute_dtype=torch.float64"):
        qmiss.prepare_qmiss(tiny_llama(), r=16, bits=bits, compute_dtype=torch.float64)
    MissLinear(make_base(None, 64, 64).double(), r=16, compute_dtype=torch.float64)  # a 16/32/64-bit base may


# --- device moves -----------------------------------------------------------------------------------------------


def _move(module: torch.nn.Module) -> None:
    """What a device move does to a module, on one device: nn.Module._apply replaces every param.data."""
    module._apply(lambda t: t.clone())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_8bit_state_follows_its_weight_through_a_move(training: bool) -> None:
    layer = MissLinear(make_base(8, 128, 64), r=16).train(training)
    randomize(layer)
    x = torch.randn(3, 128)
    before = layer(x).detach()  # the first forward moves CB/SCB from the weight onto layer.state
    _move(layer)
    base = layer.base_layer
    assert base.state.CB.data_ptr() == base.weight.data_ptr()  # bitsandbytes' forward writes state.CB back
    assert base.state.SCB.device == base.weight.device
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


def test_8bit_state_on_the_weight_follows_too() -> None:
    base = make_base(8, 128, 64)
    layer = MissLinear(base, r=16)  # no forward yet: CB/SCB still live on the Int8Params
    _move(layer)
    assert base.weight.CB.data_ptr() == base.weight.data_ptr()
    assert base.weight.SCB.device == base.weight.device


@pytest.mark.parametrize("mode", MODES)
def test_4bit_model_moved_after_prepare_gives_the_same_output(mode: str) -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, **mode_kwargs(mode))
    ids = torch.randint(0, 256, (2, 8))
    before = model(ids).logits.detach()
    _move(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


# --- 8-bit per device -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["default", "mini"])
def test_8bit_additive_modes_add_to_the_base_layers_own_output(mode: str) -> None:
    """On CUDA bitsandbytes' 8-bit layer always runs LLM.int8 (int8 activations, fp16 outliers); the CPU runs the
    same algorithm in eval mode. default/mini add their term to whatever the base computes: zero adapters give the
    base layer's own output bit for bit, and the adapter term is exact on top of it."""
    layer = MissLinear(make_base(8, 128, 192), r=32, **mode_kwargs(mode)).eval()
    x = torch.randn(4, 128) * 2
    x[:, 5] = 9.0  # an outlier column above the 6.0 threshold takes the fp16 path
    with torch.no_grad():
        base_out = layer.base_layer(x)
        torch.testing.assert_close(layer(x), base_out, rtol=0, atol=0)
        randomize(layer)
        torch.testing.assert_close(layer(x), base_out + reference(layer, x), rtol=1e-5, atol=1e-5)


def test_8bit_bat_computes_with_the_dequantized_weight_in_train_and_eval() -> None:
    """bat needs W itself, so on every device it runs x·W'ᵀ on the dequantized int8 weight (as PEFT does), not
    LLM.int8. Zero-initialised, it equals x·dequant(W)ᵀ exactly, which differs from the base layer's LLM.int8 output
    by the int8 rounding of the activations (measured here on the CPU's eval path, CUDA's algorithm)."""
    layer = MissLinear(make_base(8, 128, 192), r=32, mode="bat")
    x = torch.randn(4, 128)
    with torch.no_grad():
        dequantized = reference(layer, x)
        for training in (True, False):
            torch.testing.assert_close(layer.train(training)(x), dequantized, rtol=1e-5, atol=1e-5)
        int8 = layer.base_layer.eval()(x)
    gap = ((dequantized - int8).norm() / int8.norm()).item()
    assert 1e-4 < gap < 2e-2, gap  # LLM.int8's activation rounding: a few 1e-3 relative


# --- moves no _apply sees (FSDP1 and FSDP2 assign param.data) ----------------------------------------------------


def _move_data(module: torch.nn.Module) -> None:
    """What FSDP's moves do to a module, on one device: every ``param.data`` replaced, no ``_apply``."""
    for param in module.parameters():
        param.data = param.data.clone()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_8bit_state_follows_a_param_data_move_at_forward(training: bool) -> None:
    layer = MissLinear(make_base(8, 128, 64), r=16).train(training)
    randomize(layer)
    x = torch.randn(3, 128)
    before = layer(x).detach()
    _move_data(layer)
    base = layer.base_layer
    assert base.state.CB is None or base.state.CB.data_ptr() != base.weight.data_ptr()  # left behind by the move
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    assert base.state.CB is None or base.state.CB.data_ptr() == base.weight.data_ptr()


def test_compute_dtype_follows_a_move_no_apply_sees(monkeypatch) -> None:
    """A layer that last resolved its compute dtype on another device (here: the meta device, where a model can be
    prepared before FSDP materializes it) resolves it again at its next forward, from where its adapter is."""
    free = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4)
    fixed = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, compute_dtype=torch.float32)
    for model in (free, fixed):
        for _, layer in qmiss.miss_layers(model):
            layer._synced_device = torch.device("meta")  # what the layer saw when it last followed its device
    monkeypatch.setattr("qmiss.layer.default_compute_dtype", lambda device: torch.bfloat16)  # the rule on a GPU
    ids = torch.randint(0, 128, (1, 8))
    free(ids), fixed(ids)
    for _, layer in qmiss.miss_layers(free):
        assert layer.compute_dtype == torch.bfloat16 and layer.base_layer.compute_dtype == torch.bfloat16
    for _, layer in qmiss.miss_layers(fixed):
        assert layer.compute_dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_a_param_data_move_to_the_gpu_computes_in_the_gpu_dtype(bits: int) -> None:
    """FSDP's move for real: a model prepared on the CPU, its param.data assigned on the GPU, computes in bf16
    with its 8-bit state on the GPU."""
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=bits)
    for param in model.parameters():
        param.data = param.data.cuda()
    for buffer_owner in model.modules():
        for name, buffer in list(buffer_owner.named_buffers(recurse=False)):
            setattr(buffer_owner, name, buffer.cuda())
    ids = torch.randint(0, 128, (1, 8), device="cuda")
    assert torch.isfinite(model(ids).logits).all()
    assert all(layer.compute_dtype == torch.bfloat16 for _, layer in qmiss.miss_layers(model))
