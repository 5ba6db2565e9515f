"""Mixture-of-experts models: fused experts quantized and adapted per expert (qmiss.experts, MissExperts).

The reference for exactness is transformers' own "eager" experts forward (a loop over experts, not qmiss's
code) run on fp32 weights built from the dequantized experts and the adapter blocks by DESIGN.md's formulas,
differentiably, so every adapter gradient is checked too.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import qmiss
from qmiss import train
from qmiss.layer import MissExperts
from tests.helpers import BLOCK_MODES, randomize_adapters, ref_block_delta, tiny_moe
from tests.helpers import train_args as args

MOE = ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"]


def expert_layers(model) -> dict[str, MissExperts]:
    return {name: layer for name, layer in qmiss.miss_layers(model) if isinstance(layer, MissExperts)}


def reference_weight(layer: MissExperts, block: torch.Tensor) -> torch.Tensor:
    """The fused fp32 parameter W + ΔW(block) in transformers' layout, differentiable in ``block``."""
    weights = []
    for e in range(layer.experts):
        w = layer.base_weight(e)  # (out, in) dequantized, fp32
        if layer.mode in BLOCK_MODES:
            merged = w + ref_block_delta(layer.mode, w, block[e])
        else:
            d = block[e].repeat(1, layer.out_features // block.shape[-1]) if layer.mode == "mini" else block[e]
            # ΔW x = (Σ_j x_j) D: ΔW[o, c] = D[c % r, o]
            index = torch.arange(layer.in_features) % layer.r
            merged = w + d[index].t()
        weights.append(merged.t() if layer.transposed else merged)
    return torch.stack(weights)


def run_reference(model, ids: torch.Tensor, blocks: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's loss with every MissExperts replaced by its fp32 reference weight, under transformers' eager
    experts forward; the model is restored after."""
    layers = expert_layers(model)
    parents = {}
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        parents[name] = (parent, child, parent.config._experts_implementation)
        del parent._modules[child]
        setattr(parent, child, reference_weight(layer, blocks[name]))  # a plain tensor attribute
        parent.config._experts_implementation = "eager"
    try:
        return model(input_ids=ids, labels=ids).loss
    finally:
        for name, (parent, child, implementation) in parents.items():
            delattr(parent, child)
            parent._modules[child] = layers[name]
            parent.config._experts_implementation = implementation


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("mode", ["default", "mini", "bat", "bat_row"])
@pytest.mark.parametrize("model_type", MOE)
def test_experts_forward_and_gradients_equal_a_dequantized_reference(model_type: str, mode: str, bits: int) -> None:
    model = tiny_moe(model_type).float()
    qmiss.prepare_qmiss(model, r=16, bits=bits, mode=mode, mini_r=16 if mode == "mini" else None)
    assert len(expert_layers(model)) == 4  # gate_up and down in both layers
    randomize_adapters(model)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    model.train()

    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: layer.miss_block.grad.clone() for name, layer in qmiss.miss_layers(model)}
    model.zero_grad()

    blocks = {name: layer.miss_block for name, layer in expert_layers(model).items()}
    ref_loss = run_reference(model, ids, blocks)
    ref_loss.backward()
    assert relative(loss.detach(), ref_loss.detach()) <= 1e-5
    for name, layer in qmiss.miss_layers(model):
        assert grads[name].abs().sum() > 0, name
        assert relative(grads[name], layer.miss_block.grad) <= 1e-5, name


@pytest.mark.parametrize("mode", ["default", "bat", "bat_row"])
@pytest.mark.parametrize("model_type", MOE)
def test_zero_adapters_give_the_quantized_base_and_disable_adapter_covers_experts(model_type: str, mode: str) -> None:
    model = tiny_moe(model_type).float().eval()
    qmiss.prepare_qmiss(model, r=16, bits=4, mode=mode)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        zero = model(ids).logits
        with qmiss.disable_adapter(model):
            base = model(ids).logits
        if mode == "bat":  # an expert given fewer than r tokens runs bat's few-token path (no W'), whose other
            # matmul shapes round differently on some CPU kernels (AVX512): equal to 1e-6, the bound
            assert relative(zero, base) <= 1e-6
        else:
            assert torch.equal(zero, base)
        randomize_adapters(model)
        adapted = model(ids).logits
        with qmiss.disable_adapter(model):
            assert torch.equal(model(ids).logits, base)
    assert not torch.allclose(adapted, base)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_experts_are_quantized_one_at_a_time_to_the_bytes_of_the_stacked_matrix(model_type: str) -> None:
    """4-bit experts hold the same bytes as bitsandbytes quantizing all experts' (out, in) weights at once;
    the 16-bit parameter is gone and the experts module runs qmiss's experts implementation."""
    from qmiss import quant

    model = tiny_moe(model_type).float()
    experts = model.model.layers[0].mlp.experts
    original = experts.down_proj.detach().clone()
    qmiss.prepare_qmiss(model, r=16, bits=4)
    layer = experts.down_proj
    assert isinstance(layer, MissExperts) and "down_proj" not in dict(experts.named_parameters(recurse=False))
    assert experts.config._experts_implementation == "qmiss"
    stacked = original.transpose(1, 2) if layer.transposed else original  # (E, out, in)
    linear = torch.nn.Linear(layer.in_features, layer.experts * layer.out_features, bias=False)
    linear.weight.data = stacked.reshape(-1, layer.in_features).clone()
    whole = quant.quantize_linear(linear, 4)
    assert torch.equal(layer.base_layer.weight.data.view(torch.uint8), whole.weight.data.view(torch.uint8))
    for e in range(layer.experts):
        rows = slice(e * layer.out_features, (e + 1) * layer.out_features)
        assert torch.equal(layer.base_weight(e), quant.dequantize(whole)[rows])


@pytest.mark.parametrize("mode", ["default", "mini", "bat", "bat_row"])
@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "qwen2_moe"])
def test_save_reload_bitwise_and_export_merged_loads_in_plain_transformers(tmp_path, model_type: str,
                                                                           mode: str) -> None:
    settings = dict(r=16, bits=4, mode=mode, mini_r=16 if mode == "mini" else None,
                    rank_pattern=None if mode in BLOCK_MODES else {r"experts\.down_proj": 8})
    model = qmiss.prepare_qmiss(tiny_moe(model_type).float().eval(), **settings)
    randomize_adapters(model)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        logits = model(ids).logits

    model.save_pretrained(tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "qmiss_config.json").read_text())
    assert recorded["rank_pattern"] == settings["rank_pattern"]
    again = qmiss.from_pretrained(tiny_moe(model_type).float().eval(), tmp_path / "adapter")
    for (name, a), (_, b) in zip(qmiss.miss_layers(model), qmiss.miss_layers(again)):
        assert torch.equal(a.miss_block, b.miss_block), name
    if mode not in BLOCK_MODES:
        assert tuple(expert_layers(again)["model.layers.0.mlp.experts.down_proj"].miss_block.shape)[1] == 8

    qmiss.export_merged(model, tmp_path / "merged", dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert relative(plain(ids).logits, logits) <= 1e-5


@pytest.mark.parametrize("mode", ["default", "mini"])
@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_export_lora_is_peft_target_parameters_lora_exactly(tmp_path, model_type: str, mode: str) -> None:
    """default/mini experts are LoRA exactly: PEFT's target_parameters LoRA on the dequantized base (rank_pattern
    included) gives the adapted model's logits."""
    settings = dict(r=16, bits=4, mode=mode, mini_r=16 if mode == "mini" else None,
                    rank_pattern={r"experts\.down_proj": 8})
    model = qmiss.prepare_qmiss(tiny_moe(model_type).float().eval(), **settings)
    qmiss.export_merged(model, tmp_path / "base", dtype=torch.float32)  # zero adapters: the dequantized base
    randomize_adapters(model)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        logits = model(ids).logits
    qmiss.export_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["target_parameters"] and all("experts" in n for n in config["target_parameters"])
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    lora = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        assert relative(lora(ids).logits, logits) <= 1e-5


@pytest.mark.parametrize("mode", BLOCK_MODES)
def test_export_lora_refuses_bat_experts_naming_export_merged(tmp_path, mode: str) -> None:
    model = qmiss.prepare_qmiss(tiny_moe("mixtral").float(), r=16, bits=4, mode=mode)
    with pytest.raises(ValueError, match="export_merged"):
        qmiss.export_lora(model, tmp_path / "lora")


def test_merge_and_unload_gives_transformers_experts_back() -> None:
    model = qmiss.prepare_qmiss(tiny_moe("qwen3_moe").float().eval(), r=16, bits=4)
    randomize_adapters(model)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        logits = model(ids).logits
    plain = qmiss.merge_and_unload(model, dtype=torch.float32)
    experts = plain.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, torch.nn.Parameter) and experts.config._experts_implementation != "qmiss"
    with torch.no_grad():
        assert relative(plain(ids).logits, logits) <= 1e-5


