"""Convergence: qmiss MiSS (default, bat, bat_row) against QLoRA (PEFT LoRA r=64) on SmolLM2 in 4-bit.

    python benchmarks/bench_convergence.py                  # 30 steps, 2 seeds, start grid 1e-4, 3e-4, 1e-3, widened
    python benchmarks/bench_convergence.py --steps 20 --lrs 2e-3 --max-widen 2 --seeds 0

Every run adapts a deep copy of the same 4-bit SmolLM2-135M-Instruct on the same batches of the
built-in arithmetic task (qmiss-train's demo: prompt tokens masked, batch 16), with AdamW and a cosine
schedule. Every method starts from the same learning-rate grid (--lrs). While a method's best rate
(held-out accuracy, then last-5 loss) is the smallest or the largest it has tried, the grid grows by
the next half-decade rate on that side (... 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2 ...), at most
--max-widen rates per side; so each method may end with its own grid, and the report lists every
rate each one tried and says whether its best lies inside that grid or, the cap reached, at an edge.
Reported per run: the training loss curve, its mean over the last 5 steps, and held-out exact-match
accuracy (64 problems, greedy). Writes results/bench_convergence.md and results/bench_convergence.png.

Seeds (--seeds): each seed shuffles the training batches its own way and seeds torch (LoRA's random A). The
first seed starts every method from --lrs; each later seed starts a method from the first seed's best rate
and its two half-decade neighbours, and widens the same way, so every method's best is bracketed per seed.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import Report, peft_lora_variant, pyplot, qmiss_variant, smollm2_case  # noqa: E402
from qmiss import demo, train  # noqa: E402

METHODS = {"qmiss default r=64": qmiss_variant("default"), "qmiss bat r=64": qmiss_variant("bat"),
           "qmiss bat_row r=64": qmiss_variant("bat_row"), "PEFT LoRA r=64": peft_lora_variant()}
COLOURS = {"qmiss default r=64": "Blues", "qmiss bat r=64": "Oranges", "qmiss bat_row r=64": "Purples",
           "PEFT LoRA r=64": "Greens"}


def batches(tokenizer, steps: int, batch_size: int, seed: int = 0) -> tuple[list[dict], train.DataArguments]:
    from transformers import DataCollatorForSeq2Seq

    data = train.DataArguments(prompt_template=train.DEMO_DEFAULTS["prompt_template"], model_max_length=128)
    rows = demo.arithmetic_problems(steps * batch_size, seed=0)
    random.Random(seed).shuffle(rows)
    encoded = [train.encode(tokenizer, r["query"], r["response"], data) for r in rows]
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return [collate(encoded[i * batch_size:(i + 1) * batch_size]) for i in range(steps)], data


def run(base, build, lr: float, steps_data: list[dict], data, tokenizer, held_out, seed: int = 0) -> dict:
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
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
    load = os.getloadavg()[0]
    accuracy = demo.held_out_accuracy(model, tokenizer, *held_out)
    return {"losses": losses, "accuracy": accuracy, "seconds": seconds, "load": load}


def neighbour(lr: float, side: int) -> float:
    """The next half-decade rate (1 or 3 times a power of ten) below lr (side -1) or above it (side +1)."""
    e = math.floor(math.log10(lr))
    ladder = [float(f"{m}e{p}") for p in range(e - 2, e + 3) for m in (1, 3)]
    return max(r for r in ladder if r < lr * (1 - 1e-9)) if side < 0 else min(r for r in ladder if r > lr * (1 + 1e-9))


def pick(results: dict, name: str) -> float:
    """The method's best learning rate: held-out accuracy, then the lower last-5 loss."""
    return max((lr for n, lr in results if n == name),
               key=lambda lr: (results[(name, lr)]["accuracy"], -statistics.mean(results[(name, lr)]["losses"][-5:])))


