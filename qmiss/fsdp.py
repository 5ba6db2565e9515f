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


def mixed_precision_policy(param_dtype: torch.dtype, fsdp_version: int = 1):
    """FSDP's mixed precision for a qmiss model: parameters in ``param_dtype`` for compute, gradients reduced in
    fp32, buffers left as they are.

    ``MixedPrecision(buffer_dtype=bf16)`` (what accelerate's plugin sets for ``--mixed_precision bf16``) turns
    RoPE's ``inv_freq`` into bf16, whose angles drift by radians at 4k positions, and a bf16 ``reduce_dtype``
    sums the adapters' gradients over ranks in bf16: neither is what one process computes.
    """
    if fsdp_version == 2:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    from torch.distributed.fsdp import MixedPrecision

    return MixedPrecision(param_dtype=param_dtype, reduce_dtype=torch.float32, buffer_dtype=None)


def fsdp_mixed_precision(model: nn.Module):
    """FSDP1 ``MixedPrecision`` whose param dtype is the storage dtype (:func:`mixed_precision_policy`: fp32
    gradient reduction, buffers as they are).

    Raises:
        ValueError: the 4-bit weights are packed as uint8 (FSDP1 cannot flatten them with float tensors).
    """
    dtype = storage_dtype(model)
    if dtype is None:
        raise ValueError(
            f"{type(model).__name__}: the 4-bit weights are packed as uint8, which FSDP1 cannot flatten with float "
            "tensors; prepare with qmiss.prepare_qmiss(..., quant_storage=torch.bfloat16), or use FSDP2 (fully_shard)"
        )
    return mixed_precision_policy(dtype)


def update_fsdp_plugin(plugin, model: nn.Module) -> None:
    """Set accelerate's ``FullyShardedDataParallelPlugin`` up for a qmiss model.

    The qmiss twin of transformers' ``update_fsdp_plugin_peft``: FSDP1 gets :func:`fsdp_auto_wrap_policy`; the
    mixed precision's param dtype is the storage dtype (a float-stored 4-bit model) or the one the plugin
    already had (``--mixed_precision bf16``), with fp32 gradient reduction and buffers left alone
    (:func:`mixed_precision_policy`). FSDP2 keeps accelerate's decoder-layer policy.
    """
    version = getattr(plugin, "fsdp_version", 1)
    if version == 1:
        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    policy = plugin.mixed_precision_policy
    given = policy.get("param_dtype") if isinstance(policy, dict) else getattr(policy, "param_dtype", None)
    if isinstance(given, str):
        given = getattr(torch, given, None) or {"bf16": torch.bfloat16, "fp16": torch.float16}.get(given)
    dtype = storage_dtype(model) or given
    if dtype is not None:
        plugin.mixed_precision_policy = mixed_precision_policy(dtype, version)
