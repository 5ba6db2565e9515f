"""benchmarks/bench_gpu.py's measuring functions on the CPU, on tiny shapes, so that they work when a GPU comes.

bench_gpu.py itself measures nothing without CUDA; its loss comparison and its FSDP2 route take a device, and
here run on the CPU (the live-tensor peak of ``qmiss.memory.measure_peak`` standing in for the allocator's).
"""

from __future__ import annotations

import math

import pytest
import torch

import qmiss
from benchmarks import bench_gpu
from tests.helpers import tiny_llama


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compare_losses_agree_and_report_numbers(dtype: torch.dtype) -> None:
    result = bench_gpu.compare_losses("cpu", vocab=4096, hidden=64, tokens=256, dtype=dtype, rounds=2)
    # the same math: fp32 exact to rounding; bf16 products in bf16 in both, softmax in fp32 in both
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert result.loss_rel_diff < tolerance and result.grad_rel_diff < tolerance * 10
    assert math.isclose(result.losses["chunked"], math.log(4096), rel_tol=0.05)  # tiny logits: near uniform
    # the automatic rule: a chunk as large as the (4096, 64) head, so several chunks over 256 tokens
    assert result.chunk_rows == qmiss.loss.auto_chunk_tokens(4096, 64, dtype.itemsize) < 256
    for name in bench_gpu.LOSSES:
        assert len(result.times[name]) == 2 and all(t > 0 for t in result.times[name])
        assert result.tokens_per_s(name) > 0
    # transformers' path holds the (256, 4096) fp32 logits and their gradient; the chunked one a chunk of each
    assert 0 < result.peaks["chunked"] < result.peaks["transformers"] / 2
    assert result.peaks["transformers"] >= 256 * 4096 * 4
    table = bench_gpu.loss_table([result], rounds=2)
    assert "| 1×256 |" in table and "nan" not in table


def test_fsdp2_steps_in_a_group_of_one() -> None:
    torch.manual_seed(0)
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4, gradient_checkpointing=True).train()
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    expected = model(**batch).loss.item()  # before sharding and before any update
    run = bench_gpu.fsdp2_steps(model, batch, "cpu", "gloo", rounds=2, lr=1e-2)
    assert not torch.distributed.is_initialized()  # the group of one is gone again
    assert run.losses[0] == pytest.approx(expected, rel=1e-6)
    assert len(run.losses) == 4 and all(math.isfinite(loss) for loss in run.losses)
    assert run.losses[-1] < run.losses[0]  # it trains (the same batch every step)
    assert len(run.times) == 2 and all(t > 0 for t in run.times) and run.step_peak > 0
    table = bench_gpu.fsdp_table(run, expected, step_s=run.times[0], step_peak=run.step_peak)
    assert "| FSDP2, qmiss default |" in table