def edge(results: dict, name: str) -> str | None:
    """'smallest' or 'largest' when the best rate sits at that end of the rates tried, else None (interior)."""
    tried, best = sorted(lr for n, lr in results if n == name), pick(results, name)
    return "smallest" if best == tried[0] else "largest" if best == tried[-1] else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="the first seed's starting learning-rate grid, every "
                                                              "method's")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (batch order, torch's seed)")
    parser.add_argument("--max-widen", type=int, default=4,
                        help="most rates added on each side of a method's grid while its best rate is at that edge")
    parser.add_argument("--eval", type=int, default=64, help="held-out problems")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_convergence.md"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from qmiss.smollm import smollm2_path

    lrs = sorted(float(v) for v in args.lrs.split(","))
    seeds = [int(v) for v in args.seeds.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    problems = demo.arithmetic_problems(args.eval, seed=1)
    data = batches(tokenizer, 1, args.batch)[1]
    held_out = ([train.prompt_text(tokenizer, r["query"], data) for r in problems], [r["response"] for r in problems])
    base = smollm2_case(4).model

    report = Report(args.out)
    report.add(f"## bench_convergence: `python {' '.join(sys.argv)}`\n")
    report.add(f"SmolLM2-135M-Instruct, 4-bit nf4 (double quant), fp32 compute on {torch.get_num_threads()} CPU "
               f"threads; built-in arithmetic task, {args.steps} steps × batch {args.batch}, AdamW + cosine "
               f"schedule (10% warmup); seeds {', '.join(map(str, seeds))} (batch order and torch's seed). Seed "
               f"{seeds[0]} starts every method from learning rates {', '.join(f'{v:g}' for v in lrs)}; each later "
               f"seed starts a method from seed {seeds[0]}'s best rate and its two half-decade neighbours. While a "
               f"method's best rate (held-out accuracy, then last-5 loss) is the smallest or largest it has tried, "
               f"the next half-decade rate on that side is added, at most {args.max_widen} per side; held-out: "
               f"{args.eval} problems (they share the task's arithmetic facts with training); "
               f"{time.strftime('%Y-%m-%d')}\n")
    report.add(f"held-out accuracy of the base model: {demo.held_out_accuracy(base, tokenizer, *held_out):.1%}\n")
    started, by_seed = time.perf_counter(), {}
    for seed in seeds:
        steps_data, data = batches(tokenizer, args.steps, args.batch, seed=seed)
        results, widened = {}, {name: {"smallest": 0, "largest": 0} for name in METHODS}

        def measure(name: str, lr: float) -> None:
            r = results[(name, lr)] = run(base, METHODS[name], lr, steps_data, data, tokenizer, held_out, seed)
            print(f"seed {seed}, {name} lr {lr:g}: last-5 loss {statistics.mean(r['losses'][-5:]):.3f}, "
                  f"accuracy {r['accuracy']:.1%}, {r['seconds']:.0f} s", flush=True)

        for name in METHODS:
            first = by_seed.get(seeds[0])
            if first is None:
                grid = lrs
            else:
                best = pick(first[0], name)
                grid = [neighbour(best, -1), best, neighbour(best, +1)]
            for lr in grid:
                measure(name, lr)
            while (side := edge(results, name)) and widened[name][side] < args.max_widen:
                tried = sorted(lr for n, lr in results if n == name)
                lr = neighbour(tried[0], -1) if side == "smallest" else neighbour(tried[-1], +1)
                widened[name][side] += 1
                print(f"seed {seed}, {name}: best lr {pick(results, name):g} is the {side} tried, adding {lr:g}",
                      flush=True)
                measure(name, lr)
        by_seed[seed] = (results, widened)
        report.add(f"### seed {seed}\n\n" + seed_report(results, widened, args) + "\n")
    minutes = (time.perf_counter() - started) / 60
    loads = [r["load"] for results, _ in by_seed.values() for r in results.values()]
    runs = sum(len(results) for results, _ in by_seed.values())

    lines = ["### every seed, at each method's best rate for that seed", "",
             "| method | " + " | ".join(f"seed {s}: best lr, accuracy" for s in seeds) + " | mean accuracy |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for name in METHODS:
        cells, accuracies = [], []
        for seed in seeds:
            results = by_seed[seed][0]
            lr = pick(results, name)
            accuracies.append(results[(name, lr)]["accuracy"])
            inside = "" if edge(results, name) is None else " (edge)"
            cells.append(f"{lr:g}{inside}, {accuracies[-1]:.1%}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(accuracies):.1%} |")
    lines += ["", f"train s: wall seconds of the {args.steps} training steps (evaluation excluded). The 1-minute load "
                  f"average at the end of the runs ranged {min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} CPU "
                  f"cores, so these times carry whatever else ran on the machine: a rough cost, not a speed "
                  f"comparison (bench_compare is one). {runs} runs, {minutes:.0f} min in all."]
    report.add("\n".join(lines) + "\n")

    results = by_seed[seeds[0]][0]
    best = {name: pick(results, name) for name in METHODS}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in METHODS:
        tried = sorted(lr for n, lr in results if n == name)
        cmap = plt.get_cmap(COLOURS.get(name, "Greys"))
        for i, lr in enumerate(tried):
            r, top = results[(name, lr)], best[name] == lr
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], color=cmap(0.35 + 0.6 * i / max(1, len(tried) - 1)),
                    lw=1.8 if top else 0.9, ls="-" if top else ":", label=f"{name}, lr {lr:g} ({r['accuracy']:.0%})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(f"SmolLM2-135M 4-bit, arithmetic task, seed {seeds[0]}: MiSS vs LoRA (held-out accuracy in "
                 "brackets)\ndarker: higher learning rate; solid: each method's best", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    png = Path(args.out).with_suffix(".png")
    fig.savefig(png, dpi=110)
    report.add(f"![loss curves]({png.name})\n")


def seed_report(results: dict, widened: dict, args: argparse.Namespace) -> str:
    """One seed's tables: every run, then each method's best rate, the rates it tried and whether the best is inside."""
    lines = ["| method | lr | loss, steps 1–5 | loss, last 5 | held-out accuracy | train s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in METHODS:
        for lr in sorted(lr for n, lr in results if n == name):
            r = results[(name, lr)]
            lines.append(f"| {name} | {lr:g} | {statistics.mean(r['losses'][:5]):.3f} | "
                         f"{statistics.mean(r['losses'][-5:]):.3f} | {r['accuracy']:.1%} | {r['seconds']:.0f} |")
    best = {name: pick(results, name) for name in METHODS}
    lines += ["", "Best learning rate per method (held-out accuracy, then last-5 loss), every rate it tried, whether "
                  "the best lies inside them, and the first step whose loss (mean of 5 around it) falls under half "
                  "of the initial loss:", "",
              "| method | rates tried | best lr | best inside the grid | held-out accuracy | loss, last 5 | "
              "steps to half the initial loss |",
              "|---|---|---:|---|---:|---:|---:|"]
    for name, lr in best.items():
        losses = results[(name, lr)]["losses"]
        start = statistics.mean(losses[:3])
        smooth = [statistics.mean(losses[max(0, i - 2):i + 3]) for i in range(len(losses))]
        half = next((i + 1 for i, v in enumerate(smooth) if v < start / 2), None)
        side = edge(results, name)
        inside = "yes" if side is None else f"**no**: the {side} tried"
        tried = ", ".join(f"{v:g}" for v in sorted(v for n, v in results if n == name))
        lines.append(f"| {name} | {tried} | {lr:g} | {inside} | {results[(name, lr)]['accuracy']:.1%} | "
                     f"{statistics.mean(losses[-5:]):.3f} | {half if half else 'not reached'} |")
    at_edge = {name: side for name in METHODS if (side := edge(results, name))}
    for name, side in at_edge.items():
        lines += ["", f"{name}: the optimum lies at an edge. Its best rate, {best[name]:g}, is the {side} it tried, "
                      f"after {widened[name][side]} added on that side (--max-widen {args.max_widen}); a better rate "
                      f"may lie beyond it."]
    if not at_edge:
        lines += ["", "Every method's best learning rate lies inside the rates it tried: each has a worse rate on "
                      "either side."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
