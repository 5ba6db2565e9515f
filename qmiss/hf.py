"""Everything qmiss does to transformers' own machinery, in one place.

A qmiss model stays the ``PreTrainedModel`` it was: ``generate``, ``Trainer`` and TRL take it as
it is. What transformers would otherwise do wrong with it is set here, each item next to a
comment naming the transformers code that reads it:

- the Trainer accepts a model loaded through ``BitsAndBytesConfig`` once adapters are attached;
- ``save_pretrained`` (and so every Trainer / TRL save) writes the adapter in PEFT's format, never
  the packed base;
- PEFT's methods (``print_trainable_parameters``, ``disable_adapter``, ``merge_and_unload`` …) are
  there for code written against a ``PeftModel``;
- dtype casts (``.half()``, ``.float()``, ``.to(dtype)``) never reinterpret packed bytes;
- FlashAttention's target dtype is the model's dtype, not the packed weight's.

The methods are bound on the model instance (its class is left alone), so what
:func:`qmiss.prepare_qmiss` changes can be listed: :data:`BOUND_METHODS`, and the attributes
named in :func:`attach`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Optional

import torch
from torch import nn

#: the methods :func:`attach` binds on a prepared model (PEFT's names and transformers' adapter methods).
BOUND_METHODS = (
    "save_pretrained",
    "print_trainable_parameters",
    "get_nb_trainable_parameters",
    "disable_adapter",
    "disable_adapters",
    "enable_adapters",
    "active_adapters",
    "load_adapter",
    "get_adapter_state_dict",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "merge_and_unload",
    "unload",
    "get_base_model",
    "half",
    "float",
    "bfloat16",
    "to",
)


def attach(model: nn.Module) -> None:
    """Set up a freshly prepared qmiss model for transformers, TRL and PEFT-style code.

    Attributes set:
        ``model._hf_peft_config_loaded = True`` — transformers' flag for "adapters are attached".
            Read by ``transformers.trainer_utils.validate_quantization_for_training``, which refuses
            a quantized model (``model.is_quantized``, left as transformers set it) unless this flag
            is set or the model is a ``PeftModel``; by ``PreTrainedModel._activation_checkpointing_enable``,
            which then keeps input gradients on (qmiss needs them); and by
            ``_activation_checkpointing_disable``, which turns them off again.
        ``model.config._is_quantized = True`` — what transformers' quantizers set on load
            (``quantizers/base.py``). ``integrations/flash_attention.get_target_dtype`` reads it and
            casts fp32 queries to ``config.dtype`` instead of the dtype of the attention block's first
            ``nn.Linear``, which is a packed uint8/int8 base weight.
    """
    model._hf_peft_config_loaded = True
    if getattr(model, "config", None) is not None:
        model.config._is_quantized = True
    for name in BOUND_METHODS:  # a partial, unlike a bound method, pickles (by the function's qualified name)
        setattr(model, name, functools.partial(globals()[f"_{name}"], model))


def detach(model: nn.Module) -> None:
    """Undo :func:`attach` (after ``merge_and_unload`` or ``unload``: the model is plain again)."""
    for name in BOUND_METHODS:
        model.__dict__.pop(name, None)
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False
    config = getattr(model, "config", None)
    if config is not None and "_is_quantized" in config.__dict__ and getattr(model, "hf_quantizer", None) is None:
        del config._is_quantized


def forget_quantization(model: nn.Module) -> None:
    """Drop transformers' record of a bitsandbytes load, so a merged model saves and loads as a plain one.

    ``hf_quantizer`` and ``quantization_method`` drive ``PreTrainedModel.save_pretrained`` (quantized
    serialization) and ``.to()``/``.cuda()`` guards; ``is_quantized`` the ``.half()``/``.float()``
    guards and ``trainer_utils.validate_quantization_for_training``; ``is_loaded_in_4bit/8bit`` the
    Trainer's ``nn.DataParallel`` decision; ``config.quantization_config`` is written to config.json.
    """
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            setattr(model, attr, False)
    config = getattr(model, "config", None)
    if hasattr(config, "quantization_config"):
        del config.quantization_config


# --- saving: transformers' Trainer._save and TRL call model.save_pretrained(output_dir, state_dict=..., ...) ----


def _save_pretrained(self: nn.Module, save_directory: str, state_dict: Optional[dict] = None,
                     is_main_process: bool = True, **kwargs: Any) -> None:
    """Write the adapter in PEFT's MiSS format, as ``PeftModel.save_pretrained`` does; the packed base is not saved.

    ``transformers.Trainer._save`` (so ``Trainer.save_model``, every checkpoint and TRL's trainers)
    calls this with ``state_dict`` (FSDP's full state dict, or None) and ``is_main_process``. Other
    keyword arguments of ``PreTrainedModel.save_pretrained`` (``safe_serialization``,
    ``max_shard_size`` …) do not apply to an adapter and are ignored. For a merged 16-bit
    checkpoint use :func:`qmiss.export_merged`.
    """
    from qmiss.io import save_adapter

    if not is_main_process:
        return
    full = state_dict if state_dict is not None and any(k.endswith(".adapter.weight") for k in state_dict) else None
    save_adapter(self, save_directory, state_dict=full)


# --- PEFT's surface -------------------------------------------------------------------------------------------


def _print_trainable_parameters(self: nn.Module) -> None:
    """PEFT's line: ``trainable params: … || all params: … || trainable%: …``."""
    from qmiss.model import trainable_parameters

    trainable_parameters(self, verbose=True)


def _get_nb_trainable_parameters(self: nn.Module) -> tuple[int, int]:
    """(trainable, total), as PEFT's ``get_nb_trainable_parameters``."""
    from qmiss.model import trainable_parameters

    return trainable_parameters(self, verbose=False)


def _disable_adapter(self: nn.Module) -> contextlib.AbstractContextManager:
    """PEFT's ``with model.disable_adapter():`` — the base model's output inside the block."""
    from qmiss.model import disable_adapter

    return disable_adapter(self)


def _disable_adapters(self: nn.Module) -> None:
    """transformers' ``model.disable_adapters()``: adapters off until :func:`_enable_adapters`."""
    from qmiss.model import miss_layers

    for _, layer in miss_layers(self):
        layer.disabled = True


def _enable_adapters(self: nn.Module) -> None:
    """transformers' ``model.enable_adapters()``."""
    from qmiss.model import miss_layers

    for _, layer in miss_layers(self):
        layer.disabled = False


def _active_adapters(self: nn.Module) -> list[str]:
    """transformers' ``model.active_adapters()``: ``["default"]`` while the adapters are on, else ``[]``
    (transformers' own version asks for a PEFT release that does not exist yet)."""
    from qmiss.model import miss_layers

    return ["default"] if any(not layer.disabled for _, layer in miss_layers(self)) else []


def _load_adapter(self: nn.Module, peft_model_id: str, adapter_name: Optional[str] = None,
                  is_trainable: bool = False, **kwargs: Any) -> None:
    """transformers' ``model.load_adapter(dir)``: :func:`qmiss.load_adapter` (one adapter per layer, "default")."""
    from qmiss.io import load_adapter

    if adapter_name not in (None, "default"):
        raise ValueError(f"adapter_name={adapter_name!r}: a qmiss model holds one adapter per layer ('default'); "
                         "prepare a second model for a second adapter")
    load_adapter(self, peft_model_id, trainable=is_trainable)


def _get_adapter_state_dict(self: nn.Module, adapter_name: Optional[str] = None, **kwargs: Any) -> dict:
    """transformers' ``model.get_adapter_state_dict()``: ``{"<module path>.miss_block": tensor}``."""
    from qmiss.model import adapter_state_dict

    return adapter_state_dict(self)


def _one_adapter_only(call: str) -> None:
    raise ValueError(f"model.{call}: a qmiss model holds one MiSS adapter per layer and no named adapters; use "
                     "qmiss.load_adapter(model, dir) to replace it, qmiss.disable_adapter(model) to switch it off, "
                     "or prepare a second model for a second adapter")


def _add_adapter(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    _one_adapter_only("add_adapter")


def _set_adapter(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    _one_adapter_only("set_adapter")


def _delete_adapter(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    _one_adapter_only("delete_adapter")


def _merge_and_unload(self: nn.Module, dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> nn.Module:
    """PEFT's ``merge_and_unload``: a plain 16-bit transformers model with the adapters folded in, exactly
    (:func:`qmiss.merge_and_unload`; PEFT's re-quantizes a 4-bit base, which loses the adapter's precision)."""
    from qmiss.io import merge_and_unload

    model = merge_and_unload(self, dtype=dtype)
    detach(model)
    return model


def _unload(self: nn.Module) -> nn.Module:
    """PEFT's ``unload``: the adapters removed, each layer back to its (quantized) base layer; in place."""
    from qmiss.model import miss_layers

    for name, layer in list(miss_layers(self)):
        parent, _, child = name.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, child, layer.base_layer)
    del self.qmiss_config
    detach(self)
    return self


def _get_base_model(self: nn.Module) -> nn.Module:
    """PEFT's ``get_base_model``: the transformers model, adapters in place. qmiss wraps nothing: the model itself."""
    return self


# --- dtype casts: nn.Module.half/float/bfloat16/to reach the packed weights through Module._apply ------------


def _refuse_packed_cast(model: nn.Module, dtype: Optional[torch.dtype], call: str) -> None:
    """Raise before any tensor changes if casting to ``dtype`` would convert packed 4-bit bytes stored as floats.

    Packed weights stored as uint8/int8 are not floating point, so ``nn.Module._apply`` leaves them
    alone and the cast is correct for every other tensor. With a float ``quant_storage`` (the FSDP1
    layout) the bytes would be converted as if they were values.
    """
    from qmiss import quant
    from qmiss.model import miss_layers

    if dtype is None or not dtype.is_floating_point:
        return
    stored = {(name, layer.base_layer.weight.dtype) for name, layer in miss_layers(model)
              if quant.quant_bits(layer.base_layer) == 4 and layer.base_layer.weight.dtype.is_floating_point}
    wrong = sorted(name for name, storage in stored if storage != dtype)
    if wrong:
        storage = next(s for n, s in stored if n == wrong[0])
        raise ValueError(
            f"model.{call}: {wrong[0]} (and {len(wrong) - 1} more) stores its packed 4-bit bytes as {storage} "
            f"(quant_storage); casting to {dtype} would convert the bytes as if they were values. Load the model "
            f"in the dtype you want before prepare_qmiss, or keep the storage dtype ({storage})")


def _half(self: nn.Module) -> nn.Module:
    _refuse_packed_cast(self, torch.float16, "half()")
    return type(self).half(self)


def _float(self: nn.Module) -> nn.Module:
    _refuse_packed_cast(self, torch.float32, "float()")
    return type(self).float(self)


def _bfloat16(self: nn.Module) -> nn.Module:
    _refuse_packed_cast(self, torch.bfloat16, "bfloat16()")
    return type(self).bfloat16(self)


def _to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    _, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    _refuse_packed_cast(self, dtype, "to()")
    return type(self).to(self, *args, **kwargs)


def bound_methods(model: nn.Module) -> Iterator[str]:
    """The names of the methods :func:`attach` bound on ``model`` (for tests and introspection)."""
    return (name for name in BOUND_METHODS if name in model.__dict__)
