"""Peak memory of export_merged on SmolLM2-135M-Instruct (4-bit): the layer-by-layer export vs the model.

    python benchmarks/bench_export.py

For each mode: RSS before the export (quantized model with adapters loaded), process peak RSS during
`qmiss.export_merged(..., dtype=bf16)` (VmHWM reset just before) with one 2 GB shard and with 100 MB
shards, the live-tensor peak of tensors the export creates, and the size of what it wrote. For contrast, the same figures for
`merge_and_unload` + `save_pretrained`, which holds the whole merged model at once.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import MB, Report, step_rss_mb  # noqa: E402

import qmiss  # noqa: E402
from qmiss.memory import measure_peak  # noqa: E402
from qmiss.smollm import smollm2_path  # noqa: E402


def _prepared(mode: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    model = qmiss.prepare_qmiss(model, r=64, bits=4, mode=mode, mini_r=64 if mode == "mini" else None)
    with torch.no_grad():
        for _, layer in qmiss.miss_layers(model):
            layer.miss_block.normal_(0, 0.01)
    return model


def _tensor_mb(model) -> float:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / MB


def main() -> None:
    out = Path(__file__).parent / "results" / "bench_export.md"
    report = Report(str(out))
    report.add(f"# bench_export: `python {' '.join(sys.argv)}`\n\nSmolLM2-135M-Instruct, 4-bit nf4, r=64, "
               f"export dtype bf16, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    report.add("| mode | method | model tensors MB | peak RSS growth MB | live-tensor peak MB | written MB | s |\n"
               "|---|---|---:|---:|---:|---:|---:|")
    for mode in ["default", "bat"]:
        for method in ["export_merged", "export_merged 100MB shards", "merge_and_unload + save_pretrained"]:
            model = _prepared(mode)
            model_mb = _tensor_mb(model)
            with tempfile.TemporaryDirectory() as folder:
                if method.startswith("export_merged"):
                    shard = "100MB" if "shards" in method else "2GB"

                    def run():
                        qmiss.export_merged(model, folder, dtype=torch.bfloat16, max_shard_size=shard)
                else:
                    def run():
                        qmiss.merge_and_unload(model, dtype=torch.bfloat16).save_pretrained(folder)
                start = time.perf_counter()
                rss = step_rss_mb(run)
                seconds = time.perf_counter() - start
                written = sum(p.stat().st_size for p in Path(folder).iterdir()) / MB
                live_mb = float("nan")
                if method.startswith("export_merged"):  # the model is unchanged by the export: measure again
                    live_mb = measure_peak(run).peak_bytes / MB
            report.add(f"| {mode} | {method} | {model_mb:.0f} | {rss:.0f} | {live_mb:.0f} | {written:.0f} | "
                       f"{seconds:.1f} |")


if __name__ == "__main__":
    main()
