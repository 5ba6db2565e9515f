"""Packed (padding-free) against padded batches: training tokens per second, step peak, and exactness.

    python benchmarks/bench_packing.py [--rows 64] [--batch 8] [--length 1024] [--demo-rows 192]

SmolLM2-135M-Instruct in 4-bit (nf4, double quant) with qmiss default r=64 on every decoder linear and
qmiss-train's chunked loss, fp32 compute on the CPU. Two sets of rows:

- **skewed**: lengths log-uniform between 32 and 1,024 tokens (MetaMathQA's kind of spread: most rows
  short, a long tail), random tokens, the first third of each row a prompt (not learned);
- **demo**: the built-in arithmetic problems, encoded as qmiss-train encodes them.

Each set is trained once padded (batches of ``--batch`` rows, padded to the batch's longest, as
``--packing false`` does) and once packed (qmiss.packing: sequences of ``--length`` tokens, batches of as
many sequences as hold about the same number of tokens), each on its own copy of the same quantized
model, their steps interleaved. Tokens/s counts real (non-padding) tokens over the summed step times
(forward, backward, AdamW). The live-tensor peak is measured (qmiss.measure_peak) on each method's
largest batch. Exactness: the packed loss of the first packed batch against the same rows run one by one.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qmiss  # noqa: E402
from benchmarks.common import Report, machine_line  # noqa: E402
from qmiss import demo, train  # noqa: E402
from qmiss.encode import IGNORE  # noqa: E402
from qmiss.memory import measure_peak  # noqa: E402
from qmiss.packing import PackedCollator, pack  # noqa: E402
from qmiss.smollm import smollm2_path  # noqa: E402


def skewed_rows(n: int, vocab: int, low: int = 32, high: int = 1024, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        rows.append({"input_ids": ids, "labels": [IGNORE] * (length // 3) + ids[length // 3:]})
    return rows


def demo_rows(n: int, tokenizer) -> list[dict]:
    data = train.DataArguments(prompt_template=train.DEMO_DEFAULTS["prompt_template"])
    return [train.encode(tokenizer, r["query"], r["response"], data) for r in demo.arithmetic_problems(n, seed=0)]


def padded_batches(rows: list[dict], batch: int, tokenizer) -> list[dict]:
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    order = list(range(len(rows)))
    random.Random(1).shuffle(order)
    return [collate([rows[i] for i in order[s:s + batch]]) for s in range(0, len(rows), batch)]


def packed_batches(rows: list[dict], length: int, batch: int, pad_token_id: int) -> list[dict]:
    from datasets import Dataset

    sequences = list(pack(Dataset.from_list(rows), length))
    random.Random(1).shuffle(sequences)
    collate = PackedCollator(pad_token_id)
    return [collate(sequences[s:s + batch]) for s in range(0, len(sequences), batch)]


def train_interleaved(models: dict, batches: dict) -> dict[str, float]:
    """Seconds of training steps of each method, one step of each in turn."""
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for k, m in models.items()}
    seconds = {k: 0.0 for k in models}
    for i in range(max(len(b) for b in batches.values())):
        for name, model in models.items():
            if i >= len(batches[name]):
                continue
            start = time.perf_counter()
            model(**batches[name][i]).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            seconds[name] += time.perf_counter() - start
    return seconds


def peak_of(model, batch: dict) -> int:
    def step() -> None:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    return measure_peak(step).peak_bytes


def packed_equals_rows(model, batch: dict, rows_by_ids: dict) -> float:
    """|packed loss − the mean loss of the same rows run one by one| for one packed batch."""
    with torch.no_grad():
        packed = model(**batch).loss
        total, count = 0.0, 0
        for b in range(batch["input_ids"].shape[0]):
            starts = (batch["position_ids"][b] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
            for a, e in zip(starts, starts[1:]):
                ids = batch["input_ids"][b, a:e]
                original = rows_by_ids.get(tuple(ids.tolist()))
                if original is None:  # padding at the end of a sequence
                    continue
                labels = torch.tensor(original["labels"])
                n = int((labels[1:] != IGNORE).sum())
                total += model(input_ids=ids[None], labels=labels[None]).loss * n
                count += n
    return abs(float(packed - total / count))


def measure(rows: list[dict], batch: int, length: int, base, tokenizer) -> dict:
    mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
    packed_batch = math.ceil(batch * mean / length)  # sequences holding at least a padded batch's tokens
    batches = {"padded": padded_batches(rows, batch, tokenizer),
               "packed": packed_batches(rows, length, packed_batch, tokenizer.pad_token_id)}
    models = {k: qmiss.prepare_qmiss(copy.deepcopy(base), r=64, bits=4, chunked_loss=True).train() for k in batches}
    exact = packed_equals_rows(models["packed"], batches["packed"][0],
                               {tuple(r["input_ids"]): r for r in rows})
    seconds = train_interleaved(models, batches)
    real = sum(len(r["input_ids"]) for r in rows)
    positions = {k: sum(b["input_ids"].numel() for b in v) for k, v in batches.items()}
    peaks = {k: peak_of(models[k], max(v, key=lambda b: b["input_ids"].numel())) for k, v in batches.items()}
    result = {k: {"tokens_s": real / seconds[k], "steps": len(batches[k]), "positions": positions[k],
                  "peak": peaks[k], "seconds": seconds[k]} for k in batches}
    result["exact"] = exact
    result["packed_batch"] = packed_batch
    result["mean"] = mean
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="skewed rows")
    parser.add_argument("--batch", type=int, default=8, help="rows per padded batch (skewed set)")
    parser.add_argument("--length", type=int, default=1024, help="tokens per packed sequence (skewed set)")
    parser.add_argument("--demo-rows", type=int, default=192)
    parser.add_argument("--demo-batch", type=int, default=16, help="rows per padded batch (demo set)")
    parser.add_argument("--demo-length", type=int, default=256, help="tokens per packed sequence (demo set)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_packing.md"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)  # each method prepares a copy
    report = Report(args.out)
    report.add(f"## bench_packing: `python {' '.join(sys.argv)}`\n")
    report.add(f"SmolLM2-135M-Instruct 4-bit nf4 (double quant), qmiss default r=64 on every decoder linear, chunked "
               f"loss; {machine_line()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}. Padded: rows padded "
               "to the batch's longest (`--packing false`); packed: `qmiss.packing` (TRL's best-fit-decreasing bins, "
               "position_ids restarting per row, SDPA's block-diagonal mask); each on its own copy of the model, "
               "steps interleaved.\n")
    lines = ["| set | rows (mean tokens) | padded: rows/step, steps | packed: sequences/step × tokens, steps "
             "| tokens/s packed ÷ padded | live peak packed ÷ padded | positions computed packed ÷ padded "
             "| packed loss − rows alone |", "|---|---|---|---|---:|---:|---:|---:|"]
    sets = [("skewed 32–1,024 tokens", skewed_rows(args.rows, base.config.vocab_size), args.batch, args.length),
            ("built-in demo problems", demo_rows(args.demo_rows, tokenizer), args.demo_batch, args.demo_length)]
    for name, rows, batch, length in sets:
        if not rows:  # --rows 0 / --demo-rows 0: that set is skipped
            continue
        r = measure(rows, batch, length, base, tokenizer)
        p, q = r["packed"], r["padded"]
        report.add(f"{name}: padded {q['tokens_s']:.0f} tokens/s ({q['steps']} steps, {q['seconds']:.1f} s, peak "
                   f"{q['peak'] / 2**20:.0f} MiB); packed {p['tokens_s']:.0f} tokens/s ({p['steps']} steps, "
                   f"{p['seconds']:.1f} s, peak {p['peak'] / 2**20:.0f} MiB); |packed − alone| {r['exact']:.2e}")
        lines.append(f"| {name} | {len(rows)} ({r['mean']:.0f}) | {batch}, {q['steps']} | {r['packed_batch']} × "
                     f"{length}, {p['steps']} | **{p['tokens_s'] / q['tokens_s']:.2f}** | "
                     f"{p['peak'] / q['peak']:.2f} | {p['positions'] / q['positions']:.2f} | {r['exact']:.1e} |")
    report.add("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
