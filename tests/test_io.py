"""Adapters on disk: round trips, PEFT both ways, Bone, merges, LoRA export, bad input, atomic writes."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import warnings
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import qmiss
from qmiss import adapters, quant
from tests.helpers import BLOCK_MODES, MODES, load, mode_kwargs, randomize_adapters, tiny_llama

PEFT_MODES = ["default", "mini", "bat"]  # PEFT has no bat_row
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "qmiss_config.json"]
    fresh = qmiss.load_adapter(prepared(fp32_tiny, bits, mode), tmp_path)
    assert torch.equal(logits(fresh), logits(model))
    assert not any(layer.miss_block.requires_grad for _, layer in qmiss.miss_layers(fresh))
    # one call onto a plain model: the recorded settings rebuild the same qmiss model
    again = qmiss.from_pretrained(copy.deepcopy(fp32_tiny), tmp_path)
    assert again.qmiss_config.bits == bits and again.qmiss_config.mode == mode
    assert torch.equal(logits(again), logits(model))


def test_saved_files_are_peft_miss_format(tmp_path, fp32_tiny) -> None:
    from peft import MissConfig

    model = prepared(fp32_tiny, 4, "mini")
    qmiss.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MISS" and config["init_weights"] == "mini" and config["r"] == 16
    assert config["mini_r"] == 16
    assert set(config) <= {f.name for f in dataclasses.fields(MissConfig)}  # nothing PEFT does not know
    settings = json.loads((tmp_path / "qmiss_config.json").read_text())
    assert settings == {"version": qmiss.__version__, "mode": "mini", "bits": 4, "quant_type": "nf4",
                        "double_quant": True, "compute_dtype": None, "rank_pattern": None, "modules": {
                            name: [layer.in_features, layer.out_features] for name, layer in qmiss.miss_layers(model)}}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.down_proj.miss_block" in tensors
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.miss_block"].shape == (16, 16)


@contextlib.contextmanager
def caught_warnings() -> Iterator[list[str]]:
    """Every warning raised inside, through ``warnings`` or the peft / transformers loggers (which do not propagate)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, loggers = Collect(logging.WARNING), [logging.getLogger(n) for n in ("peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_peft_loads_ours_without_unexpected_keyword_warnings(tmp_path, tiny_dir) -> None:
    """qmiss's own settings live in qmiss_config.json, so PEFT's MissConfig sees only fields it knows."""
    from peft import PeftModel

    ours = qmiss.prepare_qmiss(load(tiny_dir, 4), r=16, mode="mini", mini_r=16)
    qmiss.save_adapter(ours, tmp_path)
    base = load(tiny_dir, 4)
    with caught_warnings() as messages:
        PeftModel.from_pretrained(base, tmp_path)
    assert not [m for m in messages if "Unexpected keyword arguments" in m], messages


def disable_cpu_repack(model) -> None:
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
@pytest.mark.parametrize("mode", PEFT_MODES)
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


@pytest.mark.parametrize("mode", PEFT_MODES)
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


@pytest.mark.parametrize("mode", BLOCK_MODES)
def test_lora_export_refuses_bat(tmp_path, fp32_tiny, mode: str) -> None:
    with pytest.raises(ValueError, match=f"mode='{mode}' is not a low-rank update.*no exact LoRA form.*export_merged"):
        qmiss.export_lora(prepared(fp32_tiny, 4, mode), tmp_path)
    qmiss.save_adapter(prepared(fp32_tiny, 4, mode), tmp_path / "adapter")
    with pytest.raises(ValueError, match=f"mode='{mode}' is not a low-rank update"):
        qmiss.export_lora(tmp_path / "adapter", tmp_path / "lora")


def test_peft_refuses_a_bat_row_folder(tmp_path, tiny_dir) -> None:
    """PEFT has no Bat-Row: its loaders must stop, not build bat's or default's adapter. Targets with in == out
    (q_proj, o_proj: 64 -> 64) give bat and bat_row adapters of the same shape, where loading as bat would pass."""
    from peft import PeftConfig, PeftModel

    ours = qmiss.prepare_qmiss(load(tiny_dir, 4), r=16, mode="bat_row", target_modules=["q_proj", "o_proj"])
    randomize_adapters(ours)
    qmiss.save_adapter(ours, tmp_path)
    assert {tuple(layer.miss_block.shape) for _, layer in qmiss.miss_layers(ours)} == {(4, 16, 16)}  # bat's shape too
    for load_it in (lambda: PeftModel.from_pretrained(load(tiny_dir, 4), tmp_path),
                    lambda: PeftConfig.from_pretrained(tmp_path),
                    lambda: load(tiny_dir, 4).load_adapter(str(tmp_path))):
        with pytest.raises(KeyError, match="QMISS_BAT_ROW.*PEFT cannot load.*qmiss.from_pretrained"):
            load_it()
    again = qmiss.from_pretrained(load(tiny_dir, 4), tmp_path)
    assert again.qmiss_config.mode == "bat_row"
    assert all(torch.equal(layer.miss_block, dict(qmiss.miss_layers(ours))[name].miss_block)
               for name, layer in qmiss.miss_layers(again))
    assert torch.equal(logits(again), logits(ours))


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
        assert error <= (1e-4 if mode in BLOCK_MODES else torch.finfo(torch.float32).eps)  # (W + ΔW) − ΔW: one rounding
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


@pytest.mark.parametrize("mode", MODES)
def test_export_merged_leaves_an_unquantized_model_as_it_was(tmp_path, fp32_tiny, mode: str) -> None:
    # dequantize() of a plain fp32 layer once returned its weight itself, and the merge added ΔW into it
    model = prepared(fp32_tiny, None, mode)
    randomize_adapters(model)
    expected = logits(model)
    reloaded = AutoModelForCausalLM.from_pretrained(qmiss.export_merged(model, tmp_path, dtype=torch.float32))
    assert torch.equal(logits(model), expected)
    assert (logits(reloaded) - expected).abs().max() <= 1e-5 * expected.abs().max()


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
    settings = json.loads((saved / "qmiss_config.json").read_text())
    settings["modules"]["model.layers.0.mlp.down_proj"] = [999, 64]
    (saved / "qmiss_config.json").write_text(json.dumps(settings))
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
    settings = json.loads((saved / "qmiss_config.json").read_text())
    settings["mode"] = "bat"
    (saved / "qmiss_config.json").write_text(json.dumps(settings))
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
    (lambda s: "{not json", "qmiss_config.json: not valid JSON"),
    (lambda s: [1, 2], "qmiss_config.json: expected a JSON object, got list"),
    (lambda s: None, "qmiss_config.json: expected a JSON object, got NoneType"),
    (lambda s: {k: v for k, v in s.items() if k != "bits"}, r"qmiss_config.json: missing field\(s\) \['bits'\]"),
    (lambda s: {**s, "modules": None}, r"qmiss_config.json: modules must map module names"),
    (lambda s: {**s, "bits": 3}, "qmiss_config.json: bits=3 must be 4, 8 or null"),
    (lambda s: {**s, "bits": "4"}, "qmiss_config.json: bits='4' must be 4, 8 or null"),
    (lambda s: {**s, "bits": 4.0}, "qmiss_config.json: bits=4.0 must be 4, 8 or null"),
    (lambda s: {**s, "bits": float("nan")}, "qmiss_config.json: bits=nan must be 4, 8 or null"),
    (lambda s: {**s, "quant_type": ["nf4"]}, r"qmiss_config.json: quant_type=\['nf4'\] must be one of"),
    (lambda s: {**s, "double_quant": "false"}, "qmiss_config.json: double_quant='false' must be true or false"),
    (lambda s: {**s, "compute_dtype": ["float32"]}, r"qmiss_config.json: compute_dtype=\['float32'\] must be"),
    (lambda s: {**s, "compute_dtype": "float64"}, "qmiss_config.json: compute_dtype='float64' must be"),
    (lambda s: {**s, "mode": "bat"}, "qmiss_config.json: mode='bat' contradicts .*adapter_config.json's "
                                     "init_weights=True"),
    (lambda s: {**s, "mode": 7}, "qmiss_config.json: mode=7 must be one of"),
    (lambda s: {**s, "version": 1}, "qmiss_config.json: version=1 must be a string"),
    (lambda s: {**s, "modules": {"x": [float("inf"), 64]}}, r"qmiss_config.json: modules must map module names"),
    (lambda s: {**s, "modules": [[64, 64]]}, r"qmiss_config.json: modules must map module names"),
], ids=["not-json", "list", "null", "missing-bits", "modules-null", "bits-3", "bits-string", "bits-float", "bits-nan",
        "quant-list", "double-quant-string", "dtype-list", "dtype-fp64", "mode-contradicts", "mode-int",
        "version-int", "modules-inf", "modules-list"])
