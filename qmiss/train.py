"""qmiss-train: supervised fine-tuning with MiSS on a 4/8-bit base, on prompt/response pairs or conversations.

    qmiss-train                                   # built-in demo: SmolLM2-135M-Instruct, arithmetic problems
    qmiss-train --base_model_name_or_path meta-llama/Llama-2-7b-hf --data_path meta-math/MetaMathQA \\
        --dataset_split "train[:100000]" --dataset_field query response --output_dir out --miss_r 64 \\
        --bits 4 --init_weights bat --bf16 --num_train_epochs 1 --per_device_train_batch_size 4 \\
        --gradient_accumulation_steps 32 --learning_rate 2e-5 --gradient_checkpointing

The flags mirror the MiSS reference fine-tuning script (HfArgumentParser over the three
dataclasses below, TrainingArguments included). Pairs are prompted with ``--prompt_template``
(or the chat template) and only the response is learned; conversations (``messages`` or ShareGPT
``conversations``) go through the tokenizer's chat template and every assistant turn is learned
(:mod:`qmiss.encode`). Rows are packed into sequences of ``--model_max_length`` tokens without
padding (:mod:`qmiss.packing`; ``--packing false`` pads each batch instead). The model is a folder,
a hub id or a GGUF file (:mod:`qmiss.gguf_file`). Checkpoints and the output folder hold the adapter
in PEFT's MiSS format (never the frozen base), the tokenizer, the arguments and a ``summary.json``.

Why one file of ~500 lines: it is the command and only the command — its flags (three dataclasses whose
help texts are a quarter of it), the flags' rows made sequences, the model loaded as they say, the parse
that spells errors as typed, and the run. Each piece is read from every other one's flags; what stands
alone lives below it (the rows: data.py, the tokens: encode.py, packing.py, the task: demo.py, the
checkpoints: trainer.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import datasets
import torch
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    TrainingArguments,
)

from qmiss import data as rows_io
from qmiss.adapters import atomic_write_json
from qmiss.config import DEFAULTS, FRONT_END_DEFAULTS, QMissConfig, default_compute_dtype, mode_from_init_weights
from qmiss.demo import DEMO_DEFAULTS, arithmetic_problems, held_out_accuracy
from qmiss.encode import IGNORE, ChatTemplateError, Encoder, chat_prompt
from qmiss.gguf_file import converted_folder, is_gguf, load_tokenizer
from qmiss.inputs import (InputError, MissingPathError, check_local_path, check_output_dir, exit_status, few,
                          hub_access, parse_rank_pattern, spelled_as)
from qmiss.model import check_targets, trainable_parameters
from qmiss.packing import PackedCollator, pack
from qmiss.prepare import check_long_context, prepare_qmiss
from qmiss.smollm import smollm2_path
from qmiss.sources import load_hf_config, meta_model
from qmiss.trainer import COMPLETE_MARKER, QMissTrainer, last_complete_checkpoint

# The reference script's prompt (Alpaca-style, as used for MetaMathQA).
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{query}\n\n### Response:"
)
BITS = {"4": 4, "8": 8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: prepare_qmiss's arguments and the qmiss-train flags that set them, for error messages.
FLAGS = {"r": "--miss_r", "mini_r": "--mini_r", "mode": "--mode", "init_weights": "--init_weights", "bits": "--bits",
         "quant_type": "--quant_type", "dropout": "--miss_dropout", "target_modules": "--target_modules",
         "rank_pattern": "--rank_pattern"}
#: qmiss-train's own defaults where they differ from the API's (config.FRONT_END_DEFAULTS says why).
COMMAND = FRONT_END_DEFAULTS["qmiss-train"]


@dataclass
class ModelArguments:
    base_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Model folder or hub id. Default: the built-in SmolLM2-135M-Instruct demo."})
    miss_r: int = field(default=DEFAULTS.r, metadata={"help": "MiSS shard size r (the rank)."})
    init_weights: str = field(default="True", metadata={"help": "PEFT's MiSS variant: True (balance), bat or mini (qmiss: bat_row)."})
    mode: Optional[str] = field(default=None, metadata={"help": "Clearer alias of --init_weights: default, mini, bat, bat_row."})
    mini_r: Optional[int] = field(default=None, metadata={"help": "mini: adapter width along out_features."})
    bits: str = field(default="4", metadata={"help": "Base precision: 4, 8 (bitsandbytes), bf16, fp16 or fp32."})
    quant_type: str = field(default=DEFAULTS.quant_type, metadata={"help": "4-bit data type: nf4 or fp4."})
    double_quant: bool = field(default=DEFAULTS.double_quant, metadata={"help": "4-bit double quantization."})
    target_modules: Optional[list[str]] = field(default=None, metadata={"help": "Module names; default all-linear."})
    rank_pattern: Optional[str] = field(default=None, metadata={
        "help": "Per-module r, PEFT's rank_pattern: key=r pairs (experts=16,q_proj=32) or a JSON object; a key is "
                "a regex matched at the end of module paths (mixture-of-experts: experts=16)."})
    miss_dropout: float = field(default=DEFAULTS.dropout,
                                metadata={"help": "Dropout on the adapter input (default/mini)."})
    chunked_loss: bool = field(default=COMMAND["chunked_loss"], metadata={
        "help": "Compute the training loss chunk by chunk of tokens, never the full logits (--chunked_loss false: "
                "transformers' own loss)."})
    loss_chunk_mib: Optional[int] = field(default=None, metadata={
        "help": "Chunked loss: MiB of logits and gradient per chunk (default: chunks as large as the output head, "
                "at most a quarter of the free GPU memory)."})
    offload_activations: bool = field(default=DEFAULTS.offload_activations, metadata={
        "help": "Keep the checkpointed layer inputs in pinned host memory until backward (a GPU-memory saving "
                "for long sequences; a no-op on the CPU)."})
    embeddings_on_host: bool = field(default=DEFAULTS.embeddings_on_host, metadata={
        "help": "Keep the input embedding table in host memory and move only each batch's rows to the GPU "
                "(1 GiB less for Llama-3-8B; not for models with tied embeddings)."})


@dataclass
class DataArguments:
    data_path: Optional[str] = field(
        default=None, metadata={"help": "A .json/.jsonl/.csv/.parquet file or folder, or a datasets hub name. "
                                        "Default: the built-in arithmetic word problems."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on, e.g. 'train[:100000]'."})
    dataset_field: Optional[list[str]] = field(default=None, metadata={
        "help": "QUERY RESPONSE: the columns of prompt/response pairs; or one COLUMN of conversations. Default: "
                "query/response, prompt/completion, messages (OpenAI) or conversations (ShareGPT), as the data has."})
    model_max_length: int = field(default=512, metadata={
        "help": "Longer rows are cut to this many tokens; with --packing, the length of a packed sequence."})
    packing: bool = field(default=True, metadata={
        "help": "Pack rows into sequences of --model_max_length tokens without padding, each row attending only "
                "to itself (--packing false: pad each batch to its longest row). --per_device_train_batch_size "
                "then counts packed sequences."})
    prompt_template: str = field(default=PROMPT, metadata={"help": "Prompt around {query}; default: the reference "
                                                                     "script's Alpaca-style prompt."})
    chat_template: bool = field(default=False, metadata={"help": "Pairs: make each a user turn and an assistant turn "
                                                                  "of the tokenizer's chat template instead of using "
                                                                  "--prompt_template (conversations always use it)."})
    demo_train_size: int = field(default=960, metadata={"help": "Built-in demo: training problems."})
    demo_eval_size: int = field(default=256, metadata={"help": "Built-in demo: held-out problems."})


_HAS_WARMUP_RATIO = hasattr(TrainingArguments, "warmup_ratio")  # transformers 5 folded it into warmup_steps


@dataclass
class QMissTrainingArguments(TrainingArguments):
    output_dir: str = field(default="outputs/qmiss-train", metadata={"help": "Where the adapter and checkpoints go."})
    if not _HAS_WARMUP_RATIO:
        warmup_ratio: Optional[float] = field(
            default=None, metadata={"help": "The reference script's flag: warm up over this fraction of the steps."})
    ddp_find_unused_parameters: Optional[bool] = field(
        default=False, metadata={"help": "DDP: every adapter takes part in every step, so no search for unused ones."})
    logging_nan_inf_filter: bool = field(default=False, metadata={
        "help": "transformers' filter of non-finite losses out of the logged mean; off here, as it reads every "
                "micro-step's loss on the host (a GPU sync) and qmiss stops the run on a non-finite loss anyway."})

    def __post_init__(self) -> None:
        if not _HAS_WARMUP_RATIO and self.warmup_ratio:
            self.warmup_steps = self.warmup_ratio  # a float in [0, 1) is a ratio there
        super().__post_init__()


# --- data -----------------------------------------------------------------------------------------------------


def load_rows(data: DataArguments) -> rows_io.Rows:
    """The training rows, every one checked (:func:`qmiss.data.load_rows`); the built-in problems without
    ``--data_path``.

    Raises:
        InputError: see :func:`qmiss.data.load_rows`.
    """
    fields = tuple(data.dataset_field) if data.dataset_field else None
    if data.data_path is None:
        problems = arithmetic_problems(data.demo_train_size, seed=0)
        return rows_io.Rows(datasets.Dataset.from_list(problems), "pairs",
                            [f"built-in problem {i + 1}" for i in range(len(problems))], "built-in problems")
    return rows_io.load_rows(data.data_path, data.dataset_split, fields)


def prompt_text(tokenizer, query: str, data: DataArguments) -> str:
    """A query as training prompts it: in ``--prompt_template``, or as a user turn of the chat template."""
    if data.chat_template:
        try:
            return chat_prompt(tokenizer, query)
        except ChatTemplateError as exc:
            raise InputError(f"--chat_template: {exc}") from None
    return data.prompt_template.format(query=query)


def encode_row(encoder: Encoder, row: dict, kind: str, data: DataArguments) -> dict[str, list[int]]:
    """One row's ``input_ids`` and ``labels`` (:class:`qmiss.encode.Encoder`'s rules)."""
    if kind == "conversations":
        return encoder.conversation(row["messages"])
    if data.chat_template:
        return encoder.conversation([{"role": "user", "content": row["query"]},
                                     {"role": "assistant", "content": row["response"]}])
    return encoder.pair(data.prompt_template.format(query=row["query"]), row["response"])


def encode(tokenizer, query: str, response: str, data: DataArguments) -> dict[str, list[int]]:
    """One pair encoded as qmiss-train encodes it: prompt masked, the tokenizer's BOS and EOS, truncated."""
    return encode_row(Encoder(tokenizer, data.model_max_length), {"query": query, "response": response}, "pairs",
                      data)


