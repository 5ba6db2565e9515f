"""Measuring memory as a GPU would hold it, on any device.

Process RSS says little about what a CUDA allocator would need. What it needs is
the tensors alive at the worst moment of a step, and among them the ones autograd
keeps for backward. :func:`measure_peak` counts both while a function runs:

- live peak: a ``TorchDispatchMode`` sees every tensor an aten op creates
  (inside custom autograd Functions and bitsandbytes kernels too); each new
  storage is counted until it is freed (a finalizer on the storage), so the
  running sum is the live tensor bytes created by the step, and its maximum the peak.
- saved for backward: ``torch.autograd.graph.saved_tensors_hooks`` sees what
  ``ctx.save_for_backward`` and built-in ops save (not tensors a Function stores
  on ``ctx`` directly — bitsandbytes' 8-bit matmul does; the live peak counts those).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


@dataclass
class PeakReport:
    """What :func:`measure_peak` saw, in bytes."""

    peak_bytes: int  # most bytes of tensors created during the run that were alive at once
    end_bytes: int  # bytes of those still alive when the run ended (e.g. gradients, optimizer state)
    saved_bytes: int  # unique storages autograd saved for backward, excluding the ``exclude`` tensors
    result: Any = None  # what the function returned


def _plain(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that hold ``tensor``'s storage: itself, or for a wrapper subclass such as FSDP2's DTensor
    (which has no storage of its own) the plain tensors inside it. A dispatch mode sees the subclass's op, not
    the ops it then runs on its inner tensors, so those are counted through the subclass."""
    if not is_traceable_wrapper_subclass(tensor):
        return [] if tensor.device.type == "meta" else [tensor]
    names, _ = tensor.__tensor_flatten__()  # may name non-tensors too (a DTensor's mesh, in torch 2.13)
    inner = (getattr(tensor, name) for name in names)
    return [plain for t in inner if isinstance(t, torch.Tensor) for plain in _plain(t)]


class LiveTensorTracker(TorchDispatchMode):
    """Running sum and peak of the bytes of storages created inside the mode.

    A storage counts from the op that creates it until it is freed. Outputs that
    share storage with an op's inputs (views, in-place ops) or with a storage
    already counted add nothing; neither do tensors that existed before the mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: dict[int, int] = {}  # data_ptr -> bytes of the storages alive and counted
        self._lock = threading.Lock()

    def _release(self, ptr: int) -> None:
        with self._lock:
            self.live -= self._counted.pop(ptr, 0)

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in inputs or ptr in self._counted:
            return
        with self._lock:
            self._counted[ptr] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {
            plain.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
            for plain in _plain(t)
        }
        out = func(*args, **kwargs)
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                for plain in _plain(item):
                    self._track(plain, inputs)
        return out


def resident_bytes(*holders: Any) -> int:
    """Bytes of the unique storages that modules (parameters, buffers) and optimizers (state tensors) hold.

    With :func:`measure_peak`, ``resident_bytes(model, optimizer) + measure_peak(step).peak_bytes``
    is the whole of what a training step needs at its worst moment, weights and optimizer included.
    """
    storages: dict[int, int] = {}
    for holder in holders:
        if isinstance(holder, torch.nn.Module):
            tensors = [*holder.parameters(), *holder.buffers()]
        elif isinstance(holder, torch.optim.Optimizer):
            tensors = [v for state in holder.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        else:
            raise TypeError(f"resident_bytes takes modules and optimizers, not {type(holder).__name__}")
        for plain in (plain for tensor in tensors for plain in _plain(tensor)):
            storage = plain.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measure_peak(fn: Callable[[], Any], exclude: Optional[Iterable[torch.Tensor]] = None) -> PeakReport:
    """Run ``fn()`` and report its live-tensor peak and the bytes autograd saved for backward.

    Args:
        fn: a step, e.g. ``lambda: model(**batch).loss.backward()``.
        exclude: tensors not to count as saved (typically the model's parameters,
            which exist whether or not backward needs them).

    Returns:
        A :class:`PeakReport`; ``result`` holds fn's return value.
    """
    excluded = {plain.untyped_storage().data_ptr() for t in (exclude or []) for plain in _plain(t)}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        for plain in _plain(tensor):
            storage = plain.untyped_storage()
            if storage.data_ptr() not in excluded:
                saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    pack.repeatable_unpack = True  # its unpack is the identity: see qmiss.ops.REPEATABLE_UNPACK
    tracker = LiveTensorTracker()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
        result = fn()
    return PeakReport(peak_bytes=tracker.peak, end_bytes=tracker.live, saved_bytes=sum(saved.values()), result=result)
