"""Decoding speed with a bat adapter: qmiss default vs bat (few-token path) vs bat building W' vs bat_row vs a
merged model.

    python benchmarks/bench_generate.py                    # 7B-shaped layers + SmolLM2 generation
    python benchmarks/bench_generate.py --quick            # 3 rounds, 4 new tokens: 8.6 min on 2 busy cores
    python benchmarks/bench_generate.py --part layers      # the 7B-shaped layers alone

Two parts, all variants timed in interleaved rounds (who goes first rotates), medians, read as ratios:

1. 7B-shaped layers (4096→4096, 4096→11008, 4-bit nf4), one no-grad forward of 1 and 16 tokens — a decode
   step of one linear: qmiss default, bat (the few-token path, chosen automatically), bat building W' chunk by
   chunk (BatLinear, the path before it, forced), and bat's few-token path with the whole layer as one chunk
   (how much the chunked dequantization costs on the CPU), and bat_row (the base on a turned input).
2. SmolLM2-135M-Instruct, decoder linears 4-bit (nf4), r=64 adapters with random values: greedy
   ``model.generate`` tokens/s at batch 1 and 16 (prompt pass included), the same comparison with the bat
   model merged into a plain fp32 model (``qmiss.merge_and_unload``) in place of the one-chunk variant.

CPU: fp32 compute (bf16 matmuls are slow there); GPU: bf16. On a CPU shared with other work every
multi-threaded op waits for its threads to get a core (a few ms each, whatever its size), which a decode step
of many small ops feels most: SmolLM2's merged fp32 model generated 16 tok/s at batch 1 on 2 threads of a
2-core machine at a load average of 1.4, and 0.6 tok/s in a --quick run while other processes kept the load
near 4. So the report gives the load average before and after each part; compare runs at a similar load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import qmiss  # noqa: E402
from benchmarks.common import LINEAR_NAMES, Report, device_and_dtype, machine_line, quantize_targets, timed  # noqa: E402
from qmiss import MissLinear, ops, quant  # noqa: E402

R = 64


def building_w() -> contextlib.AbstractContextManager:
    """bat as it ran before the few-token path: W' rebuilt chunk by chunk whatever the token count."""
    return mock.patch.object(ops, "few_tokens_cheaper", lambda n, r: False)


