"""MissLinear: a frozen (quantized) linear plus one MiSS adapter tensor.

    default / mini                          bat
    x ──► base (4/8-bit kernel) ──► + ──► y    x ──► [rows of W, dequantized chunk
    └──► Σ_j x_j ──► @ D ─────────┘              by chunk, W(I+B)+B] ──► y

default and mini leave the quantized base untouched and add a cheap term;
bat folds B into dequantized weight blocks inside :class:`qmiss.ops.BatLinear`,
which keeps no dequantized weight alive between forward and backward.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from qmiss import ops, quant
from qmiss.config import MODES, check_compute_dtype, default_compute_dtype


def adapter_shape(n_out: int, r: int, mode: str, mini_r: int | None = None) -> tuple[int, ...]:
    """The adapter tensor's shape: (r, out) default, (r, mini_r) mini, (out/r, r, r) bat."""
    return {"default": (r, n_out), "mini": (r, mini_r or 0), "bat": (n_out // r, r, r)}[mode]


def shape_problem(n_in: int, n_out: int, r: int, mode: str, mini_r: int | None = None) -> str | None:
    """Which rule r / mini_r break for a linear of this shape (the rules, stated once; callers word the
    error in their own spelling): "r" (r outside 1..in_features), "bat" (r does not divide both
    in_features and out_features), "mini" (mini_r does not divide out_features); None if they fit."""
    if not 0 < r <= n_in:
        return "r"
    if mode == "bat" and (n_in % r or n_out % r):
        return "bat"
    if mode == "mini" and (not mini_r or n_out % mini_r):
        return "mini"
    return None


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


class MissLinear(nn.Module):
    """Wraps a ``nn.Linear`` or a bitsandbytes 4/8-bit linear with a MiSS adapter.

    Args:
        base_layer: the frozen layer; it is held, never copied or subclassed.
        r: shard size along in_features.
        mode: "default", "mini" or "bat".
        mini_r: mini: adapter width along out_features.
        dropout: dropout probability on the adapter's input (default/mini).
        compute_dtype: dtype of the base matmul (4-bit), the adapter math and bat's dequantized
            weight; None follows the device the layer is on (:func:`qmiss.config.default_compute_dtype`:
            bf16 on CUDA, fp32 on the CPU), also after the layer is moved.
        bat_chunk_bytes: bat: byte budget of one dequantized chunk of rows.
        name: the module's path in its model, used in error messages.

    Raises:
        ValueError: r out of range, bat with in or out not divisible by r, mini with out % mini_r != 0,
            fp64 compute on a 4/8-bit base.
        TypeError: a compute dtype that is not a floating-point dtype.

    Attributes:
        miss_block: the trainable adapter, zeros at init; (r, out) default,
            (r, mini_r) mini, (out/r, r, r) bat. Kept in fp32 (the optimizer's master copy).
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
        super().__init__()
        n_in, n_out = quant.in_out_features(base_layer)
        where = name or type(base_layer).__name__
        if mode not in MODES:
            raise ValueError(f"{where}: mode={mode!r} is not one of {MODES}")
        problem = shape_problem(n_in, n_out, r, mode, mini_r)
        if problem == "r":
            raise ValueError(f"{where}: r={r} must be in 1..in_features={n_in}; pick a smaller r")
        if problem == "bat":
            raise ValueError(
                f"{where}: in_features={n_in}, out_features={n_out} are not both divisible by r={r}; "
                "bat needs r×r blocks — use mode='default' or an r dividing both"
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
        self.adapter = MissBlock(adapter_shape(n_out, r, mode, mini_r), device)
        self.disabled = False  # True inside qmiss.disable_adapter: the output is the base layer's
        self.merged = False  # True once the adapter is folded into an unquantized base weight
        self._follow_device()

    def _follow_device(self) -> None:
        """Bring what depends on the device in line with where the weights now are: bitsandbytes'
        quantization state (which ``nn.Module._apply`` leaves behind for 8-bit weights) and the
        compute dtype, unless the user fixed it."""
        quant.follow_weight_device(self.base_layer)
        device = self.miss_block.device
        self.compute_dtype = self.requested_compute_dtype or default_compute_dtype(device)
        quant.set_compute_dtype(self.base_layer, self.compute_dtype)

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

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def adapter_weight(self) -> torch.Tensor:
        """The default-mode adapter D (r, out); mini's block tiled along out_features.

        Raises:
            ValueError: in bat mode, which has no D.
        """
        return self._adapter_weight(self.miss_block)

    def _adapter_weight(self, block: torch.Tensor) -> torch.Tensor:
        if self.mode == "bat":
            raise ValueError(f"{self.name}: bat has no additive adapter D; use delta_weight()")
        return ops.tile_mini(block, self.out_features) if self.mode == "mini" else block

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW (out, in) that the adapter adds to the (dequantized) base weight, in ``dtype``, detached."""
        if self.mode == "bat":
            weight = quant.dequantize(self.base_layer, dtype)
            return ops.bat_delta_weight(weight, self.miss_block.detach().to(dtype))
        return ops.miss_delta_weight(self.adapter_weight().detach().to(dtype), self.in_features)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dequantize(W) + ΔW (bat: W(I + B) + B blockwise), computed in fp32, returned in ``dtype``."""
        weight = quant.dequantize(self.base_layer, torch.float32)
        block = self.miss_block.detach().float()
        if self.mode == "bat":
            return ops.bat_weight(weight, block).to(dtype)
        return weight.add_(self.delta_weight(torch.float32)).to(dtype)

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
            merged, block = weight.float(), self.miss_block.detach().float()
            if self.mode == "bat":
                restored = ops.bat_unmerge(merged, block)
            else:
                restored = merged - self.delta_weight(torch.float32)
            weight.copy_(restored.to(weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:  # merged: the base weight already holds the adapter
            return self._base(x)
        if self.mode == "bat":
            return self.adapter(lambda block: self._forward_bat(x, block))
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

    def _forward_bat(self, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        rows = quant.row_dequantizer(self.base_layer, dtype)
        chunk = ops.chunk_rows(
            self.out_features,
            self.in_features,
            self.r,
            quant.row_alignment(self.base_layer),
            self.bat_chunk_bytes,
            torch.finfo(dtype).bits // 8,
        )
        bias = self.bias.to(dtype) if self.bias is not None else None
        y = ops.bat_linear(x.to(dtype), block.to(dtype), bias, rows, self.out_features, chunk)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        mini = f", mini_r={self.mini_r}" if self.mode == "mini" else ""
        return f"r={self.r}, mode={self.mode!r}{mini}, bits={self.bits}, compute_dtype={self.compute_dtype}"
