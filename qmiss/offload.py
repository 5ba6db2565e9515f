"""What a long-context step can keep in host memory instead of the GPU's.

- :class:`ActivationOffload` / ``prepare_qmiss(offload_activations=True)``: saved activations wait
  in pinned host memory between a step's forward and its backward.
- :class:`HostEmbeddings` / ``prepare_qmiss(embeddings_on_host=True)``: the input embedding table
  stays on the host and only each batch's rows come to the GPU.

Saved activations

With gradient checkpointing a step keeps one tensor per decoder layer for backward: the layer's
input, (tokens × hidden) in the stream dtype. At 32k tokens of a 4096-wide model that is 256 MiB
a layer, 8 GiB for 32 layers. ``prepare_qmiss(offload_activations=True)`` moves every tensor
autograd saves outside the checkpointed layers (those inputs, chiefly) to the host as it is
saved, and back when backward reaches it::

    forward   layer i input ─► saved for backward ─► copied to pinned host memory (GPU copy freed)
    backward  layer i reached ─► copied back ─► layer i recomputed and differentiated

Inside a checkpointed layer torch's own hooks run (nothing is stored there to offload). Without
checkpointing, every saved activation of 1 MiB or more is offloaded. Parameters are never copied, nor
is anything in a parameter's memory: ``F.linear`` saves ``weight.t()``, a view of the head's weight and no
``nn.Parameter``, which would otherwise take the whole head (1 GiB for Llama-3-8B) to the host and back.
Tensors already on the host are left alone, so on a CPU-only machine this is a no-op.

The copies are synchronous with the compute stream: a step trades PCIe time for GPU memory
(torchtune's ``OffloadActivations`` overlaps them on a second stream; this keeps to ``save_on_cpu``'s
simpler contract).

Host memory: one pool (:class:`HostPool`), not an allocation per tensor. torch's pinned allocations go
through its caching host allocator, which rounds each request up to a power of two and keeps the block
(``ATen/core/CachingHostAllocator.h``): a 192 MiB layer input would take 256 MiB, held for good, per rank.
The pool is one exact-size buffer, page-locked with ``cudaHostRegister``; every forward carves its copies
from it, each rounded up to :data:`HOST_ALIGNMENT`, so from the second step on the host holds what
:func:`qmiss.plan_memory` prints as the offloaded activations' pinned host memory.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import nn

from qmiss.inputs import InputError

MiB = 2**20
#: bytes: where each copy starts in the pool (cudaMalloc's blocks are aligned at least as well, so a copy's two
#: ends line up the same way); a copy of n bytes takes :func:`host_bytes` (n) of the pool.
HOST_ALIGNMENT = 256


def host_bytes(nbytes: int, min_bytes: int = MiB) -> int:
    """The pool bytes an offloaded tensor of ``nbytes`` takes: none under ``min_bytes`` (it is not offloaded),
    else ``nbytes`` rounded up to :data:`HOST_ALIGNMENT`. The planner asks this."""
    if nbytes < min_bytes:
        return 0
    return -(-nbytes // HOST_ALIGNMENT) * HOST_ALIGNMENT


class HostPool:
    """One host buffer that the offloaded copies of a forward are carved from, reused by every later forward.

    A forward takes its copies from the front of the pool; a copy that does not fit (on the first forward,
    all of them) gets a pageable buffer of its own, exact size, freed with its graph. The next forward
    starts with the pool grown to what the last one took, so after one step the pool is the largest step's
    offloaded bytes (:func:`host_bytes` each) and nothing else is allocated. A pool that a graph not yet
    differentiated still reads is never written: that forward's copies get buffers of their own.

    Args:
        pin: page-lock the pool (``cudaHostRegister``), so copies to and from the GPU run asynchronously.
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.capacity = 0  # bytes of the pool
        self.taken = 0  # bytes this forward asked for (fitting or not)
        self.spilled = 0  # bytes of this forward given buffers of their own
        self._buffer: Optional[torch.Tensor] = None  # (capacity,) uint8
        self._unpin: Optional[weakref.finalize] = None
        self._handed: list[weakref.ref] = []  # this forward's views of the pool
        self._open = False  # this forward may write the pool

    def reset(self) -> None:
        """Start a forward: grow the pool to what the last forward took, if no graph still reads it."""
        busy = any(view() is not None for view in self._handed)
        if not busy and self.taken > self.capacity:
            self._release()
            self._buffer = torch.empty(self.taken, dtype=torch.uint8)
            if self.pin:
                _register(self._buffer)
                # unregistered before the memory can go back to the allocator, here or when the pool is dropped
                self._unpin = weakref.finalize(self, _unregister, self._buffer)
            self.capacity = self.taken
        self._open = not busy
        self._handed = [view for view in self._handed if view() is not None]
        self.taken = self.spilled = 0

    def take(self, size: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor of ``size`` and ``dtype``: a view of the pool if it fits."""
        nbytes = math.prod(size) * _element_size(dtype)
        start, self.taken = self.taken, self.taken + host_bytes(nbytes, 0)
        if not self._open or self.taken > self.capacity:
            self.spilled += nbytes
            return torch.empty(size, dtype=dtype)
        view = self._buffer[start:start + nbytes].view(dtype).view(size)
        self._handed.append(weakref.ref(view))
        return view

    def _release(self) -> None:
        if self._unpin is not None:
            # the last backward's host-to-device copies (non_blocking) may still be queued on the stream: the pool
            # is freed only once they ran (torch's own pinned allocator waits on events for the same reason)
            torch.cuda.current_stream().synchronize()
            self._unpin()
        self._buffer, self._unpin, self.capacity = None, None, 0


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _register(buffer: torch.Tensor) -> None:
    """Page-lock ``buffer`` in place, at its exact size. torch exposes no exact-size pinned allocation (its
    ``pin_memory`` rounds up, see the module doc); ``torch.cuda.cudart()`` is the CUDA runtime torch itself
    pins with (``torch/cuda/_pin_memory_utils.py``). tests/test_offload.py's gpu test fails if it stops working."""
    # flag 1, cudaHostRegisterPortable, as torch's helper passes: pinned for every CUDA context, not only the current
    code = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 1))
    if code != 0:
        raise RuntimeError(f"offload_activations: cudaHostRegister of the {buffer.numel() / MiB:.0f} MiB host pool "
                           f"failed with CUDA error {code}; raise the locked-memory limit (ulimit -l) or pass "
                           "offload_activations=False")


