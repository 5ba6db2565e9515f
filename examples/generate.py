"""Load a base model with a qmiss (or PEFT MiSS) adapter and generate, many prompts in one batch.

    python examples/generate.py --adapter outputs/qmiss-train "Tom has 3 apples and gets 4 more. How many apples does Tom have now?"

The base model is the adapter's own (recorded in adapter_config.json) unless --model is given;
the built-in demo's SmolLM2 is found without a hub. The prompt format must match training:
"{query}\\n" for the built-in demo, the reference Alpaca prompt otherwise (--prompt overrides).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qmiss
from qmiss.smollm import smollm2_path
from qmiss.train import DEMO_DEFAULTS, PROMPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queries", nargs="+")
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", default=None, help="template around {query}; default: the demo's or Alpaca's")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args()

    recorded = json.loads((Path(args.adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    demo = args.model is None and recorded in (None, "SmolLM2-135M-Instruct")
    path = str(smollm2_path()) if demo else (args.model or recorded)
    template = args.prompt or (DEMO_DEFAULTS["prompt_template"] if demo else PROMPT)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 device_map="cuda" if cuda else None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = qmiss.from_pretrained(model, args.adapter).eval()  # prepare with the adapter's settings, then load

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer([template.format(query=q) for q in args.queries], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    for query, ids in zip(args.queries, out[:, batch.input_ids.shape[1]:]):
        print(f"> {query}\n{tokenizer.decode(ids, skip_special_tokens=True).strip()}\n")


if __name__ == "__main__":
    main()