def encode_rows(rows: rows_io.Rows, tokenizer, data: DataArguments):
    """Every row as ``input_ids``/``labels`` (a ``datasets.Dataset``), checked before any model weight is loaded.

    Rows left with nothing to learn by ``--model_max_length`` are dropped with a warning naming them.

    Raises:
        InputError: conversations the chat template cannot render or mark (the first few by file and row).
    """
    encoder = Encoder(tokenizer, data.model_max_length)
    encoded: dict[str, list] = {"input_ids": [], "labels": []}
    bad, empty = [], []
    for i, row in enumerate(rows.dataset):
        try:
            out = encode_row(encoder, row, rows.kind, data)
        except ChatTemplateError as exc:
            bad.append(f"{rows.where[i]}: {exc}")
            continue
        if all(label == IGNORE for label in out["labels"][1:]):
            empty.append(rows.where[i])
            continue
        encoded["input_ids"].append(out["input_ids"])
        encoded["labels"].append(out["labels"])
    if bad:
        more = "; …" if len(bad) > rows_io.SHOWN else ""
        raise InputError(f"--data_path {rows.source}: {len(bad)} of {len(rows.where)} rows cannot go through the "
                         f"tokenizer's chat template: {'; '.join(bad[:rows_io.SHOWN])}{more}")
    if empty:
        warnings.warn(f"{len(empty)} of {len(rows.where)} rows have no response token left within "
                      f"--model_max_length {data.model_max_length} ({few(empty)}); they are skipped — raise "
                      "--model_max_length to keep them")
    if not encoded["input_ids"]:
        raise InputError(f"--model_max_length {data.model_max_length}: no row keeps a response token; raise it")
    return datasets.Dataset.from_dict(encoded)


