"""qmiss against PEFT MiSS and QLoRA (PEFT LoRA r=64) on the same quantized model, in one run.

    python benchmarks/bench_compare.py                 # SmolLM2 2×256 and a 2-layer Llama-2-7B shape 1×256
    python benchmarks/bench_compare.py --case smollm2 --steps 3

For each case, eight variants adapt deep copies of one 4-bit model: qmiss default / mini / bat /
bat_row, PEFT MiSS default / mini / bat (r=64, mini_r=64) and PEFT LoRA r=64 on every decoder linear
(PEFT has no bat_row; it is compared with qmiss default and with PEFT MiSS bat). Steps
(forward + backward + AdamW) run interleaved, one per variant per round. Reported: median step
time and its ratio to PEFT LoRA and PEFT MiSS default, bytes saved for backward, live-tensor peak,
process RSS growth, trainable parameters. Then the adapter branch alone (its forward and backward
without the base) on the 7B decoder layer's seven projection shapes, qmiss MiSS against PEFT LoRA.
Writes results/bench_compare.md and results/bench_compare.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    LINEAR_NAMES,
    MB,
    Report,
    device_and_dtype,
    llama7b_two_layer_case,
    machine_line,
    pyplot,
    run_case,
    smollm2_case,
    table,
    timed,
    variants,
)

VARIANTS = variants("qmiss default", "qmiss mini", "qmiss bat", "qmiss bat_row", "PEFT MiSS default",
                    "PEFT MiSS mini", "PEFT MiSS bat", "PEFT LoRA r=64")
# case: (builder, (batch, seq), measured rounds); 8 rounds put each of the 8 variants first once
CASES = {"smollm2": (smollm2_case, (2, 256), 8), "llama7b2": (llama7b_two_layer_case, (1, 256), 4)}
LAYER_SHAPES = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]  # q k v o, gate up, down (in, out)


def targets(results) -> str:
    by = {r.variant: r for r in results}
    default, bat_row = by["qmiss default"], by["qmiss bat_row"]
    rows = [("qmiss default step ≤ 1.0× PEFT MiSS default's", default.median_s / by["PEFT MiSS default"].median_s, 1.0),
            ("qmiss default step ≤ 1.0× PEFT LoRA r=64's", default.median_s / by["PEFT LoRA r=64"].median_s, 1.0),
            ("qmiss bat_row step ≤ 1.10× qmiss default's", bat_row.median_s / default.median_s, 1.10),
            ("qmiss bat_row live peak ≤ 1.10× qmiss default's", bat_row.peak_bytes / default.peak_bytes, 1.10),
            ("qmiss bat_row step ≤ 0.40× PEFT MiSS bat's", bat_row.median_s / by["PEFT MiSS bat"].median_s, 0.40)]
    lines = ["| target | measured ratio | met |", "|---|---:|:---:|"]
    lines += [f"| {name} | {value:.3f} | {'yes' if value <= bound else 'NO'} |" for name, value, bound in rows]
    return "\n".join(lines)


def branch_times(tokens: int, r: int = 64, rounds: int = 12) -> tuple[float, float]:
    """Median seconds of the adapter branch alone (forward + backward, dx included), summed over the 7B
    layer's projection shapes: qmiss's MiSS default branch and PEFT LoRA's branch, interleaved."""
    import bitsandbytes as bnb
    from peft import LoraConfig, inject_adapter_in_model

    import qmiss
    from qmiss import ops

    device, dtype = device_and_dtype()
    pairs = []
    for n_in, n_out in LAYER_SHAPES:
        base = torch.nn.Sequential(bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=dtype).to(device))
        miss = qmiss.MissLinear(base[0], r=r, compute_dtype=dtype)
        with torch.no_grad():
            miss.miss_block.normal_(0, 0.01)
        lora = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=16, target_modules=["0"]), base)[0]
        x = torch.randn(1, tokens, n_in, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(1, tokens, n_out, device=device, dtype=dtype)

        def miss_branch(miss=miss, x=x, grad=grad) -> None:  # MissLinear.forward without the base layer
            xs = ops.shard_sum(miss.dropout(x), miss.r)
            miss.adapter(lambda block: xs @ miss._adapter_weight(block).to(dtype)).backward(grad)

        def lora_branch(lora=lora, x=x, grad=grad) -> None:  # peft's lora.Linear.forward without the base layer
            a, b = lora.lora_A["default"], lora.lora_B["default"]
            (b(a(lora.lora_dropout["default"](x))) * lora.scaling["default"]).backward(grad)

        pairs.append((miss_branch, lora_branch))

    miss_s, lora_s = [], []
    for i in range(rounds + 2):
        m = sum(timed(mb) for mb, _ in pairs)
        lo = sum(timed(lb) for _, lb in pairs)
        if i >= 2:
            miss_s.append(m)
            lora_s.append(lo)
    return statistics.median(miss_s), statistics.median(lora_s)


def plot(all_results: dict[str, list], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(all_results), 2, figsize=(12, 3.6 * len(all_results)), squeeze=False)
    for row, (title, results) in enumerate(all_results.items()):
        names = [r.variant for r in results]
        lora = next(r for r in results if r.variant == "PEFT LoRA r=64")
        colors = ["tab:blue" if n.startswith("qmiss") else "tab:gray" for n in names]
        axes[row][0].barh(names, [r.median_s / lora.median_s for r in results], color=colors)
        axes[row][0].axvline(1.0, color="black", lw=0.8)
        axes[row][0].set_title(f"{title}: step time ÷ PEFT LoRA r=64's")
        axes[row][1].barh(names, [r.peak_bytes / MB for r in results], color=colors)
        axes[row][1].set_title(f"{title}: live-tensor peak of a step (MB)")
        for ax in axes[row]:
            ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--steps", type=int, default=None, help="measured rounds (default: 7 SmolLM2, 4 7B)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_compare.md"))
    args = parser.parse_args()

    report = Report(args.out)
    report.add(f"## bench_compare: `python {' '.join(sys.argv)}`\n")
    report.add(f"{machine_line()}, 4-bit base (nf4, double quant), r=64 "
               f"(mini_r=64; LoRA alpha 16) on {', '.join(LINEAR_NAMES)}; torch {torch.__version__}, "
               f"{time.strftime('%Y-%m-%d')}\n")
    all_results = {}
    for key in CASES if args.case == "all" else [args.case]:
        make, (batch, seq), steps = CASES[key]
        case = make(4)
        results = run_case(case, VARIANTS, batch, seq, warmup=args.warmup, steps=args.steps or steps)
        title = f"{case.name}, batch {batch}×{seq}"
        all_results[title] = results
        lines = [table(results, "PEFT LoRA r=64", title), "",
                 "| variant | × PEFT MiSS same mode |", "|---|---:|"]
        by = {r.variant: r for r in results}
        for mode in ("default", "mini", "bat"):
            lines.append(f"| qmiss {mode} | {by[f'qmiss {mode}'].median_s / by[f'PEFT MiSS {mode}'].median_s:.2f} |")
        lines.append(f"| qmiss bat_row (× PEFT MiSS bat) | "
                     f"{by['qmiss bat_row'].median_s / by['PEFT MiSS bat'].median_s:.2f} |")
        report.add("\n".join(lines) + "\n\n" + targets(results) + "\n")
        del case
    if args.case in ("all", "llama7b2"):
        miss_s, lora_s = branch_times(tokens=256)
        report.add("**Adapter branch alone** (forward + backward incl. dx, no base), summed over the 7B layer's "
                   "seven projections, 1×256 tokens, median of 12 interleaved rounds:\n\n"
                   "| branch | s | ratio |\n|---|---:|---:|\n"
                   f"| qmiss MiSS default r=64 | {miss_s:.4f} | {miss_s / lora_s:.3f} |\n"
                   f"| PEFT LoRA r=64 | {lora_s:.4f} | 1.000 |\n\n"
                   f"target: MiSS branch ≤ 0.6× LoRA's: {'met' if miss_s / lora_s <= 0.6 else 'NOT met'}\n")
    png = Path(args.out).with_suffix(".png")
    plot(all_results, png)
    report.add(f"![step time and live peak per variant]({png.name})\n")


if __name__ == "__main__":
    main()
