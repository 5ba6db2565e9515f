"""The memory planner's tables for Llama-2-7B and a Llama-3-8B-shaped config, and the consumer-GPU targets;
then for three mixture-of-experts checkpoints (Mixtral-8x7B, Qwen3-30B-A3B, gpt-oss-20b) and their targets.

    python benchmarks/bench_plan.py

No weights are loaded (the models are built on the meta device): for bits 4/8 × modes × batch 1/2/4
× seq 512/1024, with gradient checkpointing, paged 8-bit AdamW and bf16 compute, the planned
allocator peak in GiB and the smallest common card it fits (with the CUDA-context allowance). The
mixtures of experts (benchmarks/moe_configs.py) are planned at their targets' settings over 512 to
4,096 tokens. Writes results/bench_plan.md and results/bench_plan.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import Report, pyplot  # noqa: E402
from benchmarks.moe_configs import EXPERTS_RANK, MOE_CONFIGS, TARGET_SETTINGS, gpt_oss_20b  # noqa: E402
from qmiss.plan import CARDS_GIB, CUDA_CONTEXT_BYTES, GiB, plan_memory  # noqa: E402

MODES = {"default": {}, "mini": {"mini_r": 64}, "bat": {}, "bat_row": {}}
BATCHES, SEQS = (1, 2, 4), (512, 1024)
MOE_TOKENS = ((1, 512), (1, 1024), (1, 2048), (1, 4096), (2, 2048))
MOE_TARGETS = {"Qwen3-30B-A3B": 22.5, "gpt-oss-20b": 14.5}  # GiB, planned peak at TARGET_SETTINGS


def configs():
    from transformers import LlamaConfig

    return {
        "Llama-2-7B": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                  num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000),
        "Llama-3-8B shape": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                        num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
                                        rope_theta=500000.0),
    }


def smallest_card(plan) -> str:
    fits = [gib for gib, ok in plan.cards().items() if ok]
    return f"{fits[0]} GiB" if fits else f"> {CARDS_GIB[-1]} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_plan.md"))
    args = parser.parse_args()
    report = Report(args.out)
    report.add(f"## bench_plan: `python {' '.join(sys.argv)}`\n")
    report.add(f"Planned allocator peak (GiB) and the smallest card that holds it plus "
               f"{CUDA_CONTEXT_BYTES / GiB:.2f} GiB of CUDA context (cards in GiB: an \"8 GB\" card has 8 GiB); r=64 on every decoder linear (mini_r=64), "
               f"gradient checkpointing, paged 8-bit AdamW, bf16 compute, nf4 + double quantization; "
               f"{time.strftime('%Y-%m-%d')}\n")
    curves = {}
    for name, config in configs().items():
        header = "| bits | mode | " + " | ".join(f"{b}×{s}" for b in BATCHES for s in SEQS) + " |"
        lines = [f"**{name}**", "", header, "|---|---|" + "---:|" * (len(BATCHES) * len(SEQS))]
        for bits in (4, 8):
            for mode, extra in MODES.items():
                cells = []
                for batch in BATCHES:
                    for seq in SEQS:
                        plan = plan_memory(config, bits=bits, mode=mode, batch_size=batch, seq_len=seq, **extra)
                        cells.append(f"{plan.peak_bytes / GiB:.2f} ({smallest_card(plan)})")
                        curves.setdefault((name, bits, mode), []).append(plan.peak_bytes / GiB)
                lines.append(f"| {bits} | {mode} | " + " | ".join(cells) + " |")
        report.add("\n".join(lines) + "\n")

    llama2 = configs()["Llama-2-7B"]
    default = plan_memory(llama2, bits=4, mode="default", batch_size=1, seq_len=512)
    bat = plan_memory(llama2, bits=4, mode="bat", batch_size=1, seq_len=512)
    report.add("**Targets** (Llama-2-7B, 4-bit, r=64, 1×512, checkpointing, paged 8-bit AdamW):\n\n"
               "| target | planned | met |\n|---|---:|:---:|\n"
               f"| trainable parameters ≈ 87M | {default.trainable_parameters / 1e6:.1f}M | "
               f"{'yes' if abs(default.trainable_parameters / 87e6 - 1) < 0.02 else 'NO'} |\n"
               f"| default peak ≤ 5.0 GiB | {default.peak_bytes / GiB:.3f} GiB | {'yes' if default.peak_bytes <= 5 * GiB else 'NO'} |\n"
               f"| bat peak ≤ 5.3 GiB | {bat.peak_bytes / GiB:.3f} GiB | {'yes' if bat.peak_bytes <= 5.3 * GiB else 'NO'} |\n"
               f"| default fits a 6 GiB card with the CUDA context | {(default.peak_bytes + CUDA_CONTEXT_BYTES) / GiB:.2f} GiB | "
               f"{'yes' if default.fits(6) else 'NO'} |\n")
    report.add("Breakdown, Llama-2-7B default:\n\n```\n" + default.table() + "\n```\n")
    report.add("Breakdown, Llama-2-7B bat:\n\n```\n" + bat.table() + "\n```\n")

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    labels = [f"{b}×{s}" for b in BATCHES for s in SEQS]
    for ax, name in zip(axes, configs()):
        for (model, bits, mode), values in curves.items():
            if model == name:
                ax.plot(labels, values, marker="o", ls="-" if bits == 4 else "--", label=f"{bits}-bit {mode}")
        for gib in (6, 8, 12, 16, 24):
            ax.axhline(gib - CUDA_CONTEXT_BYTES / GiB, color="gray", lw=0.6, ls=":")
            ax.text(len(labels) - 1, gib - CUDA_CONTEXT_BYTES / GiB, f"{gib} GiB card", fontsize=7, va="bottom")
        ax.set_title(f"{name}: planned peak (GiB)")
        ax.set_xlabel("batch × seq")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    png = Path(args.out).with_suffix(".png")
    fig.savefig(png, dpi=110)
    report.add(f"![planned peak per batch and sequence length]({png.name})\n")
    moe_tables(report)


def moe_tables(report: Report) -> None:
    """Mixtral-8x7B, Qwen3-30B-A3B and gpt-oss-20b: the planned peak per bits × mode × tokens at the targets'
    other settings, the targets, what meets a missed one, and the breakdowns at the targets' settings."""
    fixed = {k: v for k, v in TARGET_SETTINGS.items() if k not in ("bits", "batch_size", "seq_len")}
    report.add("**Mixtures of experts** (the checkpoints' published shapes, `benchmarks/moe_configs.py`): r=64 on "
               f"the attention's linears and r=16 on every fused expert parameter, `rank_pattern={EXPERTS_RANK}` "
               "(a key that matches an experts module covers its fused projections, "
               "`model.layers.0.mlp.experts.gate_up_proj` and `…down_proj`); experts quantized "
               "by qmiss and dequantized one expert chunk at a time; the chunked loss, gradient checkpointing, "
               "paged 8-bit AdamW, bf16 compute. transformers builds gpt-oss with eager attention (SDPA cannot take "
               "its sinks), so its rows carry batch × 64 heads × seq² attention scores per recomputed layer.\n")
    for name, build in MOE_CONFIGS.items():
        config = build()
        header = "| bits | mode | " + " | ".join(f"{b}×{s:,}" for b, s in MOE_TOKENS) + " |"
        lines = [f"**{name}**", "", header, "|---|---|" + "---:|" * len(MOE_TOKENS)]
        for bits in (4, 8):
            for mode, extra in MODES.items():
                cells = []
                for batch, seq in MOE_TOKENS:
                    plan = plan_memory(config, bits=bits, mode=mode, batch_size=batch, seq_len=seq, **fixed, **extra)
                    cells.append(f"{plan.peak_bytes / GiB:.2f} ({smallest_card(plan)})")
                lines.append(f"| {bits} | {mode} | " + " | ".join(cells) + " |")
        report.add("\n".join(lines) + "\n")

    plans = {name: plan_memory(build(), **TARGET_SETTINGS) for name, build in MOE_CONFIGS.items()}
    rows = [f"| {name} | {plans[name].peak_bytes / GiB:.2f} GiB | ≤ {target} GiB | "
            f"{'yes' if plans[name].peak_bytes <= target * GiB else 'NO'} |" for name, target in MOE_TARGETS.items()]
    report.add("**Targets** (4-bit default, r=64 attention / r=16 experts, 1×2,048, checkpointing, paged 8-bit AdamW, "
               "chunked loss, bf16):\n\n| model | planned peak | target | met |\n|---|---:|---:|:---:|\n"
               + "\n".join(rows) + "\n")

    target = MOE_TARGETS["gpt-oss-20b"]
    smaller = {key: 8 for key in EXPERTS_RANK}
    changes = {
        "flex attention (`attn_implementation=\"flex_attention\"`, which takes the sinks)":
            plan_memory(gpt_oss_20b(attn_implementation="flex_attention"), **TARGET_SETTINGS),
        "input embeddings on the host (`embeddings_on_host=True`)":
            plan_memory(gpt_oss_20b(), **{**TARGET_SETTINGS, "embeddings_on_host": True}),
        "r=8 on the experts": plan_memory(gpt_oss_20b(), **{**TARGET_SETTINGS, "rank_pattern": smaller}),
        "1×1,536 tokens": plan_memory(gpt_oss_20b(), **{**TARGET_SETTINGS, "seq_len": 1536}),
        "activations offloaded to the host (`offload_activations=True`)":
            plan_memory(gpt_oss_20b(), **{**TARGET_SETTINGS, "offload_activations": True}),
    }
    rows = [f"| {change} | {plan.peak_bytes / GiB:.2f} GiB | {'yes' if plan.peak_bytes <= target * GiB else 'NO'} |"
            for change, plan in changes.items()]
    report.add(f"What meets gpt-oss-20b's target (≤ {target} GiB), one change at a time from the targets' "
               "settings:\n\n| change | planned peak | met |\n|---|---:|:---:|\n" + "\n".join(rows) + "\n")
    for name, plan in plans.items():
        report.add(f"Breakdown, {name} at the targets' settings:\n\n```\n" + plan.table() + "\n```\n")


if __name__ == "__main__":
    main()
