"""The memory planner against the live-tensor tracker, the tracker on a hand-computable case, `qmiss plan`."""

from __future__ import annotations

import json

import pytest
import torch

import qmiss
from qmiss import cli
from qmiss.memory import measure_peak, resident_bytes
from qmiss.plan import plan_memory

TOLERANCE = 0.15  # the bound: planned peak within ±15% of the measured one


def test_tracker_on_a_chain_of_matmuls() -> None:
    n = 256
    x, w = torch.randn(n, n), torch.randn(n, n)
    size = n * n * 4

    def chain() -> torch.Tensor:
        a = x @ w
        b = a @ w  # a and b alive: 2 matrices
        del a
        c = b @ w  # b and c alive: 2 again
        del b
        return c

    report = measure_peak(chain)
    assert (report.peak_bytes, report.end_bytes) == (2 * size, size)  # c is still referenced by the report

    x.requires_grad_(True)
    report = measure_peak(lambda: (x @ w).relu().sum().backward(), exclude=[x, w])
    assert report.saved_bytes == size  # relu keeps its output; mm keeps x and w, which are excluded
    # backward: relu's gradient and mm's gradient for x (relu's saved output is freed once relu's node ran),
    # plus two fp32 scalars: the loss and its seed gradient
    assert report.peak_bytes == 2 * size + 8
    assert report.end_bytes == size  # x.grad
    assert resident_bytes(torch.nn.Linear(n, n, bias=False)) == size


