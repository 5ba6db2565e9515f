"""bat at 7B scale: qmiss bat vs PEFT MiSS bat vs qmiss default vs PEFT LoRA r=64, on one quantized base.

    python benchmarks/bench_bat.py                        # both cases, batch 1×256 and 2×512
    python benchmarks/bench_bat.py --case layer7b --shapes 1x256

CPU: fp32 compute; GPU: bf16. Per case and batch it prints a markdown table
(median step time of forward + backward + AdamW step over interleaved steps,
bytes autograd saved for backward, live-tensor peak during a step, process RSS
growth during a step) and the issue's targets with the measured ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    MB,
    Report,
    layer7b_case,
    machine_line,
    run_case,
    smollm2_case,
    table,
    variants,
)

VARIANTS = variants("qmiss bat", "PEFT MiSS bat", "qmiss default", "PEFT LoRA r=64")
CASES = {"layer7b": layer7b_case, "smollm2": smollm2_case}


def targets(results, input_bytes: int) -> str:
    by = {r.variant: r for r in results}
    bat, peft, default = by["qmiss bat"], by["PEFT MiSS bat"], by["qmiss default"]
    rows = [
        ("saved for backward ≤ 1/10 of PEFT bat's", bat.saved_bytes / peft.saved_bytes, 0.1),
        ("saved for backward ≤ 2× qmiss default's + input",
         bat.saved_bytes / (2 * default.saved_bytes + input_bytes), 1.0),
        ("live peak ≤ 1/3 of PEFT bat's", bat.peak_bytes / peft.peak_bytes, 1 / 3),
        ("step time ≤ 0.8× PEFT bat's", bat.median_s / peft.median_s, 0.8),
        ("step time ≤ 2.0× qmiss default's", bat.median_s / default.median_s, 2.0),
    ]
    lines = ["| target | measured ratio | bound | met |", "|---|---:|---:|:---:|"]
    lines += [f"| {name} | {value:.3f} | {bound:.3f} | {'yes' if value <= bound else 'NO'} |" for name, value, bound in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--shapes", default="1x256,2x512", help="batch×seq list, e.g. 1x256,2x512")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_bat.md"),
                        help="markdown file the tables are also written to")
    args = parser.parse_args()

    report = Report(args.out)
    report.add(f"# bench_bat: `python {' '.join(sys.argv)}`\n")
    report.add(f"{machine_line()}, {args.bits}-bit base (nf4, double quant), "
               f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for key in CASES if args.case == "all" else [args.case]:
        case = CASES[key](args.bits)
        for batch, seq in shapes:
            results = run_case(case, VARIANTS, batch, seq, warmup=args.warmup, steps=args.steps)
            title = f"{case.name}, {args.bits}-bit, batch {batch}×{seq}"
            data = case.make_batch(batch, seq)
            input_bytes = sum(t.numel() * t.element_size() for t in data.values() if t.is_floating_point())
            report.add(table(results, "PEFT MiSS bat", title) + f"\n\ninput activations {input_bytes / MB:.1f} MB\n")
            report.add("targets (the issue sets them for the 7B-shaped layer at 1×256):\n")
            report.add(targets(results, input_bytes) + "\n")


if __name__ == "__main__":
    main()
