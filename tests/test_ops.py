"""ops.py against naive references written straight from DESIGN.md's formulas."""

from __future__ import annotations

import pytest
import torch

from qmiss import ops
from tests.helpers import ref_bat_delta, ref_shard_sum


@pytest.mark.parametrize("n_in,r", [(64, 16), (70, 16), (5, 8), (48, 48)], ids=["aligned", "ragged", "r>in-pad", "one-shard"])
def test_shard_sum_matches_zero_padding(n_in: int, r: int) -> None:
    x = torch.randn(3, 4, n_in, dtype=torch.float64)
    torch.testing.assert_close(ops.shard_sum(x, r), ref_shard_sum(x, r), rtol=0, atol=1e-12)


def test_tile_mini_repeats_along_out() -> None:
    block = torch.randn(4, 3)
    tiled = ops.tile_mini(block, 12)
    assert tiled.shape == (4, 12)
    for o in range(12):
        torch.testing.assert_close(tiled[:, o], block[:, o % 3])
    with pytest.raises(ValueError, match="mini_r=3"):
        ops.tile_mini(block, 10)


@pytest.mark.parametrize("n_in", [64, 70], ids=["aligned", "ragged"])
def test_miss_delta_weight_is_the_shard_update(n_in: int) -> None:
    block = torch.randn(16, 24, dtype=torch.float64)
    x = torch.randn(5, n_in, dtype=torch.float64)
    delta = ops.miss_delta_weight(block, n_in)
    assert delta.shape == (24, n_in)
    torch.testing.assert_close(x @ delta.t(), ref_shard_sum(x, 16) @ block, rtol=0, atol=1e-12)


def test_bat_weight_and_delta_match_blockwise_reference() -> None:
    weight = torch.randn(32, 48, dtype=torch.float64)
    block = torch.randn(4, 8, 8, dtype=torch.float64)
    ref = ref_bat_delta(weight, block)
    torch.testing.assert_close(ops.bat_delta_weight(weight, block), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(ops.bat_weight(weight, block), weight + ref, rtol=0, atol=1e-12)


def test_bat_block_grad_matches_autograd() -> None:
    weight = torch.randn(32, 48, dtype=torch.float64)
    block = torch.randn(4, 8, 8, dtype=torch.float64, requires_grad=True)
    grad_w = torch.randn(32, 48, dtype=torch.float64)
    (ref_bat_delta(weight, block) * grad_w).sum().backward()
    torch.testing.assert_close(ops.bat_block_grad(weight, grad_w, 8), block.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk", [8, 24, 40], ids=["chunk=r", "chunk-not-dividing-out", "one-chunk"])
def test_bat_linear_forward_matches_reference(chunk: int) -> None:
    weight = torch.randn(40, 32, dtype=torch.float64)
    block = torch.randn(5, 8, 8, dtype=torch.float64)
    bias = torch.randn(40, dtype=torch.float64)
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    y = ops.bat_linear(x, block, bias, lambda a, b: weight[a:b], 40, chunk)
    torch.testing.assert_close(y, x @ (weight + ref_bat_delta(weight, block)).t() + bias, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [8, 24], ids=["chunk=r", "chunk-not-dividing-out"])
def test_bat_linear_gradcheck(chunk: int) -> None:
    weight = torch.randn(40, 16, dtype=torch.float64)
    rows = lambda a, b: weight[a:b]  # noqa: E731
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    block = (0.1 * torch.randn(5, 8, 8, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b, c: ops.bat_linear(x, b, c, rows, 40, chunk), (x, block, bias))


def test_chunk_rows_respects_r_alignment_and_budget() -> None:
    assert ops.chunk_rows(4096, 4096, 64, 1, 128 * 2**20, 4) == 4096
    assert ops.chunk_rows(4096, 4096, 64, 1, 64 * 2**20, 4) == 2048  # W_c and W'_c: two chunks in the budget
    rows = ops.chunk_rows(11008, 4096, 64, 1, 8 * 2**20, 2)
    assert rows % 64 == 0 and 2 * rows * 4096 * 2 <= 8 * 2**20
    assert ops.chunk_rows(1000, 4096, 8, 1, 1, 4) == 8  # never below one block row
    assert ops.chunk_rows(4096, 576, 64, 1 * 64 // 64, 10**9, 4) == 4096
    assert ops.chunk_rows(640, 96, 32, 2, 1, 4) == 32  # lcm(r, alignment)
    # few-token path: W_c and v (N/r of it), no W'_c — nearly twice the rows in the same budget
    assert ops.chunk_rows(4096, 4096, 64, 1, 64 * 2**20, 4, tokens=1) == 4032
    assert ops.chunk_rows(4096, 4096, 64, 1, 64 * 2**20, 4, tokens=63) == 2048