def _unregister(buffer: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


class ActivationOffload:
    """``saved_tensors_hooks`` pack/unpack pair that parks saved device tensors in host memory.

    Args:
        min_bytes: smaller tensors stay where they are (not worth a copy).
        include_host: also copy tensors that are already on the host (tests use it to exercise the
            round trip on a CPU-only machine).
        pin: page-lock the host pool; default: when CUDA is available.
    """

    def __init__(self, min_bytes: int = MiB, include_host: bool = False, pin: Optional[bool] = None) -> None:
        self.min_bytes = min_bytes
        self.include_host = include_host
        self.pool = HostPool(torch.cuda.is_available() if pin is None else pin)
        self.offloaded_bytes = 0  # bytes moved by the current forward (reset by :meth:`reset`)
        # one host copy per tensor object (the rotary cos/sin go to every layer): id -> (weak ref, version, copy).
        # Keyed by the object, not its address: a freed block is soon another tensor of the same shape.
        self._copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._parameter_storages: set[int] = set()  # data pointers of the parameters' storages (see reset)

    def reset(self, parameters: Iterable[torch.Tensor] = ()) -> None:
        """Start a new forward: forget which tensors were copied, count the bytes afresh, and note where
        ``parameters`` live (read again each forward: a model may have moved since the last)."""
        self.offloaded_bytes = 0
        self.forget_copies()
        self.pool.reset()
        self._parameter_storages = {_storage_ptr(p) for p in parameters} - {0}

    def forget_copies(self) -> None:
        """Drop the lookup table of host copies (the copies autograd needs live on in its graph)."""
        self._copies.clear()

    def pack(self, tensor: torch.Tensor) -> Union[torch.Tensor, tuple[torch.device, torch.Tensor]]:
        if (tensor.device.type == "meta" or (tensor.device.type == "cpu" and not self.include_host)
                or tensor.layout != torch.strided
                or tensor.numel() * tensor.element_size() < self.min_bytes or self._is_parameter_memory(tensor)):
            return tensor
        ref, version, host = self._copies.get(id(tensor), (None, None, None))
        if ref is None or ref() is not tensor or version != tensor._version:
            host = self.pool.take(tensor.size(), tensor.dtype)
            # pinned: stream-ordered before anything reuses the device memory; the host never writes the pool
            host.copy_(tensor, non_blocking=self.pool.pin and tensor.device.type == "cuda" and host.is_pinned())
            self._copies[id(tensor)] = (weakref.ref(tensor), tensor._version, host)
            self.offloaded_bytes += host.numel() * host.element_size()
        return tensor.device, host

    def _is_parameter_memory(self, tensor: torch.Tensor) -> bool:
        """A parameter, a view of one (its ``_base``: FSDP's unsharded parameters, which the model's
        ``parameters()`` do not list), or another tensor on a parameter's storage (``weight.detach()``)."""
        return (isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)
                or _storage_ptr(tensor) in self._parameter_storages)

    @staticmethod
    def unpack(packed: Union[torch.Tensor, tuple[torch.device, torch.Tensor]]) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=host.is_pinned())

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class OffloadHooks:
    """Module hooks that run the model's training forward under :class:`ActivationOffload`."""

    def __init__(self, model: nn.Module, offload: Optional[ActivationOffload] = None) -> None:
        self.offload = offload or ActivationOffload()
        self._stack: list[contextlib.AbstractContextManager] = []
        self.handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _enter(self, model: nn.Module, args: Any) -> None:
        active = model.training and torch.is_grad_enabled()
        context = self.offload.hooks() if active else contextlib.nullcontext()
        if active and not self._stack:
            self.offload.reset(model.parameters())
        context.__enter__()
        self._stack.append(context)

    def _exit(self, model: nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop().__exit__(None, None, None)
        if not self._stack:
            self.offload.forget_copies()


def attach_offload(model: nn.Module, min_bytes: int = MiB, include_host: bool = False,
                   pin: Optional[bool] = None) -> OffloadHooks:
    """Offload what ``model``'s training forwards save for backward to host memory (see the module doc)."""
    existing = getattr(model, "qmiss_offload", None)
    if existing is not None:
        existing.remove()
    model.qmiss_offload = OffloadHooks(model, ActivationOffload(min_bytes, include_host, pin))
    return model.qmiss_offload


def _storage_ptr(tensor: torch.Tensor) -> int:
    """The address of ``tensor``'s storage; 0 for a tensor with none of its own (a wrapper subclass: DTensor)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


class HostEmbeddings:
    """The input embedding table stays in host memory; each batch's token ids go to it, their rows come back.

    A 128k-token vocabulary makes the table 1 GiB in bf16 (Llama-3-8B), for a lookup of a few
    thousand rows per step. With ``prepare_qmiss(embeddings_on_host=True)`` the table lives on the
    CPU: a hook sends the token ids there and moves the looked-up rows (tokens × hidden) to the
    device of the output head. Moving the model (``.to("cuda")``, ``.cuda()``) keeps the table on
    the host; a dtype cast still applies. The table is re-registered last among its siblings so that
    ``model.device`` (the first parameter's) stays the GPU, and DDP is told to leave it alone. A
    frozen table's backward stops at the device copy.
    """

    def __init__(self, model: nn.Module) -> None:
        self.embeddings = check_host_embeddings(model)
        self.anchor = model.get_output_embeddings()  # the rows go where the head is
        weight = self.embeddings.weight
        weight.data = weight.data.to("cpu")
        # torch has no public hook on a module's device moves (``.to``/``.cuda`` reach parameters only through
        # ``Module._apply``), and transformers' embedding classes vary (Gemma's scales its output), so this one
        # instance gets its own ``_apply`` rather than a subclass swapped in; ``remove`` takes it away again.
        self.embeddings._apply = functools.partial(_dtype_only_apply, self.embeddings)
        name = _move_to_the_end(model, self.embeddings)
        # DDP: the frozen host table is neither broadcast nor reduced (NCCL cannot carry a host tensor)
        ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
        model._ddp_params_and_buffers_to_ignore = ignored + [f"{name}.weight"]
        self.handles = [
            self.embeddings.register_forward_pre_hook(self._to_host),
            self.embeddings.register_forward_hook(self._to_device),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.embeddings.__dict__.pop("_apply", None)

    @staticmethod
    def _to_host(module: nn.Module, args: tuple) -> tuple:
        return (args[0].to("cpu"),) + tuple(args[1:])

    def _to_device(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        rows = output.to(self.anchor.weight.device)
        if output.requires_grad and not module.weight.requires_grad:
            # only marked so checkpointing sees a grad-requiring input (enable_input_require_grads): the
            # gradient is not wanted on the host, so the graph starts at the device copy
            rows = rows.detach().requires_grad_()
        return rows


def _dtype_only_apply(module: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    """``Module._apply`` for a host-kept table: the dtype a cast asks for is applied, a device move is not.

    What ``fn`` (a ``.to``/``.cuda``/``.half`` closure) wants is read off an empty CPU tensor.
    """
    for param in module.parameters(recurse=False):
        wanted = fn(torch.empty(0, dtype=param.dtype)).dtype
        if wanted != param.dtype:
            param.data = param.data.to(wanted)
    return module


def _move_to_the_end(model: nn.Module, child: nn.Module) -> str:
    """Re-register ``child`` last among its siblings; returns its name in ``model``.

    transformers' ``model.device`` is the device of the first parameter, the input table's: kept
    on the host it would send ``generate``'s inputs there. Last, the first parameter is a decoder
    weight's again. Names and state-dict keys do not change, only their order.
    """
    for name, module in model.named_modules():
        for child_name, sub in list(module.named_children()):
            if sub is child:
                delattr(module, child_name)  # registering it again puts it last (nn.Module keeps insertion order)
                setattr(module, child_name, child)
                return f"{name}.{child_name}" if name else child_name
    raise ValueError("the input embedding is not a submodule of the model")


def check_host_embeddings(model: nn.Module) -> nn.Module:
    """The model's input embedding if it can stay on the host.

    Raises:
        InputError: no ``nn.Embedding`` input table, or one tied to the output head (which needs it on the GPU).
    """
    name = type(model).__name__
    get_in = getattr(model, "get_input_embeddings", None)
    embeddings = get_in() if callable(get_in) else None
    if not isinstance(embeddings, nn.Embedding):
        raise InputError(f"embeddings_on_host: {name}'s input embedding is {type(embeddings).__name__}, not an "
                         "nn.Embedding; pass embeddings_on_host=False")
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None and getattr(head, "weight", None) is embeddings.weight:
        raise InputError(f"embeddings_on_host: {name} ties its input embeddings to its output head "
                         "(tie_word_embeddings), which runs on the GPU; pass embeddings_on_host=False for this model")
    if getattr(embeddings, "_hf_hook", None) is not None:
        raise InputError(f"embeddings_on_host: {name}'s input embedding is placed by a device_map (accelerate's hook "
                         "sends its input ids back to the GPU it was mapped to); load the model on one device "
                         "(device_map={'': 0}) or pass embeddings_on_host=False")
    return embeddings


def attach_host_embeddings(model: nn.Module) -> HostEmbeddings:
    """Keep ``model``'s input embedding table in host memory (see :class:`HostEmbeddings`)."""
    existing = getattr(model, "qmiss_host_embeddings", None)
    if existing is not None:
        existing.remove()
    model.qmiss_host_embeddings = HostEmbeddings(model)
    return model.qmiss_host_embeddings
