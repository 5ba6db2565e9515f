"""MissLinear: a frozen (quantized) linear plus one MiSS adapter tensor.

    default / mini                          bat
    x ──► base (4/8-bit kernel) ──► + ──► y    x ──► [rows of W, dequantized chunk
    └──► Σ_j x_j ──► @ D ─────────┘              by chunk, W(I+B)+B] ──► y

    bat_row
    x ──► + ──► base (4/8-bit kernel) ──► + ──► y
    └──► z = [x_j B_jᵀ]_j ──┘── Σ_j z_j, tiled ─┘

default and mini leave the quantized base untouched and add a cheap term;
bat folds B into dequantized weight blocks inside :class:`qmiss.ops.BatLinear`,
which keeps no dequantized weight alive between forward and backward; bat_row
(one block per input block) is the same kind of update computed by the untouched
base on a turned input, so it costs what default costs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from qmiss import ops, quant
from qmiss.config import BLOCK_MODES, MODES, check_compute_dtype, default_compute_dtype


def adapter_shape(n_in: int, n_out: int, r: int, mode: str, mini_r: int | None = None) -> tuple[int, ...]:
    """The adapter tensor's shape: (r, out) default, (r, mini_r) mini, (out/r, r, r) bat, (in/r, r, r) bat_row."""
    return {"default": (r, n_out), "mini": (r, mini_r or 0), "bat": (n_out // r, r, r),
            "bat_row": (n_in // r, r, r)}[mode]


def shape_problem(n_in: int, n_out: int, r: int, mode: str, mini_r: int | None = None) -> str | None:
    """Which rule r / mini_r break for a linear of this shape (the rules, stated once; callers word the
    error in their own spelling): "r" (r outside 1..in_features), "bat" (bat or bat_row, and r does not
    divide both in_features and out_features), "mini" (mini_r does not divide out_features); None if they fit."""
    if not 0 < r <= n_in:
        return "r"
    if mode in BLOCK_MODES and (n_in % r or n_out % r):
        return "bat"
    if mode == "mini" and (not mini_r or n_out % mini_r):
        return "mini"
    return None


def expert_chunk_rows(n_in: int, n_out: int, r: int, mode: str, bits: int | None, budget_bytes: int,
                      itemsize: int) -> int:
    """Rows of one expert's (out, in) weight :class:`MissExperts` dequantizes at once: whole r-row blocks for bat,
    any rows else, starting on whole 4-bit blocks (:func:`qmiss.quant.expert_row_alignment`), within the chunk
    budget (:func:`qmiss.ops.chunk_rows`)."""
    unit = r if mode == "bat" else 1
    return ops.chunk_rows(n_out, n_in, unit, quant.expert_row_alignment(n_in, bits), budget_bytes, itemsize)


def expert_backward_bytes(n_in: int, n_out: int, r: int, mode: str, bits: int | None, budget_bytes: int,
                          itemsize: int, rows: int) -> int:
    """Bytes one expert's projection holds at once in backward (:class:`qmiss.ops.BatLinear` on ``rows`` routed
    tokens, as :meth:`MissExperts._experts` calls it): the dequantized chunk and the W' buffer, the input gradient
    and that gradient with the adapter term added, and in 16 bits over several chunks the fp32 dx sum (+ on CUDA
    each chunk's fp32 product)."""
    chunk = expert_chunk_rows(n_in, n_out, r, mode, bits, budget_bytes, itemsize)
    held = 2 * chunk * n_in * itemsize + 2 * rows * n_in * itemsize
    if itemsize < 4 and chunk < n_out:
        held += 8 * rows * n_in
    return held


class MissBlock(nn.Module):
    """The adapter tensor alone, as a leaf module's ``weight``.

    Keeping the one trainable tensor in a module of its own lets FSDP give it a unit
    of its own (:func:`qmiss.fsdp_auto_wrap_policy`), apart from the frozen base
    weights, so no flat parameter mixes trainable and frozen tensors or dtypes.
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))

    def forward(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn(weight)``. Every use of the weight in training goes through here, so that
        FSDP, which gathers a unit's parameters around its forward (and that forward's
        backward), has the whole weight in place while ``fn`` runs."""
        return fn(self.weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


class MissAdapter(nn.Module):
    """What every qmiss adapter layer shares: a frozen (quantized) base, one trainable :class:`MissBlock`, the
    checks of r / mode / mini_r against the base's shape, and the compute dtype that follows the device.

    Two kinds: :class:`MissLinear` (one linear) and :class:`MissExperts` (the fused projection of a
    mixture-of-experts block, one adapter per expert, ``experts`` of them stacked in the block's first dim).

    Raises:
        ValueError: r out of range, bat / bat_row with in or out not divisible by r, mini with out % mini_r != 0,
            fp64 compute on a 4/8-bit base.
        TypeError: a compute dtype that is not a floating-point dtype.
    """

    def __init__(self, base_layer: nn.Module, n_in: int, n_out: int, experts: int | None, r: int, mode: str,
                 mini_r: int | None, dropout: float, compute_dtype: torch.dtype | None, bat_chunk_bytes: int,
                 name: str) -> None:
        super().__init__()
        where = name or type(base_layer).__name__
        if mode not in MODES:
            raise ValueError(f"{where}: mode={mode!r} is not one of {MODES}")
        problem = shape_problem(n_in, n_out, r, mode, mini_r)
        if problem == "r":
            raise ValueError(f"{where}: r={r} must be in 1..in_features={n_in}; pick a smaller r")
        if problem == "bat":
            raise ValueError(
                f"{where}: in_features={n_in}, out_features={n_out} are not both divisible by r={r}; "
                f"{mode} needs r×r blocks — use mode='default' or an r dividing both"
            )
        if problem == "mini":
            raise ValueError(f"{where}: out_features={n_out} is not divisible by mini_r={mini_r}; pick a mini_r dividing it")
        check_compute_dtype(compute_dtype, quant.quant_bits(base_layer), f"{where}: compute_dtype")
        quant.prepare_for_adapter(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = n_in, n_out
        self.r, self.mode, self.mini_r = r, mode, mini_r
        self.requested_compute_dtype = compute_dtype  # None: follow the device; self.compute_dtype: the one in force
        self.bat_chunk_bytes = bat_chunk_bytes
        self.name = name
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next(base_layer.parameters()).device
        shape = adapter_shape(n_in, n_out, r, mode, mini_r)
        self.adapter = MissBlock(shape if experts is None else (experts, *shape), device)
        self.disabled = False  # True inside qmiss.disable_adapter: the output is the base layer's
        self.merged = False  # True once the adapter is folded into an unquantized base weight
        self._follow_device()

    def _follow_device(self) -> None:
        """Bring what depends on the device in line with where the weights now are: bitsandbytes'
        quantization state (which ``nn.Module._apply`` leaves behind for 8-bit weights) and the
        compute dtype, unless the user fixed it."""
        quant.follow_weight_device(self.base_layer)
        device = self.base_layer.weight.device  # where the layer computes (an FSDP1 adapter unit may be sharded)
        self._synced_device = device
        self.compute_dtype = self.requested_compute_dtype or default_compute_dtype(device)
        quant.set_compute_dtype(self.base_layer, self.compute_dtype)

    def _follow_device_if_moved(self) -> None:
        """Run :meth:`_follow_device` if the base weight is on another device than when it last ran, or
        bitsandbytes' state no longer matches it (:func:`qmiss.quant.state_left_behind`). FSDP1 and FSDP2 move
        parameters by assigning ``param.data`` (FSDP1's ``_init_utils``, FSDP2's ``_fsdp_init``), which no
        ``_apply`` sees: without this a model prepared on the CPU would keep the CPU's fp32 compute rule on the
        GPU, and an 8-bit layer its int8 matrix and scales on the CPU. Called at the start of every forward."""
        device = self.base_layer.weight.device
        if device.type != "meta" and (device != self._synced_device or quant.state_left_behind(self.base_layer)):
            self._follow_device()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 — nn.Module's signature
        """``.to()``, ``.cuda()`` and the Trainer's move all end here: move, then re-sync (see :meth:`_follow_device`)."""
        super()._apply(fn, recurse)
        if self.miss_block.device.type != "meta":
            self._follow_device()
        return self

    @property
    def miss_block(self) -> nn.Parameter:
        """The trainable adapter tensor (held by the leaf module ``self.adapter``)."""
        return self.adapter.weight

    @property
    def bits(self) -> int | None:
        """4, 8, or None for an unquantized base."""
        return quant.quant_bits(self.base_layer)

    def _adapter_weight(self, block: torch.Tensor) -> torch.Tensor:
        """One (linear's or expert's) adapter as the default-mode D (r, out): mini's block tiled along out."""
        if self.mode in BLOCK_MODES:
            raise ValueError(f"{self.name}: {self.mode} has no additive adapter D; use delta_weight()")
        return ops.tile_mini(block, self.out_features) if self.mode == "mini" else block

    def _merged(self, weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """W + ΔW for one fp32 weight W (out, in) and its adapter block, in fp32 (``weight`` is consumed)."""
        if self.mode == "bat":
            return ops.bat_weight(weight, block)
        if self.mode == "bat_row":
            return ops.bat_row_weight(weight, block)
        return weight.add_(ops.miss_delta_weight(self._adapter_weight(block), self.in_features))

    def _unmerged(self, merged: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """W from W + ΔW (bat: W = (W' − B)(I + B)⁻¹ per row-block, bat_row per input block; inverse in fp32)."""
        if self.mode == "bat":
            return ops.bat_unmerge(merged, block)
        if self.mode == "bat_row":
            return ops.bat_row_unmerge(merged, block)
        return merged - ops.miss_delta_weight(self._adapter_weight(block), self.in_features)

    def extra_repr(self) -> str:
        mini = f", mini_r={self.mini_r}" if self.mode == "mini" else ""
        return f"r={self.r}, mode={self.mode!r}{mini}, bits={self.bits}, compute_dtype={self.compute_dtype}"


class MissLinear(MissAdapter):
    """Wraps a ``nn.Linear`` or a bitsandbytes 4/8-bit linear with a MiSS adapter.

    Args:
        base_layer: the frozen layer; it is held, never copied or subclassed.
        r: shard size along in_features.
        mode: "default", "mini", "bat" or "bat_row".
        mini_r: mini: adapter width along out_features.
        dropout: dropout probability on the adapter's input (default/mini).
        compute_dtype: dtype of the base matmul (4-bit), the adapter math and bat's dequantized
            weight; None follows the device the layer is on (:func:`qmiss.config.default_compute_dtype`:
            bf16 on CUDA, fp32 on the CPU), also after the layer is moved.
        bat_chunk_bytes: bat: byte budget of one dequantized chunk of rows.
        name: the module's path in its model, used in error messages.

    Raises:
        see :class:`MissAdapter`.

    Attributes:
        miss_block: the trainable adapter, zeros at init; (r, out) default,
            (r, mini_r) mini, (out/r, r, r) bat, (in/r, r, r) bat_row. Kept in fp32 (the optimizer's master copy).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        mode: str = "default",
        mini_r: int | None = None,
        dropout: float = 0.0,
        compute_dtype: torch.dtype | None = None,
        bat_chunk_bytes: int = 64 * 2**20,
        name: str = "",
    ) -> None:
        n_in, n_out = quant.in_out_features(base_layer)
        super().__init__(base_layer, n_in, n_out, None, r, mode, mini_r, dropout, compute_dtype, bat_chunk_bytes,
                         name)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def adapter_weight(self) -> torch.Tensor:
        """The default-mode adapter D (r, out); mini's block tiled along out_features.

        Raises:
            ValueError: in bat mode, which has no D.
        """
        return self._adapter_weight(self.miss_block)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW (out, in) that the adapter adds to the (dequantized) base weight, in ``dtype``, detached."""
        if self.mode in BLOCK_MODES:
            weight = quant.dequantize(self.base_layer, dtype)
            delta = ops.bat_delta_weight if self.mode == "bat" else ops.bat_row_delta_weight
            return delta(weight, self.miss_block.detach().to(dtype))
        return ops.miss_delta_weight(self.adapter_weight().detach().to(dtype), self.in_features)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dequantize(W) + ΔW (bat: W(I + B) + B blockwise), computed in fp32, returned in ``dtype``."""
        weight = quant.dequantize(self.base_layer, torch.float32)
        return self._merged(weight, self.miss_block.detach().float()).to(dtype)

    def merge(self) -> None:
        """Fold the adapter into an unquantized base weight, in place; merging twice is merging once.

        Raises:
            ValueError: for a 4/8-bit base, where writing W + ΔW back re-quantizes it (lossy).
        """
        if self.merged:
            return
        if self.bits is not None:
            raise ValueError(
                f"{self.name}: merging into a {self.bits}-bit weight re-quantizes it and loses the adapter's precision; "
                "use qmiss.merge_and_unload(model) or qmiss.export_merged(model, dir) for an exact 16-bit model"
            )
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_(self.merged_weight(torch.float32).to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge` (bat: W = (W' − B)(I + B)⁻¹, inverse in fp32)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_(self._unmerged(weight.float(), self.miss_block.detach().float()).to(weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._follow_device_if_moved()
        if self.merged or self.disabled:  # merged: the base weight already holds the adapter
            return self._base(x)
        if self.mode == "bat":
            return self.adapter(lambda block: self._forward_bat(x, block))
        if self.mode == "bat_row":
            return self.adapter(lambda block: self._forward_bat_row(x, block))
        y = self._base(x)
        xs = ops.shard_sum(self.dropout(x.to(self.compute_dtype)), self.r)
        update = self.adapter(lambda block: xs @ self._adapter_weight(block).to(self.compute_dtype))  # (..., r) @ (r, out)
        return y + update.to(y.dtype)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output. bitsandbytes' 8-bit matmul flattens 3-D inputs only (MatMul8bitLt), so a
        4-D one (DeepSeek-V3's kv_b_proj input) goes in as 2-D and comes back in its own shape."""
        if x.dim() > 3 and self.bits == 8:
            return self.base_layer(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
        return self.base_layer(x)

    def _forward_bat_row(self, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """base(x + z) + tile_out(Σ_j z_j), z = [x_j B_jᵀ]_j (:func:`qmiss.ops.bat_row_turn`): the base computes W'
        without it being built, and its backward gives dz for dB; the turn keeps x (in the compute dtype) unless
        it can rebuild it (down's act(gate)·up: :func:`qmiss.ops.product_source`)."""
        z = ops.bat_row_turn(x.to(self.compute_dtype), block.to(self.compute_dtype))
        y = self._base(x + z.to(x.dtype))
        return y + ops.tile_out(ops.shard_sum(z, self.r), self.out_features).to(y.dtype)

    def _forward_bat(self, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        rows = quant.row_dequantizer(self.base_layer, dtype)
        shape = (self.out_features, self.in_features, self.r, quant.row_alignment(self.base_layer),
                 self.bat_chunk_bytes, torch.finfo(dtype).bits // 8)
        few = ops.chunk_rows(*shape, tokens=x.numel() // self.in_features)  # used if bat_linear takes that path
        bias = self.bias.to(dtype) if self.bias is not None else None
        y = ops.bat_linear(x.to(dtype), block.to(dtype), bias, rows, self.out_features, ops.chunk_rows(*shape), few)
        return y.to(x.dtype)


class MissExperts(MissAdapter):
    """One fused projection of a mixture-of-experts block, quantized, with a MiSS adapter per expert.

    transformers (5.x) stores a block's routed experts as 3-D parameters of an ``…Experts`` module
    (``gate_up_proj`` / ``up_proj`` and ``down_proj``, (E, out, in), or (E, in, out) where
    ``is_transposed``). A MissExperts takes such a parameter's place under the same name: its base is
    :func:`qmiss.quant.quantize_experts`' stacked layer, its adapter one block per expert, stacked —
    (E, r, out) default, (E, r, mini_r) mini, (E, out/r, r, r) bat, (E, in/r, r, r) bat_row. The experts module's
    forward is qmiss's experts implementation (:mod:`qmiss.experts`), which sorts the tokens by expert and
    calls this module once per projection.

    Each expert runs :class:`qmiss.ops.BatLinear` on its own tokens: its weight is dequantized chunk by
    chunk while they are processed, again in backward, and never kept (bat with the expert's B; default
    and mini with no block, plus the adapter term). So a step holds one expert's chunk at a time, never
    the dequantized experts.

    Args:
        base_layer: the stacked experts (:func:`qmiss.quant.quantize_experts`), frozen.
        experts: E.
        transposed: the layout the parameter had (kept for the 16-bit export).
        weight_dtype: the dtype it had (the same).
        implementation: the model's ``config._experts_implementation`` before qmiss's (put back by the exports).
        Others as :class:`MissLinear`; r, mode and mini_r are checked against one expert's (in, out).
    """

    def __init__(self, base_layer: nn.Module, experts: int, r: int, mode: str = "default", mini_r: int | None = None,
                 dropout: float = 0.0, compute_dtype: torch.dtype | None = None, bat_chunk_bytes: int = 64 * 2**20,
                 name: str = "", transposed: bool = False, weight_dtype: torch.dtype = torch.float32,
                 implementation: str | None = None) -> None:
        n_in, stacked = quant.in_out_features(base_layer)
        super().__init__(base_layer, n_in, stacked // experts, experts, r, mode, mini_r, dropout, compute_dtype,
                         bat_chunk_bytes, name)
        self.experts, self.transposed, self.weight_dtype = experts, transposed, weight_dtype
        self.implementation = implementation  # the experts implementation the model used before (restored on unwrap)

    def expert_rows(self, expert: int, dtype: torch.dtype) -> ops.RowDequantizer:
        """``rows(a, b)``: rows a..b of one expert's (out, in) base weight, dequantized in ``dtype``."""
        return quant.row_dequantizer(self.base_layer, dtype, flat=True, first=expert * self.out_features)

    def base_weight(self, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One expert's whole (out, in) base weight in ``dtype``: a new tensor, which the caller may write into (an
        unquantized base's rows in their own dtype are a view of the parameter, so they are copied)."""
        weight = self.expert_rows(expert, dtype)(0, self.out_features)
        return weight.clone() if self.bits is None else weight

    def merged_weight(self, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One expert's dequantize(W) + ΔW (out, in), computed in fp32, returned in ``dtype``."""
        return self._merged(self.base_weight(expert), self.miss_block[expert].detach().float()).to(dtype)

    def delta_weight(self, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One expert's ΔW (out, in) on its dequantized base weight, computed in fp32, returned in ``dtype``."""
        return (self.merged_weight(expert) - self.base_weight(expert)).to(dtype)

    def fused_weight(self, merged: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Every expert's weight in the layout and dtype transformers' parameter had ((E, out, in), or (E, in, out)
        when transposed): merged (W + ΔW) or the base alone, filled one expert at a time."""
        dtype = dtype or self.weight_dtype
        shape = (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)
        fused = torch.empty(self.experts, *shape, dtype=dtype, device=self.miss_block.device)
        for e in range(self.experts):
            weight = self.merged_weight(e, dtype) if merged else self.base_weight(e, dtype)
            fused[e] = weight.t() if self.transposed else weight
        return fused

    def merge(self) -> None:
        """Fold each expert's adapter into an unquantized base, in place (see :meth:`MissLinear.merge`)."""
        if not self.merged:
            self._fold(self.merged_weight)

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        if self.merged:
            self._fold(lambda e, dtype: self._unmerged(self.base_weight(e), self.miss_block[e].detach().float()).to(dtype))

    def _fold(self, weight_of) -> None:  # noqa: ANN001 — (expert, dtype) -> (out, in)
        if self.bits is not None:
            raise ValueError(
                f"{self.name}: merging into {self.bits}-bit experts re-quantizes them and loses the adapter's "
                "precision; use qmiss.merge_and_unload(model) or qmiss.export_merged(model, dir) for an exact 16-bit model"
            )
        weight, n = self.base_layer.weight, self.out_features
        with torch.no_grad():
            for e in range(self.experts):
                weight[e * n : (e + 1) * n] = weight_of(e, weight.dtype)
        self.merged = not self.merged

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(S, in) tokens sorted by expert, ``counts[e]`` of them for expert e -> (S, out)."""
        if sum(counts) != x.shape[0]:
            raise ValueError(f"{self.name}: {x.shape[0]} tokens, but the counts per expert add up to {sum(counts)}")
        self._follow_device_if_moved()
        if self.merged or self.disabled:
            return self._experts(x, counts, None)
        return self.adapter(lambda block: self._experts(x, counts, block))

    def _experts(self, x: torch.Tensor, counts: list[int], block: torch.Tensor | None) -> torch.Tensor:
        dtype = self.compute_dtype
        x = x.to(dtype)
        chunk = expert_chunk_rows(self.in_features, self.out_features, self.r, self.mode, self.bits,
                                  self.bat_chunk_bytes, torch.finfo(dtype).bits // 8)
        # one unbind, not a select per expert: each select's backward would allocate and zero a whole-block gradient
        blocks = block.to(dtype).unbind(0) if block is not None else None
        outputs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            xe, start = x[start : start + n], start + n
            rows = self.expert_rows(e, dtype)
            if block is not None and self.mode == "bat":
                outputs.append(ops.bat_linear(xe, blocks[e], None, rows, self.out_features, chunk))
                continue
            if block is not None and self.mode == "bat_row":  # the base on the turned input, + Σ_j z_j tiled
                z = ops.bat_row_turn(xe, blocks[e])
                y = ops.bat_linear(xe + z, None, None, rows, self.out_features, chunk)
                outputs.append(y + ops.tile_out(ops.shard_sum(z, self.r), self.out_features))
                continue
            y = ops.bat_linear(xe, None, None, rows, self.out_features, chunk)
            if block is not None:
                xs = ops.shard_sum(self.dropout(xe), self.r)
                y = y + xs @ self._adapter_weight(blocks[e])  # (n, r) @ (r, out)
            outputs.append(y)
        return torch.cat(outputs) if outputs else x.new_zeros(0, self.out_features)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, in={self.in_features}, out={self.out_features}, {super().extra_repr()}"
