"""GPT-2's Conv1D layers (weight stored (in, out)): adapted as the nn.Linear they stand for, exported as Conv1D again."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import qmiss
from qmiss import quant
from qmiss.model import from_conv1d
from tests.helpers import randomize_adapters

BITS = [4, 8, None]
BIT_IDS = ["4bit", "8bit", "16bit"]
MODES = ["default", "bat", "bat_row"]
CONV1D = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def tiny_gpt2() -> GPT2LMHeadModel:
    """Two layers, hidden 64 (c_attn 64→192, c_fc 64→256, c_proj 256→64): every shape divisible by r=16.
    No dropout, so train-mode logits are deterministic."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).float().eval()


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    """In train mode (no dropout here): bitsandbytes' 8-bit layer then dequantizes and runs a float matmul on the
    CPU, as bat and a merged checkpoint do; in eval mode it runs LLM.int8 (int8 activations), which no float
    weight reproduces to 1e-4."""
    model.train()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
@pytest.mark.parametrize("mode", MODES)
def test_conv1d_targets_start_at_the_base_and_train(gpt2, mode: str, bits: int | None) -> None:
    model = qmiss.prepare_qmiss(copy.deepcopy(gpt2), r=16, bits=bits, mode=mode)
    layers = dict(qmiss.miss_layers(model))
    assert sorted(layers) == sorted(f"transformer.h.{i}.{n}" for i in range(2) for n in CONV1D)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    for name, layer in layers.items():
        conv = gpt2.get_submodule(name)
        assert quant.quant_bits(layer.base_layer) == bits and from_conv1d(layer)
        assert (layer.in_features, layer.out_features) == tuple(conv.weight.shape)
        linear = torch.nn.Linear(*conv.weight.shape)  # what the Conv1D computes, as an nn.Linear
        linear.weight.data, linear.bias.data = conv.weight.detach().t().contiguous(), conv.bias.detach()
        reference = linear if bits is None else quant.quantize_linear(linear, bits)
        assert torch.equal(quant.dequantize(layer.base_layer), quant.dequantize(reference))
        assert torch.equal(layer.bias, conv.bias)

    adapted = logits(model)
    if bits is None:  # the nn.Linear computes what the Conv1D did
        torch.testing.assert_close(adapted, logits(gpt2), rtol=1e-6, atol=1e-6)
    with qmiss.disable_adapter(model):
        base = logits(model)
    torch.testing.assert_close(adapted, base, rtol=1e-6, atol=1e-6)  # zero adapters: the (quantized) base

    model.train()
    model(IDS, labels=IDS).loss.backward()
    for name, layer in layers.items():
        assert layer.miss_block.grad is not None and layer.miss_block.grad.abs().sum() > 0, name
        assert all(p.grad is None for p in layer.base_layer.parameters())


@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
@pytest.mark.parametrize("mode", MODES)
def test_export_merged_gpt2_reloads_in_plain_transformers(tmp_path, gpt2, mode: str, bits: int | None) -> None:
    model = qmiss.prepare_qmiss(copy.deepcopy(gpt2), r=16, bits=bits, mode=mode)
    randomize_adapters(model)
    expected = logits(model)
    folder = qmiss.export_merged(model, tmp_path / "merged", dtype=torch.float32)
    reloaded = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(reloaded.transformer.h[0].attn.c_attn, Conv1D)
    got = logits(reloaded)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (got - logits(gpt2)).abs().max() > 1e-2  # the adapter is in it

    unloaded = qmiss.merge_and_unload(model, dtype=torch.float32)
    assert all(isinstance(unloaded.transformer.h[i].get_submodule(n), Conv1D) for i in range(2) for n in CONV1D)
    assert (logits(unloaded) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_unload_and_merge_give_the_conv1d_back(gpt2) -> None:
    model = qmiss.prepare_qmiss(copy.deepcopy(gpt2), r=16, bits=None)
    randomize_adapters(model)
    expected = logits(model)
    qmiss.merge(model)
    plain = model.unload()
    conv = plain.transformer.h[1].mlp.c_fc
    assert isinstance(conv, Conv1D) and conv.weight.shape == (64, 256)
    torch.testing.assert_close(logits(plain), expected, rtol=1e-5, atol=1e-5)


def test_gpt2_loaded_in_4bit_by_transformers_exports_as_conv1d(tmp_path, gpt2) -> None:
    """transformers' BitsAndBytesConfig swaps each Conv1D for a Linear4bit marked ``source_cls=Conv1D``."""
    gpt2.save_pretrained(tmp_path / "base")
    loaded = GPT2LMHeadModel.from_pretrained(
        tmp_path / "base", device_map="cpu", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    model = qmiss.prepare_qmiss(loaded, r=16, exclude_modules=["c_fc"])
    assert model.qmiss_config.bits == 4
    assert quant.quant_bits(model.transformer.h[0].mlp.c_fc) == 4  # left quantized, unadapted
    randomize_adapters(model)
    expected = logits(model)
    reloaded = GPT2LMHeadModel.from_pretrained(qmiss.export_merged(model, tmp_path / "merged", dtype=torch.float32))
    assert (logits(reloaded) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_export_onto_the_original_gpt2_checkpoint(tmp_path, gpt2) -> None:
    """default mode: ΔW added to the checkpoint's own (in, out) weights, read transposed."""
    gpt2.save_pretrained(tmp_path / "base")
    model = qmiss.prepare_qmiss(copy.deepcopy(gpt2), r=16, bits=4)
    randomize_adapters(model)
    folder = qmiss.export_merged(model, tmp_path / "merged", dtype=torch.float32, original_checkpoint=tmp_path / "base")
    reloaded = GPT2LMHeadModel.from_pretrained(folder)
    unquantized = qmiss.prepare_qmiss(copy.deepcopy(gpt2), r=16, bits=None)
    randomize_adapters(unquantized)  # the same values: the same seed, the same layer order
    expected = logits(unquantized)
    assert (logits(reloaded) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_planner_reads_gpt2_shapes() -> None:
    plan = qmiss.plan_memory(tiny_gpt2().config, r=16, bits=4, batch_size=1, seq_len=32)
    adapters = 2 * 16 * (3 * 64 + 64 + 256 + 64)  # (r, out) per Conv1D
    assert plan.trainable_parameters == adapters
