"""Published shapes of three mixture-of-experts checkpoints, for the memory planner's tables and tests.

No hub access is needed: each is a transformers config class filled with the hyperparameters of the
checkpoint's ``config.json`` on the hub (the fields that set shapes and the step's memory; token ids,
rope scaling and the like are left at the class defaults, which the planner does not read). gpt-oss-20b
ships its experts in MXFP4 (``quantization_config``); qmiss quantizes them from 16 bits itself, so that
field is left out. ``bench_plan.py`` prints their tables and ``tests/test_plan.py`` checks the targets.
"""

from __future__ import annotations

#: the settings of the MoE targets: 4-bit, 1×2,048 tokens, checkpointing, paged 8-bit AdamW, the chunked loss,
#: r=64 on the attention and r=16 on the experts. A ``rank_pattern`` key is matched against the END of a target's
#: path (PEFT's ``re.match(rf"(.*\.)?({key})$", name)``) and expert targets are named
#: ``model.layers.0.mlp.experts.gate_up_proj``: a bare "experts" would match none of them.
EXPERTS_RANK = {"experts": 16}
TARGET_SETTINGS = dict(bits=4, r=64, rank_pattern=EXPERTS_RANK, batch_size=1, seq_len=2048,
                       gradient_checkpointing=True, optimizer="paged_adamw_8bit", chunked_loss=True)


def mixtral_8x7b(**overrides):
    """mistralai/Mixtral-8x7B-v0.1, config.json; ``overrides`` (e.g. ``attn_implementation``) go to the config."""
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2,
                         vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
                         sliding_window=None, tie_word_embeddings=False, **overrides)


def qwen3_30b_a3b(**overrides):
    """Qwen/Qwen3-30B-A3B, config.json."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                          tie_word_embeddings=False, **overrides)


def gpt_oss_20b(**overrides):
    """openai/gpt-oss-20b, config.json: 24 layers alternating sliding-window (128) and full attention."""
    from transformers import GptOssConfig

    return GptOssConfig(hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                        vocab_size=201088, sliding_window=128, attention_bias=True, swiglu_limit=7.0,
                        layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
                        rope_theta=150000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **overrides)


#: name -> config builder, in the order the tables print them.
MOE_CONFIGS = {"Mixtral-8x7B": mixtral_8x7b, "Qwen3-30B-A3B": qwen3_30b_a3b, "gpt-oss-20b": gpt_oss_20b}
