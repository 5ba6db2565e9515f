"""The built-in task of ``qmiss-train`` with no model or data flags: one-step arithmetic word problems,
shaped like MetaMathQA (a question, a worked answer ending "The answer is: N"), and their evaluation:
greedy generation for many prompts at once, exact match on the final number.
"""

from __future__ import annotations

import random
import re
from typing import Optional

import torch
from transformers import StoppingCriteria
from transformers.utils.logging import tqdm

from qmiss.encode import Encoder

NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ivan", "Zoe"]
ITEMS = ["apples", "books", "coins", "marbles", "stickers", "pencils"]
#: tokens generated per answer: a worked answer is about 20.
MAX_NEW_TOKENS = 24

#: The built-in demo's recipe, for the flags the user did not give. Its rows are 30-70 tokens: 256-token packed
#: sequences, 4 a step (about 18 problems), 60 steps (a little over one pass of 960 problems). The learning rate
#: sits in MiSS default's plateau (bench_convergence: best 3e-4, 6% at 3e-3), where floating-point differences
#: between machines and thread counts do not grow into different runs (2e-3 gave 28-42% run to run).
DEMO_DEFAULTS = {"prompt_template": "{query}\n", "model_max_length": 256, "learning_rate": 3e-4,
                 "per_device_train_batch_size": 4, "max_steps": 60, "warmup_steps": 6, "lr_scheduler_type": "cosine",
                 "logging_steps": 10, "save_strategy": "no", "report_to": "none"}


def arithmetic_problems(n: int, seed: int) -> list[dict[str, str]]:
    """MetaMathQA-shaped pairs: a one-step word problem, a worked response ending "The answer is: N"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        if rng.random() < 0.5:
            query = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
            response = f"{name} has {a} + {b} = {a + b} {item}. The answer is: {a + b}"
        else:
            query = f"{name} has {a + b} {item} and gives away {b}. How many {item} are left?"
            response = f"{name} has {a + b} - {b} = {a} {item} left. The answer is: {a}"
        rows.append({"query": query, "response": response})
    return rows


def final_answer(text: str) -> Optional[str]:
    """The number after "The answer is" (MetaMathQA's convention), else the last number in the text."""
    match = re.search(r"answer is:?\s*(-?\d+)", text)
    numbers = re.findall(r"-?\d+", text)
    return match.group(1) if match else (numbers[-1] if numbers else None)


class _Progress(StoppingCriteria):
    """Ticks a progress bar once per generated token; never stops generation."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def held_out_accuracy(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 128,
                      desc: Optional[str] = None) -> float:
    """Exact match of the final number, generating greedily for many prompts at once (left-padded batches).

    Args:
        prompts: the prompt texts, as training wrapped the queries (the tokenizer's BOS is added as in training).
        answers: the reference responses (their final numbers count).
        desc: label of a progress bar over the generated tokens (none without it).
    """
    was_training = model.training
    model.eval()
    encoder = Encoder(tokenizer, max_length=10**9)
    correct = 0
    batches = range(0, len(prompts), batch_size)
    with tqdm(total=len(batches) * MAX_NEW_TOKENS, desc=desc, unit="tok", disable=desc is None) as bar:
        for i in batches:
            ids = [{"input_ids": encoder.prompt_ids(p)} for p in prompts[i : i + batch_size]]
            batch = tokenizer.pad(ids, padding_side="left", return_tensors="pt").to(model.device)
            done = bar.n
            out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, stopping_criteria=[_Progress(bar)])
            bar.update(done + MAX_NEW_TOKENS - bar.n)  # a batch that stopped early at EOS
            for answer, generated in zip(answers[i : i + batch_size], out[:, batch["input_ids"].shape[1]:]):
                text = tokenizer.decode(generated, skip_special_tokens=True)
                correct += final_answer(text) == final_answer(answer)
    model.train(was_training)
    return correct / len(prompts)