# --- model ----------------------------------------------------------------------------------------------------


def device_map_for(device: torch.device) -> Union[str, dict[str, int]]:
    """transformers' ``device_map`` that puts the whole model on ``device``: this process's own GPU under
    torchrun / accelerate (rank k on ``cuda:k`` of its node), or the CPU."""
    return {"": device.index or 0} if device.type == "cuda" else "cpu"


def _qmiss_settings(model_args: ModelArguments) -> dict:
    """prepare_qmiss's arguments from the model flags."""
    bits = BITS[model_args.bits]
    settings = dict(r=model_args.miss_r, bits=bits if isinstance(bits, int) else None, mini_r=model_args.mini_r,
                    target_modules=model_args.target_modules or "all-linear", dropout=model_args.miss_dropout,
                    quant_type=model_args.quant_type, double_quant=model_args.double_quant,
                    chunked_loss=model_args.chunked_loss,
                    loss_chunk_bytes=None if model_args.loss_chunk_mib is None else model_args.loss_chunk_mib * 2**20,
                    offload_activations=model_args.offload_activations,
                    embeddings_on_host=model_args.embeddings_on_host,
                    rank_pattern=parse_rank_pattern(model_args.rank_pattern) if model_args.rank_pattern else None)
    if model_args.mode is not None:
        return {**settings, "mode": model_args.mode}
    return {**settings, "mode": mode_from_init_weights(model_args.init_weights)}


