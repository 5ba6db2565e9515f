"""The methods a prepared model carries: ``save_pretrained``, PEFT's names, and dtype casts that keep packed bytes.

Code written against a ``PeftModel`` calls ``model.print_trainable_parameters()``,
``model.disable_adapter()``, ``model.merge_and_unload()`` …; transformers' Trainer and TRL call
``model.save_pretrained(dir, state_dict=...)``. :func:`bind` puts the functions of :data:`METHODS`
on the model instance (its class is left alone, so what :func:`qmiss.prepare_qmiss` changes can be
listed) and :func:`unbind` takes them off again. :func:`merge_and_unload` is also qmiss's own
public function.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from qmiss import hf, quant
from qmiss.adapters import load_adapter, require_qmiss, save_adapter
from qmiss.model import adapter_state_dict, disable_adapter, miss_layers, trainable_parameters, unwrap, unwrap_merged

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
    if not is_main_process:
        return
    full = state_dict if state_dict is not None and any(k.endswith(".adapter.weight") for k in state_dict) else None
    save_adapter(self, save_directory, state_dict=full)


# --- PEFT's surface -------------------------------------------------------------------------------------------


def _print_trainable_parameters(self: nn.Module) -> None:
    """PEFT's line: ``trainable params: … || all params: … || trainable%: …``."""
    trainable_parameters(self, verbose=True)


def _get_nb_trainable_parameters(self: nn.Module) -> tuple[int, int]:
    """(trainable, total), as PEFT's ``get_nb_trainable_parameters``."""
    return trainable_parameters(self, verbose=False)


def _disable_adapter(self: nn.Module) -> contextlib.AbstractContextManager:
    """PEFT's ``with model.disable_adapter():`` — the base model's output inside the block."""
    return disable_adapter(self)


def _disable_adapters(self: nn.Module) -> None:
    """transformers' ``model.disable_adapters()``: adapters off until :func:`_enable_adapters`."""
    for _, layer in miss_layers(self):
        layer.disabled = True


def _enable_adapters(self: nn.Module) -> None:
    """transformers' ``model.enable_adapters()``."""
    for _, layer in miss_layers(self):
        layer.disabled = False


def _active_adapters(self: nn.Module) -> list[str]:
    """transformers' ``model.active_adapters()``: ``["default"]`` while the adapters are on, else ``[]``
    (transformers' own version asks for a PEFT release that does not exist yet)."""
    return ["default"] if any(not layer.disabled for _, layer in miss_layers(self)) else []


def _load_adapter(self: nn.Module, peft_model_id: str, adapter_name: Optional[str] = None,
                  is_trainable: bool = False, **kwargs: Any) -> None:
    """transformers' ``model.load_adapter(dir)``: :func:`qmiss.load_adapter` (one adapter per layer, "default")."""
    if adapter_name not in (None, "default"):
        raise ValueError(f"adapter_name={adapter_name!r}: a qmiss model holds one adapter per layer ('default'); "
                         "prepare a second model for a second adapter")
    load_adapter(self, peft_model_id, trainable=is_trainable)


def _get_adapter_state_dict(self: nn.Module, adapter_name: Optional[str] = None, **kwargs: Any) -> dict:
    """transformers' ``model.get_adapter_state_dict()``: ``{"<module path>.miss_block": tensor}``."""
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


def merge_and_unload(model: nn.Module, dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> nn.Module:
    """A plain transformers model: every MissLinear becomes an ``nn.Linear`` holding dequantize(W) + ΔW.

    The merge is computed in fp32 from the dequantized base, so the result is exact up to
    ``dtype``'s rounding (unlike PEFT's merge into a 4-bit weight, which re-quantizes and loses the
    adapter's precision). Quantized layers left without an adapter are dequantized too. Works in
    place, one layer at a time. Also bound as ``model.merge_and_unload()`` (PEFT's name).

    Returns:
        The same model object, in ``dtype``, with no qmiss or bitsandbytes modules, flags or methods left.
    """
    require_qmiss(model)
    unwrap_merged(model, dtype)
    hf.forget_quantization(model)
    _plain_again(model)
    if callable(getattr(model, "disable_input_require_grads", None)):
        with contextlib.suppress(AttributeError):  # no hook was registered
            model.disable_input_require_grads()
    return model.to(dtype)


def _unload(self: nn.Module) -> nn.Module:
    """PEFT's ``unload``: the adapters removed, each layer back to its (quantized) base layer; in place."""
    unwrap(self)
    _plain_again(self)
    return self


def _plain_again(model: nn.Module) -> None:
    del model.qmiss_config
    hf.detach(model)
    unbind(model)


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


def _target_dtype(*args: Any, **kwargs: Any) -> Optional[torch.dtype]:
    """The dtype a ``Module.to(...)`` call asks for, in any of its documented forms (device, dtype, tensor)."""
    dtype = kwargs.get("dtype")
    for value in (*args, kwargs.get("tensor")):
        if isinstance(value, torch.dtype):
            dtype = value
        elif isinstance(value, torch.Tensor):
            dtype = value.dtype
    return dtype


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
    _refuse_packed_cast(self, _target_dtype(*args, **kwargs), "to()")
    return type(self).to(self, *args, **kwargs)


#: what :func:`bind` puts on a prepared model: PEFT's names, transformers' adapter methods, the dtype casts.
METHODS: dict[str, Callable[..., Any]] = {
    "save_pretrained": _save_pretrained,
    "print_trainable_parameters": _print_trainable_parameters,
    "get_nb_trainable_parameters": _get_nb_trainable_parameters,
    "disable_adapter": _disable_adapter,
    "disable_adapters": _disable_adapters,
    "enable_adapters": _enable_adapters,
    "active_adapters": _active_adapters,
    "load_adapter": _load_adapter,
    "get_adapter_state_dict": _get_adapter_state_dict,
    "add_adapter": _add_adapter,
    "set_adapter": _set_adapter,
    "delete_adapter": _delete_adapter,
    "merge_and_unload": merge_and_unload,
    "unload": _unload,
    "get_base_model": _get_base_model,
    "half": _half,
    "float": _float,
    "bfloat16": _bfloat16,
    "to": _to,
}


def bind(model: nn.Module) -> None:
    """Put every method of :data:`METHODS` on ``model`` (a partial, unlike a bound method, pickles)."""
    for name, function in METHODS.items():
        setattr(model, name, functools.partial(function, model))


def unbind(model: nn.Module) -> None:
    """Take them off again: the class's own methods show through."""
    for name in METHODS:
        model.__dict__.pop(name, None)


def bound_methods(model: nn.Module) -> Iterator[str]:
    """The names of the methods :func:`bind` put on ``model`` (for tests and introspection)."""
    return (name for name in METHODS if name in model.__dict__)
