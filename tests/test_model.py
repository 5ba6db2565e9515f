"""prepare_qmiss on tiny transformers models: PEFT as the oracle, surgery, bad input, training plumbing."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import qmiss
from qmiss import MissLinear, quant
from qmiss.inputs import InputError
from qmiss.prepare import enable_checkpointing, is_checkpointing
from tests.helpers import load, mode_kwargs, randomize_adapters, tiny_llama, tiny_moe

BITS = [4, 8, None]
BIT_IDS = ["4bit", "8bit", "16bit"]
MODES = ["default", "mini", "bat", "bat_row"]
PEFT_MODES = ["default", "mini", "bat"]  # PEFT has no bat_row
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
@pytest.mark.parametrize("mode", PEFT_MODES)
def test_logits_match_peft_miss(tiny_dir: str, mode: str, bits: int | None) -> None:
    from peft import MissConfig, get_peft_model

    ours = qmiss.prepare_qmiss(load(tiny_dir, bits), r=16, bits=bits, **mode_kwargs(mode))
    init_weights = {"default": True, "mini": "mini", "bat": "bat"}[mode]
    theirs = get_peft_model(load(tiny_dir, bits), MissConfig(r=16, init_weights=init_weights, mini_r=16,
                                                             target_modules="all-linear"))
    for module in theirs.modules():  # same canonical 4-bit layout on both sides (see quant.prepare_for_adapter)
        if isinstance(module, torch.nn.Linear) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    values = randomize_adapters(ours)
    peft_layers = dict(theirs.base_model.model.named_modules())
    assert len(values) == 2 * len(LINEARS)
    with torch.no_grad():
        for name, value in values.items():
            peft_layers[name].miss_block["default"].copy_(value)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        ours_logits, theirs_logits = ours(ids).logits, theirs(ids).logits
        with qmiss.disable_adapter(ours):
            base_logits = ours(ids).logits
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapters matter
    assert (ours_logits - theirs_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("bits", [4, 8], ids=["4bit", "8bit"])
def test_full_precision_model_is_quantized_and_wrapped(bits: int) -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=bits)
    layers = dict(qmiss.miss_layers(model))
    assert sorted({name.split(".")[-1] for name in layers}) == sorted(LINEARS)
    assert all(layer.bits == bits for layer in layers.values())
    assert quant.quant_bits(model.lm_head) is None and not isinstance(model.lm_head, MissLinear)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.qmiss_config.bits == bits and model.qmiss_config.compute_dtype is None  # follows the device
    assert all(layer.compute_dtype == torch.float32 for layer in layers.values())  # the CPU's default
    if bits == 4:
        layer = layers["model.layers.0.mlp.down_proj"]
        assert quant.quant_type(layer.base_layer) == "nf4" and layer.base_layer.weight.quant_state.nested
    else:
        assert layers["model.layers.0.mlp.down_proj"].base_layer.state.threshold == 6.0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{n}.adapter.weight" for n in layers]


def test_fp4_without_double_quant() -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, quant_type="fp4", double_quant=False)
    base = model.model.layers[0].self_attn.q_proj.base_layer
    assert quant.quant_type(base) == "fp4" and not base.weight.quant_state.nested


def test_bf16_model_with_fp32_norms_runs() -> None:
    model = qmiss.prepare_qmiss(tiny_llama().to(torch.bfloat16), r=16, bits=4, fp32_norms=True)
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    out = model(torch.randint(0, 256, (2, 8)), labels=torch.randint(0, 256, (2, 8)))
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_unquantized_base_keeps_its_linears() -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=None)
    assert all(type(layer.base_layer) is torch.nn.Linear for _, layer in qmiss.miss_layers(model))


def test_preloaded_quantization_is_kept(tiny_dir: str) -> None:
    model = qmiss.prepare_qmiss(load(tiny_dir, 8), r=16)  # bits="auto"
    assert model.qmiss_config.bits == 8
    assert all(layer.bits == 8 for _, layer in qmiss.miss_layers(model))


@pytest.mark.parametrize("loaded,asked", [(4, 8), (8, 4), (4, None)], ids=["4-as-8", "8-as-4", "4-as-16"])
def test_bits_contradicting_the_loaded_model(tiny_dir: str, loaded: int, asked: int | None) -> None:
    with pytest.raises(ValueError, match=f"bits={asked!r}, but the model was loaded in {loaded}-bit"):
        qmiss.prepare_qmiss(load(tiny_dir, loaded), r=16, bits=asked)


def test_target_and_exclude_modules() -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, target_modules=["q_proj", "v_proj"],
                                exclude_modules=r"model\.layers\.1\..*")
    assert [n for n, _ in qmiss.miss_layers(model)] == ["model.layers.0.self_attn.q_proj",
                                                       "model.layers.0.self_attn.v_proj"]
    assert quant.quant_bits(model.model.layers[0].mlp.up_proj) is None  # untargeted layers stay as they were


def test_init_weights_alias() -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=None, init_weights="bat")
    assert model.qmiss_config.mode == "bat" and model.qmiss_config.init_weights == "bat"
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=None, init_weights=True)
    assert model.qmiss_config.mode == "default"


@pytest.mark.parametrize("kwargs,error,match", [
    ({"r": 0}, ValueError, "r=0 must be a positive int"),
    ({"r": -4}, ValueError, "r=-4"),
    ({"r": 128}, ValueError, r"model\.layers\.0\.self_attn\.q_proj: r=128 > in_features=64"),
    ({"r": 48, "mode": "bat"}, ValueError, r"model\.layers\.0\.self_attn\.q_proj: in_features=64, out_features=64 "
                                           r"not divisible by r=48.*; and \d+ more — .*mode='default'"),
    ({"mode": "mini", "mini_r": 48}, ValueError, r"model\.layers\.0\.self_attn\.k_proj: out_features=32 is not "
                                                 r"divisible by mini_r=48"),
    ({"mode": "mini"}, ValueError, "mode='mini' needs mini_r"),
    ({"bits": 3}, ValueError, "bits=3 is not supported"),
    ({"bits": 2}, ValueError, "bits=2"),
    ({"quant_type": "int4"}, ValueError, "quant_type='int4' is not supported; use 'nf4' or 'fp4'"),
    ({"target_modules": ["qkv"]}, ValueError, r"matches no linear layer; the model's 15 linear layers are: "
                                              r"model\.layers\.0\.self_attn\.q_proj, .* and 11 more$"),
    ({"mode": "lora"}, ValueError, "mode='lora' is not one of"),
    ({"init_weights": False}, ValueError, "init_weights=False is not supported"),
    ({"mode": "bat", "init_weights": "mini"}, ValueError, "disagree"),
    ({"mode": "bat", "dropout": 0.1}, ValueError, "dropout=0.1 with mode='bat'"),
    ({"dropout": 1.5}, ValueError, r"dropout=1\.5 must be in \[0, 1\)"),
], ids=["r=0", "r<0", "r>in", "bat-indivisible", "mini-indivisible", "mini-no-mini_r", "bits=3", "bits=2",
        "quant_type", "no-match", "bad-mode", "init_weights=False", "mode-vs-alias", "bat-dropout", "dropout>1"])
def test_bad_input_is_a_clear_error(kwargs: dict, error: type, match: str) -> None:
    kwargs = {"r": 16, **kwargs}
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(error, match=match):
        qmiss.prepare_qmiss(model, **kwargs)
    assert not list(qmiss.miss_layers(model))  # nothing changed
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_bat_error_names_the_first_offenders_and_counts_them_all() -> None:
    """A 7B model has 224 target layers: the error names three and counts the rest, it does not list them all."""
    with pytest.raises(ValueError) as info:
        qmiss.prepare_qmiss(tiny_llama(), r=48, mode="bat")
    offenders = re.findall(r"(model\.layers\.\d\.\w+\.\w+):", str(info.value))
    assert offenders == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.v_proj"]
    total = 2 * len(LINEARS)
    assert str(info.value).startswith(f"{total} of {total} target layers do not fit: ")
    assert f"; and {total - 3} more — bat needs r×r blocks" in str(info.value)


def test_prepare_twice_is_an_error() -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4)
    with pytest.raises(ValueError, match="already has qmiss adapters; prepare_qmiss is called once"):
        qmiss.prepare_qmiss(model, r=16, bits=4)


def test_trainable_parameters_prints_a_peft_style_line(capsys) -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4)
    trainable, total = qmiss.trainable_parameters(model)
    expected = sum(layer.miss_block.numel() for _, layer in qmiss.miss_layers(model))
    assert trainable == expected
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + expected  # 4-bit weights counted as values
    line = capsys.readouterr().out
    assert line.startswith(f"trainable params: {expected:,d} || all params: {total:,d} || trainable%:")


@pytest.mark.parametrize("mode", MODES)
def test_disable_adapter_gives_the_base_output(mode: str) -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, **mode_kwargs(mode)).eval()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        base = model(ids).logits
        randomize_adapters(model)
        adapted = model(ids).logits
        with qmiss.disable_adapter(model):
            disabled = model(ids).logits
        after = model(ids).logits
    tol = 1e-5 if mode == "bat" else 0
    assert (disabled - base).abs().max() <= tol * base.abs().max()
    assert (adapted - base).abs().max() > 1e-2
    assert torch.equal(after, adapted)


def adapter_grads(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {n: layer.miss_block.grad.clone() for n, layer in qmiss.miss_layers(model)}


@pytest.mark.parametrize("mode", ["default", "bat", "bat_row"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(mode: str, reentrant: bool) -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, mode=mode)
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 256, (2, 16))
    plain = adapter_grads(model, ids)
    enable_checkpointing(model, use_reentrant=reentrant)
    assert is_checkpointing(model)
    checkpointed = adapter_grads(model, ids)
    for name in plain:
        assert plain[name].abs().sum() > 0
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_prepare_turns_on_gradient_checkpointing() -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, gradient_checkpointing=True)
    assert is_checkpointing(model) and model.config.use_cache is False


def test_generate_works() -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4).eval()
    randomize_adapters(model)
    out = model.generate(torch.randint(0, 256, (2, 5)), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 9)


@pytest.mark.parametrize("preloaded", [False, True], ids=["quantized-by-qmiss", "loaded-4bit"])
def test_transformers_trainer_trains_only_the_adapters(tmp_path, tiny_dir: str, preloaded: bool) -> None:
    from transformers import Trainer, TrainingArguments

    model = load(tiny_dir, 4) if preloaded else tiny_llama()
    model = qmiss.prepare_qmiss(model, r=16, bits=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    gen = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (8, 16), generator=gen)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="no", report_to=[], use_cpu=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert all(layer.miss_block.abs().sum() > 0 for _, layer in qmiss.miss_layers(model))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_defaults_to_bf16_compute_and_trains(mode: str) -> None:
    model = qmiss.prepare_qmiss(tiny_llama().to("cuda", torch.bfloat16), r=16, bits=4, **mode_kwargs(mode))
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert all(layer.compute_dtype == expected for _, layer in qmiss.miss_layers(model))
    ids = torch.randint(0, 256, (2, 16), device="cuda")
    model(ids, labels=ids).loss.backward()
    assert all(layer.miss_block.grad is not None for _, layer in qmiss.miss_layers(model))


def test_preloaded_4bit_keeps_its_compute_dtype(tiny_dir: str) -> None:
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config, device_map="cpu")
    model = qmiss.prepare_qmiss(model, r=16)
    assert model.qmiss_config.compute_dtype == torch.bfloat16
    assert all(layer.compute_dtype == torch.bfloat16 for _, layer in qmiss.miss_layers(model))
    assert torch.isfinite(model(torch.randint(0, 256, (1, 6))).logits).all()


@pytest.mark.parametrize("model_type, router", [("mixtral", "mlp.gate"), ("qwen2_moe", "mlp.shared_expert_gate"),
                                                ("phimoe", "mlp.router"), ("gpt_oss", "mlp.router")])
def test_moe_routers_stay_and_fused_experts_are_adapted(model_type: str, router: str) -> None:
    """Routers and gates are no "all-linear" target (a wrapped PhiMoE router broke the forward; Qwen2-MoE's
    1-wide shared_expert_gate refused bat); fused 3-D experts are quantized and adapted, silently no more."""
    model = tiny_moe(model_type)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="prepare_qmiss")
        qmiss.prepare_qmiss(model, r=16, bits=4, mode="bat")
    adapted = [name for name, _ in qmiss.miss_layers(model)]
    assert adapted and not [n for n in adapted if n.endswith(router)]
    assert "model.layers.0.mlp.experts.down_proj" in adapted
    ids = torch.randint(0, 128, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_experts_left_out_are_named_with_their_share() -> None:
    """Experts excluded from the targets stay 16-bit: the warning names them and their share of the weights."""
    model = tiny_moe("mixtral")
    with pytest.warns(UserWarning, match=r"prepare_qmiss: 2 matmul weight\(s\) .* unquantized and frozen — "
                                         r"model\.layers\.0\.mlp\.experts\.down_proj.*: \d+% of the model's matmul"):
        qmiss.prepare_qmiss(model, r=16, bits=4, exclude_modules=["model.layers.0.mlp.experts.gate_up_proj",
                                                                   "model.layers.0.mlp.experts.down_proj"])


def test_a_dense_model_prepares_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="prepare_qmiss")
        qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4)


def test_falcon_trains_in_bat_mode() -> None:
    """Falcon modifies a projection's output in place; bat's backward must survive it."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
    qmiss.prepare_qmiss(model, r=16, bits=4, mode="bat")
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_deepseek_v3_in_8bit_evaluates() -> None:
    """DeepSeek-V3's attention feeds kv_b_proj a 4-D input, which bitsandbytes' 8-bit eval path could not take."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "deepseek_v3", vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    qmiss.prepare_qmiss(model, r=16, bits=8)
    ids = torch.randint(0, 128, (2, 8))
    train_loss = model(input_ids=ids, labels=ids).loss
    model.eval()
    with torch.no_grad():
        eval_loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(eval_loss) and abs(float(eval_loss) - float(train_loss)) < 0.05


def test_linears_inside_a_router_stay_16bit() -> None:
    """A router built of linears (HunYuan's mlp.gate.wg, JetMoE's router.layer, LongCat's router.classifier) is
    a router: none of its linears is an "all-linear" target; a gate_proj is no router."""
    from qmiss.model import is_router

    assert all(is_router(n) for n in ("model.layers.0.mlp.gate.wg", "model.layers.0.mlp.router.classifier",
                                      "model.layers.0.mlp.gate", "layers.1.mlp.gate.router_mlp.out_proj"))
    assert not any(is_router(n) for n in ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.experts.gate_up_proj",
                                          "model.layers.0.self_attn.g_proj"))


def test_modules_the_model_keeps_in_fp32_stay_16bit() -> None:
    """transformers' bitsandbytes loader leaves a class's _keep_in_fp32_modules unconverted (DeepSeek-V3.2 reads
    indexer.weights_proj's dtype); prepare_qmiss leaves them too, and names no warning for them."""
    model = tiny_llama()
    model._keep_in_fp32_modules = ["self_attn.o_proj"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="prepare_qmiss")
        qmiss.prepare_qmiss(model, r=16, bits=4)
    adapted = [name for name, _ in qmiss.miss_layers(model)]
    assert adapted and not [n for n in adapted if n.endswith("o_proj")]
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear


def test_a_linear_with_its_own_forward_is_left_and_named() -> None:
    """An nn.Linear subclass with a forward of its own (DeepSeek-V4's grouped o_a_proj) is no plain product: a
    quantized linear cannot stand in for it, so it stays 16-bit and the warning names it."""

    class Grouped(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = tiny_llama()
    o_proj = model.model.layers[1].self_attn.o_proj
    model.model.layers[1].self_attn.o_proj = Grouped(o_proj.in_features, o_proj.out_features, bias=False)
    with pytest.warns(UserWarning, match=r"prepare_qmiss: 1 matmul weight\(s\) .* — "
                                         r"model\.layers\.1\.self_attn\.o_proj\.weight: \d+%.*own"):
        qmiss.prepare_qmiss(model, r=16, bits=4)
    assert type(model.model.layers[1].self_attn.o_proj) is Grouped
    assert isinstance(model.model.layers[0].self_attn.o_proj, MissLinear)


def test_layers_a_device_map_offloads_are_refused_by_name() -> None:
    """A device_map that offloads layers to the CPU or disk leaves their weights on the meta device behind
    accelerate's hooks, which look them up by name: prepare_qmiss names them before touching anything."""
    from accelerate import cpu_offload

    model = tiny_llama()
    cpu_offload(model.model.layers[1], execution_device="cpu")  # what dispatch_model does for a "cpu" entry
    with pytest.raises(InputError, match=r"prepare_qmiss: 7 target layer\(s\) are offloaded to the CPU or disk "
                                               r"by the model's device_map \(model\.layers\.1\.self_attn\.q_proj"):
        qmiss.prepare_qmiss(model, r=16, bits=4)
    assert not any(isinstance(m, MissLinear) for m in model.modules())


def test_host_embeddings_refuse_a_device_map_hook() -> None:
    """accelerate's AlignDevicesHook on embed_tokens (a multi-GPU device_map) would send the ids back to its GPU
    after qmiss moved them to the host."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_llama(tie_word_embeddings=False)
    add_hook_to_module(model.model.embed_tokens, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    with pytest.raises(InputError, match=r"embeddings_on_host: LlamaForCausalLM's input embedding is placed by "
                                               r"a device_map .*\(device_map=\{'': 0\}\)"):
        qmiss.prepare_qmiss(model, r=16, bits=4, embeddings_on_host=True)
