"""A causal LM's cross-entropy without its logits: the head and the loss, chunk by chunk of tokens.

A 128k-token vocabulary makes the logits the largest tensor of a training step: 2,048 tokens of
Llama-3 are 1 GiB of fp32 logits, and the loss's backward holds three tensors that size. Here the
head's matmul, the fp32 log-softmax and the gradient run on one chunk of tokens at a time::

    hidden (N, H) ─┬─ chunk 1 ─► h @ Wᵀ ─► fp32 logits (n, V) ─► lse, target ─► loss sum
                   ├─ chunk 2 ─►  ...        (freed before the next chunk)
                   └─ ...                    softmax − onehot ─► dh rows = g @ W   (dW += gᵀ h)

Each chunk's gradient is formed in the forward pass while its logits exist, so the logits are
computed once, as in the plain loss (recomputing them in backward would cost a third head matmul);
backward only scales the stored (N, H) gradient by the incoming one. The full logits and their
gradient never exist: a chunk holds ``chunk_tokens(...)`` rows when a byte budget is given, else
``auto_chunk_tokens(...)``: as many rows as make the chunk as large as the head, in multiples of 64.

The result is transformers' ``ForCausalLMLoss``: labels shifted left by one, ``ignore_index``
(-100) skipped, the sum divided by the number of valid tokens or by ``num_items_in_batch``
(gradient accumulation), and ``shift_labels`` taken as given. Logit scaling (Cohere, Granite) and
final-logit softcapping (Gemma 2/3) are applied per chunk in fp32.

:func:`attach_chunked_loss` (``prepare_qmiss(chunked_loss=True)``) makes a transformers model's
training forward return this loss; evaluation and generation are left alone.
"""

from __future__ import annotations

import threading
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from qmiss.inputs import InputError

MiB = 2**20
#: rows of an automatic chunk are a multiple of this (whole tensor-core tiles of the head's matmuls).
ROW_MULTIPLE = 64
#: an automatic chunk takes at most this fraction of the device's free memory, the rest left for the hidden
#: gradient, the backward that follows and the allocator's rounding.
FREE_FRACTION = 0.25


def chunk_bytes_per_token(vocab: int, itemsize: int, softcap: bool = False) -> int:
    """Bytes one token of a chunk holds at the chunk's peak.

    One fp32 (n, V) buffer is reused in place for the logits, the softmax and the gradient; next
    to it a 16-bit matmul has either its logits (before the copy) or its gradient (after) — never
    both — and softcapping keeps an fp32 tanh for the derivative (freed before the gradient's cast).
    """
    base = 4 + (itemsize if itemsize < 4 else 0)
    return vocab * (max(base, 8) if softcap else base)


