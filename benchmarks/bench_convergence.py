"""Convergence: qmiss MiSS (default, bat) against QLoRA (PEFT LoRA r=64) on SmolLM2 in 4-bit.

    python benchmarks/bench_convergence.py                  # 30 steps, learning rates 3e-4, 1e-3, 3e-3 each
    python benchmarks/bench_convergence.py --steps 20 --lrs 2e-3

Every run adapts a deep copy of the same 4-bit SmolLM2-135M-Instruct on the same batches of the
built-in arithmetic task (qmiss-train's demo: prompt tokens masked, batch 16), with AdamW, a cosine
schedule and the same learning-rate grid for every method (the same search budget). Reported per run:
the training loss curve, its mean over the last 5 steps, and held-out exact-match accuracy (64
problems, greedy). Writes results/bench_convergence.md and results/bench_convergence.png.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import Report, peft_lora_variant, pyplot, qmiss_variant, smollm2_case  # noqa: E402
from qmiss import train  # noqa: E402

METHODS = {"qmiss default r=64": qmiss_variant("default"), "qmiss bat r=64": qmiss_variant("bat"),
           "PEFT LoRA r=64": peft_lora_variant()}


def batches(tokenizer, steps: int, batch_size: int, seed: int = 0) -> list[dict]:
    from transformers import DataCollatorForSeq2Seq

    data = train.DataArguments(prompt_template=train.DEMO_DEFAULTS["prompt_template"], model_max_length=128)
    rows = train.arithmetic_problems(steps * batch_size, seed=0)
    random.Random(seed).shuffle(rows)
    encoded = [train.encode(tokenizer, r["query"], r["response"], data) for r in rows]
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return [collate(encoded[i * batch_size:(i + 1) * batch_size]) for i in range(steps)], data


def run(base, build, lr: float, steps_data: list[dict], data, tokenizer, held_out) -> dict:
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(0)
    model = build(copy.deepcopy(base))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, len(steps_data) // 10), len(steps_data))
    losses, start = [], time.perf_counter()
    for batch in steps_data:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    accuracy = train.demo_accuracy(model, tokenizer, held_out, data)
    return {"losses": losses, "accuracy": accuracy, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="learning-rate grid, the same for every method")
    parser.add_argument("--eval", type=int, default=64, help="held-out problems")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_convergence.md"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from qmiss.smollm import smollm2_path

    lrs = [float(v) for v in args.lrs.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    steps_data, data = batches(tokenizer, args.steps, args.batch)
    held_out = train.arithmetic_problems(args.eval, seed=1)
    base = smollm2_case(4).model

    report = Report(args.out)
    report.add(f"## bench_convergence: `python {' '.join(sys.argv)}`\n")
    report.add(f"SmolLM2-135M-Instruct, 4-bit nf4 (double quant), fp32 compute on {torch.get_num_threads()} CPU "
               f"threads; built-in arithmetic task, {args.steps} steps × batch {args.batch}, AdamW + cosine "
               f"schedule (10% warmup), learning rates {lrs} for every method; held-out: {args.eval} problems "
               f"(they share the task's arithmetic facts with training); {time.strftime('%Y-%m-%d')}\n")
    held_out_before = train.demo_accuracy(base, tokenizer, held_out, data)
    results = {}
    for name, build in METHODS.items():
        for lr in lrs:
            results[(name, lr)] = run(base, build, lr, steps_data, data, tokenizer, held_out)
            r = results[(name, lr)]
            print(f"{name} lr {lr:g}: last-5 loss {statistics.mean(r['losses'][-5:]):.3f}, "
                  f"accuracy {r['accuracy']:.1%}, {r['seconds']:.0f} s", flush=True)

    lines = [f"held-out accuracy of the base model: {held_out_before:.1%}", "",
             "| method | lr | loss, steps 1–5 | loss, last 5 | held-out accuracy | train s |",
             "|---|---:|---:|---:|---:|---:|"]
    for (name, lr), r in results.items():
        lines.append(f"| {name} | {lr:g} | {statistics.mean(r['losses'][:5]):.3f} | "
                     f"{statistics.mean(r['losses'][-5:]):.3f} | {r['accuracy']:.1%} | {r['seconds']:.0f} |")
    best = {name: max((k for k in results if k[0] == name),
                      key=lambda k: (results[k]["accuracy"], -statistics.mean(results[k]["losses"][-5:])))
            for name in METHODS}
    lines += ["", "Best learning rate per method (held-out accuracy, then last-5 loss), and the first step "
                  "whose loss (mean of 5 around it) falls under half of the initial loss:", "",
              "| method | best lr | held-out accuracy | loss, last 5 | steps to half the initial loss |",
              "|---|---:|---:|---:|---:|"]
    for name, key in best.items():
        losses = results[key]["losses"]
        start = statistics.mean(losses[:3])
        smooth = [statistics.mean(losses[max(0, i - 2):i + 3]) for i in range(len(losses))]
        half = next((i + 1 for i, v in enumerate(smooth) if v < start / 2), None)
        lines.append(f"| {name} | {key[1]:g} | {results[key]['accuracy']:.1%} | "
                     f"{statistics.mean(losses[-5:]):.3f} | {half if half else 'not reached'} |")
    report.add("\n".join(lines) + "\n")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, lr), r in results.items():
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], lw=1.6 if best[name] == (name, lr) else 0.8,
                ls="-" if best[name] == (name, lr) else ":", label=f"{name}, lr {lr:g} ({r['accuracy']:.0%})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M 4-bit, arithmetic task: MiSS vs LoRA (held-out accuracy in brackets)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = Path(args.out).with_suffix(".png")
    fig.savefig(png, dpi=110)
    report.add(f"![loss curves]({png.name})\n")


if __name__ == "__main__":
    main()
