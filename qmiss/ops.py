"""Pure tensor math of MiSS: no modules, no bitsandbytes.

For a linear layer y = x Wᵀ + b with W of shape (out, in), split the input into
shards of r features, x = [x_0 | x_1 | …] (zero-padded on the right when in % r != 0).

    default ("balance")  y = base(x) + (Σ_j x_j) @ D          D: (r, out)
    mini                 D = D_mini tiled along out            D_mini: (r, mini_r)
    bat                  W'_ij = W_ij (I + B_i) + B_i          B: (out/r, r, r)
                         y = x W'ᵀ + b

    bat_row              W'_ij = W_ij (I + B_j) + B_j          B: (in/r, r, r)
                         y = base(x + z) + tile_out(Σ_j z_j),  z_j = x_j B_jᵀ

W_ij is the r×r block at output rows i·r… and input columns j·r…; bat's B_i is shared
by every block of output row-block i, bat_row's B_j by every block of input column-block j.

bat_row needs no dequantized weight: y_i = Σ_j x_j W'_ijᵀ = Σ_j (x_j + z_j) W_ijᵀ + Σ_j z_j, one
call of the untouched base on a turned input plus an r-wide term repeated along out
(:func:`bat_row_turn`); the base's own backward gives dz, and dB_j = Σ_tokens dz_jᵀ x_j. x is
kept for dB unless it is a product autograd can rebuild (a gated MLP's down input, :func:`product_source`).

For a few tokens bat need not build W': y_i = Σ_j x_j W'_ijᵀ = v_i W_iᵀ + (Σ_j x_j) B_iᵀ with
v_i = [x_j (I + B_i)ᵀ]_j, which is N·out·in flops for the v_i and as many for the products,
against r·out·in + N·out·in for W' (:func:`bat_linear_few_tokens`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

RowDequantizer = Callable[[int, int], torch.Tensor]


def shard_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """Σ_j x_j over the r-wide shards of the last dimension.

    Args:
        x: (..., in).
        r: shard width. If in % r != 0, the tail shard is treated as zero-padded.

    Returns:
        (..., r).
    """
    n_in = x.shape[-1]
    aligned = n_in - n_in % r
    if aligned == n_in:  # no slice: its backward would allocate and zero-fill an x-sized gradient first
        return x.unflatten(-1, (n_in // r, r)).sum(dim=-2)  # (..., in/r, r) -> (..., r)
    s = x[..., :aligned].unflatten(-1, (aligned // r, r)).sum(dim=-2)
    rem = n_in - aligned
    # the padded tail shard adds into the first `rem` positions only (no copy of x)
    return torch.cat([s[..., :rem] + x[..., aligned:], s[..., rem:]], dim=-1)


def tile_mini(block: torch.Tensor, out_features: int) -> torch.Tensor:
    """Expand a mini adapter (r, mini_r) to the default adapter (r, out) it stands for.

    Raises:
        ValueError: if out_features % mini_r != 0.
    """
    mini_r = block.shape[-1]
    if out_features % mini_r:
        raise ValueError(f"out_features={out_features} is not divisible by mini_r={mini_r}")
    return block.repeat(1, out_features // mini_r)  # (r, out)


def miss_delta_weight(block: torch.Tensor, in_features: int) -> torch.Tensor:
    """ΔW of a default adapter D (r, out): ΔW[o, c] = D[c % r, o], shape (out, in)."""
    r, out_features = block.shape
    reps = -(-in_features // r)
    return block.t().repeat(1, reps)[:, :in_features]  # (out, in)


def bat_weight(weight: torch.Tensor, block: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W' = W + ΔW for bat, blockwise W'_ij = W_ij (I + B_i) + B_i.

    Args:
        weight: (rows, in) with rows % r == 0 and in % r == 0; a run of whole row-blocks.
        block: (rows/r, r, r), the B_i of those row-blocks.
        out: optional contiguous buffer with ``weight``'s numel at least; reused to spare an allocation.

    Returns:
        (rows, in): ``out``'s prefix if given, else a new tensor.
    """
    n_blocks, r, _ = block.shape
    n_in = weight.shape[1]
    w = weight.view(n_blocks, n_in, r)  # (nb, r·(in/r), r): the r-wide rows of every W_ij of row-block i
    eye = torch.eye(r, dtype=block.dtype, device=block.device)
    if out is not None:
        out = out.view(-1)[: weight.numel()].view(n_blocks, n_in, r)
    out = torch.bmm(w, block + eye, out=out)  # W_ij (I + B_i), every j in one batched product
    out.view(n_blocks, r, n_in // r, r).add_(block.unsqueeze(2))  # + B_i on every block of row-block i
    return out.view(weight.shape)


def bat_delta_weight(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """ΔW = W' − W for bat (the reference form, W_ij B_i + B_i), shape of ``weight``."""
    n_blocks, r, _ = block.shape
    n_in = weight.shape[1]
    w = weight.view(n_blocks, n_in, r)  # (nb, r·(in/r), r)
    delta = torch.bmm(w, block)
    delta.view(n_blocks, r, n_in // r, r).add_(block.unsqueeze(2))
    return delta.view(weight.shape)


def bat_unmerge(merged: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Invert :func:`bat_weight`: W = (W' − B)(I + B)⁻¹ blockwise, the inverse taken in fp32.

    Args:
        merged: (rows, in) W'.
        block: (rows/r, r, r).

    Returns:
        (rows, in) W in ``merged``'s dtype.
    """
    n_blocks, r, _ = block.shape
    n_in = merged.shape[1]
    eye = torch.eye(r, dtype=torch.float32, device=block.device)
    inverse = torch.linalg.inv(block.float() + eye).to(merged.dtype)  # (nb, r, r)
    shifted = (merged.view(n_blocks, r, n_in // r, r) - block.to(merged.dtype).unsqueeze(2)).view(n_blocks, n_in, r)
    return torch.bmm(shifted, inverse).view(merged.shape)


def bat_block_grad(weight: torch.Tensor, grad_weight: torch.Tensor, r: int) -> torch.Tensor:
    """dL/dB from dL/dW' for a run of row-blocks: dB_i = Σ_j (W_ij + I)ᵀ G_ij.

    Args:
        weight: (rows, in) dequantized base rows W.
        grad_weight: (rows, in) G = dL/dW' for the same rows.
        r: block size.

    Returns:
        (rows/r, r, r).
    """
    rows, n_in = weight.shape
    n_blocks = rows // r
    w = weight.view(n_blocks, n_in, r)  # (nb, r·(in/r), r)
    g = grad_weight.view(n_blocks, n_in, r)
    grad = torch.bmm(w.transpose(1, 2), g)  # Σ_j W_ijᵀ G_ij
    return grad.add_(grad_weight.view(n_blocks, r, n_in // r, r).sum(dim=2))  # + Σ_j G_ij


def bat_row_turn(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """z = [x_j B_jᵀ]_j for bat_row: each r-wide input shard times its own block, shape of ``x``.

    Where a gradient is recorded this is :class:`BatRowTurn`, which keeps x for dB only when x cannot
    be rebuilt from what autograd already keeps (:func:`product_source`).

    Args:
        x: (..., in), in = (in/r)·r.
        block: (in/r, r, r), the B_j.
    """
    if _records_grad(x, block):
        return BatRowTurn.apply(x, block)
    return _turn(x, block)


def _turn(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    n_blocks, r, _ = block.shape
    shards = x.reshape(-1, n_blocks, r).transpose(0, 1)  # (in/r, N, r)
    with torch.autocast(x.device.type, enabled=False):  # dtypes are the caller's choice, as in BatLinear
        z = torch.bmm(shards, block.transpose(1, 2))  # (in/r, N, r): x_j B_jᵀ for every token
    return z.transpose(0, 1).reshape(x.shape)


def product_source(x: torch.Tensor) -> Optional[torch.autograd.graph.Node]:
    """The autograd node of ``x = a * b`` when that node keeps both a and b (both need a gradient), else None.

    A gated MLP's down projection reads h = act(gate) · up; autograd keeps act(gate) and up for the
    product's own backward, so h can be rebuilt from them (one elementwise product, bitwise the same)
    instead of being kept a second time: (tokens, intermediate) bytes per layer.

    None as well under saved-tensor hooks (non-reentrant checkpointing, activation offloading): those may let a
    saved tensor be unpacked only once, by its own node, and checkpointing drops what a layer saves anyway.
    """
    node = x.grad_fn
    if (type(node).__name__ != "MulBackward0" or any(fn is None for fn, _ in node.next_functions)
            or _saved_tensors_hooked()):
        return None
    return node


REPEATABLE_UNPACK = "repeatable_unpack"
"""The attribute a saved-tensor pack hook sets (to True) when its unpack may run more than once for one saved
tensor, as an identity hook's may: :func:`product_source` then goes on under it (qmiss.memory's counters set it)."""


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are active that may unpack once only (torch keeps their stack private; without
    it, assume they are)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True
    hooks = top(True)
    return hooks is not None and not getattr(hooks[0], REPEATABLE_UNPACK, False)


class BatRowTurn(torch.autograd.Function):
    """z = [x_j B_jᵀ]_j with dx_j = dz_j B_j and dB_j = Σ_tokens dz_jᵀ x_j.

    x is needed for dB alone. Where x is a product whose factors autograd keeps anyway
    (:func:`product_source`), backward rebuilds x from them and nothing of x is saved here.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        source = product_source(x) if ctx.needs_input_grad[1] else None
        ctx.source, ctx.x_shape, ctx.x_dtype = source, x.shape, x.dtype
        ctx.save_for_backward(x if source is None and ctx.needs_input_grad[1] else None, block)
        return _turn(x, block)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_z: torch.Tensor):
        x, block = ctx.saved_tensors
        n_blocks, r, _ = block.shape
        dz = grad_z.to(block.dtype).reshape(-1, n_blocks, r).transpose(0, 1)  # (in/r, N, r)
        grad_x = grad_block = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(dz, block).transpose(0, 1).reshape(ctx.x_shape).to(ctx.x_dtype)  # dz_j B_j
        if ctx.needs_input_grad[1]:
            if x is None:  # rebuilt from the product's own saved factors; freed again after dB
                x = ctx.source._saved_self * ctx.source._saved_other
            shards = x.to(block.dtype).reshape(-1, n_blocks, r).transpose(0, 1)  # (in/r, N, r)
            grad_block = torch.bmm(dz.transpose(1, 2), shards)  # dz_jᵀ x_j, (in/r, r, r)
        return grad_x, grad_block


def tile_out(s: torch.Tensor, out_features: int) -> torch.Tensor:
    """An r-vector per row repeated along out: (..., r) -> (..., out), out % r == 0 (a broadcast view)."""
    r = s.shape[-1]
    return s.unsqueeze(-2).expand(*s.shape[:-1], out_features // r, r).reshape(*s.shape[:-1], out_features)


def _per_input_block(weight: torch.Tensor, r: int) -> torch.Tensor:
    """(out, in) -> (in/r, out, r): the r-wide column block j of every row, as bmm's batch j (a strided view)."""
    n_out, n_in = weight.shape
    return weight.view(n_out, n_in // r, r).transpose(0, 1)


def _from_input_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_per_input_block` for a product: (in/r, out, r) -> (out, in), contiguous."""
    n_blocks, n_out, r = blocks.shape
    return blocks.transpose(0, 1).reshape(n_out, n_blocks * r)


def _add_column_blocks(weight: torch.Tensor, block: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """weight[i·r + a, j·r + c] += sign · B_j[a, c] for every row-block i, in place; returns ``weight``."""
    n_blocks, r, _ = block.shape
    weight.view(weight.shape[0] // r, r, n_blocks, r).add_(block.permute(1, 0, 2).to(weight.dtype), alpha=sign)
    return weight


def bat_row_weight(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """W' for bat_row, blockwise W'_ij = W_ij (I + B_j) + B_j; ``weight`` (out, in), ``block`` (in/r, r, r)."""
    r = block.shape[-1]
    eye = torch.eye(r, dtype=block.dtype, device=block.device)
    merged = _from_input_blocks(torch.bmm(_per_input_block(weight, r), block + eye))
    return _add_column_blocks(merged, block)


def bat_row_delta_weight(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """ΔW = W' − W for bat_row (W_ij B_j + B_j), shape of ``weight``."""
    r = block.shape[-1]
    return _add_column_blocks(_from_input_blocks(torch.bmm(_per_input_block(weight, r), block)), block)


def bat_row_unmerge(merged: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Invert :func:`bat_row_weight`: W = (W' − B_j)(I + B_j)⁻¹ per input column-block, the inverse in fp32."""
    r = block.shape[-1]
    eye = torch.eye(r, dtype=torch.float32, device=block.device)
    inverse = torch.linalg.inv(block.float() + eye).to(merged.dtype)  # (in/r, r, r)
    shifted = _add_column_blocks(merged.clone(), block, sign=-1.0)
    return _from_input_blocks(torch.bmm(_per_input_block(shifted, r), inverse))


def chunk_rows(out_features: int, in_features: int, r: int, alignment: int, budget_bytes: int, itemsize: int,
               tokens: Optional[int] = None) -> int:
    """Rows per bat chunk, so that a chunk's transient tensors fit in ``budget_bytes``.

    At any moment :class:`BatLinear` holds two weight-chunk-sized tensors: the
    dequantized rows W_c and W'_c (forward, and backward for dx), or W_c and
    G_c = g_cᵀ x (backward for dB). So a chunk is ``budget / (2 · in · itemsize)``
    rows, rounded down to a multiple of r and of the dequantizer's ``alignment``;
    never less than one such unit, never more than the layer.

    With ``tokens`` (N < r, for :func:`bat_linear_few_tokens`), a chunk holds W_c and the v_i of its
    row-blocks, N/r of W_c's size, and no W'_c: ``budget · r / ((r + N) · in · itemsize)`` rows, nearly
    twice as many in the same bytes. Fewer chunks matter there: a decode step's cost on the CPU is
    largely the per-op waits of its chunks (three multi-threaded ops each).
    """
    unit = r * alignment // _gcd(r, alignment)
    if tokens is None:
        rows = budget_bytes // (2 * in_features * itemsize) // unit * unit
    else:
        rows = budget_bytes * r // ((r + tokens) * in_features * itemsize) // unit * unit
    return min(max(rows, unit), out_features)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


#: fp32 copies of 16-bit chunk rows are made this many parts at a time: they add 1/16 to the chunk budget.
WIDEN_PARTS = 16


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scratch: Optional[torch.Tensor]) -> None:
    """``acc += a @ b`` for 16-bit ``a``, ``b`` and an fp32 ``acc``, the product never rounded to 16 bits.

    CUDA multiplies 16-bit matrices into fp32 (``out_dtype``), into ``scratch``. Other devices
    (the CPU in torch 2.13) cannot: there ``b``'s rows are copied to fp32 a part at a time
    (1/:data:`WIDEN_PARTS` of them, so the copies stay small next to the chunk) and multiplied
    in fp32, which is exact for the products of 16-bit values and sums them in fp32 alike.

    Args:
        acc: (N, in) fp32, added into.
        a: (N, k) 16-bit, may be a strided column slice.
        b: (k, in) 16-bit.
        scratch: (N, in) fp32 buffer on CUDA, else None.
    """
    if scratch is not None:
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32, out=scratch))
            return
        except (TypeError, RuntimeError, NotImplementedError):  # torch before 2.8 has no out_dtype: widen instead
            pass
    k = b.shape[0]
    step = max(1, k // WIDEN_PARTS)
    for s in range(0, k, step):
        acc.addmm_(a[:, s : s + step].float(), b[s : s + step].float())


def _chunk_weight(weight: torch.Tensor, block: Optional[torch.Tensor], a: int, b: int,
                  buffer: torch.Tensor) -> torch.Tensor:
    """Rows a..b of W' = bat(W, B), built in ``buffer``; W itself when there is no block."""
    if block is None:
        return weight
    r = block.shape[-1]
    return bat_weight(weight, block[a // r : b // r], out=buffer)


def _sweep(rows: RowDequantizer, out_features: int) -> RowDequantizer:
    """``rows`` for one pass over all ``out_features`` rows, chunk by chunk: ``rows.sweep(0, out_features)`` where
    the dequantizer has one (4-bit: the absmax undone once for the pass, not once per chunk; see
    :class:`qmiss.quant.Rows4bit`), else ``rows`` itself. Dropped after the pass, so nothing outlives it."""
    sweep = getattr(rows, "sweep", None)
    return sweep(0, out_features) if sweep is not None else rows


class BatLinear(torch.autograd.Function):
    """y = x W'ᵀ + b with W' = bat(W, B), keeping no dequantized weight for backward.

    With ``block=None`` it is the plain y = x Wᵀ + b on a weight known only through ``rows``
    (a mixture-of-experts base weight, :class:`qmiss.layer.MissExperts`), with the same economy.

    Forward and backward rebuild W' one chunk of output rows at a time from the
    packed base weight (through ``rows``), so the transient peak is one chunk and
    only x and B are saved: the bitsandbytes MatMul4Bit pattern applied to bat.

    In 16 bits, backward sums dx over the chunks in fp32, so its rounding error does
    not grow with the chunk count. That costs an fp32 (N, in) accumulator (twice the
    bytes of x; on CUDA a second one for each chunk's product), and, off CUDA, fp32
    copies of 1/:data:`WIDEN_PARTS` of a chunk at a time. fp32 compute has neither.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        block: torch.Tensor,
        bias: Optional[torch.Tensor],
        rows: RowDequantizer,
        out_features: int,
        chunk: int,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        # the output is a tensor of its own, written through a 2-D view: a view returned from a Function could
        # not be modified in place afterwards (Falcon adds to a projection's output in place)
        out = x.new_empty(*x.shape[:-1], out_features)
        y = out.view(-1, out_features)
        with torch.autocast(x.device.type, enabled=False):  # dtypes are the caller's choice
            # one W' buffer for every chunk: a fresh multi-MB tensor per chunk costs page faults (none without B)
            buffer = x2.new_empty(min(chunk, out_features), x2.shape[1]) if block is not None else None
            dequantize = _sweep(rows, out_features)
            for a in range(0, out_features, chunk):
                b = min(a + chunk, out_features)
                w = _chunk_weight(dequantize(a, b), block, a, b, buffer)  # (b - a, in)
                torch.mm(x2, w.t(), out=y[:, a:b])  # written in place: a strided slice is a valid BLAS output
            del w, buffer, dequantize
            if bias is not None:
                y += bias
        # x only for dB: without a block dx needs the weight alone (bat_row's turned input is saved by nothing)
        ctx.save_for_backward(x if block is not None else None, block)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.rows, ctx.chunk, ctx.has_bias = rows, chunk, bias is not None
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):
        x, block = ctx.saved_tensors  # x is None without a block
        out_features, dtype = grad_out.shape[-1], ctx.x_dtype
        n_in = ctx.x_shape[-1]
        x2 = x.reshape(-1, n_in) if x is not None else None  # (N, in)
        g2 = grad_out.reshape(-1, out_features).to(dtype)  # (N, out)
        need_x, need_block = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # dx is a sum over chunks: summed in 16 bits, each step rounds and the error grows with the
        # chunk count. Over several chunks a 16-bit dx is summed in an fp32 (N, in) accumulator
        # (the size of two 16-bit activations) and rounded once at the end.
        wide = need_x and dtype.itemsize < 4 and ctx.chunk < out_features
        grad_x = g2.new_zeros(g2.shape[0], n_in, dtype=torch.float32 if wide else dtype) if need_x else None
        scratch = torch.empty_like(grad_x) if wide and g2.device.type == "cuda" else None
        grad_block = torch.empty_like(block) if need_block else None
        with torch.autocast(g2.device.type, enabled=False):
            # W'_c, then G_c (neither exists without B)
            buffer = g2.new_empty(min(ctx.chunk, out_features), n_in) if block is not None else None
            dequantize = _sweep(ctx.rows, out_features)
            for a in range(0, out_features, ctx.chunk):
                b = min(a + ctx.chunk, out_features)
                w = dequantize(a, b)  # (b - a, in), dequantized once per chunk
                g = g2[:, a:b]  # (N, b - a)
                if need_x:
                    w_new = _chunk_weight(w, block, a, b, buffer)  # W'_c
                    if wide:
                        _addmm_fp32(grad_x, g, w_new, scratch)
                    else:
                        grad_x.addmm_(g, w_new)
                if need_block:
                    grad_w = torch.mm(g.t(), x2, out=buffer[: b - a])  # G_c = g_cᵀ x, (b - a, in)
                    r = block.shape[-1]
                    grad_block[a // r : b // r] = bat_block_grad(w, grad_w, r)
                del w
            del buffer, scratch, dequantize
        grad_bias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = grad_x.to(dtype).view(ctx.x_shape) if need_x else None
        return grad_x, grad_block, grad_bias, None, None, None


def few_tokens_cheaper(n_tokens: int, r: int) -> bool:
    """Whether :func:`bat_linear_few_tokens` costs fewer flops than building W' for ``n_tokens`` rows of x:
    2·N·out·in (the v_i, then the products) against r·out·in + N·out·in, i.e. N < r."""
    return n_tokens < r


def bat_linear_few_tokens(
    x: torch.Tensor,
    block: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: RowDequantizer,
    out_features: int,
    chunk: int,
) -> torch.Tensor:
    """y = x W'ᵀ + b for bat without building W', and without autograd (generation, evaluation).

    Per output row-block i, y_i = v_i W_iᵀ + (Σ_j x_j) B_iᵀ with v_i = [x_j (I + B_i)ᵀ]_j: every
    input shard turned by row-block i's (I + B_i), then multiplied by the base rows W_i as they are.
    The base is dequantized chunk by chunk as in :class:`BatLinear`; a chunk's v is N/r of its size.

    Args:
        x: (..., in), in % r == 0.
        block: (out/r, r, r) bat adapter B.
        bias, rows, out_features, chunk: as :func:`bat_linear`.

    Returns:
        (..., out), not attached to any autograd graph.
    """
    n_in = x.shape[-1]
    r = block.shape[-1]
    x2 = x.detach().reshape(-1, n_in)  # (N, in)
    n = x2.shape[0]
    block = block.detach()
    shards = x2.reshape(n * n_in // r, r)  # (N·in/r, r): every input shard x_j of every token
    # On the CPU each multi-threaded op waits for all its threads, which costs more than a decode step's
    # small products when the cores are shared: so what every chunk needs is computed once, here, and a chunk
    # runs three ops (dequantize, v, its y_i).
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        turned = block.transpose(1, 2) + torch.eye(r, dtype=block.dtype, device=block.device)  # (out/r, r, r): (I + B_i)ᵀ
        # y_i of every row-block i, contiguous: a product into a strided (N, r) slice of the output would run as
        # one small product per i. Starts as (Σ_j x_j) B_iᵀ (beta=0: the empty tensor's contents are not read).
        y = x2.new_empty(out_features // r, n, r).baddbmm_(
            shard_sum(x2, r).expand(out_features // r, n, r), block.transpose(1, 2), beta=0)  # (out/r, N, r)
        dequantize = _sweep(rows, out_features)
        for a in range(0, out_features, chunk):
            b = min(a + chunk, out_features)
            nb = (b - a) // r
            # v_i = [x_j (I + B_i)ᵀ]_j: the shards are one matrix for every i (a stride-0 batch, not copied)
            v = torch.bmm(shards.expand(nb, -1, r), turned[a // r : b // r]).view(nb, n, n_in)  # (nb, N, in)
            w = dequantize(a, b).view(nb, r, n_in)  # (nb, r, in): W_i
            y[a // r : b // r].baddbmm_(v, w.transpose(1, 2))  # (nb, N, r) += v_i W_iᵀ
            del v, w
        del dequantize
        out = y.transpose(0, 1).reshape(*x.shape[:-1], out_features)  # (..., out)
        if bias is not None:
            out += bias
    return out


def _records_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def bat_linear(
    x: torch.Tensor,
    block: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    rows: RowDequantizer,
    out_features: int,
    chunk: int,
    few_token_chunk: Optional[int] = None,
) -> torch.Tensor:
    """Functional form of :class:`BatLinear`; all tensors in one dtype (``block=None``: the base alone).

    Where no gradient is recorded and there are few tokens (:func:`few_tokens_cheaper`), bat runs
    :func:`bat_linear_few_tokens` instead, which never builds W'; training always runs :class:`BatLinear`.

    Args:
        x: (..., in).
        block: (out/r, r, r) bat adapter B.
        bias: (out,) or None.
        rows: ``rows(a, b)`` returns base weight rows a..b as (b - a, in) in x's dtype.
        out_features: out.
        chunk: rows per chunk, a multiple of r.
        few_token_chunk: rows per chunk of :func:`bat_linear_few_tokens` (:func:`chunk_rows` with ``tokens``);
            None: ``chunk``.

    Returns:
        (..., out).
    """
    if (block is not None and not _records_grad(x, block, bias)
            and few_tokens_cheaper(x.numel() // max(x.shape[-1], 1), block.shape[-1])):
        return bat_linear_few_tokens(x, block, bias, rows, out_features, few_token_chunk or chunk)
    return BatLinear.apply(x, block, bias, rows, out_features, chunk)
