"""The GPU's dtype flow, reproduced on the CPU: a bf16 residual stream (qmiss's default) against QLoRA's fp32 norms.

    python benchmarks/bench_dtype_flow.py                 # SmolLM2's first 4 layers, 4-bit, 2×64, checkpointing
    python benchmarks/bench_dtype_flow.py --layers 30 --seq 128

Both variants adapt the same 4-bit SmolLM2 weights with the same (random, non-zero) adapters and
run a bf16 model with bf16 compute under ``torch.autocast("cpu", dtype=torch.bfloat16)``, as a
bf16 Trainer step runs on CUDA. It prints, per variant: the dtypes of the decoder layers' inputs,
the bytes of those inputs (what checkpointing keeps per layer), the bytes autograd saves without
checkpointing, the live-tensor peak of a checkpointed step, the median step time over interleaved
steps, the loss against an fp32 run of the same model, and ``plan_memory``'s peak against the measured
one (weights + live peak of the checkpointed step). Then bat's bf16 input-gradient error
against fp64 at 1 and 32 chunks. bf16 matrix products are slow on CPUs in the layout of every
input gradient, so the defaults are small; the ratios are what carries over to a GPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import qmiss  # noqa: E402
from benchmarks.common import MB, Report  # noqa: E402
from qmiss import MissLinear, ops, quant  # noqa: E402
from qmiss.memory import measure_peak, resident_bytes  # noqa: E402
from qmiss.plan import plan_memory  # noqa: E402

VARIANTS = {"bf16 stream (default)": {}, "fp32 norms + head (fp32_norms=True)": {"fp32_norms": True}}


def smollm2_cut(layers: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from qmiss.smollm import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    return model


def prepared(base, dtype: torch.dtype, checkpointing: bool, **kwargs):
    model = qmiss.prepare_qmiss(copy.deepcopy(base).to(dtype), r=64, bits=4, compute_dtype=dtype,
                                gradient_checkpointing=checkpointing, **kwargs)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in qmiss.miss_layers(model):
            layer.miss_block.copy_(torch.randn(layer.miss_block.shape, generator=gen) * 0.002)
    return model.train()


def step_fn(model, ids: torch.Tensor, autocast: bool):
    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    return step


def layer_inputs(model, ids: torch.Tensor) -> tuple[list[str], int]:
    """Decoder-layer input dtypes and their total bytes, from one autocast forward."""
    seen: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        for layer in model.model.layers]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return [str(t.dtype).removeprefix("torch.") for t in seen], sum(t.numel() * t.element_size() for t in seen)


def bat_dx_error(chunks: int, n: int = 1024, r: int = 32, tokens: int = 64) -> float:
    """Relative error of bat's bf16 input gradient against fp64, with the layer cut into ``chunks`` chunks."""
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(n, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, n, generator=gen) * n**-0.5)
    base = quant.quantize_linear(linear, 4)
    budget = 2 * (n // chunks) * n * 2  # two bf16 chunk buffers of n/chunks rows
    layer = MissLinear(base, r=r, mode="bat", compute_dtype=torch.bfloat16, bat_chunk_bytes=budget)
    with torch.no_grad():
        layer.miss_block.copy_(torch.randn(layer.miss_block.shape, generator=gen) * 0.05)
    x = torch.randn(tokens, n, generator=gen).to(torch.bfloat16).requires_grad_()
    g = torch.randn(tokens, n, generator=gen).to(torch.bfloat16)
    layer(x).backward(g)
    w64 = quant.dequantize(base, torch.float64)
    reference = g.double() @ ops.bat_weight(w64, layer.miss_block.detach().double())
    return ((x.grad.double() - reference).norm() / reference.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="SmolLM2's first N decoder layers")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_dtype_flow.md"))
    args = parser.parse_args()

    report = Report(args.out)
    report.add(f"# bench_dtype_flow: `python {' '.join(sys.argv)}`\n")
    report.add(f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: "
               f"SmolLM2-135M-Instruct's first {args.layers} decoder layers, 4-bit nf4, MiSS default r=64 with "
               f"non-zero adapters, batch {args.batch}×{args.seq}; bf16 model, bf16 compute, CPU bf16 autocast\n")
    base = smollm2_cut(args.layers, torch.float32)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    reference = step_fn(prepared(base, torch.float32, False), ids, autocast=False)()

    rows = {}
    for name, kwargs in VARIANTS.items():
        plain, ckpt = prepared(base, torch.bfloat16, False, **kwargs), prepared(base, torch.bfloat16, True, **kwargs)
        dtypes, input_bytes = layer_inputs(plain, ids)
        frozen = [p for p in plain.parameters()]
        saved = measure_peak(step_fn(plain, ids, True), exclude=frozen).saved_bytes
        step_fn(ckpt, ids, True)()  # warm-up
        peak = measure_peak(step_fn(ckpt, ids, True))
        plan = plan_memory(ckpt.config, bits=4, r=64, batch_size=args.batch, seq_len=args.seq, optimizer="sgd",
                           compute_dtype=torch.bfloat16, **kwargs)  # the step has no optimizer state
        planned = plan.peak_bytes / (resident_bytes(ckpt) + peak.peak_bytes)
        rows[name] = dict(dtypes=dtypes, input_bytes=input_bytes, saved=saved, peak=peak.peak_bytes,
                          loss=peak.result, step=step_fn(ckpt, ids, True), times=[], planned=planned)
    for _ in range(args.rounds):  # interleaved: drift of a shared machine falls on both alike
        for row in rows.values():
            start = time.perf_counter()
            row["step"]()
            row["times"].append(time.perf_counter() - start)

    first = next(iter(rows.values()))
    lines = ["| variant | decoder-layer inputs | layer-input bytes | saved for backward (no ckpt) | live peak (ckpt) "
             "| step time (ckpt) | loss | loss vs fp32 | plan_memory ÷ measured (ckpt) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        median = statistics.median(row["times"])
        lines.append(
            f"| {name} | {', '.join(row['dtypes'])} | {row['input_bytes'] / MB:.2f} MB "
            f"({row['input_bytes'] / first['input_bytes']:.2f}×) | {row['saved'] / MB:.1f} MB "
            f"({row['saved'] / first['saved']:.2f}×) | {row['peak'] / MB:.1f} MB ({row['peak'] / first['peak']:.2f}×) "
            f"| {median:.2f} s ({median / statistics.median(first['times']):.2f}×) | {row['loss']:.5f} "
            f"| {abs(row['loss'] - reference) / reference:.1e} | {row['planned']:.3f} |")
    report.add("\n".join(lines) + f"\n\nfp32 run of the same model and adapters: loss {reference:.5f}. Ratios are "
               f"to the first row; step times are medians of {args.rounds} interleaved steps.\n")

    one, many = bat_dx_error(1), bat_dx_error(32)
    report.add("bat's bf16 input gradient against fp64 (4-bit 1024→1024, r=32, 64 tokens; the fp64 reference uses the "
               f"same dequantized weight):\n\n| chunks | relative error |\n|---:|---:|\n| 1 | {one:.2e} |\n"
               f"| 32 | {many:.2e} |\n\n32 chunks ÷ 1 chunk: {many / one:.3f} (target ≤ 1.1)\n")


if __name__ == "__main__":
    main()
