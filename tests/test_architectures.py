"""Every causal-LM architecture transformers knows, built tiny from its own config: prepared in 4 and 8 bits,
default and bat, trained one step, its adapter saved and loaded, exported merged and reloaded by plain
transformers, and what prepare_qmiss leaves in floating point measured.

The default run takes :data:`DEFAULT_SUBSET`; ``pytest -m architectures tests/test_architectures.py`` runs the
whole grid (conftest.py deselects the rest otherwise, and prints how many architectures ran and were skipped).
An architecture that does not work today sits in :data:`SKIP` with the reason, found by running it.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import qmiss
from qmiss import quant
from qmiss.layer import MissAdapter
from qmiss.model import is_matmul_weight, is_router, keeps_in_float, output_head, unreachable_weights
from tests.helpers import randomize_adapters

ARCHITECTURES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
#: run by default: the common dense families, GPT-2's Conv1D, and the common mixture-of-experts ones
DEFAULT_SUBSET = ("llama", "gpt2", "falcon", "phi3", "qwen2", "gemma2", "mistral", "mixtral", "qwen3_moe", "gpt_oss",
                  "deepseek_v3", "olmoe", "granitemoe", "phimoe", "qwen2_moe")
UNDECORATED = ("its experts module is not routed through transformers' experts interface (use_experts_implementation), "
               "so its fused experts stay 16-bit; prepare_qmiss warns, naming them")
#: mixture-of-experts architectures whose routed experts are fused 3-D parameters (an ``...Experts`` module)
MOE_TYPES = (
    "afmoe", "aria_text", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "dots1", "dots3_note", "dots3_note_text", "ergo", "ernie4_5_moe", "exaone_moe", "flex_olmo",
    "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoe_swa", "granitemoehybrid",
    "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "jamba", "kimi_linear", "kolibri1", "laguna", "lara_mini",
    "llama4", "llama4_text", "longcat_flash", "mellum", "mimo_v2_flash", "minicpm5_moe", "minimax", "minimax_m2",
    "minimax_m3_vl_text", "mixtral", "nemotron_h", "olmoe", "param2moe", "phimoe", "qwen2_moe", "qwen3_5_moe",
    "qwen3_5_moe_text", "qwen3_moe", "qwen3_next", "qwen4_exp", "qwen4_exp_text", "sarvam_mla", "sarvam_moe",
    "solar_open", "zaya",
)
GATE_OUT = "bat: a per-head gate linear's out_features is the head count"
#: why an architecture does not run today, found by running it (`pytest -m architectures`): keyed by model_type,
#: or by "model_type-mode" where only that mode fails
SKIP: dict[str, str] = {
    "llama4": UNDECORATED,
    "llama4_text": UNDECORATED,
    "jetmoe": f"{UNDECORATED} (its MLP and attention experts, input_linear/output_linear)",
    "hy_v4": "its hyper-connection mixing weights (hc_fn, attn_hc.fn, ffn_hc.fn) are raw parameters, left float",
    "inkling_text": "its shared experts are 3-D raw parameters (bmm, not an experts module) and its relative-logits "
                    "projection (rel_logits_proj.proj) is a raw parameter: left float",
    "inkling2_text": "raw-parameter projections (relative_position_bias.proj, attention_input.query) left float",
    "inkling2_loop_text": "raw-parameter projections (relative_position_bias.proj, attention_input.query) left float",
    "deepseek_v4": "o_a_proj is a grouped (block-diagonal) nn.Linear subclass with its own forward: left 16-bit, "
                   "prepare_qmiss warns, naming it",
    # the model reads a linear's weight dtype to pick its compute dtype: a quantized weight is uint8 / int8 (so
    # transformers' own bitsandbytes loading breaks the same way); a MissLinear has no .weight
    "ergo": "its decoder layer reads self_attn.o_proj.weight.dtype",
    "dots3_note": "its indexer reads weights_proj.weight.dtype, and unlike DeepSeek-V3.2 its class does not keep "
                  "indexer.weights_proj in fp32 (_keep_in_fp32_modules)",
    "dots3_note_text": "its indexer reads weights_proj.weight.dtype, and unlike DeepSeek-V3.2 its class does not keep "
                       "indexer.weights_proj in fp32 (_keep_in_fp32_modules)",
    "dbrx": "transformers' default config does not build a model (DbrxAttentionConfig has no rope_theta)",
    # bat needs r to divide out_features: small gate and router linears (out = heads or experts) do not fit
    "bailing_hybrid-bat": f"{GATE_OUT} (self_attn.g_proj: 4)",
    "dots3_note_text-bat": f"{GATE_OUT} (self_attn.g_proj: 4)",
    "dots3_note-bat": f"{GATE_OUT} (self_attn.g_proj: 4)",
    "lfm3-bat": f"{GATE_OUT} (self_attn.g_proj: 4)",
    "doge-bat": "bat: self_attn.dt_proj's out_features is the key/value head count (2)",
    "inkling2_text-bat": f"{GATE_OUT} (self_attn.sink_proj: 4)",
    "inkling2_loop_text-bat": f"{GATE_OUT} (self_attn.sink_proj: 4)",
    "qwen4_exp-bat": "bat: the hyper-connection block_inject_weight linears have out_features=4",
    "qwen4_exp_text-bat": "bat: the hyper-connection block_inject_weight linears have out_features=4",
    "xlstm-bat": f"{GATE_OUT} (mlstm_layer.igate_preact / fgate_preact: 4)",
    "fuyu-bat": "bat: vision_embed_tokens has in_features=2700 (a 30×30×3 patch), not divisible by r=16",
    # qmiss
    "ctrl": "qmiss: prepare_qmiss's enable_input_require_grads makes the embedding output a leaf that requires grad, "
            "and CTRL scales it in place (RuntimeError: a leaf Variable … in-place operation)",
    "git": "qmiss: prepare_qmiss's enable_input_require_grads makes the embedding output a leaf that requires grad, "
           "and GIT adds position embeddings to it in place (RuntimeError: a leaf Variable … in-place operation)",
    "mamba": "its mixer reads x_proj/dt_proj/out_proj .weight directly (mamba_inner_fn, dt_proj.weight @ …): a "
             "MissLinear has no .weight",
    "gemma3n_text": "AltUp's correction/prediction coefficient linears have in_features=altup_num_inputs=4 < r=16",
    # matmul weights that are raw parameters, not linears: left in float
    "xlnet": "its relative attention's q/k/v/o/r are raw parameters (einsum), not linears: 56% left float",
    "recurrent_gemma": "the RG-LRU gates are block-diagonal raw parameters (input_gate_weight, recurrent_gate_weight): "
                       "4% left float",
    "gemma3": "the vision tower's pooling head (nn.MultiheadAttention in_proj_weight) and the projector's "
              "mm_input_projection_weight are raw parameters: 9% left float",
    "phi4_multimodal": "the image encoder's pooling head (nn.MultiheadAttention in_proj_weight) is a raw parameter, "
                       "left float",
    # the model itself (without qmiss) does not run tiny, or needs a setup beyond input ids
    "blt": "does not run without qmiss: its cache setup reads BltConfig.num_hidden_layers, which the byte-latent "
           "composite config lacks",
    "hrm_text": "does not run without qmiss at 2 layers: IndexError in its cache update (cache_utils.py) over the "
                "recurrent cycles",
    "xlstm": "does not run without qmiss at this size: tensor size mismatch in its native mLSTM kernel",
    "zamba": "does not build tiny: its shared-transformer tied-weights check (tie_weights_keys) refuses the 2- and "
             "4-layer layouts",
    "musicgen": "transformers' default config does not build a model (MusicgenConfig has no dropout)",
    "musicgen_melody": "transformers' default config does not build a model (MusicgenMelodyConfig has no dropout)",
    "gemma3n": "needs the timm package (its vision tower), which is not installed",
    "gemma4_assistant": "its default config does not validate (hidden_size_per_layer_input must be 0, got 256)",
    "gemma4_unified_assistant": "a drafter whose every layer shares a target model's KV cache (num_kv_shared_layers "
                                "= num_hidden_layers): its config refuses the 2-layer cut (layer types producing a "
                                "cache differ from those using one)",
    "xmod": "needs a language chosen first (XmodPreTrainedModel.set_default_language)",
    "emu3": "the exported text config (Emu3TextConfig) is not in AutoModelForCausalLM's mapping: plain transformers "
            "reloads the merged checkpoint only by its class",
    "mllama": "the exported text config (MllamaTextConfig) is not in AutoModelForCausalLM's mapping: plain "
              "transformers reloads the merged checkpoint only by its class",
}

#: sizes by config attribute, whatever the family calls them; only attributes a config has are set
WIDTH, FFN, LAYERS, HEADS, HEAD_DIM, RANK, VOCAB, POSITIONS = 64, 128, 2, 4, 16, 32, 256, 128
SIZES: dict[str, int] = {
    **dict.fromkeys(["hidden_size", "n_embd", "d_model", "emb_dim", "embedding_dim", "embedding_size",
                     "word_embed_proj_dim", "input_embedding_size", "output_embedding_size", "attention_hidden_size",
                     "lru_width", "backbone_hidden_size", "adapter_in_dim", "adapter_out_dim", "adapter_input_size"],
                    WIDTH),
    **dict.fromkeys(["intermediate_size", "n_inner", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim",
                     "ffn_hidden_size", "d_inner", "dff", "dim_ff", "feed_forward_size", "intermediate_size_mlp",
                     "dense_intermediate_size", "first_dense_intermediate_size", "mlp_only_intermediate_size",
                     "moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
                     "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size",
                     "shared_intermediate_size"], FFN),
    **dict.fromkeys(["num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
                     "num_decoder_layers", "num_encoder_layers"], LAYERS),
    **dict.fromkeys(["num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "encoder_attention_heads", "attention_heads", "num_decoder_attention_heads",
                     "num_encoder_attention_heads", "swa_num_attention_heads"], HEADS),
    # heads of state-space, linear-attention and indexer blocks: per-head gate projections have out_features =
    # heads, 16 here as in real models (32, 64, 128), so r=16 divides them
    **dict.fromkeys(["index_n_heads", "index_num_heads", "linear_num_value_heads", "linear_num_heads",
                     "mamba_n_heads", "mamba_num_heads", "n_mamba_heads"], 16),
    **dict.fromkeys(["head_dim", "attention_head_dim", "attention_head_size", "d_head", "dim_head", "kv_channels",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "swa_head_dim", "index_head_dim",
                     "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim", "rotary_dim"], HEAD_DIM),
    # Mamba heads: mamba heads · head dim = expand (2) · hidden
    **dict.fromkeys(["mamba_head_dim", "mamba_headdim", "mamba_d_head"], 2 * WIDTH // 16),
    **dict.fromkeys(["kv_lora_rank", "q_lora_rank", "o_lora_rank"], RANK),
    "qk_head_dim": 2 * HEAD_DIM,  # latent attention: qk_nope_head_dim + qk_rope_head_dim
    **dict.fromkeys(["vocab_size", "decoder_vocab_size", "unpadded_vocab_size", "vocab_size_per_layer_input"], VOCAB),
    **dict.fromkeys(["max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions",
                     "max_source_positions", "original_max_position_embeddings"], POSITIONS),
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k"], 2),
    **dict.fromkeys(["n_group", "topk_group", "num_expert_group", "n_shared_experts", "num_shared_experts",
                     "moe_num_shared_experts", "first_k_dense_replace"], 1),
    # state-space and linear-attention blocks
    **dict.fromkeys(["n_groups", "mamba_n_groups", "mamba_ngroups"], 1),
    "mamba_d_ssm": 2 * WIDTH,
    **dict.fromkeys(["state_size", "mamba_d_state", "ssm_state_size", "time_step_rank", "mamba_dt_rank",
                     "mamba_chunk_size", "chunk_size"], 16),
    "sliding_window": 32,
}
#: attributes whose value stays at most what the config had (a kv-head count of 1 stays 1)
AT_MOST = {"num_key_value_heads": 2, "num_kv_heads": 2, "swa_num_key_value_heads": 2, "num_query_groups": 2,
           "multi_query_group_num": 2, "linear_num_key_heads": 2}
#: attributes set even where the config has None (None elsewhere means "none of it": no sliding window, no q rank)
FILL_NONE = {"head_dim", "num_experts", "num_local_experts", "n_routed_experts", "n_shared_experts",
             "num_experts_per_tok"}
#: per-architecture settings the generic shrinking cannot guess
OVERRIDES: dict[str, dict] = {
    "mamba2": {"num_heads": 16, "head_dim": 2 * WIDTH // 16},  # its Mamba heads: heads · head_dim = expand · hidden
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # a hybrid whose attention layers a period or an index list places: keep one of each kind
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # None by default, which its model cannot read
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    # its indexed-attention layer (kept second) indexes itself, with no more heads than queries per key/value head
    "kolibri1_1": {"index_layers": [1], "kv_source_layers": [0, 1], "index_num_heads": 2},
    "zamba2": {"attention_hidden_size": 2 * WIDTH, "attention_head_dim": 2 * WIDTH // HEADS, "hybrid_layer_ids": [1]},
    "dory": {"layer_types": None, "num_hidden_layers": 3, "n_input_layers": 1, "n_recurrent_layers": 1,
             "n_output_layers": 1},
    "dots3_note_text": {"head_dim": 2 * HEAD_DIM},  # its sliding layers' = qk_nope_head_dim + qk_rope_head_dim
    "qwen4_exp_text": {"indexer_n_heads": HEADS, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM,
                       "indexer_budget": 16, "indexer_compress_ratio": 4},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # is_decoder: its LM head's requirement; axial positions to the tiny width; a fixed LSH hash (deterministic)
    "reformer": {"is_decoder": True, "axial_pos_shape": [4, 4], "axial_pos_embds_dim": [WIDTH // 2, WIDTH // 2],
                 "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4, "hash_seed": 0},
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 16},  # its router MLP is 1/8 of hidden wide
    "longcat_flash": {"zero_expert_num": 4},  # its router scores experts and "zero experts" (256 by default)
    "gemma3n_text": {"num_kv_shared_layers": 0},
}
#: input ids are drawn below this; special token ids sit above it
TEXT_IDS = 200


def _layer_indices(values: dict, layers: int) -> list[int]:
    """Which of the config's ``layers`` layers the tiny model keeps: the first of each kind its per-layer lists
    name (``layer_types`` first: a hybrid keeps an attention layer and a linear-attention one), then the first
    ones left, :data:`LAYERS` in all, in order."""
    per_layer = [values[k] for k in sorted(values, key=lambda k: k != "layer_types")
                 if isinstance(values[k], list) and len(values[k]) == layers]
    kinds = next((lst for lst in per_layer if len({repr(v) for v in lst}) > 1), [])
    chosen: list[int] = []
    for i, kind in enumerate(kinds):
        if kind not in [kinds[j] for j in chosen]:
            chosen.append(i)
    chosen = chosen[:LAYERS]
    chosen += [i for i in range(layers) if i not in chosen][: LAYERS - len(chosen)]
    return sorted(chosen)


def _shrink(values: dict, model_type: str | None) -> dict:
    """A config's ``to_dict()`` with every size made tiny (:data:`SIZES`), the per-layer lists and {layer: …}
    tables cut to the kept layers (:func:`_layer_indices`), dropout and router noise off, and special token ids
    inside the tiny vocabulary; sub-configs (``text_config`` …) shrunk the same way."""
    depth_keys = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    layers = next((values[k] for k in depth_keys if k in values), None)
    kept = _layer_indices(values, layers) if isinstance(layers, int) and layers > LAYERS else None
    out, special = {}, VOCAB - 1
    for key, value in values.items():
        if isinstance(value, dict) and "model_type" in value:
            out[key] = _shrink(value, value["model_type"])
        elif isinstance(value, bool):
            out[key] = value
        elif value is None:  # derived from other sizes, or (experts) a default the model cannot run with
            out[key] = AT_MOST.get(key, SIZES.get(key) if key in FILL_NONE else None)
        elif kept is not None and isinstance(value, list) and len(value) == layers:
            out[key] = [value[i] for i in kept]
        elif kept is not None and "layer" in key and isinstance(value, dict) and all(str(k).isdigit() for k in value):
            out[key] = {new: _shrink(v, None) if isinstance(v, dict) else v
                        for new, i in enumerate(kept) for k, v in value.items() if int(k) == i}
        elif key in SIZES and isinstance(value, int):
            out[key] = SIZES[key]
        elif key in AT_MOST and isinstance(value, int):
            out[key] = min(value, AT_MOST[key])
        elif key == "use_cache":  # training: no cache (some hybrids' caches need a generation setup)
            out[key] = False
        elif isinstance(value, float) and ("dropout" in key or "pdrop" in key or "jitter" in key):
            out[key] = 0.0
        elif key.endswith(("_token_id", "_token_index", "_token_ids")):
            fixed = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(key)
            if fixed is None:
                fixed, special = special, special - 1
            out[key] = [fixed] if isinstance(value, list) else fixed
        else:
            out[key] = value
    if "kv_lora_rank" in out and "num_attention_heads" in out:  # latent attention: a kv head per query head
        out.update({k: out["num_attention_heads"] for k in AT_MOST if k in out})
    out.update(OVERRIDES.get(model_type, {}))
    return out


def tiny_config(model_type: str) -> PretrainedConfig:
    """``model_type``'s config with its defaults, shrunk (:func:`_shrink`) and built again, so whatever it
    derives from its sizes (layer types, head counts) follows."""
    default = AutoConfig.for_model(model_type)
    return type(default).from_dict(_shrink(default.to_dict(), model_type))


def tiny_model(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).float().eval()


def left_in_float(model: nn.Module) -> tuple[dict[str, int], int]:
    """The decoder's matmul weights prepare_qmiss left in floating point ({name: size}), and the size of all of
    them: a quantized or adapted linear counts (in · out); any other parameter :func:`qmiss.model.is_matmul_weight`
    takes is a matmul weight, except in embeddings, the output head, norms and convolutions."""
    head = output_head(model)
    done: list[str] = []
    floating, total = {}, 0
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in done):
            continue
        if isinstance(module, MissAdapter) or (quant.is_linear(module) and quant.quant_bits(module) is not None):
            done.append(f"{name}.")
            total += math.prod(quant.in_out_features(getattr(module, "base_layer", module)))
            continue
        if module is head or isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or \
                "norm" in type(module).__name__.lower():
            continue
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{name}.{param_name}" if name else param_name
            if is_matmul_weight(full, param):
                floating[full] = param.numel()
                total += param.numel()
    return floating, total


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """In train mode (dropout is off in the tiny configs): bitsandbytes' 8-bit layer then dequantizes and runs a
    float matmul on the CPU, as a merged checkpoint does; in eval mode it runs LLM.int8 (int8 activations)."""
    model.train()
    with torch.no_grad():
        return model(ids).logits.float()


def _case(model_type: str, bits: int, mode: str) -> pytest.param:
    marks = [pytest.mark.architectures(default=model_type in DEFAULT_SUBSET)]
    reason = SKIP.get(model_type) or SKIP.get(f"{model_type}-{mode}")
    if reason is not None:
        marks.append(pytest.mark.skip(reason=f"{model_type}: {reason}"))
    return pytest.param(model_type, bits, mode, marks=marks, id=f"{model_type}-{bits}bit-{mode}")


CASES = [_case(t, bits, mode) for t in ARCHITECTURES for bits in (4, 8) for mode in ("default", "bat")]


@pytest.mark.parametrize(("model_type", "bits", "mode"), CASES)
def test_architecture(tmp_path, record_property, model_type: str, bits: int, mode: str) -> None:
    ids = torch.randint(3, TEXT_IDS, (2, 16), generator=torch.Generator().manual_seed(0))
    model = qmiss.prepare_qmiss(tiny_model(model_type), r=16, bits=bits, mode=mode)

    # what stays in floating point: routers and gates, and what the model class keeps in fp32, under 2%
    floating, total = left_in_float(model)
    share = sum(floating.values()) / total
    record_property("float_share", share)  # conftest.py's summary line reports the largest
    assert all(is_router(name.rpartition(".")[0]) or keeps_in_float(model, name.rpartition(".")[0])
               for name in floating) and share < 0.02, (
        f"{share:.1%} of the matmul weights left in float: {sorted(floating)}")
    assert not unreachable_weights(model)  # so prepare_qmiss named nothing

    # one training step reaches the adapters
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = {name: layer.miss_block.grad for name, layer in qmiss.miss_layers(model)}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values()), "no adapter got a gradient"

    # the adapter round trip, bit for bit
    randomize_adapters(model)
    qmiss.save_adapter(model, tmp_path / "adapter")
    fresh = qmiss.load_adapter(qmiss.prepare_qmiss(tiny_model(model_type), r=16, bits=bits, mode=mode),
                               tmp_path / "adapter")
    saved, loaded = qmiss.adapter_state_dict(model), qmiss.adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)

    # the merged checkpoint, reloaded by plain transformers, computes what the adapted model computes
    expected = logits(model, ids)
    folder = qmiss.export_merged(model, tmp_path / "merged", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    error = ((logits(reloaded, ids) - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-4, f"merged checkpoint's logits off by {error:.1e} (relative to the largest)"


#: architectures whose matmul weights qmiss cannot all hold (see SKIP): raw weight parameters, experts outside
#: transformers' experts interface, a linear with its own forward
LEFT_FLOAT = ("xlnet", "recurrent_gemma", "llama4_text", "jetmoe", "deepseek_v4", "hy_v4", "inkling_text")


@pytest.mark.architectures(default=True)
@pytest.mark.parametrize("model_type", LEFT_FLOAT)
def test_what_qmiss_cannot_hold_is_named(model_type: str) -> None:
    """Every matmul weight left in float but routers (as this file's :func:`left_in_float` finds them) is named by
    prepare_qmiss's warning, with its share."""
    model = tiny_model(model_type)
    with pytest.warns(UserWarning, match=r"prepare_qmiss: \d+ matmul weight\(s\) .* unquantized and frozen") as caught:
        qmiss.prepare_qmiss(model, r=16, bits=4)
    floating, _ = left_in_float(model)
    expected = {n for n in floating if not is_router(n.rpartition(".")[0]) and not keeps_in_float(model, n.rpartition(".")[0])}
    assert expected and expected == set(unreachable_weights(model))
    message = next(str(w.message) for w in caught if "matmul weight" in str(w.message))
    assert sorted(expected)[0] in message