def chunk_tokens(vocab: int, budget_bytes: int, itemsize: int, softcap: bool = False) -> int:
    """Tokens per chunk so that one chunk's logits and gradient fit ``budget_bytes`` (at least 1)."""
    return max(1, budget_bytes // chunk_bytes_per_token(vocab, itemsize, softcap))


def auto_chunk_tokens(vocab: int, hidden: int, itemsize: int, softcap: bool = False,
                      free_bytes: Optional[int] = None) -> int:
    """Tokens per chunk when no budget is given: as many as make one chunk's logits and gradient as large as the
    (V, H) head in the matmul dtype, at most ``FREE_FRACTION`` of ``free_bytes``, rounded down to a multiple of
    ``ROW_MULTIPLE`` (at least one multiple).

    Why the head's size: every chunk reads the whole head twice (its logits, then the hidden gradient), so a
    chunk of n rows does n multiply-adds per head value read. A fixed byte budget makes n shrink as the
    vocabulary grows (64 MiB is 87 bf16 tokens at 128k) and the products memory-bound; a chunk as large as the
    head gives n ≈ H·itemsize / (4 + itemsize) rows whatever the vocabulary (1,344 at H=4,096 in bf16), past
    the ≈300 multiply-adds per byte where an H100's bf16 products stop waiting on memory, for the memory the
    head itself already takes.

    Args:
        free_bytes: what the device has free now (:func:`free_memory`); None: no bound but the head's size.
    """
    budget = vocab * hidden * itemsize
    if free_bytes is not None:
        budget = min(budget, int(free_bytes * FREE_FRACTION))
    rows = budget // chunk_bytes_per_token(vocab, itemsize, softcap)
    return max(ROW_MULTIPLE, rows // ROW_MULTIPLE * ROW_MULTIPLE)


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes a chunk could take on ``device`` now: on CUDA the driver's free memory plus what torch's caching
    allocator holds unused (``torch.cuda.mem_get_info``, ``memory_reserved - memory_allocated``); on any other
    device None, so the chunk is bounded by the head's size alone (host memory already holds the head)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def loss_chunk_tokens(vocab: int, hidden: int, itemsize: int, softcap: bool, chunk_bytes: Optional[int],
                      free_bytes: Optional[int] = None) -> int:
    """Tokens per chunk: from ``chunk_bytes`` when the user gave a budget (:func:`chunk_tokens`), else the
    automatic rule (:func:`auto_chunk_tokens`). The loss and the planner both ask this."""
    if chunk_bytes is not None:
        return chunk_tokens(vocab, chunk_bytes, itemsize, softcap)
    return auto_chunk_tokens(vocab, hidden, itemsize, softcap, free_bytes)


def _chunk(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], safe: torch.Tensor,
           valid: torch.Tensor, row_weight: torch.Tensor, scale: float, softcap: Optional[float],
           want_grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One chunk: the loss summed over its valid rows, and its gradient (n, V) in the matmul dtype, each row
    weighted by ``row_weight``.

    One fp32 (n, V) buffer is reused in place for the logits, exp(z − max), the softmax and the
    gradient; everything here is freed on return, before the next chunk's logits exist.
    """
    logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())  # (n, V) matmul dtype
    z = logits.float()  # (n, V) fp32; the same tensor when the matmul ran in fp32
    del logits
    if scale != 1.0:
        z.mul_(scale)
    tanh = None
    if softcap is not None:  # z ← cap·tanh(z / cap); tanh kept for the derivative 1 − tanh²
        z.div_(softcap).tanh_()
        tanh = z.clone() if want_grad else None
        z.mul_(softcap)
    target = z.gather(1, safe).squeeze(1)  # (n,)
    peak = z.amax(dim=1, keepdim=True)  # (n, 1)
    probs = z.sub_(peak).exp_()  # in place: exp(z − max)
    norm = probs.sum(dim=1, keepdim=True)  # (n, 1)
    loss_sum = ((peak.squeeze(1) + norm.squeeze(1).log() - target) * valid).sum()  # lse − target on valid rows
    if not want_grad:
        return loss_sum, None
    # d loss / d z = (softmax − onehot) · row weight (0 on ignored rows), in place
    probs.div_(norm).scatter_add_(1, safe, -valid[:, None].float())
    probs.mul_(row_weight[:, None])
    if tanh is not None:
        probs.mul_(tanh.mul_(tanh).neg_().add_(1.0))  # d cap·tanh(z/cap) / dz = 1 − tanh²
        del tanh
    if scale != 1.0:
        probs.mul_(scale)
    if weight.dtype != torch.float32 and weight.device.type == "cpu":
        # CPU 16-bit GEMM: (n, V) @ (V, H) is ~40x slower from a row-major gradient than from a column-major
        # one (8.3 s against 0.2 s at n=128, V=65,536, H=256 in bf16); the same bytes, laid out for it
        return loss_sum, torch.empty(probs.shape[::-1], dtype=weight.dtype).copy_(probs.t()).t()
    return loss_sum, probs.to(weight.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """Sum of ``-log softmax(transform(h @ Wᵀ + b))[target]`` over valid rows, divided by ``denominator``.

    Inputs: hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) long with ``ignore_index``
    rows skipped, denominator (a 0-d fp32 tensor), then plain numbers. All matmuls run in
    ``weight.dtype`` (the caller casts); softmax and loss in fp32.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor, denominator: torch.Tensor, ignore_index: int, scale: float,
                softcap: Optional[float], rows: int) -> torch.Tensor:
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_db = bias is not None and ctx.needs_input_grad[2]
        want_grad = want_dh or want_dw or want_db
        n_tokens = hidden.shape[0]
        valid = targets != ignore_index  # (N,)
        safe = targets.masked_fill(~valid, 0)[:, None]  # (N, 1) a real index on ignored rows; their loss is masked
        # bf16/fp32: the gradient kept here already carries 1/denominator, as transformers' does before its
        # cast, and backward multiplies by the incoming gradient (exact when that is 1). fp16 has too little
        # range for that: softmax/N underflows and GradScaler's 65,536 overflows, so there the gradient is
        # kept unscaled and 1/denominator and the loss scale are applied together in fp32 in backward.
        ctx.prescaled = weight.dtype != torch.float16
        inverse = torch.where(denominator > 0, 1.0 / denominator, torch.zeros_like(denominator))  # none valid: 0
        row_weight = valid.float() * (inverse if ctx.prescaled else 1.0)  # (N,) ignored rows count 0
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if want_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_db else None
        for start in range(0, n_tokens, rows):
            end = min(start + rows, n_tokens)
            h = hidden[start:end]  # (n, H)
            loss_sum, grad = _chunk(h, weight, bias, safe[start:end], valid[start:end], row_weight[start:end],
                                    scale, softcap, want_grad)
            total += loss_sum
            if grad is None:
                continue
            if dh is not None:
                torch.mm(grad, weight, out=dh[start:end])
            if dw is not None:
                dw.addmm_(grad.t().float(), h.float())
            if db is not None:
                db += grad.sum(dim=0, dtype=torch.float32)
            del grad  # before the next chunk's logits
        ctx.save_for_backward(dh, dw, db, denominator)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / denominator  # no valid token: nan, as transformers' mean over none

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        dh, dw, db, denominator = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        # one fp32 factor; a 0-d fp32 operand keeps dh's dtype and is applied in fp32 (opmath) by the kernel.
        # No valid token: the factor is 0, not inf, so the gradients are zeros rather than nan.
        factor = grad_loss.float()
        if not ctx.prescaled:
            factor = torch.where(denominator > 0, factor / denominator, torch.zeros_like(denominator))
        grad_hidden = None if dh is None else dh * factor
        grad_weight = None if dw is None else (dw * factor).to(weight_dtype)
        grad_bias = None if db is None else (db * factor).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    num_items_in_batch: Union[torch.Tensor, int, None] = None,
    ignore_index: int = -100,
    shift_labels: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """transformers' causal-LM loss of ``hidden @ weight.T + bias`` against ``labels``, without the logits.

    Args:
        hidden: (B, T, H) or (N, H) final hidden states (what the model's head receives).
        weight: (V, H) head weight; bias: (V,) or None.
        labels: (B, T) or (N,) token ids, ``ignore_index`` where no loss is wanted; shifted left
            by one as transformers does (position t predicts label t+1).
        num_items_in_batch: divide the sum by this (transformers' gradient accumulation) instead
            of by the number of valid tokens.
        shift_labels: labels already aligned with ``hidden`` (not shifted again); when given,
            ``labels`` is ignored, as in transformers (context parallelism passes both).
        logit_scale: multiply the logits by this before the softmax (Cohere; Granite: 1/logits_scaling).
        softcap: ``cap·tanh(logits/cap)`` before the softmax (Gemma 2/3's final_logit_softcapping).
        chunk_bytes: byte budget of one chunk's logits and gradient (:func:`chunk_tokens`); None: chunks as
            large as the head, bounded by the device's free memory (:func:`auto_chunk_tokens`).

    Returns:
        A 0-d fp32 loss. Under autocast the matmuls run in the autocast dtype, as ``F.linear`` would.

    Raises:
        ValueError: neither labels nor shift_labels, or shapes that do not line up.
    """
    if labels is None and shift_labels is None:
        raise ValueError("chunked_cross_entropy: give labels (shifted here) or shift_labels (already shifted)")
    if shift_labels is None:
        targets = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (…, T) label t+1 at position t
    else:
        targets = shift_labels
    hidden2d = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    targets = targets.reshape(-1).to(device=hidden2d.device, dtype=torch.long)  # (N,)
    if targets.numel() != hidden2d.shape[0]:
        raise ValueError(f"chunked_cross_entropy: {hidden2d.shape[0]} hidden rows but {targets.numel()} labels; "
                         "hidden (B, T, H) and labels (B, T) must cover the same tokens")
    device = hidden2d.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    hidden2d, weight = hidden2d.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if num_items_in_batch is None:
        denominator = (targets != ignore_index).sum().float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden2d.device).float()
    free = None if chunk_bytes is not None else free_memory(weight.device)
    rows = loss_chunk_tokens(*weight.shape, weight.element_size(), softcap is not None, chunk_bytes, free)
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropy.apply(hidden2d, weight, bias, targets, denominator, ignore_index,
                                        float(logit_scale), softcap, rows)