def check_model_args(model_args: ModelArguments) -> str:
    """Check the model flags, and r / mini_r against the model's layer shapes (read from its config, built on
    the meta device), before any weight is loaded; returns the model's folder or hub id.

    Raises:
        InputError: a flag out of range, a model path that does not exist (at once, no hub request), a model
            that cannot be found, or shapes the settings do not fit; each names the flag as typed.
    """
    if model_args.bits not in BITS:
        raise InputError(f"--bits {model_args.bits!r} is not one of {list(BITS)}")
    if model_args.loss_chunk_mib is not None and model_args.loss_chunk_mib <= 0:
        raise InputError(f"--loss_chunk_mib {model_args.loss_chunk_mib} must be a positive number of MiB, e.g. 64")
    name = model_args.base_model_name_or_path
    if name is not None:
        check_local_path(name, "--base_model_name_or_path")
    path = name or str(smollm2_path())
    with spelled_as(FLAGS):
        config = QMissConfig(**_qmiss_settings(model_args))
        hf_config = load_hf_config(path, what="--base_model_name_or_path")
        meta = meta_model(hf_config)
        check_long_context(meta, check_targets(meta, config), config.chunked_loss, config.loss_chunk_bytes,
                           config.embeddings_on_host)
    return path


def tokenizer_for(path: str):
    """The model's tokenizer (read from a GGUF file's header, without converting it), with a pad token.

    Raises:
        MissingPathError: the model cannot be found.
    """
    with hub_access():
        try:
            tokenizer = load_tokenizer(path)
        except OSError as exc:
            raise MissingPathError(f"--base_model_name_or_path {path}: could not be loaded ({exc})") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def fsdp_version(train_args: TrainingArguments) -> Optional[int]:
    """The FSDP version this run will shard with, None without FSDP: ``accelerate launch --use_fsdp`` (its
    environment: ``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, 1 by default) or the Trainer's ``--fsdp`` flag
    (``fsdp_config``'s ``version``, 2 by default in transformers 5)."""
    if train_args.fsdp:
        return int((train_args.fsdp_config or {}).get("version", 2))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def check_fsdp(model_args: ModelArguments, train_args: TrainingArguments) -> Optional[int]:
    """Refuse, before anything loads, the FSDP runs that cannot work; returns :func:`fsdp_version`.

    Raises:
        InputError: FSDP on the CPU (accelerate shards only on accelerators: on the CPU its plugin refuses
            ``sync_module_states``, or the ranks silently run DDP), or 8-bit weights under FSDP (FSDP1 cannot
            flatten int8 tensors; FSDP2 hands the layer a plain parameter where bitsandbytes' 8-bit forward reads
            its ``Int8Params``' ``CB``/``SCB``).
    """
    version = fsdp_version(train_args)
    if version is None:
        return None
    if train_args.device.type == "cpu":
        raise InputError(
            f"FSDP (version {version}) with --use_cpu: accelerate shards only on GPUs; on the CPU drop --use_fsdp / "
            "--fsdp and launch with --multi_gpu (DDP over gloo), or run on GPUs")
    if BITS[model_args.bits] == 8:
        raise InputError(
            f"--bits 8 under FSDP{version}: bitsandbytes' 8-bit layers cannot be sharded (FSDP1 cannot flatten int8 "
            "weights; FSDP2 replaces their Int8Params, whose row scales the 8-bit forward reads); use --bits 4, or "
            "DDP (drop --use_fsdp) if the 8-bit model fits each GPU")
    return version