def test_a_step_dequantizes_one_expert_at_a_time(monkeypatch) -> None:
    """The step's live peak is the peak with every expert's weight dequantized beforehand (no dequantization
    inside the step) plus at most one expert's weight (twice for bat: W and W'), far below all 16 experts."""
    def peak(model, ids) -> int:
        model.zero_grad(set_to_none=True)  # each step creates its gradients
        return qmiss.measure_peak(lambda: model(input_ids=ids, labels=ids).loss.backward()).peak_bytes

    for mode in ("default", "bat", "bat_row"):
        model = tiny_moe("qwen3_moe", experts=16, moe_intermediate_size=512, hidden_size=256, head_dim=64).float()
        qmiss.prepare_qmiss(model, r=16, bits=4, mode=mode)
        randomize_adapters(model)
        model.train()
        ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
        layers = list(expert_layers(model).values())
        measured = peak(model, ids)
        one_expert = max(layer.in_features * layer.out_features * 4 for layer in layers)  # fp32 compute on the CPU
        all_experts = sum(layer.experts * layer.in_features * layer.out_features * 4 for layer in layers[:1])
        cache = {id(layer): [layer.base_weight(e) for e in range(layer.experts)] for layer in layers}
        with monkeypatch.context() as patch:
            patch.setattr(MissExperts, "expert_rows",
                          lambda self, e, dtype: lambda a, b: cache[id(self)][e][a:b])
            predequantized = peak(model, ids)
        assert measured - predequantized <= (2 if mode == "bat" else 1) * one_expert, (mode, measured, predequantized)
        assert measured - predequantized < all_experts / 4