# --- on a transformers model ------------------------------------------------------------------------------------

#: How a transformers causal LM changes its head's output before the loss: a field of its (text) config and
#: what the model's forward does with it. tests/test_loss.py reads every modeling file of transformers and
#: checks that each statement changing the logits after the head is described here.
LOGIT_FIELDS = {"final_logit_softcapping": "softcap", "logit_scale": "multiply", "logits_scaling": "divide",
                "output_multiplier": "multiply", "lm_head_multiplier": "multiply"}
#: model types that use one of those fields otherwise: the other way round, or not at all (None).
LOGIT_FIELDS_BY_MODEL = {"hyperclovax": {"logits_scaling": "multiply"},
                         "hyperclovax_vision_v2": {"logits_scaling": "multiply"},
                         "mpt": {"logit_scale": None}}  # MPT's config has it; transformers' MptForCausalLM ignores it


def logit_transform(model: nn.Module) -> tuple[float, Optional[float]]:
    """(scale, softcap) the model's forward applies to the head's output before its loss, from its config:
    :data:`LOGIT_FIELDS` (softcapping as Gemma 2/3, scaling as Cohere and Granite …).

    Raises:
        InputError: the model's forward is not transformers' own (a subclass that overrides it, remote
            code), so what it does to the logits cannot be known from its config.
    """
    name = type(model).__name__
    module = getattr(type(model).forward, "__module__", "") or ""
    if not module.startswith("transformers."):
        origin = module or "an unknown module"
        raise InputError(f"chunked_loss: {name}.forward is not transformers' own (it comes from {origin}), so what "
                         "it does to the logits after the head is not known; pass chunked_loss=False "
                         "(--chunked_loss false) for this model")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    rules = {**LOGIT_FIELDS, **LOGIT_FIELDS_BY_MODEL.get(getattr(model.config, "model_type", None), {})}
    scale, softcap = 1.0, None
    for field, use in rules.items():
        value = getattr(config, field, None)
        if value is None or use is None:
            continue
        if use == "softcap":
            softcap = float(value)
        else:
            scale = scale * float(value) if use == "multiply" else scale / float(value)
    return scale, softcap


