"""FSDP1 (``FullyShardedDataParallel``), QLoRA-style: what to wrap and in which dtype.

FSDP1 flattens the parameters of each unit into one tensor, which must have one
dtype (and, without ``use_orig_params``, one ``requires_grad``). A qmiss model made
for it (``prepare_qmiss(..., quant_storage=torch.bfloat16)`` or a model loaded with
``BitsAndBytesConfig(bnb_4bit_quant_storage=torch.bfloat16)``) stores its packed 4-bit
weights and every other frozen tensor in that one dtype; its fp32 adapters live in
leaf modules (:class:`~qmiss.layer.MissBlock`) that :func:`fsdp_auto_wrap_policy`
gives units of their own. The mixed-precision param dtype must equal the storage
dtype: casting packed bytes to another float dtype would destroy them.

FSDP2 (``fully_shard`` per decoder layer) needs none of this: it shards each tensor
separately, uint8 included.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from qmiss import quant
from qmiss.layer import MissBlock
from qmiss.model import miss_layers


def storage_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The float dtype the model's 4-bit weights are stored in, or None (uint8, 8-bit, unquantized)."""
    found = {quant.storage_dtype(layer.base_layer) for _, layer in miss_layers(model)} - {None}
    floating = {d for d in found if d.is_floating_point}
    return floating.pop() if len(floating) == 1 else None


def _layer_classes(model: nn.Module, names: Optional[Iterable[str]]) -> set[type]:
    names = list(names if names is not None else getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(
            f"{type(model).__name__} names no decoder-layer class (_no_split_modules is empty); "
            "pass layer_classes=['MyDecoderLayer']"
        )
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    missing = set(names) - {c.__name__ for c in classes}
    if missing:
        raise ValueError(f"{type(model).__name__} has no module of class {sorted(missing)}; check layer_classes")
    return classes


def fsdp_auto_wrap_policy(model: nn.Module, layer_classes: Optional[Iterable[str]] = None) -> Callable:
    """An FSDP1 ``auto_wrap_policy``: every decoder layer a unit, every adapter a unit of its own.

    The adapters' units hold only trainable fp32 tensors; the decoder layers' units hold
    only frozen tensors of the storage dtype, so no flat parameter mixes the two (PEFT
    issue #1702: "Must flatten tensors with uniform requires_grad").

    Args:
        model: a prepared qmiss model.
        layer_classes: decoder-layer class names; default the model's ``_no_split_modules``.

    Raises:
        ValueError: the model has no qmiss adapters, or no decoder-layer class is found.
    """
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    if not any(True for _ in miss_layers(model)):
        raise ValueError(f"{type(model).__name__} has no qmiss adapters; call qmiss.prepare_qmiss(model) first")
    adapters = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: isinstance(module, MissBlock))
    layers = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=_layer_classes(model, layer_classes))
    return functools.partial(_or_policy, policies=[adapters, layers])


def fsdp_mixed_precision(model: nn.Module):
    """FSDP1 ``MixedPrecision`` whose param dtype is the storage dtype (None for a uint8/8-bit model).

    Raises:
        ValueError: the 4-bit weights are packed as uint8 (FSDP1 cannot flatten them with float tensors).
    """
    from torch.distributed.fsdp import MixedPrecision

    dtype = storage_dtype(model)
    if dtype is None:
        raise ValueError(
            f"{type(model).__name__}: the 4-bit weights are packed as uint8, which FSDP1 cannot flatten with float "
            "tensors; prepare with qmiss.prepare_qmiss(..., quant_storage=torch.bfloat16), or use FSDP2 (fully_shard)"
        )
    return MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype)


def update_fsdp_plugin(plugin, model: nn.Module) -> None:
    """Set accelerate's ``FullyShardedDataParallelPlugin`` up for a qmiss model.

    The qmiss twin of transformers' ``update_fsdp_plugin_peft``: FSDP1 gets
    :func:`fsdp_auto_wrap_policy`, and a float storage dtype becomes the
    mixed-precision dtype. FSDP2 keeps accelerate's decoder-layer policy.
    """
    if getattr(plugin, "fsdp_version", 1) == 1:
        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    dtype = storage_dtype(model)
    if dtype is not None:
        plugin.set_mixed_precision(dtype, override=True)
