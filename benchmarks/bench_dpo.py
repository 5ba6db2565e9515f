"""Memory of a DPO step with qmiss.trl's reference (the model, adapters off) against an SFT step and TRL's default.

    python benchmarks/bench_dpo.py                      # SmolLM2-135M-Instruct, 4-bit, r=64, 2 pairs of ~240 tokens
    python benchmarks/bench_dpo.py --pairs 4 --shots 2

Three ways to train the same 4-bit SmolLM2 (all 30 layers, nf4, fp32 compute on the CPU) on the
same tokens, each a fresh model with zero adapters and its own AdamW over the adapters:

- ``qmiss.trl.DPOTrainer``: the reference is the model with its adapters disabled;
- an SFT step on the same sequences (both completions of every pair, prompt masked), TRL's
  SFTTrainer loss (fused log-prob head, as DPO's);
- plain ``trl.DPOTrainer(model, ref_model=None)``, which loads a second model from
  ``config._name_or_path`` as the reference.

For each: the step-1 loss (DPO with zero adapters: ln 2 against the right reference), the bytes the
model, the optimizer and any reference hold (``qmiss.resident_bytes``), the live-tensor peak of a
step after a first one (``qmiss.measure_peak``), their sum, and the process RSS growth over building
the trainer and both steps. The DPO/SFT ratio is the issue's target (≤ 1.2).
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import MB, Report, machine_line, step_rss_mb  # noqa: E402

import qmiss  # noqa: E402
from qmiss.memory import measure_peak, resident_bytes  # noqa: E402
from qmiss.smollm import smollm2_path  # noqa: E402
from qmiss.demo import arithmetic_problems  # noqa: E402


def preference_rows(pairs: int, shots: int) -> list[dict[str, str]]:
    """Few-shot arithmetic prompts; chosen: the worked answer, rejected: the same with a wrong result."""
    problems = arithmetic_problems(pairs * (shots + 1), seed=0)
    rng = random.Random(1)
    rows = []
    for i in range(pairs):
        *examples, asked = problems[i * (shots + 1):(i + 1) * (shots + 1)]
        prompt = "".join(f"Question: {p['query']}\nAnswer: {p['response']}\n\n" for p in examples)
        answer = asked["response"].rsplit(" ", 1)[-1]
        wrong = re.sub(rf"\b{answer}\b", str(int(answer) + rng.randint(1, 9)), asked["response"])
        rows.append({"prompt": f"{prompt}Question: {asked['query']}\nAnswer:", "chosen": " " + asked["response"],
                     "rejected": " " + wrong})
    return rows


def fresh_model(r: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    return qmiss.prepare_qmiss(model, r=r, bits=4).train()


def measured(build: Callable[[], Any], loss_of: Callable[[Any], torch.Tensor], model, lr: float = 1e-4) -> dict:
    """``trainer = build()``, a first step (its loss; AdamW allocates its state), then a second under ``measure_peak``.

    Returns the step-1 loss, the bytes the model, the optimizer and the trainer's ``ref_model`` hold, the second
    step's live-tensor peak, and the process RSS growth over all of it.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        trainer = box["trainer"] = build()
        optimizer = box["optimizer"] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

        def step() -> float:
            loss = loss_of(trainer)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        box["loss"] = step()
        box["peak"] = measure_peak(step).peak_bytes

    rss = step_rss_mb(run)
    reference = getattr(box["trainer"], "ref_model", None)
    held = resident_bytes(model, box["optimizer"], *([reference] if reference is not None else []))
    return {"loss": box["loss"], "reference": resident_bytes(reference) if reference is not None else 0,
            "resident": held, "peak": box["peak"], "total": held + box["peak"], "rss": rss,
            "trainer": box["trainer"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per batch (DPO runs 2× sequences)")
    parser.add_argument("--shots", type=int, default=4, help="solved examples in each prompt (sets the length)")
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=256)
    cli = parser.parse_args()

    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    import qmiss.trl

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    data = Dataset.from_list(preference_rows(cli.pairs, cli.shots))
    report = Report(str(Path(__file__).parent / "results" / "bench_dpo.md"))
    report.add(f"# bench_dpo: `python {' '.join(sys.argv)}`\n\nSmolLM2-135M-Instruct (30 layers), nf4, r={cli.r}, "
               f"{cli.pairs} pairs per batch, {machine_line()}, torch {torch.__version__}, trl {trl.__version__}, "
               f"{time.strftime('%Y-%m-%d')}\n")
    common = dict(bf16=False, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    dpo_args = dict(per_device_train_batch_size=cli.pairs, max_length=cli.max_length, **common)
    batch: dict[str, torch.Tensor] = {}

    def dpo_loss(trainer) -> torch.Tensor:
        if not batch:  # the first trainer's collated batch serves every variant
            batch.update(trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))))
        return trainer.compute_loss(trainer.model, batch)

    rows = {}
    model = fresh_model(cli.r)  # qmiss.trl's DPO, then SFT on the same model and the same sequences
    rows["qmiss.trl.DPOTrainer (reference: adapters off)"] = measured(
        lambda: qmiss.trl.DPOTrainer(model, args=trl.DPOConfig("/tmp/bench_dpo/qmiss", **dpo_args),
                                     train_dataset=data, processing_class=tokenizer), dpo_loss, model)
    dpo = rows["qmiss.trl.DPOTrainer (reference: adapters off)"]["trainer"]
    reference_pass = measure_peak(lambda: dpo.compute_ref_log_probs(model, batch)).peak_bytes
    sft_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                 "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)}
    rows["SFT, same sequences (TRL SFTTrainer's loss)"] = measured(
        lambda: trl.SFTTrainer(model, args=trl.SFTConfig("/tmp/bench_dpo/sft", **common), processing_class=tokenizer,
                               train_dataset=Dataset.from_list([{"text": "unused"}])),
        lambda trainer: trainer.compute_loss(model, dict(sft_batch)), model)
    del model
    model = fresh_model(cli.r)  # TRL's default: a second model loaded from config._name_or_path as the reference
    rows["trl.DPOTrainer, ref_model=None (TRL's default)"] = measured(
        lambda: trl.DPOTrainer(model, ref_model=None, args=trl.DPOConfig("/tmp/bench_dpo/trl", **dpo_args),
                               train_dataset=data, processing_class=tokenizer), dpo_loss, model)

    sequences, length = batch["input_ids"].shape
    report.add(f"Batch: {sequences} sequences × {length} tokens (DPO: chosen and rejected of {cli.pairs} pairs; SFT: "
               "the same sequences, prompt masked). MiB; live peak: tensors alive at once during the second step; "
               "total = held + live peak; RSS growth: process peak over building the trainer and both steps.\n")
    report.add("| trainer | step-1 loss | reference held | model + optimizer + reference held | step live peak | "
               "total | RSS growth |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        report.add(f"| {name} | {row['loss']:.4f} | {row['reference'] / MB:.1f} | {row['resident'] / MB:.1f} | "
                   f"{row['peak'] / MB:.1f} | {row['total'] / MB:.1f} | {row['rss']:.0f} |")
    ours, sft, default = rows.values()
    reference = default["trainer"].ref_model
    count = sum(p.numel() for p in reference.parameters())
    report.add(
        f"\nqmiss.trl DPO / SFT: total {ours['total'] / sft['total']:.4f}×, live peak "
        f"{ours['peak'] / sft['peak']:.4f}× (target ≤ 1.2): the adapters-off reference pass (no grad, before the "
        f"policy's forward) peaks at {reference_pass / MB:.1f} MiB on its own, below the policy step's peak. "
        f"Step-1 loss against ln 2 = {math.log(2):.4f}: qmiss.trl off by {abs(ours['loss'] - math.log(2)):.1e}, "
        f"TRL's default by {abs(default['loss'] - math.log(2)):.1e}. TRL's default reference: "
        f"{type(reference).__name__} in {reference.dtype}, {count:,d} params, {default['reference'] / MB:.1f} MiB "
        f"held ({default['reference'] / ours['resident']:.2f}× the 4-bit model + optimizer); its total is "
        f"{default['total'] / ours['total']:.2f}× qmiss.trl's.")

if __name__ == "__main__":
    main()