def load_model(model_args: ModelArguments, device: torch.device, path: Optional[str] = None,
               fsdp: Optional[int] = None):
    """The base model (4/8-bit through BitsAndBytesConfig, or 16/32-bit) made a qmiss model.

    Args:
        model_args: the model flags.
        device: where this process trains (``TrainingArguments.device``: ``cuda:LOCAL_RANK`` under a launcher).
        path: what :func:`check_model_args` returned; it is called here when not given. A GGUF file is converted
            once into the cache (:func:`qmiss.gguf_file.converted_folder`) and loaded from there.
        fsdp: the FSDP version the run shards with (:func:`check_fsdp`). Under FSDP1, 4-bit weights are stored in
            the compute dtype (``bnb_4bit_quant_storage``, as QLoRA with FSDP needs), so FSDP1 can flatten them
            with the other frozen tensors of a decoder layer (see :mod:`qmiss.fsdp`).
    """
    path = path or check_model_args(model_args)
    if is_gguf(path):
        path = str(converted_folder(path))
    compute = default_compute_dtype(device)  # the model's dtype and bitsandbytes' compute dtype
    bits = BITS[model_args.bits]
    kwargs: dict = {"dtype": compute if isinstance(bits, int) else bits}
    if isinstance(bits, int):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type=model_args.quant_type,
            bnb_4bit_use_double_quant=model_args.double_quant, bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute if fsdp == 1 else torch.uint8)
    kwargs["device_map"] = device_map_for(device)
    with hub_access():
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as exc:
            raise MissingPathError(f"--base_model_name_or_path {path}: could not be loaded ({exc})") from exc
    with spelled_as(FLAGS):
        model = prepare_qmiss(model, **_qmiss_settings(model_args))
    model.qmiss_config.base_model_name_or_path = model_args.base_model_name_or_path or "SmolLM2-135M-Instruct"
    return model


def resolve_resume(resume: Optional[str], output_dir: str) -> Optional[str]:
    """``--resume_from_checkpoint``: a folder (which must be complete), or "last"/"true" for the newest complete one.

    Raises:
        InputError: no complete checkpoint, or the named one is missing or incomplete.
    """
    if resume is None or str(resume).lower() in ("", "false", "none"):
        return None
    if str(resume).lower() in ("last", "true"):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise MissingPathError(f"--resume_from_checkpoint {resume}: no complete checkpoint in {output_dir}")
        return found
    check_local_path(resume, "--resume_from_checkpoint")
    if not (Path(resume) / COMPLETE_MARKER).is_file():
        raise InputError(f"--resume_from_checkpoint {resume}: the checkpoint is incomplete or not a qmiss-train "
                         f"checkpoint; use 'last' to pick the newest complete one in {output_dir}")
    return resume


# --- the command ----------------------------------------------------------------------------------------------


EPILOG = ("Errors in the input (flags, paths, data) print one line and exit with status 2; --debug (or QMISS_DEBUG=1) "
          "shows their traceback.")
ARGUMENTS = (ModelArguments, DataArguments, QMissTrainingArguments)
#: flags of PEFT / TRL / axolotl recipes, and what qmiss-train calls them (or why it has none).
HABITS = {
    "lora_r": "--miss_r", "r": "--miss_r", "rank": "--miss_r", "lora_rank": "--miss_r",
    "lora_dropout": "--miss_dropout", "lora_target_modules": "--target_modules",
    "model_name_or_path": "--base_model_name_or_path", "model_name": "--base_model_name_or_path",
    "base_model": "--base_model_name_or_path", "dataset_name": "--data_path", "dataset": "--data_path",
    "max_seq_length": "--model_max_length", "max_length": "--model_max_length", "sequence_len": "--model_max_length",
    "load_in_4bit": "--bits 4", "load_in_8bit": "--bits 8", "bnb_4bit_quant_type": "--quant_type",
    "lora_alpha": "MiSS has no alpha (its update is not scaled): drop the flag",
}


