"""Long context and big vocabularies: the chunked loss against transformers' loss, and the planner's tables.

    python benchmarks/bench_long_context.py            # about 6 minutes on a 2-core CPU
    python benchmarks/bench_long_context.py --quick    # the 32k-vocabulary points only

1. Equality: loss and gradients of ``qmiss.loss.chunked_cross_entropy`` against transformers'
   ``ForCausalLMLoss`` on the full logits (ignored tokens, ``num_items_in_batch``, a softcap), fp32
   and bf16.
2. A training step of a 2-layer Llama (hidden 256, 4-bit MiSS default r=64, checkpointing, AdamW)
   with the chunked loss and with transformers' loss, at vocabularies 32,768 / 65,536 / 128,256 ×
   1,024 and 4,096 tokens: the step's live-tensor peak (``qmiss.measure_peak``: what a GPU would
   hold on top of weights and optimizer state) and its time, steps of the two interleaved, as ratios.
   fp32 on the CPU: transformers' bf16 loss backward is a (tokens × vocab) @ (vocab × hidden) bf16
   product, which this CPU runs ~40x slower than fp32 (67 s at 1,024 × 65,536), so a bf16 time
   would measure that, not the loss.
3. The head's dtype with the chunked loss: bf16 (what prepare_qmiss keeps) against fp32 (QLoRA's
   upcast), in the bf16 flow: resident bytes, step peak and the loss.
4. The planner (``qmiss.plan_memory``) for Llama-3-8B and Llama-2-7B, 4-bit default r=64,
   checkpointing, paged 8-bit AdamW, bf16, at 512 / 2,048 / 8,192 / 32,768 tokens, with each
   long-context switch, and the issue's targets.

Writes results/bench_long_context.md and results/bench_long_context.png.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_plan import configs as plan_configs, smallest_card  # noqa: E402
from benchmarks.common import Report, machine_line, pyplot, timed  # noqa: E402
import qmiss  # noqa: E402
from qmiss.loss import chunked_cross_entropy  # noqa: E402
from qmiss.memory import measure_peak, resident_bytes  # noqa: E402
from qmiss.plan import CUDA_CONTEXT_BYTES, GiB, MiB, plan_memory  # noqa: E402

HIDDEN = 256
STEP_POINTS = [(32768, 1024), (32768, 4096), (65536, 1024), (128256, 1024), (128256, 4096)]
QUICK_POINTS = [(32768, 1024), (32768, 4096)]
SEQS = (512, 2048, 8192, 32768)
VARIANTS = {  # planner columns: the long-context switches, cumulatively
    "transformers' loss": {},
    "chunked loss": {"chunked_loss": True},
    "+ embeddings on host": {"chunked_loss": True, "embeddings_on_host": True},
    "+ offload": {"chunked_loss": True, "embeddings_on_host": True, "offload_activations": True},
    "chunked + offload": {"chunked_loss": True, "offload_activations": True},
}
TARGETS = [  # (tokens, variant, GiB): the targets for Llama-3-8B
    (2048, "+ embeddings on host", 6.9), (8192, "chunked loss", 10.9), (32768, "chunked + offload", 14.5)]


def reference(hidden, weight, labels, softcap=None, **kwargs):
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return ForCausalLMLoss(logits, labels, weight.shape[0], **kwargs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def equality(report: Report) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab, tokens = 32768, 512
    hidden = torch.randn(2, tokens // 2, HIDDEN, generator=gen)
    weight = torch.randn(vocab, HIDDEN, generator=gen) * HIDDEN**-0.5
    labels = torch.randint(0, vocab, (2, tokens // 2), generator=gen)
    labels[:, :40] = -100
    cases = {"ignored prompt tokens": {}, "num_items_in_batch=300": {"num_items_in_batch": torch.tensor(300)},
             "softcap 30": {"softcap": 30.0}}
    lines = ["| case | dtype | loss (transformers) | loss (chunked) | loss rel. diff | d hidden rel. diff | "
             "d head rel. diff |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, kwargs in cases.items():
        for dtype in (torch.float32, torch.bfloat16):
            h = hidden.to(dtype).requires_grad_()
            w = weight.to(dtype).requires_grad_()
            want = reference(h, w, labels, **kwargs)
            want_grads = torch.autograd.grad(want, (h, w))
            got = chunked_cross_entropy(h, w, labels, chunk_bytes=8 * MiB, **kwargs)
            got_grads = torch.autograd.grad(got, (h, w))
            lines.append(f"| {name} | {str(dtype).removeprefix('torch.')} | {float(want):.6f} | {float(got):.6f} | "
                         f"{abs(float(got) / float(want) - 1):.1e} | {rel(got_grads[0], want_grads[0]):.1e} | "
                         f"{rel(got_grads[1], want_grads[1]):.1e} |")
    report.add("### Loss and gradients against transformers' `ForCausalLMLoss`\n\n"
               f"{tokens} tokens (40 per row ignored), vocabulary {vocab:,}, hidden {HIDDEN}, chunks of 8 MiB; "
               "relative differences are max |a − b| / max |b|. bf16 compares bf16 with bf16 (each path's own "
               "rounding; with a softcap transformers caps the bf16 logits in bf16, the chunked loss in fp32)."
               "\n\n" + "\n".join(lines) + "\n")


def small_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def step_fn(model, ids: torch.Tensor, autocast: bool = False):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def steps(report: Report, points, repeats: int) -> list[dict]:
    rows = []
    for vocab, tokens in points:
        base = small_model(vocab)
        ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
        models = {chunked: qmiss.prepare_qmiss(copy.deepcopy(base), r=64, bits=4, gradient_checkpointing=True,
                                               chunked_loss=chunked).train() for chunked in (False, True)}
        del base
        fns = {}
        for chunked, model in models.items():
            fns[chunked], optimizer = step_fn(model, ids)
            fns[chunked]()  # optimizer state allocated, caches warm
        peaks = {chunked: measure_peak(fns[chunked]).peak_bytes for chunked in models}
        times = {False: [], True: []}
        for _ in range(repeats):  # interleaved: drift of the shared machine falls on both alike
            for chunked in (False, True):
                times[chunked].append(timed(fns[chunked]))
        row = {"vocab": vocab, "tokens": tokens, "peak_plain": peaks[False], "peak_chunked": peaks[True],
               "time_plain": statistics.median(times[False]), "time_chunked": statistics.median(times[True])}
        rows.append(row)
        print(f"vocab {vocab} × {tokens}: peak {row['peak_chunked'] / MiB:.0f} / {row['peak_plain'] / MiB:.0f} MiB, "
              f"time {row['time_chunked']:.2f} / {row['time_plain']:.2f} s", flush=True)
        del models, fns
    lines = ["| vocabulary × tokens | step live peak, transformers' loss | chunked | ratio | step time, "
             "transformers' loss | chunked | ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['vocab']:,} × {r['tokens']:,} | {r['peak_plain'] / MiB:.0f} MiB | "
                     f"{r['peak_chunked'] / MiB:.0f} MiB | {r['peak_chunked'] / r['peak_plain']:.2f}× | "
                     f"{r['time_plain']:.2f} s | {r['time_chunked']:.2f} s | "
                     f"{r['time_chunked'] / r['time_plain']:.2f}× |")
    report.add("### A training step: chunked loss against transformers' loss\n\n"
               f"2-layer Llama, hidden {HIDDEN}, 4-bit MiSS default r=64, checkpointing, AdamW, fp32 on the CPU; "
               f"the chunked loss at its default 64 MiB budget. Live peak: tensors created by the step (weights "
               f"and optimizer state not included); time: median of {repeats} steps, the two interleaved.\n\n"
               + "\n".join(lines) + "\n")
    target = next((r for r in rows if (r["vocab"], r["tokens"]) == (65536, 1024)), None)
    if target is not None:
        peak, tm = target["peak_chunked"] / target["peak_plain"], target["time_chunked"] / target["time_plain"]
        report.add(f"**Target** (vocabulary 65,536 × 1,024 tokens): live peak ≤ 0.35× — {peak:.2f}× "
                   f"({'met' if peak <= 0.35 else 'NOT met'}); step time ≤ 1.1× — {tm:.2f}× "
                   f"({'met' if tm <= 1.1 else 'NOT met'}).\n")
    return rows


def head_dtype(report: Report) -> None:
    """bf16 flow, chunked loss: the head kept in bf16 against the same head upcast to fp32."""
    vocab, tokens = 65536, 256
    base = small_model(vocab).to(torch.bfloat16)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    lines = ["| head | resident (weights) | step live peak | loss |", "|---|---:|---:|---:|"]
    for label, upcast in (("bf16 (kept)", False), ("fp32 (upcast)", True)):
        model = qmiss.prepare_qmiss(copy.deepcopy(base), r=64, bits=4, compute_dtype=torch.bfloat16,
                                    gradient_checkpointing=True, chunked_loss=True).train()
        if upcast:
            model.lm_head.float()
        step, _ = step_fn(model, ids, autocast=True)
        step()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = float(model(input_ids=ids, labels=ids).loss)
        peak = measure_peak(step).peak_bytes
        lines.append(f"| {label} | {resident_bytes(model) / MiB:.1f} MiB | {peak / MiB:.1f} MiB | {loss:.6f} |")
    report.add("### The head's dtype under the chunked loss (bf16 flow)\n\n"
               f"Vocabulary {vocab:,}, hidden {HIDDEN}, {tokens} tokens, bf16 model under CPU autocast. An fp32 head "
               "is cast to bf16 by autocast for its matmul anyway, so the loss is the same; what changes is "
               "its bytes and the bf16 copy made during every forward.\n\n" + "\n".join(lines) + "\n")


def configs():
    names = {"Llama-3-8B shape": "Llama-3-8B", "Llama-2-7B": "Llama-2-7B"}
    return {names[k]: v for k, v in plan_configs().items()}


def planner(report: Report) -> dict:
    curves = {}
    for name, config in configs().items():
        lines = ["| tokens | " + " | ".join(VARIANTS) + " |", "|---:|" + "---:|" * len(VARIANTS)]
        for seq in SEQS:
            cells = []
            for variant, kwargs in VARIANTS.items():
                plan = plan_memory(config, bits=4, r=64, mode="default", seq_len=seq, **kwargs)
                curves.setdefault((name, variant), []).append(plan.peak_bytes / GiB)
                cells.append(f"{plan.peak_bytes / GiB:.2f} ({smallest_card(plan)})")
            lines.append(f"| 1×{seq:,} | " + " | ".join(cells) + " |")
        report.add(f"**{name}** — planned peak in GiB (smallest card that holds it with "
                   f"{CUDA_CONTEXT_BYTES / GiB:.2f} GiB of CUDA context)\n\n" + "\n".join(lines) + "\n")
    llama3 = configs()["Llama-3-8B"]
    lines = ["| Llama-3-8B | switches | planned peak | target | met |", "|---|---|---:|---:|:---:|"]
    for seq, variant, gib in TARGETS:
        plan = plan_memory(llama3, bits=4, r=64, mode="default", seq_len=seq, **VARIANTS[variant])
        lines.append(f"| 1×{seq:,} | {variant} | {plan.peak_bytes / GiB:.2f} GiB | ≤ {gib} GiB | "
                     f"{'yes' if plan.peak_bytes <= gib * GiB else 'NO'} |")
    report.add("**Targets** (4-bit default r=64 on every decoder linear, checkpointing, paged 8-bit AdamW, bf16):\n\n"
               + "\n".join(lines) + "\n")
    plan = plan_memory(llama3, bits=4, r=64, mode="default", seq_len=2048, **VARIANTS["+ embeddings on host"])
    report.add("Breakdown, Llama-3-8B at 1×2,048 with the chunked loss and the embeddings on the host:\n\n```\n"
               + plan.table() + "\n```\n")
    return curves


def plot(path: Path, rows: list[dict], curves: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    ax = axes[0]
    labels = [f"{r['vocab']:,}\n× {r['tokens']:,}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["peak_plain"] / MiB for r in rows], width=0.4, label="transformers' loss")
    ax.bar([i + 0.2 for i in x], [r["peak_chunked"] / MiB for r in rows], width=0.4, label="chunked loss")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("step live peak (MiB)")
    ax.set_xlabel("vocabulary × tokens")
    ax.set_title("training step, 2-layer Llama, hidden 256 (CPU, fp32)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for (name, variant), values in curves.items():
        if name == "Llama-3-8B":
            ax.plot([f"{s // 1024}k" if s >= 1024 else str(s) for s in SEQS], values, marker="o", label=variant)
    for gib in (8, 12, 16, 24):
        ax.axhline(gib - CUDA_CONTEXT_BYTES / GiB, color="gray", lw=0.6, ls=":")
        ax.text(0, gib - CUDA_CONTEXT_BYTES / GiB, f"{gib} GiB card", fontsize=7, va="bottom")
    ax.set_ylim(0, 26)
    ax.set_title("Llama-3-8B 4-bit r=64: planned peak (GiB)")
    ax.set_xlabel("tokens (batch 1)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_long_context.md"))
    parser.add_argument("--quick", action="store_true", help="only the 32k-vocabulary step points")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()
    report = Report(args.out)
    report.add(f"## bench_long_context: `python {' '.join(sys.argv)}`\n")
    report.add(f"{machine_line()}; {time.strftime('%Y-%m-%d')}\n")
    equality(report)
    rows = steps(report, QUICK_POINTS if args.quick else STEP_POINTS, args.repeats)
    head_dtype(report)
    report.add("### The planner: Llama-3-8B and Llama-2-7B\n")
    curves = planner(report)
    png = Path(args.out).with_suffix(".png")
    plot(png, rows, curves)
    report.add(f"![step peak, and Llama-3-8B's planned peak per switch]({png.name})\n")
    report.add(f"({time.time() - start:.0f} s)\n")


if __name__ == "__main__":
    main()
