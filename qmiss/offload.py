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
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import nn

from qmiss.inputs import InputError

MiB = 2**20


class ActivationOffload:
    """``saved_tensors_hooks`` pack/unpack pair that parks saved device tensors in host memory.

    Args:
        min_bytes: smaller tensors stay where they are (not worth a copy).
        include_host: also copy tensors that are already on the host (tests use it to exercise the
            round trip on a CPU-only machine).
    """

    def __init__(self, min_bytes: int = MiB, include_host: bool = False) -> None:
        self.min_bytes = min_bytes
        self.include_host = include_host
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
        self._parameter_storages = {_storage_ptr(p) for p in parameters} - {0}

    def forget_copies(self) -> None:
        """Drop the lookup table of host copies (the copies autograd needs live on in its graph)."""
        self._copies.clear()

    def pack(self, tensor: torch.Tensor) -> Union[torch.Tensor, tuple[torch.device, torch.Tensor]]:
        if (tensor.device.type == "meta" or (tensor.device.type == "cpu" and not self.include_host)
                or tensor.numel() * tensor.element_size() < self.min_bytes or self._is_parameter_memory(tensor)):
            return tensor
        ref, version, host = self._copies.get(id(tensor), (None, None, None))
        if ref is None or ref() is not tensor or version != tensor._version:
            pin = tensor.device.type == "cuda"
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
            host.copy_(tensor, non_blocking=pin)  # stream-ordered before anything reuses the device memory
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


def attach_offload(model: nn.Module, min_bytes: int = MiB, include_host: bool = False) -> OffloadHooks:
    """Offload what ``model``'s training forwards save for backward to host memory (see the module doc)."""
    existing = getattr(model, "qmiss_offload", None)
    if existing is not None:
        existing.remove()
    model.qmiss_offload = OffloadHooks(model, ActivationOffload(min_bytes, include_host))
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
    return embeddings


def attach_host_embeddings(model: nn.Module) -> HostEmbeddings:
    """Keep ``model``'s input embedding table in host memory (see :class:`HostEmbeddings`)."""
    existing = getattr(model, "qmiss_host_embeddings", None)
    if existing is not None:
        existing.remove()
    model.qmiss_host_embeddings = HostEmbeddings(model)
    return model.qmiss_host_embeddings
