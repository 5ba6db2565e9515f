"""The FSDP1 layout without processes: quant_storage, the wrap policy, the mixed-precision dtype."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import MixedPrecision

import qmiss
from qmiss.fsdp import fsdp_auto_wrap_policy, fsdp_mixed_precision, storage_dtype, update_fsdp_plugin
from qmiss.layer import MissBlock
from tests.helpers import tiny_llama


def _units(model) -> list[str]:
    """Module names FSDP1 would make units of (the policy asked bottom-up, as _recursive_wrap does)."""
    policy = fsdp_auto_wrap_policy(model)
    return [n for n, m in model.named_modules() if n and policy(module=m, recurse=False, nonwrapped_numel=1)]


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_quant_storage_keeps_the_bytes_and_one_dtype_for_frozen_tensors(storage) -> None:
    torch.manual_seed(0)
    packed_u8 = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4)
    torch.manual_seed(0)
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, quant_storage=storage)
    assert storage_dtype(model) == storage and storage_dtype(packed_u8) is None
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {storage}  # packed weights, embeddings, norms, head: nothing upcast
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    for (name, a), (_, b) in zip(qmiss.miss_layers(model), qmiss.miss_layers(packed_u8)):
        assert torch.equal(a.base_layer.weight.view(torch.uint8).flatten(), b.base_layer.weight.flatten()), name
    if storage == torch.float32:  # same model otherwise: identical logits
        ids = torch.randint(0, 256, (2, 8))
        torch.testing.assert_close(model(ids).logits, packed_u8(ids).logits, rtol=0, atol=0)


def test_loaded_bnb_4bit_quant_storage_is_picked_up(tiny_dir) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=torch.bfloat16,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config, device_map="cpu",
                                                 dtype=torch.bfloat16)
    model = qmiss.prepare_qmiss(model, r=16)
    assert storage_dtype(model) == torch.bfloat16
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert torch.isfinite(model(torch.randint(0, 256, (1, 8))).logits).all()
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage"):
        qmiss.prepare_qmiss(
            AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config, device_map="cpu"),
            r=16, quant_storage=torch.float32)


def test_wrap_policy_gives_each_adapter_a_unit_of_its_own() -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, mode="bat", quant_storage=torch.bfloat16)
    units = _units(model)
    adapters = [n for n in units if n.endswith(".adapter")]
    assert adapters == [f"{n}.adapter" for n, _ in qmiss.miss_layers(model)]
    assert sorted(set(units) - set(adapters)) == ["model.layers.0", "model.layers.1"]
    assert all(isinstance(model.get_submodule(n), MissBlock) for n in adapters)


def test_mixed_precision_is_the_storage_dtype_and_plugin_update() -> None:
    from accelerate import FullyShardedDataParallelPlugin

    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, quant_storage=torch.bfloat16)
    # gradients reduced in fp32, buffers (RoPE's inv_freq) left in theirs
    assert fsdp_mixed_precision(model) == MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                         buffer_dtype=None)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1)
    update_fsdp_plugin(plugin, model)
    assert plugin.mixed_precision_policy == fsdp_mixed_precision(model)
    assert _units(model) == [n for n, m in model.named_modules() if n and plugin.auto_wrap_policy(
        module=m, recurse=False, nonwrapped_numel=1)]


@pytest.mark.parametrize("version", [1, 2])
def test_accelerates_bf16_mixed_precision_keeps_buffers_and_reduces_in_fp32(version: int) -> None:
    """``--mixed_precision bf16`` makes accelerate's plugin cast buffers and reduce gradients in bf16; on a qmiss
    model the plugin keeps bf16 compute, but fp32 reduction and buffers as they are."""
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=version)
    plugin.set_mixed_precision("bf16")
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16  # accelerate's own
    update_fsdp_plugin(plugin, qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, quant_storage=torch.bfloat16))
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert getattr(policy, "buffer_dtype", None) is None


def test_fsdp_layout_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="packed as uint8.*quant_storage"):
        fsdp_mixed_precision(qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4))
    with pytest.raises(ValueError, match="4-bit setting.*bits=8"):
        qmiss.prepare_qmiss(tiny_llama(), r=16, bits=8, quant_storage=torch.bfloat16)
    with pytest.raises(ValueError, match="float dtype"):
        qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, quant_storage=torch.int32)
    with pytest.raises(ValueError, match="prepare_qmiss"):
        fsdp_auto_wrap_policy(tiny_llama())
    with pytest.raises(ValueError, match="NoSuchLayer"):
        fsdp_auto_wrap_policy(qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4), layer_classes=["NoSuchLayer"])
