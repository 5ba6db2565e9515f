"""prepare_qmiss: a transformers model made a trainable 4-bit/8-bit MiSS model, and what that implies.

Above the surgery (:mod:`qmiss.model`) and the adapter files (:mod:`qmiss.adapters`): the settings
are checked against the model before anything changes, then this module decides the dtypes (the
compute dtype, the 4-bit storage, QLoRA's fp32 norms), switches checkpointing on, attaches the
chunked loss and the offload hooks, and sets the model up for transformers and PEFT-style code.
:func:`from_pretrained` prepares a plain model with an adapter folder's own settings.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Optional, Union

import torch
from torch import nn

from qmiss import hf, methods, quant
from qmiss.adapters import load_adapter, read_adapter
from qmiss.config import AUTO, QMissConfig, mode_from_init_weights
from qmiss.inputs import InputError, few, spelled
from qmiss.layer import MissLinear
from qmiss.loss import attach_chunked_loss, check_model as check_chunked_loss
from qmiss.model import (check_targets, miss_layers, output_head, output_layer_names, target_bits,
                         unreachable_weights, wrap_targets)
from qmiss.offload import attach_host_embeddings, attach_offload, check_host_embeddings

PathLike = Union[str, os.PathLike]


def _loaded_compute_dtype(targets: list[nn.Module]) -> Optional[torch.dtype]:
    """A 16-bit ``bnb_4bit_compute_dtype`` the model was loaded with, which counts as the user's choice.

    transformers' ``BitsAndBytesConfig`` turns an unset ``bnb_4bit_compute_dtype`` into fp32,
    so a loaded fp32 cannot be told from "left at the default" and is treated as unset: the
    layers then follow the compute-dtype rule (bf16 on CUDA). Pass ``compute_dtype=torch.float32``
    to prepare_qmiss to really compute in fp32 on a GPU.
    """
    for module in targets:
        dtype = getattr(module, "compute_dtype", None) if target_bits(module) == 4 else None
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    return None


def check_long_context(model: nn.Module, targets: list[str], chunked_loss: bool, loss_chunk_bytes: int,
                       embeddings_on_host: bool) -> None:
    """Refuse, before any surgery, long-context settings the model cannot take (``model`` may be on
    the meta device; ``targets`` as :func:`check_targets` returns them).

    Raises:
        InputError: a model whose loss the chunked loss cannot stand in for, an output head among the
            targets, a bad chunk budget, or an input table that cannot stay on the host.
    """
    if chunked_loss:
        check_chunked_loss(model, loss_chunk_bytes)
        adapted_head = sorted(output_layer_names(model) & set(targets))
        if adapted_head:
            raise InputError(f"chunked_loss: the output head {adapted_head[0]} is in target_modules; the chunked "
                             "loss needs a plain float head — exclude it (exclude_modules=['lm_head']) or pass "
                             "chunked_loss=False")
    if embeddings_on_host:
        check_host_embeddings(model)


def _resolve_bits(model: nn.Module, targets: list[str], bits: Union[int, str, None]) -> Optional[int]:
    """The bits to use: the loaded quantization if any, else ``bits`` (4 for "auto").

    Raises:
        ValueError: ``bits`` contradicts how the model was loaded.
    """
    modules = dict(model.named_modules())
    loaded = {target_bits(modules[n]) for n in targets if n in modules} - {None}  # experts are never loaded quantized
    if len(loaded) > 1:
        raise ValueError(f"the model mixes 4-bit and 8-bit target layers ({sorted(loaded)}); qmiss wraps one kind")
    if not loaded:
        return 4 if bits == AUTO else (None if bits == 16 else bits)
    have = loaded.pop()
    if bits not in (AUTO, have):
        raise InputError(
            f"{spelled('bits')}={bits!r}, but the model was loaded in {have}-bit with bitsandbytes; "
            f"pass bits={have} (or leave bits='auto'), or load the model in full precision to quantize it to {bits}"
        )
    return have


def _resolve_storage(
    model: nn.Module, targets: list[str], bits: Optional[int], quant_storage: Optional[torch.dtype]
) -> Optional[torch.dtype]:
    """The float dtype 4-bit weights are stored in (the FSDP1 layout), or None for packed uint8.

    Raises:
        ValueError: quant_storage without 4-bit, not a float dtype, or contradicting the loaded layers.
    """
    modules = dict(model.named_modules())
    loaded = {quant.storage_dtype(modules[n]) for n in targets if n in modules and target_bits(modules[n]) is not None}
    loaded -= {None}
    if quant_storage is None:
        floating = {d for d in loaded if d.is_floating_point}
        return floating.pop() if len(floating) == 1 else None
    if bits != 4:
        raise ValueError(f"quant_storage={quant_storage} is a 4-bit setting, but bits={bits}; use bits=4 or drop it")
    if not isinstance(quant_storage, torch.dtype) or not (quant_storage.is_floating_point or quant_storage == torch.uint8):
        raise ValueError(f"quant_storage={quant_storage!r}: use a float dtype (torch.bfloat16, torch.float32) or torch.uint8")
    if loaded - {quant_storage}:
        raise ValueError(
            f"quant_storage={quant_storage}, but the model's 4-bit weights were loaded stored as {sorted(map(str, loaded))}; "
            "load it with BitsAndBytesConfig(bnb_4bit_quant_storage=...) set to the same dtype, or drop quant_storage"
        )
    return quant_storage if quant_storage.is_floating_point else None


def fp32_upcast_modules(model: nn.Module, head: bool = True) -> list[nn.Module]:
    """What QLoRA's habit (``fp32_norms``) upcasts to fp32: every norm, and the output head unless
    ``head=False`` (the chunked loss keeps it in the compute dtype) or it is adapted or quantized.
    The rule, stated once: :func:`_upcast_for_kbit_training` applies it, the planner counts it."""
    modules = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
    output = output_head(model) if head else None
    if output is not None and not isinstance(output, MissLinear) and quant.quant_bits(output) is None:
        modules.append(output)
    return modules


def _upcast_for_kbit_training(model: nn.Module, head: bool = True) -> None:
    """Norms and the output head in fp32, as QLoRA's prepare_model_for_kbit_training leaves them
    (``prepare_qmiss(fp32_norms=True)``; :func:`fp32_upcast_modules`).

    An fp32 norm returns fp32 (transformers' RMSNorm multiplies by its weight last), so the
    head must be fp32 too, and with a 16-bit model every decoder layer after the first then
    receives an fp32 residual stream: twice the activation bytes. The input embeddings (a
    lookup) keep their dtype. ``head=False`` (the chunked loss) leaves the head as it is.
    """
    for module in fp32_upcast_modules(model, head):
        for param in module.parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.to(torch.float32)


def _head_in_compute_dtype(model: nn.Module, compute_dtype: Optional[torch.dtype]) -> None:
    """With the chunked loss the head's matmul runs in the compute dtype and only each chunk's
    softmax in fp32, so an fp32 head (not tied to the embeddings) is cast to a 16-bit compute dtype:
    half its bytes, and no 16-bit copy made by autocast on every step."""
    head = output_head(model)
    if compute_dtype not in (torch.bfloat16, torch.float16) or head is None or isinstance(head, MissLinear):
        return
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is getattr(head, "weight", None):
        return
    for param in head.parameters(recurse=False):
        if param.dtype == torch.float32:
            param.data = param.data.to(compute_dtype)


def enable_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """transformers' gradient (activation) checkpointing, under its current name, with the KV cache off."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    if enable is not None:
        enable({"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def is_checkpointing(model: nn.Module) -> bool:
    """Whether any submodule has transformers' checkpointing switched on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _as_qmiss_config(config: object) -> QMissConfig:
    """``prepare_qmiss``'s second argument as a QMissConfig: one already, or PEFT's ``MissConfig`` / ``BoneConfig``
    read as its adapter folder would be (``bits`` then follows the model, as with keyword settings).

    Raises:
        TypeError: anything else, saying what to write instead.
    """
    if isinstance(config, QMissConfig):
        return config
    to_dict = getattr(config, "to_dict", None)
    if type(config).__name__ in ("MissConfig", "BoneConfig") and callable(to_dict):
        payload = dict(to_dict())
        payload["peft_type"] = str(getattr(payload.get("peft_type"), "value", payload.get("peft_type")))
        if isinstance(payload.get("target_modules"), (set, frozenset)):
            payload["target_modules"] = sorted(payload["target_modules"])
        read = QMissConfig.from_peft_dict(payload, source=type(config).__name__)
        return dataclasses.replace(read, bits=AUTO, exclude_modules=payload.get("exclude_modules"))
    raise TypeError(f"prepare_qmiss(model, {config!r}): the second argument is a qmiss.QMissConfig (or PEFT's "
                    "MissConfig); give settings by name, e.g. prepare_qmiss(model, r=64, bits=4)")


def _is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate offloads ``module``'s weights (an ``AlignDevicesHook`` with ``offload=True``: its weights
    sit on the meta device and are read from the CPU or disk at each call)."""
    hook = getattr(module, "_hf_hook", None)
    return any(getattr(h, "offload", False) for h in getattr(hook, "hooks", [hook]) if h is not None)


def check_not_offloaded(model: nn.Module, targets: list[str]) -> None:
    """Refuse targets that a ``device_map`` offloads to the CPU or disk.

    transformers leaves such layers unquantized, their weights on the meta device behind accelerate's offload
    hooks, which look each weight up by its name at every call: wrapping them would rename the weights under
    the hook. A target is offloaded if it or a module above it carries such a hook.

    Raises:
        InputError: naming the offloaded targets and the fix.
    """
    hooked = {name for name, module in model.named_modules() if _is_offloaded(module)}  # "" is the model
    offloaded = [name for name in targets
                 if any(".".join(name.split(".")[:i]) in hooked for i in range(name.count(".") + 2))]
    if offloaded:
        raise InputError(
            f"prepare_qmiss: {len(offloaded)} target layer(s) are offloaded to the CPU or disk by the model's "
            f"device_map ({few(offloaded)}); qmiss trains layers on a GPU: load with a device_map that keeps every "
            "layer on GPUs (qmiss plan says what fits a card), or exclude them with exclude_modules"
        )


def _warn_unreachable(model: nn.Module, targets: list[str]) -> None:
    """Name the matmul weights left in 16-bit and frozen because no qmiss layer can hold them, with their share."""
    left = unreachable_weights(model)
    if not left:
        return
    modules = dict(model.named_modules())
    adapted = sum(math.prod(quant.in_out_features(modules[n].base_layer)) for n in targets)
    share = sum(left.values()) / (sum(left.values()) + adapted)
    warnings.warn(
        f"prepare_qmiss: {len(left)} matmul weight(s) are not linears qmiss can quantize or adapt, so they stay "
        f"unquantized and frozen — {few(sorted(left))}: {share:.0%} of the model's matmul weights (fused "
        "experts of a module transformers does not route through its experts interface, such as DBRX's, JetMoE's "
        "and Llama 4's, experts excluded from the targets, linears with a forward of their own, such as "
        "DeepSeek-V4's grouped o_a_proj, or raw weight parameters, such as XLNet's attention); the model will be "
        "larger and train less than planned",
        stacklevel=3,
    )


def prepare_qmiss(model: nn.Module, config: Optional[QMissConfig] = None, **settings) -> nn.Module:
    """Turn a transformers model into a trainable 4-bit/8-bit (or 16-bit) MiSS model, in place.

    Every selected linear is quantized with bitsandbytes (if it is not already),
    wrapped in a :class:`~qmiss.layer.MissLinear` with a zero adapter, and
    everything but the adapters is frozen.

    Args:
        model: a transformers ``PreTrainedModel`` (or any ``nn.Module``), full precision or
            loaded in 4/8-bit through ``BitsAndBytesConfig``.
        config: a :class:`~qmiss.QMissConfig` (PEFT's habit: ``get_peft_model(model, config)``);
            ``settings`` given as well replace its fields.
        **settings: any :class:`~qmiss.QMissConfig` field, with the defaults and meanings stated
            there: ``r=64``, ``bits="auto"`` (keep the model's bitsandbytes quantization, else 4),
            ``mode="default"`` (``"mini"``, ``"bat"``, ``"bat_row"``; or PEFT's ``init_weights=True | "mini" | "bat"``), ``mini_r``,
            ``target_modules="all-linear"``, ``exclude_modules``, ``dropout``, ``quant_type``,
            ``double_quant``, ``compute_dtype``, ``bat_chunk_bytes``, and how the model trains:
            ``gradient_checkpointing``, ``quant_storage`` (4-bit weights stored as a float dtype for
            FSDP1: every frozen tensor then keeps that dtype, the adapters go in units of their own,
            see :func:`qmiss.fsdp_auto_wrap_policy`), ``fp32_norms`` (QLoRA's habit: a 16-bit model's
            stream turns fp32 after the first norm), ``chunked_loss`` / ``loss_chunk_bytes`` (in
            training, ``model(..., labels=...)`` returns the causal-LM loss computed chunk by chunk of
            tokens and ``logits=None``; the head stays in the compute dtype), ``offload_activations``
            and ``embeddings_on_host`` (:mod:`qmiss.offload`).

    Returns:
        The same model object, with ``model.qmiss_config`` set (the settings as applied: ``bits`` and
        ``compute_dtype`` resolved), and set up for transformers and PEFT-style code (:mod:`qmiss.hf`,
        :mod:`qmiss.methods`) (``save_pretrained`` writes the adapter; PEFT's ``print_trainable_parameters``,
        ``disable_adapter``, ``merge_and_unload``, ``unload`` …).

    Raises:
        ValueError / TypeError: bad settings, shapes r does not fit, no matching layer,
            bits contradicting the loaded quantization, or a model prepared already.
    """
    if any(True for _ in miss_layers(model)) or hasattr(model, "qmiss_config"):
        raise ValueError(
            f"{type(model).__name__} already has qmiss adapters; prepare_qmiss is called once per model — "
            "load a fresh model to start over, or use qmiss.disable_adapter(model) to get the base output"
        )
    init_weights = settings.pop("init_weights", None)
    if init_weights is not None:
        from_alias = mode_from_init_weights(init_weights)
        if settings.get("mode") not in (None, from_alias):
            raise ValueError(f"mode={settings['mode']!r} and init_weights={init_weights!r} disagree; give only one "
                             "of them")
        settings["mode"] = from_alias
    if settings.get("mode", "") is None:
        settings.pop("mode")
    given = dataclasses.asdict(_as_qmiss_config(config)) if config is not None else {}
    config = QMissConfig.from_settings({**given, **settings})
    bits = config.bits
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    targets = check_targets(model, config)
    check_not_offloaded(model, targets)
    check_long_context(model, targets, config.chunked_loss, config.loss_chunk_bytes, config.embeddings_on_host)
    config.bits = _resolve_bits(model, targets, bits)
    storage = _resolve_storage(model, targets, config.bits, config.quant_storage)
    if config.compute_dtype is None:
        modules = dict(model.named_modules())
        config.compute_dtype = _loaded_compute_dtype([modules[n] for n in targets if n in modules])

    model.requires_grad_(False)
    for module in model.modules():  # untargeted 4-bit layers too: eval must see the weights training saw
        if quant.is_linear(module):
            quant.prepare_for_adapter(module)
    if config.fp32_norms and config.bits is not None and storage is None:
        _upcast_for_kbit_training(model, head=not config.chunked_loss)
    if config.chunked_loss:
        _head_in_compute_dtype(model, config.compute_dtype)
    wrap_targets(model, targets, config, storage)
    if storage is not None:  # FSDP1 layout: one dtype for every frozen tensor of a unit
        for param in model.parameters():
            if not param.requires_grad and param.is_floating_point() and param.dtype != storage:
                param.data = param.data.to(storage)

    # Frozen base + checkpointing: the first block's input must require grad, or reentrant
    # checkpointing cuts the graph before any adapter (what PEFT does for k-bit training).
    enable_input_grads = getattr(model, "enable_input_require_grads", None)
    if callable(enable_input_grads):
        enable_input_grads()
    if config.gradient_checkpointing:
        enable_checkpointing(model, use_reentrant=False)
    if config.offload_activations:  # registered first, so the chunked loss's own saved tensors stay on the device
        attach_offload(model)
    if config.chunked_loss:
        attach_chunked_loss(model, config.loss_chunk_bytes)
    if config.embeddings_on_host:
        attach_host_embeddings(model)
    _warn_unreachable(model, targets)
    model.qmiss_config = config
    hf.attach(model)  # transformers' flags: see qmiss/hf.py
    methods.bind(model)  # save_pretrained, PEFT's methods, the dtype casts: see qmiss/methods.py
    return model


def from_pretrained(model: nn.Module, directory: PathLike, trainable: bool = False, **overrides) -> nn.Module:
    """Prepare a plain transformers model with an adapter's own settings, then load the adapter.

    Args:
        model: a full-precision (or BitsAndBytesConfig-loaded) transformers model.
        directory: the adapter folder.
        trainable: see :func:`qmiss.load_adapter`.
        **overrides: :func:`prepare_qmiss` arguments to use instead of the recorded ones (e.g. ``bits=8``,
            ``compute_dtype=torch.float32``; the compute dtype recorded at save time is not replayed).
    """
    config, tensors, _ = read_adapter(directory)
    # The recorded compute dtype is not replayed: it belongs to the machine that trained (fp32 on a
    # CPU), not to the adapter; the compute-dtype rule picks one for where this model runs.
    settings = dict(r=config.r, mode=config.mode, mini_r=config.mini_r, bits=config.bits, quant_type=config.quant_type,
                    double_quant=config.double_quant, target_modules=sorted(tensors), dropout=config.dropout,
                    rank_pattern=config.rank_pattern)
    if any(quant.is_linear(m) and quant.quant_bits(m) is not None for m in model.modules()):
        settings["bits"] = "auto"  # a BitsAndBytesConfig model keeps its own quantization
    settings.update(overrides)
    return load_adapter(prepare_qmiss(model, **settings), directory, trainable=trainable)