def _measured(model, batch, seq: int, vocab: int, autocast: bool = False) -> int:
    """Weights, optimizer state and the live-tensor peak of a training step, after a first step.

    ``autocast``: the step runs under ``torch.autocast("cpu", dtype=torch.bfloat16)``, as a
    CUDA user's bf16 Trainer step runs under CUDA autocast.
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step(ids: torch.Tensor = ids) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(ids[:1, :8])  # the optimizer allocates its state on the first step (a short one will do)
    return resident_bytes(model, optimizer) + measure_peak(step).peak_bytes


def _check(config, model, bits: int, mode: str, checkpointing: bool, dtype: torch.dtype = torch.float32,
           batch: int = 2, seq: int = 256, fp32_norms: bool = False, r: int = 64, **settings):
    """Plan against measurement. ``dtype`` bf16 is the GPU's flow: a bf16 model, bf16 compute, bf16 autocast.
    ``settings``: more qmiss settings for both (chunked_loss, loss_chunk_bytes, offload_activations, rank_pattern)."""
    model = qmiss.prepare_qmiss(model.to(dtype), r=r, bits=bits, mode=mode, gradient_checkpointing=checkpointing,
                                compute_dtype=dtype, fp32_norms=fp32_norms, **settings)
    model.train()
    measured = _measured(model, batch, seq, config.vocab_size, autocast=dtype == torch.bfloat16)
    plan = plan_memory(config, bits=bits, r=r, mode=mode, batch_size=batch, seq_len=seq,
                       gradient_checkpointing=checkpointing, optimizer="adamw", compute_dtype=dtype,
                       fp32_norms=fp32_norms, **settings)
    assert plan.trainable_parameters == qmiss.trainable_parameters(model, verbose=False)[0]
    ratio = plan.peak_bytes / measured
    assert abs(ratio - 1) <= TOLERANCE, f"planned {plan.peak_bytes / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    return plan


@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
@pytest.mark.parametrize("mode", ["default", "bat", "bat_row"])
@pytest.mark.parametrize("bits", [4, 8])
def test_plan_matches_measurement_on_smollm2(smollm2_dir, bits: int, mode: str, checkpointing: bool) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    _check(model.config, model, bits, mode, checkpointing)


@pytest.fixture(scope="module")
def smollm2_first_layers(smollm2_dir):
    """SmolLM2-135M-Instruct's real weights in bf16, cut to its first 4 decoder layers.

    bf16 matrix products are very slow on this CPU in the layout of every input gradient
    (``g @ W``: 10 s for SmolLM2's head at 128 tokens, against 0.07 s in fp32), so the bf16-flow
    checks run on a cut of the model and short sequences; the planner is given the same cut config.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    return model


@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
@pytest.mark.parametrize("mode", ["default", "bat", "bat_row"])
@pytest.mark.parametrize("bits", [4, 8])
def test_plan_matches_measurement_in_the_bf16_flow_on_smollm2(smollm2_first_layers, bits: int, mode: str,
                                                               checkpointing: bool) -> None:
    import copy

    model = copy.deepcopy(smollm2_first_layers)
    _check(model.config, model, bits, mode, checkpointing, dtype=torch.bfloat16, batch=2, seq=64)


@pytest.mark.parametrize("mode", ["default", "bat"])
def test_plan_follows_qloras_fp32_norms_in_the_bf16_flow(smollm2_first_layers, mode: str) -> None:
    """fp32 norms and head (the old default): an fp32 stream, and autocast's 16-bit copy of the fp32 head kept
    for backward; the planner once missed both (0.79 of the measured peak)."""
    import copy

    model = copy.deepcopy(smollm2_first_layers)
    _check(model.config, model, 4, mode, True, dtype=torch.bfloat16, batch=2, seq=64, fp32_norms=True)


def _llama2_7b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=layers, vocab_size=32000, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def llama2_7b_two_layers():
    """Llama-2-7B's shapes cut to 2 decoder layers, random weights, fp32 (built once; tests adapt copies)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(_llama2_7b_config(2), dtype=torch.float32)


@pytest.mark.parametrize("mode,checkpointing", [("default", True), ("bat", True), ("default", False),
                                                ("bat_row", True), ("bat_row", False)])
def test_plan_matches_measurement_on_a_two_layer_llama2_7b_shape(llama2_7b_two_layers, mode: str,
                                                                  checkpointing: bool) -> None:
    import copy

    _check(_llama2_7b_config(2), copy.deepcopy(llama2_7b_two_layers), 4, mode, checkpointing)


def test_plan_matches_measurement_in_the_bf16_flow_on_a_two_layer_llama2_7b_shape(llama2_7b_two_layers) -> None:
    """The 7B shapes in the GPU's dtype flow, MiSS default with checkpointing (bat's bf16 flow is checked on
    SmolLM2 above). Few tokens: every bitsandbytes input gradient is a bf16 ``g @ W`` product, the slow layout
    on this CPU (see ``smollm2_first_layers``); a 16-token step still takes about a minute."""
    import copy

    _check(_llama2_7b_config(2), copy.deepcopy(llama2_7b_two_layers), 4, "default", True, dtype=torch.bfloat16,
           batch=1, seq=16)


def _big_vocabulary_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=65536, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                       attn_implementation="sdpa")


@pytest.fixture(scope="module")
def big_vocabulary_model():
    """Vocabulary 65,536, hidden 256: the logits of 1,024 tokens (256 MiB in fp32) outweigh everything else."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_big_vocabulary_config(), dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-flow"])
@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
def test_plan_matches_measurement_with_the_chunked_loss_on_a_big_vocabulary(big_vocabulary_model, dtype,
                                                                              checkpointing: bool) -> None:
    """1,024 tokens, the chunked loss at its default 64 MiB budget; the bf16 flow is a bf16 model under autocast."""
    import copy

    _check(_big_vocabulary_config(), copy.deepcopy(big_vocabulary_model), 4, "default", checkpointing, dtype=dtype,
           batch=1, seq=1024, chunked_loss=True)


