"""Load a base model with a qmiss (or PEFT MiSS) adapter and generate, many prompts in one batch.

    python examples/generate.py --adapter outputs/qmiss-train "Tom has 3 apples and gets 4 more. How many apples does Tom have now?"

The base model is the adapter's own (recorded in adapter_config.json) unless --model is given;
the built-in demo's SmolLM2 is found without a hub. The prompt format must match training, so it
is the one qmiss-train recorded in the adapter's qmiss_train_args.json ("{query}\\n" for the
built-in demo, the reference Alpaca prompt for a --data_path run, or that run's --prompt_template /
--chat_template; the chat template for a run on conversations); an adapter without that record gets the
Alpaca prompt. The tokenizer's own BOS is added as in training. --prompt_template and
--chat_template override it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qmiss
from qmiss.encode import Encoder
from qmiss.gguf_file import converted_folder, is_gguf
from qmiss.smollm import smollm2_path
from qmiss.train import DataArguments, prompt_text

TRAIN_ARGS_NAME = "qmiss_train_args.json"  # what qmiss-train writes next to the adapter
FIX = "fix or delete the file, or pass --prompt_template / --chat_template"


def check_template(template: object, where: str, fix: str = "") -> str:
    """``template`` if it is a string that formats with ``query`` alone and uses it.

    Args:
        template: the value to check.
        where: what the error names (the flag, or the file and field).
        fix: appended to the error after "; ".

    Raises:
        ValueError: not a string, another placeholder than ``{query}``, or no ``{query}`` at all.
    """
    fix = f"; {fix}" if fix else ""
    if not isinstance(template, str):
        raise ValueError(f"{where}={template!r} must be a string around {{query}}, e.g. '{{query}}\\n'{fix}")
    try:
        with_query, without = template.format(query="\0"), template.format(query="")
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ValueError(f"{where}={template!r} does not format with only {{query}} ({exc!r}); "
                         f"double any literal braces ({{{{ }}}}){fix}") from exc
    if with_query == without:
        raise ValueError(f"{where}={template!r} must contain {{query}}, where each query goes{fix}")
    return template


def recorded_data_args(adapter: Union[str, os.PathLike]) -> Optional[DataArguments]:
    """The prompt settings ``qmiss-train`` recorded for an adapter, or None where there is no record.

    The record is ``qmiss_train_args.json`` in the adapter folder, or, for a ``checkpoint-N`` folder
    inside a run's output folder, in that output folder (qmiss-train writes it once, at the end).
    Only its ``"data"`` section's ``prompt_template``, ``chat_template`` and ``rows`` are read; a missing one
    takes qmiss-train's default.

    Raises:
        ValueError: the file is not JSON, or a field has the wrong type, naming the file, field and value.
    """
    adapter = Path(adapter)
    path = adapter / TRAIN_ARGS_NAME
    if not path.is_file() and re.fullmatch(r"checkpoint-\d+", adapter.name):
        path = adapter.parent / TRAIN_ARGS_NAME
    if not path.is_file():
        return None
    try:
        arguments = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); {FIX}") from exc
    data = arguments.get("data", {}) if isinstance(arguments, dict) else None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: 'data' must be an object holding prompt_template and chat_template; {FIX}")
    defaults = DataArguments()
    chat = data.get("chat_template", defaults.chat_template)
    if not isinstance(chat, bool):
        raise ValueError(f"{path}: data.chat_template={chat!r} must be true or false; {FIX}")
    chat = chat or data.get("rows") == "conversations"  # a run on conversations learned the chat template
    template = check_template(data.get("prompt_template", defaults.prompt_template), f"{path}: data.prompt_template",
                              FIX)
    return DataArguments(prompt_template=template, chat_template=chat)


def build_prompts(tokenizer, queries: list[str], adapter: Union[str, os.PathLike],
                  prompt_template: Optional[str] = None, chat_template: bool = False) -> list[str]:
    """Each query wrapped as the adapter was trained: the given template (or the tokenizer's chat
    template), else the one recorded by ``qmiss-train`` (:func:`recorded_data_args`), else
    ``qmiss.train.PROMPT``. Formatted by ``qmiss.train.prompt_text``, as in training.

    Args:
        tokenizer: the base model's tokenizer (used for ``chat_template`` only).
        queries: the user's questions.
        adapter: the adapter folder.
        prompt_template: a template around ``{query}`` that overrides the record.
        chat_template: use the tokenizer's chat template, overriding the record.

    Raises:
        ValueError: a malformed record or template (see :func:`recorded_data_args`).
    """
    if chat_template:
        data = DataArguments(chat_template=True)
    elif prompt_template is not None:
        data = DataArguments(prompt_template=check_template(prompt_template, "--prompt_template"))
    else:
        data = recorded_data_args(adapter) or DataArguments()
    return [prompt_text(tokenizer, query, data) for query in queries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queries", nargs="+")
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt_template", "--prompt", default=None,
                        help=f"template around {{query}}; default: the one in {TRAIN_ARGS_NAME}, else Alpaca's")
    parser.add_argument("--chat_template", action="store_true", help="wrap each query in the tokenizer's chat template")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args()

    recorded = json.loads((Path(args.adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    demo = args.model is None and recorded in (None, "SmolLM2-135M-Instruct")
    path = str(smollm2_path()) if demo else (args.model or recorded)
    path = str(converted_folder(path)) if is_gguf(path) else path  # a GGUF base: the folder qmiss-train converted
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = build_prompts(tokenizer, args.queries, args.adapter, args.prompt_template, args.chat_template)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 device_map="cuda" if cuda else None)
    model = qmiss.from_pretrained(model, args.adapter).eval()  # prepare with the adapter's settings, then load

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoder = Encoder(tokenizer, max_length=tokenizer.model_max_length)  # the tokenizer's BOS, as in training
    ids = [{"input_ids": encoder.prompt_ids(prompt)} for prompt in prompts]
    batch = tokenizer.pad(ids, padding_side="left", return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    for query, ids in zip(args.queries, out[:, batch["input_ids"].shape[1]:]):
        print(f"> {query}\n{tokenizer.decode(ids, skip_special_tokens=True).strip()}\n")


if __name__ == "__main__":
    main()