def test_rank_pattern_gives_experts_their_own_r_and_counts_fewer_parameters() -> None:
    model = qmiss.prepare_qmiss(tiny_moe("qwen3_moe").float(), r=16, bits=4, rank_pattern={"experts.*": 8})
    for name, layer in qmiss.miss_layers(model):
        assert layer.r == (8 if ".experts." in name else 16), name
    assert model.qmiss_config.rank_for("model.layers.0.mlp.experts.gate_up_proj") == 8


@pytest.mark.parametrize("settings, match", [
    (dict(rank_pattern={"no_such_module": 8}), r"rank_pattern key 'no_such_module' matches none of the \d+ target"),
    (dict(rank_pattern={"experts.*": 0}), r"rank_pattern\['experts.\*'\]=0 must be a positive int"),
    (dict(rank_pattern={"experts(": 8}), r"rank_pattern: key 'experts\(' is not a valid regex"),
    (dict(rank_pattern={"experts.*": 24}, mode="bat"),
     r"experts\.gate_up_proj: in_features=64, out_features=64 not divisible by r=24 \(from rank_pattern\)"),
    (dict(rank_pattern={r"experts\.down_proj": 48}), r"experts\.down_proj: r=48 \(from rank_pattern\) > in_features=32"),
])
def test_bad_expert_settings_fail_in_one_line_before_any_weight_is_quantized(settings: dict, match: str) -> None:
    model = tiny_moe("qwen3_moe").float()
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match) as error:
        qmiss.prepare_qmiss(model, **{"r": 16, "bits": 4, **settings})
    assert "\n" not in str(error.value)
    assert {name: p for name, p in model.named_parameters()}.keys() == before.keys()  # nothing was swapped


def test_rank_pattern_flag_parses_pairs_and_json() -> None:
    from qmiss.inputs import InputError, parse_rank_pattern

    assert parse_rank_pattern("experts=16, q_proj=32") == {"experts": 16, "q_proj": 32}
    assert parse_rank_pattern('{"experts\\\\.down_proj": 8}') == {r"experts\.down_proj": 8}
    with pytest.raises(InputError, match="--rank_pattern 'experts': 'experts' is not key=r"):
        parse_rank_pattern("experts")


def test_qmiss_train_fine_tunes_a_tiny_moe_from_a_saved_folder(tmp_path, smollm2_dir, jsonl: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    folder = tmp_path / "tiny-moe"
    tiny_moe("qwen3_moe", vocab_size=len(tokenizer), max_position_embeddings=256).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    summary = train.run(args(str(folder), jsonl, out, "--max_steps", "8", "--learning_rate", "3e-3",
                             "--rank_pattern", "experts=8", "--save_strategy", "steps", "--save_steps", "8"))
    assert summary["steps"] == 8
    history = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    losses = [row["loss"] for row in history if "loss" in row]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    _, tensors, payload = qmiss.read_adapter(out)
    assert payload["qmiss"]["rank_pattern"] == {"experts": 8}
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape[:2] == (4, 8)
    reloaded = qmiss.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), out)
    for name, layer in qmiss.miss_layers(reloaded):
        assert torch.equal(layer.miss_block, tensors[name]), name


def test_16bit_experts_merge_unmerge_and_unload_round_trip() -> None:
    model = tiny_moe("mixtral").float().eval()
    original = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    qmiss.prepare_qmiss(model, r=16, bits=None, mode="bat")
    randomize_adapters(model)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        adapted = model(ids).logits
        qmiss.merge(model)
        assert relative(model(ids).logits, adapted) <= 1e-5
        qmiss.unmerge(model)
        assert relative(model(ids).logits, adapted) <= 1e-5
    model.unload()
    restored = model.model.layers[0].mlp.experts.down_proj
    assert isinstance(restored, torch.nn.Parameter) and torch.allclose(restored, original, atol=1e-5)
    assert model.model.layers[0].mlp.experts.config._experts_implementation != "qmiss"


@pytest.mark.parametrize("mode", ["default", "bat_row"])
def test_merged_weight_of_unquantized_experts_leaves_the_base_as_it_was(mode: str) -> None:
    """An unquantized expert's rows in their own dtype are a view of the parameter: merged_weight once added ΔW
    into the base itself (delta_weight then read 0, and export_merged left the live model at W + ΔW)."""
    model = qmiss.prepare_qmiss(tiny_moe("qwen3_moe").float(), r=16, bits=None, mode=mode)
    randomize_adapters(model)
    layer = expert_layers(model)["model.layers.0.mlp.experts.gate_up_proj"]
    before = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight(0)
    layer.merged_weight(1)
    assert torch.equal(layer.base_layer.weight, before)
    assert delta.abs().max() > 0
