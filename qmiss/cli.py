"""The ``qmiss`` command: ``qmiss plan ...`` (memory planner) and ``qmiss train ...`` (= ``qmiss-train``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from qmiss import train
from qmiss.config import DEFAULTS, MODES
from qmiss.inputs import InputError, exit_status, parse_rank_pattern, spelled_as
from qmiss.plan import OPTIMIZERS, MiB, plan_memory

USAGE = """usage: qmiss {plan,train} ...

  qmiss plan --config CONFIG [--bits 4] [--r 64] [--gpu-gb 8] ...   GPU memory of a fine-tune, per item
  qmiss train [qmiss-train flags]                                    fine-tune (the same as qmiss-train)

'qmiss plan --help' and 'qmiss train --help' list the flags."""


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else None
    if command == "plan":
        return plan_command(argv)
    if command == "train":
        return train.main(argv) or 0
    print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
    return 0 if command in ("-h", "--help") else 2


# --- qmiss plan ---------------------------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: plan_memory's arguments and the `qmiss plan` flags that set them, for error messages.
FLAGS = {"config": "--config", "r": "--r", "mini_r": "--mini_r", "mode": "--mode", "bits": "--bits",
         "batch_size": "--batch", "seq_len": "--seq", "optimizer": "--optimizer",
         "rank_pattern": "--rank-pattern"}


def plan_parser() -> argparse.ArgumentParser:
    """``qmiss plan``'s flags; the adapter's defaults are :class:`~qmiss.QMissConfig`'s."""
    parser = argparse.ArgumentParser(prog="qmiss plan", description="Plan the GPU memory of a qmiss fine-tune.")
    parser.add_argument("--config", required=True,
                        help="config.json, a model folder, a GGUF file, or a hub model id")
    parser.add_argument("--bits", default="4", choices=["4", "8", "16"], help="base quantization (16: none)")
    parser.add_argument("--r", type=int, default=DEFAULTS.r)
    parser.add_argument("--mode", default=DEFAULTS.mode, choices=list(MODES))
    parser.add_argument("--mini_r", type=int, default=None)
    parser.add_argument("--rank-pattern", "--rank_pattern", dest="rank_pattern", default=None,
                        help="per-module r as qmiss-train takes it: key=r pairs (experts=16) or a JSON object")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--no-checkpointing", action="store_true", help="plan without gradient checkpointing")
    parser.add_argument("--optimizer", default="paged_adamw_8bit", help=f"one of {', '.join(sorted(OPTIMIZERS))}")
    parser.add_argument("--compute-dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--chunked-loss", action="store_true",
                        help="the loss chunk by chunk of tokens, no full logits (qmiss-train's default)")
    parser.add_argument("--loss-chunk-mib", type=int, default=None,
                        help="chunked loss: MiB per chunk (default: chunks as large as the head)")
    parser.add_argument("--offload-activations", action="store_true",
                        help="checkpointed layer inputs wait in pinned host memory until backward")
    parser.add_argument("--embeddings-on-host", action="store_true",
                        help="the input embedding table stays in host memory (not for tied embeddings)")
    parser.add_argument("--packing", action="store_true",
                        help="--batch packed sequences of --seq tokens (qmiss-train's default): SDPA's block-diagonal "
                             "mask")
    parser.add_argument("--gpu-gib", "--gpu-gb", dest="gpu_gib", type=float, default=None,
                        help="say whether it fits a card of this many GiB (an '8 GB' card has 8 GiB); exit status 1 "
                             "if not")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error "
                        "(also QMISS_DEBUG=1); without it an input error prints one line and exits with status 2")
    return parser


def plan_command(argv: list[str]) -> int:
    """``qmiss plan``: exit status 0, 1 if ``--gpu-gib`` is given and the plan does not fit, 2 for an input error."""
    args = plan_parser().parse_args(argv)
    return exit_status("qmiss plan", argv, lambda: _show_plan(args))


def _show_plan(args: argparse.Namespace) -> int:
    if args.loss_chunk_mib is not None and args.loss_chunk_mib <= 0:
        raise InputError(f"--loss-chunk-mib {args.loss_chunk_mib} must be a positive number of MiB, e.g. 64")
    with spelled_as(FLAGS):
        plan = plan_memory(args.config, bits=None if args.bits == "16" else int(args.bits), r=args.r, mode=args.mode,
                           mini_r=args.mini_r, batch_size=args.batch, seq_len=args.seq,
                           gradient_checkpointing=not args.no_checkpointing, optimizer=args.optimizer,
                           compute_dtype=DTYPES[args.compute_dtype], chunked_loss=args.chunked_loss,
                           loss_chunk_bytes=None if args.loss_chunk_mib is None else args.loss_chunk_mib * MiB,
                           offload_activations=args.offload_activations,
                           embeddings_on_host=args.embeddings_on_host, packing=args.packing,
                           rank_pattern=parse_rank_pattern(args.rank_pattern, "--rank-pattern")
                           if args.rank_pattern else None)
    if args.json:
        print(json.dumps({"peak_bytes": plan.peak_bytes, "peak_phase": plan.peak_phase, "host_bytes": plan.host_bytes,
                          "items": plan.items,
                          "settings": plan.settings, "cards": plan.cards()}, indent=2))
    else:
        print(plan.table())
    if args.gpu_gib is not None:
        print(plan.verdict(args.gpu_gib))
        return 0 if plan.fits(args.gpu_gib) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