@pytest.mark.parametrize("loss_chunk_bytes", [None, 64 * 2**20], ids=["head-sized", "64MiB"])
def test_plan_follows_the_loss_chunk_rule(loss_chunk_bytes) -> None:
    """A 32,768 × 256 fp32 head (32 MiB) and 2,048 tokens: without a budget the rule's chunks of 256 rows (32 MiB),
    with 64 MiB chunks of 512 rows; the loss's backward is the step's peak, and the two plans differ by 30%."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32768, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plan = _check(config, model, 4, "default", True, batch=1, seq=2048, chunked_loss=True,
                  loss_chunk_bytes=loss_chunk_bytes)
    assert plan.peak_phase == "loss backward"
    rows = 256 if loss_chunk_bytes is None else 512
    assert any(key.startswith(f"chunked loss: {rows}-token chunk") for key in plan.items), plan.items


def test_plan_command_prints_the_breakdown_and_the_card(tmp_path, smollm2_dir, capsys) -> None:
    smollm2_dir = str(smollm2_dir)
    assert cli.main(["plan", "--config", smollm2_dir, "--bits", "4", "--r", "64", "--gpu-gb", "8"]) == 0
    out = capsys.readouterr().out
    for item in ["4-bit weights + quant state", "embeddings + lm_head", "adapters (fp32)", "optimizer states",
                 "activations", "logits + loss", "peak (", "fits a card of 8 GiB: yes"]:
        assert item in out, item
    assert cli.main(["plan", "--config", f"{smollm2_dir}/config.json", "--gpu-gb", "0.5", "--json"]) == 1
    payload = json.loads(capsys.readouterr().out.split("\nfits")[0])
    static = sum(v for k, v in payload["items"].items() if k.startswith(("4-bit", "embeddings", "norms", "adapters (",
                                                                          "optimizer")))
    assert static < payload["peak_bytes"] < sum(payload["items"].values())  # not every transient at once
    assert payload["cards"]["80"] is True


@pytest.mark.parametrize("argv,message", [
    (["--config", "/no/such/model"], "--config /no/such/model: no such file or folder"),
    (["--config", "SMOL", "--optimizer", "adam"], "--optimizer='adam'"),
    (["--config", "SMOL", "--batch", "-1"], "--batch=-1 must be a positive integer"),
    (["--config", "SMOL", "--r", "0"], "--r=0 must be a positive integer"),
])
def test_plan_command_errors_are_clear(smollm2_dir, capsys, argv, message) -> None:
    argv = [str(smollm2_dir) if a == "SMOL" else a for a in argv]
    assert cli.main(["plan", *argv]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no --config at all: argparse's usage error
        cli.main(["plan"])
    assert "--config" in capsys.readouterr().err


def test_plan_of_llama2_7b_meets_the_consumer_gpu_target() -> None:
    config = _llama2_7b_config(32)
    default = plan_memory(config, bits=4, r=64, mode="default")
    assert 86e6 < default.trainable_parameters < 88e6  # "87M trainable parameters"
    assert default.fits(6)
    # the targets, in the true bf16 flow (bf16 norms, head and residual stream): 1×512, checkpointing, paged 8-bit AdamW
    assert default.peak_bytes <= 5.0 * 2**30
    assert plan_memory(config, bits=4, r=64, mode="bat").peak_bytes <= 5.3 * 2**30
    # QLoRA's fp32 norms and head cost more: the head's fp32 copy and an fp32 residual stream
    assert plan_memory(config, bits=4, r=64, mode="default", fp32_norms=True).peak_bytes > default.peak_bytes


def test_qmiss_command_lists_its_subcommands(capsys) -> None:
    assert cli.main(["no-such-command"]) == 2
    assert "qmiss {plan,train}" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0


@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
def test_plan_follows_packed_sequences(smollm2_dir, checkpointing: bool) -> None:
    """Packed sequences (qmiss-train's default) make SDPA take a mask: the bool mask, each layer's float copy of it
    and k/v repeated to every head. The planned difference from an unpacked step is the measured one (±10%).
    The loss's chunk is held at 64 MiB: the head-sized default (113 MiB here) makes the unpacked step's peak the
    loss's, which the mask barely touches, and the difference would no longer measure the mask's cost."""
    import copy

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    base.model.layers = base.model.layers[:4]
    base.config.num_hidden_layers = 4
    batch, seq = 2, 1024
    measured, planned = {}, {}
    for packing in (False, True):
        model = qmiss.prepare_qmiss(copy.deepcopy(base), r=64, bits=4, gradient_checkpointing=checkpointing,
                                    chunked_loss=True, loss_chunk_bytes=64 * 2**20)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        # four rows of 256 tokens in each sequence, as qmiss.packing.PackedCollator hands them over
        packed = {"position_ids": torch.arange(seq).remainder(256).expand(batch, seq), "use_cache": False}

        def step(ids: torch.Tensor = ids, extra: dict = packed if packing else {}) -> None:
            model(input_ids=ids, labels=ids, **extra).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step(ids[:1, :8], {})  # the optimizer's state
        measured[packing] = resident_bytes(model, optimizer) + measure_peak(step).peak_bytes
        planned[packing] = plan_memory(base.config, bits=4, r=64, batch_size=batch, seq_len=seq,
                                       gradient_checkpointing=checkpointing, optimizer="adamw",
                                       compute_dtype=torch.float32, chunked_loss=True, packing=packing,
                                       loss_chunk_bytes=64 * 2**20).peak_bytes
    assert abs(planned[True] / measured[True] - 1) <= TOLERANCE
    extra_measured, extra_planned = measured[True] - measured[False], planned[True] - planned[False]
    assert extra_measured > 0 and abs(extra_planned / extra_measured - 1) <= 0.10, (extra_planned, extra_measured)


#: r on the tiny mixtures' experts (their down projection's input is 32 wide); r=16 on the attention
TINY_EXPERTS_RANK = {"experts": 8}


@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
@pytest.mark.parametrize("mode", ["default", "bat", "bat_row"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_plan_matches_measurement_in_the_bf16_flow_on_a_tiny_moe(model_type: str, mode: str,
                                                                  checkpointing: bool) -> None:
    """Mixtures of 16 experts, 2 per token, 2×256 tokens (1,024 routed rows a layer), 4-bit experts one expert
    chunk at a time; r=16 on the attention and 8 on the experts through rank_pattern (the trainable count checks
    it). Qwen3-MoE adds per-head q/k norms; gpt-oss adds expert biases, its clamped gate and eager attention
    with sinks (transformers has no SDPA path for it), whose batch × heads × seq² scores the plan counts."""
    from tests.helpers import tiny_moe

    model = tiny_moe(model_type, experts=16)
    _check(model.config, model, 4, mode, checkpointing, dtype=torch.bfloat16, batch=2, seq=256, r=16,
           rank_pattern=TINY_EXPERTS_RANK)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_plan_matches_measurement_with_8bit_experts(model_type: str) -> None:
    """8-bit experts (int8 rows and a scale per row, dequantized per chunk by qmiss, not by bitsandbytes' matmul),
    fp32 flow, checkpointing."""
    from tests.helpers import tiny_moe

    model = tiny_moe(model_type, experts=16)
    _check(model.config, model, 8, "default", True, batch=2, seq=256, r=16, rank_pattern=TINY_EXPERTS_RANK)


@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
def test_plan_follows_eager_attention(checkpointing: bool) -> None:
    """A model built with eager attention keeps batch × heads × seq² probabilities (fp32 and bf16) per layer."""
    from tests.helpers import tiny_llama

    model = tiny_llama(attn_implementation="eager")
    eager = _check(model.config, model, 4, "default", checkpointing, dtype=torch.bfloat16, batch=2, seq=256, r=16)
    sdpa = plan_memory(tiny_llama(attn_implementation="sdpa").config, bits=4, r=16, batch_size=2, seq_len=256,
                       gradient_checkpointing=checkpointing, optimizer="adamw", compute_dtype=torch.bfloat16)
    # 2 × 4 heads × 256² scores a layer, fp32 and bf16, at least once more than SDPA keeps
    assert eager.peak_bytes - sdpa.peak_bytes > 2 * 4 * 256 * 256 * 6
    assert "eager attention" in eager.notes[0] and "SDPA attention" in sdpa.notes[0]


def test_the_plan_counts_experts_no_target_holds_unquantized() -> None:
    """Experts the user excludes stay in the model's dtype, frozen: a line of their own and a note naming them.
    Adapted experts are no such thing (prepare_qmiss quantizes and adapts them)."""
    from tests.helpers import tiny_llama_config, tiny_moe

    config = tiny_moe("mixtral").config
    excluded = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    plan = plan_memory(config, r=16, exclude_modules=excluded, base_dtype=torch.bfloat16)
    (note,) = [n for n in plan.notes if "no target holds" in n]
    assert all(name in note for name in excluded)
    # gate_up_proj (4, 256, 64) and down_proj (4, 64, 128) of layer 0, in bf16
    assert plan.items["experts left unquantized (not targets)"] == 2 * (4 * 256 * 64 + 4 * 64 * 128)
    adapted = plan_memory(config, r=16)
    assert "experts left unquantized (not targets)" not in adapted.items
    assert not [n for n in adapted.notes if "no target holds" in n]
    assert adapted.items["4-bit experts + quant state"] == 2 * plan.items["4-bit experts + quant state"]
    assert not [n for n in plan_memory(tiny_llama_config(), r=16).notes if "experts" in n]


def test_the_plans_of_moe_checkpoints_against_their_targets() -> None:
    """Mixtral-8x7B, Qwen3-30B-A3B and gpt-oss-20b (their published shapes, benchmarks/moe_configs.py) at the
    targets' settings: 4-bit, 1×2,048, checkpointing, paged 8-bit AdamW, the chunked loss, r=64 on the attention
    and 16 on the experts. benchmarks/RESULTS.md (bench_plan) has the breakdowns."""
    from benchmarks.moe_configs import EXPERTS_RANK, TARGET_SETTINGS, gpt_oss_20b, mixtral_8x7b, qwen3_30b_a3b
    from qmiss import quant
    from qmiss.plan import GiB

    qwen = plan_memory(qwen3_30b_a3b(), **TARGET_SETTINGS)
    assert qwen.peak_bytes <= 22.5 * GiB
    # every expert adapter is (16, out) per expert, every linear's (64, out): rank_pattern reaches both kinds
    experts = 48 * 128 * 16 * (2 * 768 + 2048)
    attention = 48 * 64 * (32 * 128 + 2 * 4 * 128 + 2048)
    assert qwen.trainable_parameters == experts + attention
    # each fused parameter is stored as one stacked 4-bit layer, (128 · out, in)
    stacked = 48 * (quant.stored_bytes(2048, 128 * 2 * 768, 4, True, 2)
                    + quant.stored_bytes(768, 128 * 2048, 4, True, 2))
    assert qwen.items["4-bit experts + quant state"] == stacked

    mixtral = plan_memory(mixtral_8x7b(), **TARGET_SETTINGS)
    assert 24 * GiB < mixtral.peak_bytes < 28 * GiB  # 21.7 GiB of 4-bit experts alone: a 48 GiB card

    # gpt-oss-20b misses its target (≤ 14.5 GiB) by 0.19 GiB: transformers runs its attention eager (no SDPA
    # path for the sinks), so the recomputed layer holds 64 heads × 2,048² scores (0.5 GiB, and 1 GiB more in
    # backward). Flex attention (which takes the sinks), the input embeddings on the host, or r=8 on the experts
    # meet it.
    gpt = plan_memory(gpt_oss_20b(), **TARGET_SETTINGS)
    assert 14.5 * GiB < gpt.peak_bytes < 14.8 * GiB
    assert plan_memory(gpt_oss_20b(attn_implementation="flex_attention"), **TARGET_SETTINGS).peak_bytes <= 14.5 * GiB
    assert plan_memory(gpt_oss_20b(), **TARGET_SETTINGS, embeddings_on_host=True).peak_bytes <= 14.5 * GiB
    smaller = {**TARGET_SETTINGS, "rank_pattern": {key: 8 for key in EXPERTS_RANK}}
    assert plan_memory(gpt_oss_20b(), **smaller).peak_bytes <= 14.5 * GiB


def test_bat_row_plans_at_defaults_memory() -> None:
    """Bat-Row's memory is default's (no W' chunk, bitsandbytes' own backward): on Llama-2-7B, 4-bit, r=64, 1×512
    with checkpointing its plan is at most default's (its adapters are in × r, default's r × out), below bat's,
    and the plan says so."""
    config = _llama2_7b_config(32)
    plans = {mode: plan_memory(config, bits=4, r=64, mode=mode, batch_size=1, seq_len=512) for mode in
             ("default", "bat", "bat_row")}
    assert plans["bat_row"].peak_bytes <= plans["default"].peak_bytes < plans["bat"].peak_bytes
    assert plans["bat_row"].items.get("bat: dequantized weight chunk") is None
    assert [n for n in plans["bat_row"].notes if n.startswith("bat_row: default's memory")]
