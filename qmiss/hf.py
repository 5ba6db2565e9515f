"""transformers' flags on a qmiss model: what transformers reads to decide how to treat it.

A qmiss model stays the ``PreTrainedModel`` it was: ``generate``, ``Trainer`` and TRL take it as
it is. What transformers would otherwise do wrong with it is set here, each flag next to a comment
naming the transformers code that reads it:

- the Trainer accepts a model loaded through ``BitsAndBytesConfig`` once adapters are attached;
- FlashAttention's target dtype is the model's dtype, not the packed weight's;
- a merged model saves and loads as a plain one (:func:`forget_quantization`).

The methods bound on the model (``save_pretrained``, PEFT's names, the dtype casts) are in
:mod:`qmiss.methods`. This module imports nothing of qmiss.
"""

from __future__ import annotations

from torch import nn


def attach(model: nn.Module) -> None:
    """Set transformers' flags on a freshly prepared qmiss model.

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


def detach(model: nn.Module) -> None:
    """Undo :func:`attach` (after ``merge_and_unload`` or ``unload``: the model is plain again)."""
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
