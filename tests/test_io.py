"""Adapters on disk: round trips, PEFT both ways, Bone, merges, LoRA export, bad input, atomic writes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import qmiss
from qmiss import io, quant
from tests.conftest import load, mode_kwargs, randomize_adapters, tiny_llama

MODES = ["default", "mini", "bat"]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def fp32_tiny():
    return tiny_llama()


def prepared(fp32_tiny, bits: int | None, mode: str, r: int = 16):
    return qmiss.prepare_qmiss(copy.deepcopy(fp32_tiny), r=r, bits=bits, **mode_kwargs(mode))


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
@pytest.mark.parametrize("mode", MODES)
def test_round_trip_is_bitwise(tmp_path, fp32_tiny, mode: str, bits: int) -> None:
    model = prepared(fp32_tiny, bits, mode)
    randomize_adapters(model)
    qmiss.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = qmiss.load_adapter(prepared(fp32_tiny, bits, mode), tmp_path)
    assert torch.equal(logits(fresh), logits(model))
    assert not any(layer.miss_block.requires_grad for _, layer in qmiss.miss_layers(fresh))
    # one call onto a plain model: the recorded settings rebuild the same qmiss model
    again = qmiss.from_pretrained(copy.deepcopy(fp32_tiny), tmp_path)
    assert again.qmiss_config.bits == bits and again.qmiss_config.mode == mode
    assert torch.equal(logits(again), logits(model))


def test_saved_files_are_peft_miss_format(tmp_path, fp32_tiny) -> None:
    model = prepared(fp32_tiny, 4, "mini")
    qmiss.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MISS" and config["init_weights"] == "mini" and config["r"] == 16
    assert config["mini_r"] == 16 and config["qmiss"]["bits"] == 4 and config["qmiss"]["quant_type"] == "nf4"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.down_proj.miss_block" in tensors
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.miss_block"].shape == (16, 16)


def disable_cpu_repack(model) -> None:
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
@pytest.mark.parametrize("mode", MODES)
def test_peft_loads_ours(tmp_path, tiny_dir, mode: str, bits: int) -> None:
    from peft import PeftModel

    ours = qmiss.prepare_qmiss(load(tiny_dir, bits), r=16, **mode_kwargs(mode))
    randomize_adapters(ours)
    qmiss.save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(load(tiny_dir, bits), tmp_path)
    disable_cpu_repack(theirs)
    expected = logits(ours)
    assert (logits(theirs) - expected).abs().max() <= 1e-4
    if bits == 4:  # onto an fp32 model holding the dequantized weights
        dequantized = load(tiny_dir, None)
        for name, layer in qmiss.miss_layers(ours):
            dequantized.get_submodule(name).weight.data.copy_(quant.dequantize(layer.base_layer))
        theirs_fp32 = PeftModel.from_pretrained(dequantized, tmp_path)
        assert (logits(theirs_fp32) - expected).abs().max() <= 1e-4


def train_peft(model, steps: int = 3):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("mode", MODES)
def test_we_load_peft_trained_adapters(tmp_path, tiny_dir, mode: str) -> None:
    from peft import MissConfig, get_peft_model

    init = {"default": True, "mini": "mini", "bat": "bat"}[mode]
    theirs = get_peft_model(load(tiny_dir, 4), MissConfig(r=16, init_weights=init, mini_r=16,
                                                          target_modules=["q_proj", "v_proj", "down_proj"]))
    disable_cpu_repack(theirs)
    train_peft(theirs).save_pretrained(tmp_path)
    ours = qmiss.from_pretrained(load(tiny_dir, 4), tmp_path)
    assert len(list(qmiss.miss_layers(ours))) == 6
    assert (logits(ours) - logits(theirs)).abs().max() <= 1e-4


def test_we_load_the_bone_format(tmp_path, tiny_dir) -> None:
    """Bone is MiSS under older names: peft_type BONE, .bone_block keys."""
    from peft import MissConfig, get_peft_model

    theirs = get_peft_model(load(tiny_dir, 4), MissConfig(r=16, target_modules=["q_proj", "o_proj"]))
    disable_cpu_repack(theirs)
    train_peft(theirs).save_pretrained(tmp_path / "miss")
    config = json.loads((tmp_path / "miss" / "adapter_config.json").read_text())
    bone = {"peft_type": "BONE", "r": config["r"], "init_weights": True, "target_modules": config["target_modules"],
            "task_type": "CAUSAL_LM", "bias": "none"}
    (tmp_path / "bone").mkdir()
    (tmp_path / "bone" / "adapter_config.json").write_text(json.dumps(bone))
    tensors = load_file(tmp_path / "miss" / "adapter_model.safetensors")
    save_file({k.replace(".miss_block", ".bone_block"): v for k, v in tensors.items()},
              tmp_path / "bone" / "adapter_model.safetensors")
    ours = qmiss.from_pretrained(load(tiny_dir, 4), tmp_path / "bone")
    assert (logits(ours) - logits(theirs)).abs().max() <= 1e-4


@pytest.mark.parametrize("n_hidden,r", [(64, 16), (64, 48)], ids=["aligned", "in%r!=0"])
@pytest.mark.parametrize("mode", ["default", "mini"])
def test_lora_export_reproduces_miss_logits(tmp_path, fp32_tiny, mode: str, n_hidden: int, r: int) -> None:
    from peft import PeftModel

    model = qmiss.prepare_qmiss(copy.deepcopy(fp32_tiny), r=r, bits=4, mode=mode, mini_r=16 if mode == "mini" else None)
    randomize_adapters(model)
    if r == 48:
        assert any(layer.in_features % r for _, layer in qmiss.miss_layers(model))
    qmiss.export_lora(model, tmp_path / "from-model")
    qmiss.save_adapter(model, tmp_path / "adapter")
    qmiss.export_lora(tmp_path / "adapter", tmp_path / "from-dir")
    config = json.loads((tmp_path / "from-dir" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == r and config["lora_alpha"] == r
    dequantized = copy.deepcopy(fp32_tiny)
    for name, layer in qmiss.miss_layers(model):
        dequantized.get_submodule(name).weight.data.copy_(quant.dequantize(layer.base_layer))
    expected = logits(model)
    for folder in ("from-model", "from-dir"):
        lora = PeftModel.from_pretrained(copy.deepcopy(dequantized), tmp_path / folder)
        assert (logits(lora) - expected).abs().max() <= 1e-5


def test_lora_export_refuses_bat(tmp_path, fp32_tiny) -> None:
    with pytest.raises(ValueError, match="bat.*no exact LoRA form.*export_merged"):
        qmiss.export_lora(prepared(fp32_tiny, 4, "bat"), tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_merge_unmerge_round_trip_unquantized(fp32_tiny, mode: str) -> None:
    model = prepared(fp32_tiny, None, mode)
    randomize_adapters(model)
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in qmiss.miss_layers(model)}
    adapted = logits(model)
    qmiss.merge(model)
    qmiss.merge(model)  # idempotent
    assert all(layer.merged for _, layer in qmiss.miss_layers(model))
    assert (logits(model) - adapted).abs().max() <= 1e-4
    qmiss.unmerge(model)
    for name, layer in qmiss.miss_layers(model):
        error = (layer.base_layer.weight - before[name]).abs().max() / before[name].abs().max()
        assert error <= (1e-4 if mode == "bat" else torch.finfo(torch.float32).eps)  # (W + ΔW) − ΔW: one rounding
    assert (logits(model) - adapted).abs().max() <= 1e-4


def test_merge_refuses_quantized_and_disable_refuses_merged(fp32_tiny) -> None:
    with pytest.raises(ValueError, match="re-quantizes.*merge_and_unload"):
        qmiss.merge(prepared(fp32_tiny, 4, "default"))
    model = qmiss.merge(prepared(fp32_tiny, None, "default"))
    with pytest.raises(ValueError, match="hold merged weights; call qmiss.unmerge"):
        with qmiss.disable_adapter(model):
            pass


@pytest.mark.parametrize("mode", MODES)
def test_merge_and_unload_is_exact(fp32_tiny, mode: str) -> None:
    model = prepared(fp32_tiny, 4, mode)
    randomize_adapters(model)
    expected = logits(model)
    plain = qmiss.merge_and_unload(model, dtype=torch.float32)
    assert not any(isinstance(m, qmiss.MissLinear) for m in plain.modules())
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in plain.modules())
    assert not hasattr(plain, "qmiss_config")
    assert (logits(plain) - expected).abs().max() <= 1e-4 * expected.abs().max()


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path, fp32_tiny):
    model = prepared(fp32_tiny, 4, "default")
    randomize_adapters(model)
    qmiss.save_adapter(model, tmp_path)
    return tmp_path


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: layer.miss_block.detach().clone() for n, layer in qmiss.miss_layers(model)}


def assert_rejected(model, folder, match: str, error: type = ValueError) -> None:
    before = snapshot(model)
    with pytest.raises(error, match=match):
        qmiss.load_adapter(model, folder)
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing changed


def rewrite_tensors(folder, change) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_base_of_another_shape(saved) -> None:
    wider = qmiss.prepare_qmiss(tiny_llama(intermediate_size=256), r=16, bits=4)
    assert_rejected(wider, saved, r"model\.layers\.0\.mlp\.gate_proj adapter has shape \(16, 192\), the model's "
                                  r"layer needs \(16, 256\)")


def test_other_in_features_is_caught_by_recorded_shapes(saved, fp32_tiny) -> None:
    config = json.loads((saved / "adapter_config.json").read_text())
    config["qmiss"]["modules"]["model.layers.0.mlp.down_proj"] = [999, 64]
    (saved / "adapter_config.json").write_text(json.dumps(config))
    assert_rejected(prepared(fp32_tiny, 4, "default"), saved, r"down_proj was trained on a base of \(in, out\)=\(999, 64\)")


def test_missing_and_unexpected_keys(saved, fp32_tiny) -> None:
    def change(tensors):
        tensors["base_model.model.model.layers.9.mlp.up_proj.miss_block"] = tensors.pop(
            "base_model.model.model.layers.0.mlp.up_proj.miss_block")
    rewrite_tensors(saved, change)
    assert_rejected(prepared(fp32_tiny, 4, "default"), saved,
                    r"missing for the model's layers: \['model\.layers\.0\.mlp\.up_proj'\]; unexpected.*layers\.9")


def test_mode_or_r_contradicting_the_model(saved, fp32_tiny) -> None:
    assert_rejected(prepared(fp32_tiny, 4, "bat"), saved, "adapter is mode='default', r=16.*prepared with mode='bat'")
    config = json.loads((saved / "adapter_config.json").read_text())
    config["r"] = 32
    (saved / "adapter_config.json").write_text(json.dumps(config))
    assert_rejected(prepared(fp32_tiny, 4, "default"), saved, "adapter is mode='default', r=32")


def test_config_contradicting_its_tensors(saved, fp32_tiny) -> None:
    config = json.loads((saved / "adapter_config.json").read_text())
    config["init_weights"] = "bat"
    (saved / "adapter_config.json").write_text(json.dumps(config))
    assert_rejected(prepared(fp32_tiny, 4, "bat"), saved, r"adapter has shape \(16, 64\), the model's layer needs "
                                                         r"\(4, 16, 16\)")


@pytest.mark.parametrize("damage,match", [
    (lambda b: b[: len(b) // 2], "truncated or corrupt"),
    (lambda b: b"\x00" * 8 + b[8:], "truncated or corrupt"),
    (lambda b: b"", "truncated or corrupt"),
], ids=["truncated", "bad-header", "empty"])
def test_corrupt_weights_file(saved, fp32_tiny, damage, match: str) -> None:
    path = saved / "adapter_model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    assert_rejected(prepared(fp32_tiny, 4, "default"), saved, match)


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ('{"peft_type": "LORA", "r": 16}', "peft_type='LORA' is not a MiSS adapter"),
    ('{"peft_type": "MISS", "r": "16"}', "r='16' must be an int"),
    ('{"peft_type": "MISS", "r": 16, "init_weights": 3}', "init_weights=3"),
    ('[1, 2]', "expected a JSON object"),
], ids=["not-json", "lora", "r-string", "init-int", "list"])
def test_bad_config(saved, fp32_tiny, text: str, match: str) -> None:
    (saved / "adapter_config.json").write_text(text)
    assert_rejected(prepared(fp32_tiny, 4, "default"), saved, match)


@pytest.mark.parametrize("change,match", [
    (lambda t: t.update({k: v.to(torch.int32) for k, v in list(t.items())[:1]}), "dtype torch.int32"),
    (lambda t: next(iter(t.values())).__setitem__((0, 0), float("nan")), "NaN or inf"),
    (lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(2)}), "unexpected tensor 'base_model.model.lm_head"),
], ids=["int-dtype", "nan", "foreign-key"])
def test_bad_tensors(saved, fp32_tiny, change, match: str) -> None:
    rewrite_tensors(saved, change)
    assert_rejected(prepared(fp32_tiny, 4, "default"), saved, match)


def test_missing_files(tmp_path, fp32_tiny) -> None:
    assert_rejected(prepared(fp32_tiny, 4, "default"), tmp_path, "adapter_config.json is missing", FileNotFoundError)


def test_unprepared_model_is_an_error(saved, fp32_tiny) -> None:
    with pytest.raises(ValueError, match="has no qmiss adapters; call qmiss.prepare_qmiss"):
        qmiss.load_adapter(copy.deepcopy(fp32_tiny), saved)


def test_interrupted_save_keeps_the_earlier_adapter(saved, fp32_tiny, monkeypatch) -> None:
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = prepared(fp32_tiny, 4, "default")
    randomize_adapters(model, seed=9)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        qmiss.save_adapter(model, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # no temp files left, nothing replaced
    qmiss.load_adapter(prepared(fp32_tiny, 4, "default"), saved)


def test_resume_training_from_a_saved_adapter(saved, fp32_tiny) -> None:
    model = qmiss.load_adapter(prepared(fp32_tiny, 4, "default"), saved, trainable=True)
    start = snapshot(model)
    train_peft(model, steps=1)
    assert any(not torch.equal(start[n], b) for n, b in snapshot(model).items())


# --- merged checkpoints on the real model ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_export_merged_smollm2_reloads_in_plain_transformers(tmp_path, smollm2_dir, mode: str) -> None:
    from transformers import AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, num_hidden_layers=4, dtype=torch.float32)
    model = qmiss.prepare_qmiss(base, r=64, bits=4, **{**mode_kwargs(mode), "mini_r": 64 if mode == "mini" else None})
    randomize_adapters(model)
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = logits(model, ids)
    scale = expected.abs().max()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    errors = {}
    for dtype, bound in [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)]:
        folder = qmiss.export_merged(model, tmp_path / str(dtype), dtype=dtype, max_shard_size="100MB",
                                     tokenizer=tokenizer)
        assert (folder / "model.safetensors.index.json").is_file() == (dtype == torch.float32)  # sharded
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        errors[dtype] = (logits(reloaded, ids) - expected).abs().max() / scale
        assert errors[dtype] <= bound, errors
    assert torch.equal(logits(model, ids), expected)  # export left the qmiss model as it was

    # the contrast: folding W + ΔW back into 4-bit (what PEFT's merge does on a 4-bit layer) is lossy
    requantized = copy.deepcopy(model)
    for name, layer in list(qmiss.miss_layers(requantized)):
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
        linear.weight.data = layer.merged_weight(torch.float32)
        parent, _, child = name.rpartition(".")
        setattr(requantized.get_submodule(parent), child, quant.quantize_linear(linear, 4))
    requant_error = (logits(requantized, ids) - expected).abs().max() / scale
    assert requant_error > 20 * errors[torch.float32], (requant_error, errors)

    unloaded = qmiss.merge_and_unload(model, dtype=torch.bfloat16)
    assert (logits(unloaded.float(), ids) - expected).abs().max() / scale <= 5e-2
