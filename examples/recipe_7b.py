"""A qmiss-train command for a 7B model on one consumer GPU, sized by the memory planner.

    python examples/recipe_7b.py --gpu-gib 8                     # Llama-2-7B shapes, MetaMathQA
    python examples/recipe_7b.py --gpu-gib 12 --config path/to/Llama-2-7b-hf
    python examples/recipe_7b.py --gpu-gib 24 --mode bat

For the card, it tries settings from the most frugal up (4-bit, checkpointing, paged 8-bit AdamW,
r=64 on every linear) and keeps the largest micro-batch × sequence length whose planned peak, plus
the CUDA-context allowance, fits; gradient accumulation keeps the effective batch at 64 sequences.
It prints the plan's breakdown and the command. Nothing is measured on a GPU here: the figures are
the planner's (checked against CPU measurements within ±15%, see tests/test_plan.py).
"""

from __future__ import annotations

import argparse
import sys

from qmiss.plan import GiB, plan_memory

EFFECTIVE_BATCH = 64


def llama2_7b():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=32, vocab_size=32000, _name_or_path="meta-llama/Llama-2-7b-hf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-gib", "--gpu-gb", dest="gpu_gib", type=float, required=True,
                        help="the card's memory in GiB (an '8 GB' card has 8 GiB)")
    parser.add_argument("--config", default=None, help="model folder or config.json (default: Llama-2-7B's shapes)")
    parser.add_argument("--model", default="meta-llama/Llama-2-7b-hf", help="what the command trains")
    parser.add_argument("--mode", default="default", choices=["default", "mini", "bat"])
    args = parser.parse_args()
    config = args.config or llama2_7b()
    extra = {"mini_r": 64} if args.mode == "mini" else {}

    best = None
    for bits in (4, 8):
        for seq in (512, 1024, 2048):
            for batch in (1, 2, 4, 8, 16):
                plan = plan_memory(config, bits=bits, mode=args.mode, batch_size=batch, seq_len=seq, **extra)
                if plan.fits(args.gpu_gib) and (best is None or (batch * seq, -bits) > (best[1] * best[2], -best[0])):
                    best = (bits, batch, seq, plan)
        if best is not None:
            break  # 4-bit fits: it leaves the most room for activations
    if best is None:
        print(f"no setting fits a {args.gpu_gib:g} GiB card (even 4-bit, 1×512, checkpointing)", file=sys.stderr)
        return 1
    bits, batch, seq, plan = best
    print(plan.table())
    print(f"\n# {args.gpu_gib:g} GiB card: {bits}-bit {args.mode}, micro-batch {batch}×{seq}, planned peak "
          f"{plan.peak_bytes / GiB:.2f} GiB")
    print(f"qmiss-train --base_model_name_or_path {args.model} --data_path meta-math/MetaMathQA \\\n"
          f"  --dataset_field query response --output_dir out/llama2-7b-qmiss --bits {bits} --miss_r 64 "
          f"--mode {args.mode}"
          f"{' --mini_r 64' if args.mode == 'mini' else ''} \\\n"
          f"  --model_max_length {seq} --per_device_train_batch_size {batch} "
          f"--gradient_accumulation_steps {max(1, EFFECTIVE_BATCH // batch)} \\\n"
          f"  --gradient_checkpointing --optim paged_adamw_8bit --bf16 --learning_rate 2e-5 --num_train_epochs 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