def _is_causal_lm_loss(model: nn.Module) -> bool:
    return getattr(model, "loss_function", None) is ForCausalLMLoss


def check_model(model: nn.Module, chunk_bytes: Optional[int] = None) -> tuple[nn.Module, float, Optional[float]]:
    """The model's output head and its (scale, softcap), if the chunked loss can stand in for its loss.

    Raises:
        InputError: no float output head, a loss other than the causal-LM cross-entropy, a forward
            that changes the logits in a way not reproduced (see :func:`logit_transform`), or a bad budget.
    """
    name = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise InputError(f"chunked_loss: {name} has no output head (get_output_embeddings() is None); "
                         "it is for causal LMs — pass chunked_loss=False")
    if not head.weight.is_floating_point() or not isinstance(head, nn.Linear):  # packed, or wrapped by qmiss
        raise InputError(f"chunked_loss: {name}'s output head is {type(head).__name__} with "
                         f"{head.weight.dtype} weights (quantized or adapted); the chunked loss needs a plain "
                         "float head — leave the head out of target_modules, or pass chunked_loss=False")
    if type(head) is not nn.Linear:
        raise InputError(f"chunked_loss: {name}'s output head is a {type(head).__name__}, not an nn.Linear, and "
                         "may compute more than x·Wᵀ + b; pass chunked_loss=False for this model")
    if not _is_causal_lm_loss(model):
        raise InputError(f"chunked_loss: {name} computes its loss with {getattr(model, 'loss_type', None)!r}, "
                         "not the causal-LM cross-entropy; pass chunked_loss=False")
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                    or chunk_bytes <= 0):
        raise InputError(f"chunked_loss: loss_chunk_bytes={chunk_bytes!r} must be a positive number of bytes, or "
                         "None for chunks sized from the head and free memory")
    return (head, *logit_transform(model))