def test_bad_qmiss_config(saved, fp32_tiny, change, match: str) -> None:
    settings = change(json.loads((saved / "qmiss_config.json").read_text()))
    (saved / "qmiss_config.json").write_text(settings if isinstance(settings, str) else json.dumps(settings))
    assert_rejected(prepared(fp32_tiny, 4, "default"), saved, match)


def old_format(folder, model, into) -> None:
    """``folder``'s adapter as qmiss wrote it before qmiss_config.json: its settings inside adapter_config.json."""
    into.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    settings = model.qmiss_config
    config["qmiss"] = {
        "version": "0.1.0", "mode": settings.mode, "bits": settings.bits, "quant_type": settings.quant_type,
        "double_quant": settings.double_quant, "compute_dtype": "float32",
        "modules": {name: [layer.in_features, layer.out_features] for name, layer in qmiss.miss_layers(model)},
    }
    (into / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (into / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())


@pytest.mark.parametrize("mode", MODES)
def test_old_format_with_an_inline_qmiss_section_still_loads(tmp_path, fp32_tiny, mode: str) -> None:
    model = qmiss.prepare_qmiss(copy.deepcopy(fp32_tiny), r=16, bits=8, quant_type="fp4", double_quant=False,
                                **mode_kwargs(mode))  # not the defaults, so reading them back shows
    randomize_adapters(model)
    qmiss.save_adapter(model, tmp_path / "new")
    old_format(tmp_path / "new", model, tmp_path / "old")
    config, tensors, payload = qmiss.read_adapter(tmp_path / "old")
    new_config, new_tensors, new_payload = qmiss.read_adapter(tmp_path / "new")
    assert (config.bits, config.quant_type, config.double_quant, config.compute_dtype) == (8, "fp4", False,
                                                                                           torch.float32)
    assert dataclasses.replace(config, compute_dtype=None) == new_config
    assert payload["qmiss"]["modules"] == new_payload["qmiss"]["modules"]
    assert tensors.keys() == new_tensors.keys() and all(torch.equal(tensors[n], new_tensors[n]) for n in tensors)
    again = qmiss.from_pretrained(copy.deepcopy(fp32_tiny), tmp_path / "old")
    assert again.qmiss_config.bits == 8 and again.qmiss_config.mode == mode
    assert torch.equal(logits(again), logits(model))
    if mode not in BLOCK_MODES:  # the module shapes are read from the inline section
        qmiss.export_lora(tmp_path / "old", tmp_path / "lora-old")
        qmiss.export_lora(tmp_path / "new", tmp_path / "lora-new")
        old_lora, new_lora = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("lora-old", "lora-new"))
        assert old_lora.keys() == new_lora.keys() and all(torch.equal(old_lora[k], new_lora[k]) for k in old_lora)


