"""Everything qmiss knows about bitsandbytes, behind one small interface.

The rest of qmiss never imports bitsandbytes. It asks this file four things:

- :func:`quant_bits` — is this layer 4-bit, 8-bit or a plain ``nn.Linear``?
- :func:`quantize_linear` — turn a full-precision ``nn.Linear`` into a bitsandbytes layer.
- :func:`dequantize` — the whole weight of a layer, in a chosen dtype.
- :func:`row_dequantizer` — a callable that dequantizes a range of output rows
  only, which bat uses to rebuild its weight chunk by chunk without ever holding
  the whole dequantized matrix.

Layouts (bitsandbytes ≥ 0.46):

- 4-bit (``Params4bit``): the (out, in) weight is flattened row-major and packed
  two values per byte into a (out·in/2, 1) tensor; one absmax per ``blocksize``
  consecutive values (64 by default), itself 8-bit quantized when double
  quantization is on. Rows ``[a, b)`` are bytes ``[a·in/2, b·in/2)`` and absmax
  entries ``[a·in/bs, b·in/bs)``, as long as ``a·in`` falls on a block boundary.
- 8-bit (``Int8Params``): an int8 (out, in) matrix and one fp32 scale per row
  (``SCB``); ``W = CB · SCB / 127``. bitsandbytes moves ``SCB`` from the weight
  to ``layer.state`` on the first forward, so both places are looked at.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from typing import Callable, Iterator, Optional

import torch
from torch import nn


@contextlib.contextmanager
def _bitsandbytes_own_cpu_kernels() -> Iterator[None]:
    """Around bitsandbytes' import: no hub request, and no warning about not making one.

    bitsandbytes 0.50 (``backends/cpu/ops.py``), on a CPU with AVX512-BF16, asks the model hub at import
    time for a fused 4-bit gemm kernel through the ``kernels`` package (which transformers installs), and
    logs "Failed to load CPU gemm_4bit_forward from kernels-community" when the hub cannot be reached. That
    kernel serves only the eval-mode, CPU-only packed layout, which qmiss turns off for the layers it wraps
    (:func:`prepare_for_adapter`); bitsandbytes falls back to its own kernels for it. So qmiss keeps those:
    for the import, ``kernels`` reads as not installed (``sys.modules[name] = None`` makes ``import`` raise
    ImportError, Python's documented way), and the one warning that causes is filtered from that logger.
    ``tests/test_quant.py`` forces the AVX512-BF16 path on any CPU and checks that nothing is printed and
    no connection is attempted.
    """
    absent = object()
    saved = sys.modules.get("kernels", absent)
    sys.modules["kernels"] = None  # type: ignore[assignment]
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def drop_hub_kernel_warning(record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in record.getMessage()

    logger.addFilter(drop_hub_kernel_warning)
    try:
        yield
    finally:
        logger.removeFilter(drop_hub_kernel_warning)
        if saved is absent:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved


with _bitsandbytes_own_cpu_kernels():
    import bitsandbytes as bnb


class Int8CastNotice(logging.Filter):
    """Say once what bitsandbytes' 8-bit layers compute in on CUDA, instead of at every call.

    ``MatMul8bitLt`` casts its input to fp16 for the int8 matmul (fp16 outlier columns) whatever the
    compute dtype, and logs "MatMul8bitLt: inputs will be cast from … to float16" at every call: about 450 lines
    a step for a 7B model with checkpointing. This filter on bitsandbytes' logger lets the first such record
    through, reworded to say what it means, and drops the rest.
    """

    PREFIX = "MatMul8bitLt: inputs will be cast"

    def __init__(self) -> None:
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        if self.said:
            return False
        self.said = True
        record.msg, record.args = (
            f"qmiss: {message} — bitsandbytes' 8-bit layers compute the base product with fp16 activations on "
            "CUDA whatever compute_dtype says; a value beyond ±65,504 (fp16's range) becomes inf there. Said once, "
            "not at every call."), ()
        return True


INT8_CAST_NOTICE = Int8CastNotice()
logging.getLogger("bitsandbytes.autograd._functions").addFilter(INT8_CAST_NOTICE)

RowDequantizer = Callable[[int, int], torch.Tensor]

#: transformers' default ``llm_int8_threshold``: activations above it take the fp16 outlier path.
INT8_THRESHOLD = 6.0
#: 1/127 as bitsandbytes writes it, so dequantized int8 rows match its own to the bit.
INT8_SCALE = 7.874015718698502e-3
#: int8 rows wanted in another dtype than fp32 are computed in fp32 this many parts at a time
#: (the fp32 temporary stays a small fraction of the output, not twice a 16-bit one).
#: values per absmax of a 4-bit weight (bitsandbytes' default, which quantize_linear keeps).
BLOCKSIZE = 64
DEQUANT_PARTS = 16


def quant_bits(module: nn.Module) -> Optional[int]:
    """4 or 8 for a bitsandbytes linear, None for a plain ``nn.Linear``.

    Raises:
        TypeError: if ``module`` is neither.
    """
    if isinstance(module, bnb.nn.Linear4bit):
        return 4
    if isinstance(module, bnb.nn.Linear8bitLt):
        return 8
    if isinstance(module, nn.Linear):
        return None
    raise TypeError(f"{type(module).__name__} is not a torch.nn.Linear or a bitsandbytes Linear4bit/Linear8bitLt")


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and the bitsandbytes linears (which subclass it)."""
    return isinstance(module, nn.Linear)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a plain or quantized linear (not the packed storage shape)."""
    return module.in_features, module.out_features


def quant_type(module: nn.Module) -> Optional[str]:
    """"nf4"/"fp4" for a 4-bit layer, None otherwise."""
    state = getattr(module.weight, "quant_state", None)
    return state.quant_type if state is not None else None


def quantize_linear(
    linear: nn.Linear,
    bits: int,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = torch.float32,
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """A bitsandbytes copy of ``linear``: ``Linear4bit`` (bits=4) or ``Linear8bitLt`` (bits=8).

    The weight is quantized on the linear's own device; the bias is kept as it is.
    The original layer is left untouched (the caller drops it).

    Args:
        linear: a full-precision ``nn.Linear``.
        bits: 4 or 8.
        quant_type: 4-bit data type, "nf4" or "fp4".
        double_quant: 4-bit: quantize the absmax constants too.
        compute_dtype: 4-bit: dtype the base matmul runs in (None: bitsandbytes picks it from the
            first input; :class:`~qmiss.layer.MissLinear` sets it when it wraps the layer).
        quant_storage: 4-bit: dtype the packed bytes are stored as (transformers'
            ``bnb_4bit_quant_storage``); a float dtype lets FSDP1 flatten them with the
            float tensors of their unit. The bytes are the same either way.

    Returns:
        The quantized layer, frozen.
    """
    device = linear.weight.device
    weight = linear.weight.detach()
    has_bias = linear.bias is not None
    if bits == 4:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=quant_storage,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=layer,
        ).to(device)
    elif bits == 8:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        # Int8Params quantizes on a move away from the CPU (or CPU -> CPU), as transformers loads it.
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        raise ValueError(f"bits={bits!r}: quantize_linear takes 4 or 8")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer


def quantize_experts(
    weight: torch.Tensor,
    transposed: bool,
    bits: Optional[int],
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = torch.float32,
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """A linear layer holding every expert's (out, in) weight, stacked as rows: expert e is rows e·out … (e+1)·out.

    transformers fuses a mixture-of-experts projection into one (E, out, in) parameter, or (E, in, out) when
    ``transposed`` (gpt-oss). It is quantized one expert at a time (a transposed expert is made contiguous alone),
    so at most one expert's 16-bit copy is made. The result is an ordinary bitsandbytes layer of in_features=in,
    out_features=E·out: 4-bit, the same bytes and absmax as quantizing the stacked (E·out, in) matrix at once
    (blocks never straddle two experts as long as out·in is a multiple of the blocksize, which the caller checks);
    8-bit, per-row scales are per expert anyway; bits=None, an ``nn.Linear`` holding the stacked weight. Its
    :func:`row_dequantizer` gives one expert's rows, and its forward is never called.

    Args:
        weight: (E, out, in), or (E, in, out) if ``transposed``; 16-bit or fp32.
        transposed: the layout, as transformers' ``is_transposed`` says.
        bits, quant_type, double_quant, compute_dtype, quant_storage: as for :func:`quantize_linear`.
    """
    n_experts = weight.shape[0]
    n_out, n_in = (weight.shape[2], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[2])
    device = weight.device
    stacked = torch.Size([n_experts * n_out, n_in])

    def expert(e: int) -> torch.Tensor:
        return (weight[e].t() if transposed else weight[e]).detach().contiguous()  # (out, in)

    if bits is None:
        layer = nn.Linear(n_in, n_experts * n_out, bias=False, device="meta")
        data = torch.empty(stacked, dtype=weight.dtype, device=device)
        for e in range(n_experts):
            data[e * n_out : (e + 1) * n_out] = expert(e)
        layer.weight = nn.Parameter(data, requires_grad=False)
        return layer
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(n_in, n_experts * n_out, bias=False, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
        data = torch.empty(stacked, dtype=torch.int8, device=device)
        scales = torch.empty(n_experts * n_out, dtype=torch.float32, device=device)
        for e in range(n_experts):  # Int8Params' own quantization: fp16, then one scale per row
            rows, row_scales, _ = bnb.functional.int8_vectorwise_quant(expert(e).to(torch.float16))
            data[e * n_out : (e + 1) * n_out], scales[e * n_out : (e + 1) * n_out] = rows, row_scales
        layer.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=scales)
        return layer
    if bits != 4:
        raise ValueError(f"bits={bits!r}: quantize_experts takes 4, 8 or None")
    per_expert = n_out * n_in
    packed = torch.empty(n_experts * per_expert // 2, 1, dtype=torch.uint8, device=device)
    absmax = torch.empty(n_experts * per_expert // BLOCKSIZE, dtype=torch.float32, device=device)
    for e in range(n_experts):  # bitsandbytes' quantize_4bit, without its double quantization (done once below)
        values, scales = torch.ops.bitsandbytes.quantize_4bit(expert(e), BLOCKSIZE, quant_type, torch.uint8)
        packed[e * per_expert // 2 : (e + 1) * per_expert // 2] = values.view(-1, 1)
        absmax[e * per_expert // BLOCKSIZE : (e + 1) * per_expert // BLOCKSIZE] = scales.view(-1)
    code = bnb.functional.get_4bit_type(quant_type, device=device)
    if double_quant:  # as quantize_4bit(compress_statistics=True) does it for one matrix
        offset = absmax.mean()
        nested, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
        state = bnb.functional.QuantState(absmax=nested, shape=stacked, dtype=weight.dtype, blocksize=BLOCKSIZE,
                                          code=code, quant_type=quant_type, offset=offset, state2=state2)
    else:
        state = bnb.functional.QuantState(absmax=absmax, shape=stacked, dtype=weight.dtype, blocksize=BLOCKSIZE,
                                          code=code, quant_type=quant_type)
    layer = bnb.nn.Linear4bit(n_in, n_experts * n_out, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage,
                              device="meta")
    layer.weight = bnb.nn.Params4bit(packed.view(quant_storage), requires_grad=False, quant_state=state,
                                     blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type,
                                     quant_storage=quant_storage, module=layer, bnb_quantized=True)
    layer.quant_state = state
    return layer


def storage_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype a 4-bit layer's packed bytes are stored as (uint8 unless a quant_storage was set); None otherwise."""
    return module.weight.dtype if quant_bits(module) == 4 else None


def prepare_for_adapter(module: nn.Module) -> None:
    """Keep a 4-bit layer's weight in bitsandbytes' canonical layout for good.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight on the
    first eval-mode no-grad forward into a CPU-only layout whose absmax is rounded
    to bf16. That would make eval outputs differ from training outputs and break
    dequantization (bat, merging, saving). qmiss turns the repacking off and undoes
    one that already happened.
    """
    if quant_bits(module) != 4:
        return
    module.support_avx512bf16_for_cpu = False
    state = _quant_state(module)
    if getattr(state, "packing_format_for_cpu", False):
        data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(module.weight.data, state)
        module.weight.data, module.weight.quant_state = data, state


def set_compute_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Set the dtype a 4-bit layer's base matmul runs in (no-op for other layers)."""
    if quant_bits(module) == 4:
        module.compute_dtype = dtype
        module.compute_type_is_set = True


def state_left_behind(module: nn.Module) -> bool:
    """Whether what bitsandbytes keeps beside the weight no longer matches it (see :func:`follow_weight_device`):
    a 4-bit quant state on another device, or an 8-bit layer whose ``CB`` is not its weight's storage or whose
    row scales sit elsewhere. A few attribute reads: cheap enough for every forward."""
    bits, weight = quant_bits(module), module.weight
    if bits == 4:
        state = _quant_state(module)
        return state is not None and state.absmax.device != weight.device
    if bits == 8 and isinstance(weight, bnb.nn.Int8Params):
        cb = [t for t in (module.state.CB, getattr(weight, "CB", None)) if t is not None]
        scb = [t for t in (module.state.SCB, getattr(weight, "SCB", None)) if t is not None]
        return (any(t.data_ptr() != weight.data_ptr() for t in cb)
                or any(t.device != weight.device for t in scb))
    return False


def follow_weight_device(module: nn.Module) -> None:
    """Move what bitsandbytes keeps beside a layer's weight to the weight's device, in place.

    ``nn.Module._apply`` (behind ``model.to(...)``, ``.cuda()`` and the Trainer's move)
    replaces ``param.data`` and keeps the parameter object, so what bitsandbytes stores
    on that object or on the layer stays where it was: an ``Int8Params``' ``CB``/``SCB``
    and the layer's ``state.CB``/``state.SCB`` (bitsandbytes only moves them in
    ``Linear8bitLt.to`` called on the layer itself). ``Params4bit.to`` moves its
    ``QuantState`` in place, but a state reached only through the layer is moved here too.
    """
    bits = quant_bits(module)
    weight = module.weight
    device = weight.device
    if bits == 4:
        state = _quant_state(module)
        if state is not None and state.absmax.device != device:
            state.to(device)
    elif bits == 8:
        state = module.state
        if state.SCB is not None:  # the row scales follow the weight whatever holds it
            state.SCB = state.SCB.to(device)
        if not isinstance(weight, bnb.nn.Int8Params):  # e.g. a view into an FSDP flat parameter: not ours to re-point
            return
        if getattr(weight, "CB", None) is not None:
            weight.CB = weight.data  # CB is the int8 matrix itself
        if getattr(weight, "SCB", None) is not None:
            weight.SCB = weight.SCB.to(device)
        if state.CB is not None:
            state.CB = weight.data


def _int8_scales(module: nn.Module) -> torch.Tensor:
    scb = module.state.SCB if module.state.SCB is not None else module.weight.SCB
    if scb is None:
        raise RuntimeError(f"{type(module).__name__}: 8-bit weight has no row scales (SCB); was it quantized?")
    return scb


def _absmax_4bit(state: bnb.functional.QuantState, start: int, stop: int) -> torch.Tensor:
    """The fp32 absmax of 4-bit blocks ``[start, stop)``, undoing double quantization.

    With double quantization the absmax is itself blockwise 8-bit (``state.state2``,
    blocks of 256 entries): the whole nested blocks covering the range are dequantized
    the way ``bnb.functional.dequantize_blockwise`` dequantizes all of them, so the
    values are those of the whole layer's absmax, bit for bit, at a fraction of its size.

    Returns:
        (stop - start,) fp32.
    """
    if not state.nested:
        return state.absmax[start:stop].float()
    nested = state.state2
    first = start // nested.blocksize * nested.blocksize
    last = min(math.ceil(stop / nested.blocksize) * nested.blocksize, state.absmax.numel())
    absmax = torch.ops.bitsandbytes.dequantize_blockwise(
        state.absmax[first:last],
        nested.absmax[first // nested.blocksize : math.ceil(last / nested.blocksize)],
        nested.code.to(state.absmax.device),
        nested.blocksize,
        nested.dtype,
    )
    return absmax[start - first : stop - first].add_(state.offset).float()  # a fresh tensor: no second copy


def dequantize(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's (out, in) weight in ``dtype``: the dequantized values for a bitsandbytes layer. Always a new
    tensor, which the caller may write into: a plain layer's weight is copied even in its own dtype."""
    if quant_bits(module) is None:
        return module.weight.detach().to(dtype, copy=True)
    return row_dequantizer(module, dtype)(0, module.out_features)


def row_dequantizer(module: nn.Module, dtype: torch.dtype, flat: bool = False, first: int = 0) -> RowDequantizer:
    """A function ``rows(a, b) -> (b - a, in)`` weight rows in ``dtype``: rows ``first + a`` … ``first + b``.

    The returned function holds references to the packed weight and its quantization
    state only, and dequantizes on each call just what its rows need (4-bit: their
    bytes and their absmax entries), so it keeps nothing alive while bat holds it from
    forward to backward. Any float ``dtype`` gets the fp32 values rounded once: a 4-bit
    weight asked for a dtype other than fp32/bf16/fp16 (the ones bitsandbytes' kernels
    write) is dequantized in fp32 and cast. 4-bit: ``a`` must be a multiple of
    :func:`row_alignment`.

    ``flat`` (4-bit): rows are dequantized as the one run of values they are in the packed layout, so ``a``
    need only start a block (``a·in`` a multiple of the blocksize) whatever ``in`` is; stacked experts
    (:func:`quantize_experts`) are read this way, an expert (or a chunk of one) at a time, ``first`` being the
    expert's first row.

    A 4-bit dequantizer also has ``rows.sweep(a, b)`` (:class:`Rows4bit`), for a pass over rows ``a`` … ``b``
    chunk by chunk: the same rows, the work the chunks share done once for the pass.

    Raises:
        TypeError: if ``dtype`` is not a floating-point dtype.
    """
    if not dtype.is_floating_point:
        raise TypeError(
            f"{type(module).__name__}: cannot dequantize a weight to dtype={dtype}, which is not a float dtype; "
            "ask for torch.float32, torch.bfloat16, torch.float16 or torch.float64"
        )
    bits = quant_bits(module)
    weight = module.weight
    if bits is None:
        return lambda a, b: weight[first + a : first + b].to(dtype)
    if bits == 8:
        scales = _int8_scales(module)

        def rows_int8(a: int, b: int) -> torch.Tensor:
            a, b = first + a, first + b
            # bitsandbytes' int8_vectorwise_dequant, CB · SCB · 1/127 in fp32, kept to the bit
            if dtype == torch.float32:  # in place on the output
                return weight.data[a:b].float().mul_(scales[a:b, None]).mul_(INT8_SCALE)
            # in fp32 a part of the rows at a time: an fp32 copy of them all is twice a 16-bit chunk
            out = torch.empty(b - a, weight.shape[1], dtype=dtype, device=weight.device)
            step = max(1, (b - a) // DEQUANT_PARTS)
            for s in range(a, b, step):
                e = min(s + step, b)
                out[s - a : e - a] = weight.data[s:e].float().mul_(scales[s:e, None]).mul_(INT8_SCALE)
            return out

        return rows_int8

    return Rows4bit(module, dtype, flat, first)


class Rows4bit:
    """``rows(a, b)``: rows ``first + a`` … ``first + b`` of a 4-bit weight (see :func:`row_dequantizer`).

    :meth:`sweep` serves a pass over many chunks (:mod:`qmiss.ops`): with double quantization each call
    undoes the nested absmax of its own blocks, one more multi-threaded kernel per chunk — on the CPU one
    more wait for every thread, which costs more than the arithmetic when the cores are shared. A sweep
    undoes it for all the pass's rows at once (an fp32 vector of rows·in/blocksize entries, 1/16 of the
    bytes of the fp32 rows at blocksize 64) and keeps it only as long as the callable it returns.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype, flat: bool, first: int) -> None:
        prepare_for_adapter(module)
        self.state = _quant_state(module)
        self.dtype = dtype
        # bitsandbytes' CPU kernel writes fp32/bf16/fp16 only (for fp64 it returns an unwritten tensor)
        self.kernel_dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        self.n_in, self.flat, self.first = module.in_features, flat, first
        self.alignment = row_alignment(module)
        self.packed = module.weight.data.view(torch.uint8).reshape(-1)  # (out·in/2,) whatever the quant_storage dtype

    def __call__(self, a: int, b: int) -> torch.Tensor:
        return self._rows(a, b, None, 0)

    def sweep(self, a: int, b: int) -> RowDequantizer:
        """``rows`` for a pass over rows ``a`` … ``b``: the same values to the bit, the fp32 absmax of all their
        blocks undone once, up front, and held by the returned callable only (drop it after the pass).

        Raises:
            ValueError: when the returned callable is asked for rows outside ``a`` … ``b``.
        """
        lo, hi = self._blocks(a, b)
        absmax = _absmax_4bit(self.state, lo, hi)  # (hi - lo,) fp32
        return lambda c, d: self._rows(c, d, absmax, lo)

    def _blocks(self, a: int, b: int) -> tuple[int, int]:
        """The absmax entries of rows ``first + a`` … ``first + b``: [lo, hi)."""
        blocksize = self.state.blocksize
        return (self.first + a) * self.n_in // blocksize, math.ceil((self.first + b) * self.n_in / blocksize)

    def _rows(self, a: int, b: int, swept: Optional[torch.Tensor], swept_from: int) -> torch.Tensor:
        n_in, blocksize = self.n_in, self.state.blocksize
        a, b = self.first + a, self.first + b
        if (a * n_in) % blocksize if self.flat else a % self.alignment:
            unit = f"a multiple of {blocksize} values" if self.flat else f"a multiple of {self.alignment}"
            raise ValueError(f"4-bit rows must start at {unit} (in={n_in}, blocksize {blocksize}); got row {a}")
        start, stop = a * n_in, b * n_in
        lo, hi = start // blocksize, math.ceil(stop / blocksize)
        if swept is None:
            absmax = _absmax_4bit(self.state, lo, hi)
        elif swept_from <= lo and hi - swept_from <= swept.numel():
            absmax = swept[lo - swept_from : hi - swept_from]
        else:
            raise ValueError(f"4-bit rows {a - self.first}…{b - self.first} lie outside the sweep they were asked of")
        rows = torch.ops.bitsandbytes.dequantize_4bit(
            self.packed[start // 2 : (stop + 1) // 2],
            absmax,
            blocksize,
            self.state.quant_type,
            [stop - start] if self.flat else [b - a, n_in],
            self.kernel_dtype,
        )
        return rows.view(b - a, n_in).to(self.dtype)  # no copy when the kernel wrote the dtype asked for


def _quant_state(module: nn.Module) -> bnb.functional.QuantState:
    """The 4-bit quant state; FSDP's unsharded parameter lacks it, bitsandbytes keeps a copy on the module."""
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else module.quant_state


def row_alignment(module: nn.Module) -> int:
    """Row ranges handed to a :func:`row_dequantizer` must start at multiples of this.

    4-bit weights whose in_features is not a multiple of the blocksize are handled
    as one range (the whole layer): bitsandbytes 0.50's AVX512 CPU kernel does not
    dequantize a row range of such a weight the way it dequantizes the whole, and
    qmiss stays consistent with what the base layer itself computes.
    """
    bits = quant_bits(module)
    blocksize = _quant_state(module).blocksize if bits == 4 else BLOCKSIZE
    return row_alignment_of(module.in_features, module.out_features, bits, blocksize)


def expert_row_alignment(n_in: int, bits: Optional[int], blocksize: int = BLOCKSIZE) -> int:
    """Row ranges of one expert handed to a ``flat`` :func:`row_dequantizer` start at multiples of this:
    the fewest rows that fill whole 4-bit blocks (1 when ``in`` is a multiple of the blocksize)."""
    return blocksize // math.gcd(n_in, blocksize) if bits == 4 else 1


def row_alignment_of(n_in: int, n_out: int, bits: Optional[int], blocksize: int = BLOCKSIZE) -> int:
    """:func:`row_alignment` from the shape alone (the planner's meta model has no quantization state)."""
    if bits != 4:
        return 1
    return 1 if n_in % blocksize == 0 else n_out


def stored_bytes(n_in: int, n_out: int, bits: Optional[int], double_quant: bool, base_itemsize: int,
                 blocksize: int = BLOCKSIZE) -> int:
    """Bytes of one linear's weight as qmiss stores it (bitsandbytes' layouts; 16-bit: ``base_itemsize`` each)."""
    values = n_in * n_out
    if bits == 4:
        blocks = math.ceil(values / blocksize)
        if double_quant:  # uint8 absmax per block, fp32 absmax per 256 of those, a 256-entry code, an offset
            return values // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4
        return values // 2 + 4 * blocks
    if bits == 8:
        return values + 4 * n_out  # int8 + one fp32 scale per row
    return values * base_itemsize