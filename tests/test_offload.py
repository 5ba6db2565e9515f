"""Activation offload (qmiss/offload.py): what is copied to the host, and the host pool it is copied into.

On the CPU the offload copies nothing unless told to (``include_host=True``); the tests tell it to and count.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qmiss
from qmiss.offload import ActivationOffload, attach_offload
from tests.helpers import tiny_llama


def _step(model: nn.Module, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()


def _saved(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor the same step saves for backward, as seen from outside the model (the offload's view)."""
    saved: list[torch.Tensor] = []
    hooks = model.qmiss_offload
    hooks.remove()  # the recorder takes the offload hooks' place for one step
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _step(model, ids)
    model.qmiss_offload = attach_offload(model, hooks.offload.min_bytes, hooks.offload.include_host)
    return saved


@pytest.mark.parametrize("chunked", [False, True], ids=["plain-loss", "chunked-loss"])
def test_views_of_parameters_are_never_copied(chunked: bool) -> None:
    """F.linear saves ``lm_head.weight.t()``, a view and no nn.Parameter: copying it would move the whole head
    to the host and back every step. What is copied is exactly the saved tensors that are no parameter's memory."""
    model = qmiss.prepare_qmiss(tiny_llama(vocab_size=4096), r=16, bits=4, gradient_checkpointing=True,
                                chunked_loss=chunked, offload_activations=True).train()
    attach_offload(model, min_bytes=0, include_host=True)
    ids = torch.randint(0, 4096, (2, 21), generator=torch.Generator().manual_seed(0))
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = _saved(model, ids)
    head = model.lm_head.weight
    assert any(t.untyped_storage().data_ptr() == head.untyped_storage().data_ptr() and not isinstance(t, nn.Parameter)
               for t in saved)  # the case in point: a view of the head is saved
    unique = {id(t): t for t in saved}.values()
    activations = sum(t.numel() * t.element_size() for t in unique if t.untyped_storage().data_ptr() not in storages)
    _step(model, ids)
    assert model.qmiss_offload.offload.offloaded_bytes == activations


def test_pack_leaves_parameters_and_their_views_where_they_are() -> None:
    weight = nn.Parameter(torch.randn(64, 32))
    offload = ActivationOffload(min_bytes=0, include_host=True)
    offload.reset([weight])
    for tensor in (weight, weight.t(), weight[:8], weight.detach(), weight.data.view(-1)):
        assert offload.pack(tensor) is tensor
    assert offload.offloaded_bytes == 0
    activation = torch.randn(64, 32)
    assert offload.unpack(offload.pack(activation)).equal(activation)
    assert offload.offloaded_bytes == activation.numel() * 4