def test_old_format_inline_section_keeps_its_checks(tmp_path, fp32_tiny) -> None:
    model = prepared(fp32_tiny, 4, "default")
    qmiss.save_adapter(model, tmp_path / "new")
    old_format(tmp_path / "new", model, tmp_path / "old")
    config = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    config["qmiss"]["compute_dtype"] = "float64"
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(config))
    assert_rejected(model, tmp_path / "old", "adapter_config.json: qmiss.compute_dtype='float64' must be")


def test_export_lora_names_modules_without_a_recorded_shape(saved, tmp_path) -> None:
    settings = json.loads((saved / "qmiss_config.json").read_text())
    del settings["modules"]["model.layers.1.self_attn.q_proj"]
    (saved / "qmiss_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"give no \(in, out\) for \['model.layers.1.self_attn.q_proj'\]"):
        qmiss.export_lora(saved, tmp_path / "lora")


def test_save_writes_the_peft_config_last(tmp_path, fp32_tiny, monkeypatch) -> None:
    """adapter_config.json is what makes a folder an adapter, so it never points at files not yet written."""
    order = []
    write = adapters.atomic_write
    monkeypatch.setattr(adapters, "atomic_write", lambda path, fn: (order.append(path.name), write(path, fn)))
    qmiss.save_adapter(prepared(fp32_tiny, 4, "default"), tmp_path)
    assert order == ["adapter_model.safetensors", "qmiss_config.json", "adapter_config.json"]


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

    monkeypatch.setattr(adapters, "save_file", crash)
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