def note_load(report: Report, when: str, ours: bool) -> None:
    """Add the machine's 1-minute load average to the report (CPU only): against its cores, less this run's own
    threads when ``ours`` (it just ran), it says whether other work was competing for the cores."""
    if torch.cuda.is_available() or not hasattr(os, "getloadavg"):
        return
    load, cores, threads = os.getloadavg()[0], os.cpu_count(), torch.get_num_threads()
    others = max(load - threads, 0.0) if ours else load
    busy = " — busy: multi-threaded ops waited for cores, times are inflated" if others + threads > cores + 0.5 else ""
    report.add(f"load average {when}: {load:.1f} on {cores} cores, {threads} threads in this run{busy}\n")


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each ``fn`` over ``rounds`` rounds of all of them, the first one rotating."""
    names, times = list(fns), {name: [] for name in fns}
    for i in range(warmup + rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            elapsed = timed(fns[name])
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def randomize(model: torch.nn.Module, scale: float = 0.01) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in qmiss.miss_layers(model):
            layer.miss_block.copy_(torch.randn(layer.miss_block.shape, generator=gen) * scale)


def layer_table(shapes: list[tuple[int, int]], tokens: list[int], rounds: int) -> tuple[str, dict]:
    device, dtype = device_and_dtype()
    lines = ["| layer | tokens | default ms | bat ms | bat, W' built ms | bat, one chunk ms | bat_row ms | "
             "bat × default (tokens/s) | W' built × default | one chunk × default | bat_row × default |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = {}
    for n_in, n_out in shapes:
        torch.manual_seed(0)
        linear = torch.nn.Linear(n_in, n_out, bias=False)
        base = quant.quantize_linear(linear, 4, compute_dtype=dtype).to(device).requires_grad_(False)
        layers = {"default": MissLinear(base, r=R, mode="default", compute_dtype=dtype),
                  "bat": MissLinear(base, r=R, mode="bat", compute_dtype=dtype),
                  "one chunk": MissLinear(base, r=R, mode="bat", compute_dtype=dtype, bat_chunk_bytes=2**40),
                  "bat_row": MissLinear(base, r=R, mode="bat_row", compute_dtype=dtype)}
        with torch.no_grad():
            for layer in layers.values():
                layer.miss_block.normal_(0, 0.01)
        for n in tokens:
            x = torch.randn(n, n_in, device=device, dtype=dtype)

            def built(layer=layers["bat"], x=x) -> None:
                with building_w():
                    layer(x)

            with torch.no_grad():
                fns = {"default": lambda x=x: layers["default"](x), "bat": lambda x=x: layers["bat"](x),
                       "built": built, "one chunk": lambda x=x: layers["one chunk"](x),
                       "bat_row": lambda x=x: layers["bat_row"](x)}
                t = interleaved(fns, rounds)
            ratio = {k: t["default"] / t[k] for k in t}
            ratios[(n_in, n_out, n)] = ratio
            lines.append(f"| {n_in}→{n_out} | {n} | {t['default'] * 1e3:.1f} | {t['bat'] * 1e3:.1f} | "
                         f"{t['built'] * 1e3:.1f} | {t['one chunk'] * 1e3:.1f} | {t['bat_row'] * 1e3:.1f} | "
                         f"{ratio['bat']:.2f} | {ratio['built']:.2f} | {ratio['one chunk']:.2f} | "
                         f"{ratio['bat_row']:.2f} |")
    return "\n".join(lines), ratios


def generate_table(batches: list[int], prompt: int, new: int, rounds: int) -> tuple[str, dict]:
    from transformers import AutoModelForCausalLM

    from qmiss.smollm import smollm2_path

    device, dtype = device_and_dtype()
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype)
    model = quantize_targets(model, 4, dtype).to(device).eval()
    models = {}
    for mode in ("default", "bat", "bat_row"):
        models[mode] = qmiss.prepare_qmiss(copy.deepcopy(model), r=R, mode=mode, target_modules=LINEAR_NAMES,
                                           compute_dtype=dtype).eval()
        randomize(models[mode])
    models["merged"] = qmiss.merge_and_unload(copy.deepcopy(models["bat"]), dtype=dtype).eval()
    del model
    lines = ["| batch | default tok/s | bat tok/s | bat, W' built tok/s | bat_row tok/s | merged fp32 tok/s | "
             "bat × default | W' built × default | bat_row × default | merged × default |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = {}
    vocab = models["default"].config.vocab_size
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(device)

        def run(model, ids=ids) -> None:
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

        def built(ids=ids) -> None:
            with building_w():
                run(models["bat"], ids)

        with torch.no_grad():
            t = interleaved({"default": lambda: run(models["default"]), "bat": lambda: run(models["bat"]),
                             "built": built, "bat_row": lambda: run(models["bat_row"]),
                             "merged": lambda: run(models["merged"])}, rounds)
        speed = {k: batch * new / s for k, s in t.items()}
        ratio = {k: speed[k] / speed["default"] for k in speed}
        ratios[batch] = ratio
        lines.append(f"| {batch} | {speed['default']:.1f} | {speed['bat']:.1f} | {speed['built']:.1f} | "
                     f"{speed['bat_row']:.1f} | {speed['merged']:.1f} | {ratio['bat']:.2f} | {ratio['built']:.2f} | "
                     f"{ratio['bat_row']:.2f} | {ratio['merged']:.2f} |")
    return "\n".join(lines), ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds and 4 new tokens instead of 5 and 8")
    parser.add_argument("--part", choices=["layers", "generate", "all"], default="all")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_generate.md"),
                        help="markdown file the tables are also written to")
    args = parser.parse_args()
    rounds, new = (3, 4) if args.quick else (5, 8)

    report = Report(args.out)
    report.add(f"# bench_generate: `python {' '.join(sys.argv)}`\n")
    report.add(f"{machine_line()}, 4-bit base (nf4, double quant), r={R}, torch {torch.__version__}, "
               f"{time.strftime('%Y-%m-%d')}\n")
    note_load(report, "at start", ours=False)
    if args.part in ("layers", "all"):
        text, ratios = layer_table([(4096, 4096), (4096, 11008)], [1, 16], rounds)
        report.add(f"**7B-shaped layers, one no-grad forward, median of {rounds} interleaved rounds** "
                   "(ratios are default's time over the variant's: tokens/s against default's)\n\n" + text + "\n")
        got = ratios[(4096, 11008, 1)]["bat"]
        report.add(f"target: bat decode tokens/s ≥ 0.85× default's at batch 1 on a 7B-shaped layer (4096→11008): "
                   f"{got:.2f}× — {'met' if got >= 0.85 else 'NOT met'}\n")
        note_load(report, "after the layers", ours=True)
    if args.part in ("generate", "all"):
        text, _ = generate_table([1, 16], prompt=8, new=new, rounds=rounds)
        report.add(f"**SmolLM2-135M-Instruct, greedy generate, 8-token prompt + {new} new tokens, "
                   f"median of {rounds} interleaved rounds**\n\n" + text + "\n")
        note_load(report, "after generate", ours=True)


if __name__ == "__main__":
    main()