class _Parser(HfArgumentParser):
    """transformers' parser whose errors are :class:`InputError` (one line, exit status 2), not usage text."""

    def error(self, message: str) -> None:  # argparse's documented override point; must not return
        raise InputError(message)


def _parser() -> _Parser:
    return _Parser(ARGUMENTS, epilog=EPILOG)


def _flag_names() -> list[str]:
    """Every flag the parser knows, in the spellings HfArgumentParser gives them (``--a_b``, ``--a-b``, ``--no_a``)."""
    names = []
    for arguments in ARGUMENTS:
        for f in dataclasses.fields(arguments):
            if f.init:
                names += [f"--{f.name}", f"--{f.name.replace('_', '-')}"]
                names += [f"--no_{f.name}"] if f.default is True else []
    return list(dict.fromkeys(names))


def _unknown_flag(remaining: list[str]) -> InputError:
    """The error for arguments no flag takes: the first unknown flag and the closest known one."""
    flag = next((a for a in remaining if a.startswith("-")), remaining[0])
    name = flag.split("=")[0]
    habit = HABITS.get(name.lstrip("-").replace("-", "_"))
    if habit is not None:
        hint = f"; qmiss-train's flag for it is {habit}" if habit.startswith("--") else f"; {habit}"
    else:
        close = difflib.get_close_matches(name, _flag_names(), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; qmiss-train --help lists the flags"
    what = f"unknown flag {name}" if name.startswith("-") else f"unexpected argument {name!r} (a value without a flag)"
    return InputError(f"{what}{hint}")


def given_flags(argv: list[str]) -> set[str]:
    """The settings ``argv`` sets, by their field names, however they were spelled: ``--learning-rate``,
    ``--learning_rate=1e-3``, an unambiguous prefix (``--learning_rat``) and ``--no_x`` all count, as argparse
    reads them.

    Raises:
        InputError: an unknown flag (with the closest known one), an ambiguous prefix or a bad value.
    """
    probe, unset = _parser(), object()
    # every default replaced by one marker: what argparse sets to anything else is what the user gave
    probe.set_defaults(**{f.name: unset for a in ARGUMENTS for f in dataclasses.fields(a) if f.init})
    namespace, remaining = probe.parse_known_args(argv)
    if remaining:
        raise _unknown_flag(remaining)
    return {name for name, value in vars(namespace).items() if value is not unset}


def parse_args(argv: Optional[list[str]] = None) -> tuple[ModelArguments, DataArguments, QMissTrainingArguments]:
    """The three flag groups (``--debug`` is dropped: :func:`main` reads it). Without a model or data flag this is
    the built-in demo, whose recipe (``DEMO_DEFAULTS``) fills the flags the user did not give.

    Raises:
        InputError: an unknown or ambiguous flag, a bad value, or a combination TrainingArguments refuses.
    """
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--debug"]
    parser = _parser()
    if "--help" in argv or "-h" in argv:
        parser.parse_args_into_dataclasses(args=argv)  # prints the help and exits
    given = given_flags(argv)
    if "base_model_name_or_path" not in given and "data_path" not in given:  # the built-in demo
        parser.set_defaults(**{k: v for k, v in DEMO_DEFAULTS.items() if k not in given})
    try:
        model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as exc:  # TrainingArguments.__post_init__: e.g. --bf16 where bf16 is not supported
        raise InputError(str(exc)) from exc
    if "dataloader_pin_memory" not in given and train_args.device.type != "cuda":
        train_args.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns on every CPU run
    return model_args, data_args, train_args


def _peak_memory_mb(on_cuda: bool) -> float:
    if on_cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def collator_for(tokenizer, data: DataArguments):
    """Packed sequences (:class:`qmiss.packing.PackedCollator`), or rows padded to each batch's longest."""
    if data.packing:
        return PackedCollator(tokenizer.pad_token_id)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)