class ChunkedLoss:
    """The hooks that turn a causal LM's training forward into one with the chunked loss.

    - before the model's forward (training, ``labels`` given, not TRL's ``fused_lm_head`` call):
      ``labels``/``shift_labels`` are taken out of the call, so transformers computes no loss;
    - before the head: its input is kept and the head runs on zero positions, so no logits exist;
    - after the model's forward: the loss is computed from the kept hidden states and set on the
      output, with ``logits=None`` (plus a MoE router loss, as the model's forward would add).
    """

    def __init__(self, model: nn.Module, chunk_bytes: Optional[int] = None) -> None:
        head, self.scale, self.softcap = check_model(model, chunk_bytes)
        self.head = head
        self.chunk_bytes = chunk_bytes
        self._state = threading.local()  # per thread: nn.DataParallel runs replicas in threads
        self.handles = [
            model.register_forward_pre_hook(self._before_model, with_kwargs=True),
            model.register_forward_hook(self._after_model, with_kwargs=True, always_call=True),
            head.register_forward_pre_hook(self._before_head),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _before_model(self, model: nn.Module, args: tuple, kwargs: dict):
        state = self._state
        if (not model.training or getattr(state, "call", None) is not None or kwargs.get("fused_lm_head")
                or (kwargs.get("labels") is None and kwargs.get("shift_labels") is None)):
            return None
        state.call = {"labels": kwargs.pop("labels", None), "shift_labels": kwargs.pop("shift_labels", None),
                      "num_items_in_batch": kwargs.get("num_items_in_batch")}
        state.head = None
        return args, kwargs

    def _before_head(self, head: nn.Module, args: tuple):
        state = self._state
        if getattr(state, "call", None) is None or state.head is not None:
            return None
        hidden = args[0]
        # the head as called (a DataParallel replica's own) and the autocast it runs under: accelerate's
        # autocast wraps model.forward, so it is on here but off again in the model's forward hook
        device = hidden.device.type
        state.head = (head, hidden, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return (hidden[..., :0, :],) + tuple(args[1:])  # the head runs on no position: (B, 0, V) logits

    def _after_model(self, model: nn.Module, args: tuple, kwargs: dict, output: Any):
        state = self._state
        call, called = getattr(state, "call", None), getattr(state, "head", None)
        state.call = state.head = None
        if call is None or output is None:  # not ours, or the forward raised
            return None
        if called is None:
            raise RuntimeError(f"chunked_loss: {type(model).__name__}'s forward never called its output head "
                               f"({type(self.head).__name__}); pass chunked_loss=False for this model")
        head, hidden, autocast, autocast_dtype = called
        weight = head.weight
        with torch.autocast(weight.device.type, dtype=autocast_dtype, enabled=autocast):
            loss = chunked_cross_entropy(
                hidden.to(weight.device), weight, call["labels"], getattr(head, "bias", None),
                num_items_in_batch=call["num_items_in_batch"], shift_labels=call["shift_labels"],
                logit_scale=self.scale, softcap=self.softcap, chunk_bytes=self.chunk_bytes)
        aux = getattr(output, "aux_loss", None) if not isinstance(output, tuple) else None
        if aux is not None:  # Mixtral-style forwards add the router loss only when they compute the loss
            loss = loss + getattr(model, "router_aux_loss_coef", 0.0) * aux.to(loss.device)
        if isinstance(output, tuple):  # return_dict=False: (logits, ...) becomes (loss, ...)
            return (loss,) + tuple(output[1:])
        fields = {k: v for k, v in output.items() if k not in ("loss", "logits")}
        return type(output)(loss=loss, logits=None, **fields)


def attach_chunked_loss(model: nn.Module, chunk_bytes: Optional[int] = None) -> ChunkedLoss:
    """Make ``model(..., labels=...)`` in training mode return the chunked loss and ``logits=None``.

    Evaluation (``model.eval()``), calls without labels, and TRL's own fused head
    (``fused_lm_head=True``) run the model's forward unchanged. Labels must be passed by keyword,
    as Trainer and TRL do. Undo with ``.remove()`` on the returned object.

    Raises:
        InputError: no float output head, a loss other than the causal-LM cross-entropy, or a
            forward that changes the logits in a way not reproduced (see :func:`logit_transform`).
    """
    existing = getattr(model, "qmiss_chunked_loss", None)
    if existing is not None:
        existing.remove()
    model.qmiss_chunked_loss = ChunkedLoss(model, chunk_bytes)
    return model.qmiss_chunked_loss