def run(argv: Optional[list[str]] = None, callbacks: Optional[list] = None) -> dict:
    """Run ``qmiss-train`` with ``argv`` (and extra Trainer ``callbacks``); returns the summary it writes
    to ``<output_dir>/summary.json``."""
    model_args, data_args, train_args = parse_args(argv)
    demo = model_args.base_model_name_or_path is None and data_args.data_path is None
    device = train_args.device  # cuda:LOCAL_RANK under torchrun / accelerate, the CPU with --use_cpu
    on_cuda = device.type == "cuda"
    torch.manual_seed(train_args.seed)
    start = time.time()
    # everything the user typed is checked before the model loads: paths first (a missing one fails at once,
    # with no hub request), then the flags against the model's layer shapes, then every data row, then every row
    # through the tokenizer (its chat template)
    check_output_dir(train_args.output_dir)
    if data_args.data_path is not None:
        check_local_path(data_args.data_path, "--data_path")
    if "{query}" not in data_args.prompt_template and not data_args.chat_template:
        raise InputError(f"--prompt_template {data_args.prompt_template!r} has no {{query}}: the query would be lost")
    path = check_model_args(model_args)
    fsdp = check_fsdp(model_args, train_args)
    rows = load_rows(data_args)
    resume = resolve_resume(train_args.resume_from_checkpoint, train_args.output_dir)
    tokenizer = tokenizer_for(path)
    dataset = encode_rows(rows, tokenizer, data_args)
    tokens = sum(len(ids) for ids in dataset["input_ids"])
    if data_args.packing:
        dataset = pack(dataset, data_args.model_max_length)
    model = load_model(model_args, device, path, fsdp)
    trainable, total = trainable_parameters(model)

    held_out = arithmetic_problems(data_args.demo_eval_size, seed=1) if demo else []
    prompts = [prompt_text(tokenizer, row["query"], data_args) for row in held_out]
    answers = [row["response"] for row in held_out]
    before = held_out_accuracy(model, tokenizer, prompts, answers, desc="held-out accuracy, before") if demo else None

    train_args.remove_unused_columns = False
    trainer = QMissTrainer(model=model, args=train_args, train_dataset=dataset, processing_class=tokenizer,
                           data_collator=collator_for(tokenizer, data_args), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()

    after = held_out_accuracy(model, tokenizer, prompts, answers, desc="held-out accuracy, after") if demo else None
    summary = {
        "trainable_params": trainable, "all_params": total, "steps": trainer.state.global_step,
        "seconds": round(time.time() - start, 1), "peak_memory_mb": round(_peak_memory_mb(on_cuda), 1),
        "peak_memory_kind": "cuda max_memory_allocated" if on_cuda else "process peak RSS",
        "accuracy_before": before, "accuracy_after": after, "adapter": str(train_args.output_dir),
        "chunked_loss": getattr(model, "qmiss_chunked_loss", None) is not None,
        "rows": rows.kind, "row_count": len(rows.where), "row_tokens": tokens, "packing": data_args.packing,
        "sequences": len(dataset),
    }
    out = Path(train_args.output_dir)
    if not trainer.is_world_process_zero():  # under torchrun / accelerate launch, rank 0 writes and reports
        return summary
    out.mkdir(parents=True, exist_ok=True)
    arguments = {"model": asdict(model_args), "data": {**asdict(data_args), "rows": rows.kind},
                 "training": train_args.to_dict()}
    atomic_write_json(out / "qmiss_train_args.json", arguments)
    atomic_write_json(out / "summary.json", summary)
    accuracy = (f"held-out accuracy {before:.1%} -> {after:.1%} ({len(held_out)} problems) | " if demo else "")
    print(f"qmiss-train: {accuracy}{summary['steps']} steps in {summary['seconds']:.0f}s | peak memory "
          f"{summary['peak_memory_mb'] / 1024:.2f} GiB ({summary['peak_memory_kind']}) | adapter: {out}")
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    """The ``qmiss-train`` console script (and ``qmiss train``): exit status 0, or 2 for an input error."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def train() -> int:
        try:
            run(argv)
        finally:  # under torchrun / accelerate: leave the process group before exit, not in its destructors
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return 0

    return exit_status("qmiss-train", argv, train)


if __name__ == "__main__":
    sys.exit(main())
