"""Model surgery: find the target linears, quantize them, wrap them in MissLinear, freeze the rest."""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Optional, Union

import torch
from torch import nn

from qmiss import hf, quant
from qmiss.config import QMissConfig, mode_from_init_weights
from qmiss.inputs import InputError, few, spelled
from qmiss.layer import MissLinear
from qmiss.loss import attach_chunked_loss, check_model as check_chunked_loss
from qmiss.offload import attach_host_embeddings, attach_offload, check_host_embeddings

AUTO = "auto"


def _loaded_compute_dtype(targets: list[nn.Module]) -> Optional[torch.dtype]:
    """A 16-bit ``bnb_4bit_compute_dtype`` the model was loaded with, which counts as the user's choice.

    transformers' ``BitsAndBytesConfig`` turns an unset ``bnb_4bit_compute_dtype`` into fp32,
    so a loaded fp32 cannot be told from "left at the default" and is treated as unset: the
    layers then follow the compute-dtype rule (bf16 on CUDA). Pass ``compute_dtype=torch.float32``
    to prepare_qmiss to really compute in fp32 on a GPU.
    """
    for module in targets:
        dtype = getattr(module, "compute_dtype", None) if quant.quant_bits(module) == 4 else None
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    return None


def _matches(name: str, pattern: Union[str, list[str], tuple, set, None]) -> bool:
    """PEFT's rule: a string is a full-match regex, a list matches names exactly or by ``.suffix``."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _conv1d_type() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep the surgery usable without it
        return None
    return Conv1D


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    """The model's output projection (lm_head) as transformers reports it, if it does."""
    get_out = getattr(model, "get_output_embeddings", None)
    return get_out() if callable(get_out) else None


def _output_layer_names(model: nn.Module) -> set[str]:
    """Names of the output projection(s) (lm_head), which "all-linear" leaves alone as QLoRA does."""
    head = _output_head(model)
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names or {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}


def find_targets(model: nn.Module, config: QMissConfig) -> list[str]:
    """Names of the linear layers ``config`` selects, in model order.

    Raises:
        TypeError: a selected layer is a transformers Conv1D (GPT-2 style) layer.
        ValueError: nothing matches; the message lists the model's linear layers.
    """
    conv1d = _conv1d_type()
    linear_names, conv_names, targets = [], [], []
    skip = _output_layer_names(model)
    for name, module in model.named_modules():
        is_conv = conv1d is not None and isinstance(module, conv1d)
        if not (quant.is_linear(module) or is_conv):
            continue
        (conv_names if is_conv else linear_names).append(name)
        if config.target_modules == "all-linear":
            selected = name not in skip
        else:
            selected = _matches(name, config.target_modules)
        if selected and not _matches(name, config.exclude_modules):
            targets.append(name)
    bad_conv = [n for n in targets if n in conv_names]
    if bad_conv:
        raise TypeError(
            f"{', '.join(bad_conv)}: transformers Conv1D layers (weight stored in×out) are not supported; "
            "exclude them with exclude_modules=[...] or use a model with nn.Linear projections"
        )
    if not targets:
        raise InputError(
            f"{spelled('target_modules')}={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
            f"matches no linear layer; the model's {len(linear_names)} linear layers are: {few(linear_names) or '(none)'}"
        )
    return targets


def _check_shapes(model: nn.Module, targets: list[str], config: QMissConfig) -> None:
    """Validate r / mini_r against every target at once: the first offenders and how many there are.

    Raises:
        InputError: r exceeds a target's in_features, or (bat) r does not divide its shape, or
            (mini) mini_r does not divide its out_features.
    """
    modules = dict(model.named_modules())
    r, mini_r, mode = spelled("r"), spelled("mini_r"), spelled("mode")
    problems = []
    for name in targets:
        n_in, n_out = quant.in_out_features(modules[name])
        if config.r > n_in:
            problems.append(f"{name}: {r}={config.r} > in_features={n_in}")
        elif config.mode == "bat" and (n_in % config.r or n_out % config.r):
            problems.append(f"{name}: in_features={n_in}, out_features={n_out} not divisible by {r}={config.r}")
        elif config.mode == "mini" and n_out % config.mini_r:
            problems.append(f"{name}: out_features={n_out} is not divisible by {mini_r}={config.mini_r}")
    if problems:
        hint = {
            "bat": f"bat needs r×r blocks: use {mode}='default', an {r} dividing every shape, or exclude these modules",
            "mini": f"pick a {mini_r} dividing every target's out_features, or exclude these modules",
            "default": f"pick a smaller {r} (at most {min(quant.in_out_features(modules[n])[0] for n in targets)}), "
                       "or exclude these modules",
        }[config.mode]
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise InputError(f"{len(problems)} of {len(targets)} target layers do not fit: {shown} — {hint}")


def check_targets(model: nn.Module, config: QMissConfig) -> list[str]:
    """The layers ``config`` adapts in ``model`` (a real one or a meta-device copy), after checking r / mini_r
    against each of them; see :func:`find_targets` and :func:`_check_shapes` for what is raised."""
    targets = find_targets(model, config)
    _check_shapes(model, targets, config)
    return targets


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
        adapted_head = sorted(_output_layer_names(model) & set(targets))
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
    loaded = {quant.quant_bits(modules[n]) for n in targets if quant.quant_bits(modules[n]) is not None}
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
    loaded = {quant.storage_dtype(modules[n]) for n in targets} - {None}
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


def _upcast_for_kbit_training(model: nn.Module, head: bool = True) -> None:
    """Norms and the output head in fp32, as QLoRA's prepare_model_for_kbit_training leaves them
    (``prepare_qmiss(fp32_norms=True)``).

    An fp32 norm returns fp32 (transformers' RMSNorm multiplies by its weight last), so the
    head must be fp32 too, and with a 16-bit model every decoder layer after the first then
    receives an fp32 residual stream: twice the activation bytes. The input embeddings (a
    lookup) keep their dtype. ``head=False`` (the chunked loss) leaves the head as it is.
    """
    modules = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
    output = _output_head(model) if head else None
    if output is not None and not isinstance(output, MissLinear) and quant.quant_bits(output) is None:
        modules.append(output)
    for module in modules:
        for param in module.parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()


def _head_in_compute_dtype(model: nn.Module, compute_dtype: Optional[torch.dtype]) -> None:
    """With the chunked loss the head's matmul runs in the compute dtype and only each chunk's
    softmax in fp32, so an fp32 head (not tied to the embeddings) is cast to a 16-bit compute dtype:
    half its bytes, and no 16-bit copy made by autocast on every step."""
    head = _output_head(model)
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


#: Path parts that FSDP1 and activation-checkpoint wrappers insert; module names are reported without them.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def miss_layers(model: nn.Module) -> Iterator[tuple[str, MissLinear]]:
    """(name, layer) for every MissLinear in ``model``; names as in the unwrapped model."""
    for name, module in model.named_modules():
        if isinstance(module, MissLinear):
            for prefix in WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            yield name, module


def prepare_qmiss(
    model: nn.Module,
    r: int = 64,
    bits: Union[int, str, None] = AUTO,
    mode: Optional[str] = None,
    mini_r: Optional[int] = None,
    target_modules: Union[str, list[str]] = "all-linear",
    exclude_modules: Optional[Union[str, list[str]]] = None,
    dropout: float = 0.0,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    gradient_checkpointing: bool = False,
    bat_chunk_bytes: int = 64 * 2**20,
    init_weights: Union[bool, str, None] = None,
    quant_storage: Optional[torch.dtype] = None,
    fp32_norms: bool = False,
    chunked_loss: bool = False,
    loss_chunk_bytes: int = 64 * 2**20,
    offload_activations: bool = False,
    embeddings_on_host: bool = False,
) -> nn.Module:
    """Turn a transformers model into a trainable 4-bit/8-bit (or 16-bit) MiSS model, in place.

    Every selected linear is quantized with bitsandbytes (if it is not already),
    wrapped in a :class:`~qmiss.layer.MissLinear` with a zero adapter, and
    everything but the adapters is frozen.

    Args:
        model: a transformers ``PreTrainedModel`` (or any ``nn.Module``), full precision or
            loaded in 4/8-bit through ``BitsAndBytesConfig``.
        r: shard size (the adapter rank).
        bits: 4, 8, None/16 (no quantization) or "auto": keep the model's bitsandbytes
            quantization if it has one, else 4.
        mode: "default" (MiSS balance), "mini" or "bat". Default "default".
        mini_r: mini's adapter width along out_features.
        target_modules: "all-linear" (every linear but the output head), a full-match regex,
            or a list of names / name suffixes.
        exclude_modules: same syntax; excluded layers stay untouched.
        dropout: adapter-input dropout (default/mini only).
        quant_type: 4-bit data type, "nf4" or "fp4".
        double_quant: 4-bit double quantization.
        compute_dtype: dtype of the base matmul and adapter math. None (default): a 16-bit
            ``bnb_4bit_compute_dtype`` the model was loaded with, else each layer follows its
            device, also after a move: bf16 on CUDA (fp16 without bf16 support), fp32 on the CPU.
        gradient_checkpointing: turn on transformers' (non-reentrant) gradient checkpointing.
        bat_chunk_bytes: bat: byte budget of one dequantized chunk of weight rows.
        init_weights: PEFT's name for the mode (True, "mini", "bat"); give this or ``mode``.
        quant_storage: 4-bit: store the packed weights as this float dtype (transformers'
            ``bnb_4bit_quant_storage``), for FSDP1, which flattens one dtype per unit. Every
            frozen tensor is then kept in this dtype too (norms and head are not upcast), and the
            fp32 adapters go in units of their own (:func:`qmiss.fsdp_auto_wrap_policy`). A
            model loaded with a float ``bnb_4bit_quant_storage`` gets this layout by itself.
        fp32_norms: QLoRA's habit: norms and the output head upcast to fp32. Off by default:
            everything frozen keeps the dtype the model was loaded in, so a bf16 model's residual
            stream stays bf16 from end to end (transformers computes the loss in fp32 either way).
            With it on, a 16-bit model's stream turns fp32 after the first norm.
        chunked_loss: in training mode, ``model(..., labels=...)`` returns transformers' causal-LM
            loss computed chunk by chunk of tokens (:mod:`qmiss.loss`) and ``logits=None``: the
            (tokens × vocabulary) logits and their gradient never exist. Evaluation, generation and
            calls without labels are unchanged. The output head then stays in the compute dtype
            (not upcast by ``fp32_norms``; an fp32 head is cast to a 16-bit ``compute_dtype``).
        loss_chunk_bytes: byte budget of one chunk of the chunked loss's logits and gradient.
        offload_activations: in training, what autograd saves outside the checkpointed layers
            (chiefly each layer's input) waits in pinned host memory until backward
            (:mod:`qmiss.offload`). A no-op for tensors already on the CPU.
        embeddings_on_host: the input embedding table stays in host memory and each batch's rows
            are looked up there and moved to the device of the token ids (:mod:`qmiss.offload`);
            not for models that tie it to the output head.

    Returns:
        The same model object, with ``model.qmiss_config`` set, and set up for transformers and
        PEFT-style code by :func:`qmiss.hf.attach` (``save_pretrained`` writes the adapter; PEFT's
        ``print_trainable_parameters``, ``disable_adapter``, ``merge_and_unload``, ``unload`` …).

    Raises:
        ValueError / TypeError: bad settings, shapes r does not fit, no matching layer,
            bits contradicting the loaded quantization, or a model prepared already.
    """
    if any(True for _ in miss_layers(model)) or hasattr(model, "qmiss_config"):
        raise ValueError(
            f"{type(model).__name__} already has qmiss adapters; prepare_qmiss is called once per model — "
            "load a fresh model to start over, or use qmiss.disable_adapter(model) to get the base output"
        )
    if init_weights is not None:
        from_alias = mode_from_init_weights(init_weights)
        if mode is not None and mode != from_alias:
            raise ValueError(f"mode={mode!r} and init_weights={init_weights!r} disagree; give only one of them")
        mode = from_alias
    if bits not in (AUTO, 4, 8, 16, None):
        raise InputError(f"{spelled('bits')}={bits!r} is not supported; use 4, 8, None (or 16) for no quantization, "
                         "or 'auto'")
    config = QMissConfig(
        r=r,
        mode=mode or "default",
        mini_r=mini_r,
        bits=4 if bits == AUTO else bits,
        quant_type=quant_type,
        double_quant=double_quant,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        dropout=dropout,
        compute_dtype=compute_dtype,
        bat_chunk_bytes=bat_chunk_bytes,
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    )
    targets = check_targets(model, config)
    check_long_context(model, targets, chunked_loss, loss_chunk_bytes, embeddings_on_host)
    config.bits = _resolve_bits(model, targets, bits)
    storage = _resolve_storage(model, targets, config.bits, quant_storage)
    modules = dict(model.named_modules())
    if config.compute_dtype is None:
        config.compute_dtype = _loaded_compute_dtype([modules[n] for n in targets])

    model.requires_grad_(False)
    for module in model.modules():  # untargeted 4-bit layers too: eval must see the weights training saw
        if quant.is_linear(module):
            quant.prepare_for_adapter(module)
    if fp32_norms and config.bits is not None and storage is None:
        _upcast_for_kbit_training(model, head=not chunked_loss)
    if chunked_loss:
        _head_in_compute_dtype(model, config.compute_dtype)
    for name in targets:
        base = modules[name]
        if config.bits is not None and quant.quant_bits(base) is None:
            base = quant.quantize_linear(
                base,
                config.bits,
                config.quant_type,
                config.double_quant,
                config.compute_dtype,
                quant_storage=storage or torch.uint8,
            )
        base.requires_grad_(False)
        layer = MissLinear(
            base,
            r=config.r,
            mode=config.mode,
            mini_r=config.mini_r,
            dropout=config.dropout,
            compute_dtype=config.compute_dtype,
            bat_chunk_bytes=config.bat_chunk_bytes,
            name=name,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
        del modules[name]  # drop our reference so the full-precision weight can be freed
    if storage is not None:  # FSDP1 layout: one dtype for every frozen tensor of a unit
        for param in model.parameters():
            if not param.requires_grad and param.is_floating_point() and param.dtype != storage:
                param.data = param.data.to(storage)

    # Frozen base + checkpointing: the first block's input must require grad, or reentrant
    # checkpointing cuts the graph before any adapter (what PEFT does for k-bit training).
    enable_input_grads = getattr(model, "enable_input_require_grads", None)
    if callable(enable_input_grads):
        enable_input_grads()
    if gradient_checkpointing:
        enable_checkpointing(model, use_reentrant=False)
    if offload_activations:  # registered first, so the chunked loss's own saved tensors stay on the device
        attach_offload(model)
    if chunked_loss:
        attach_chunked_loss(model, loss_chunk_bytes)
    if embeddings_on_host:
        attach_host_embeddings(model)
    model.qmiss_config = config
    hf.attach(model)  # transformers' flags, save_pretrained and PEFT's methods: see qmiss/hf.py
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module path>.miss_block": tensor}`` for every adapter, detached."""
    return {f"{name}.miss_block": layer.miss_block.detach() for name, layer in miss_layers(model)}


def trainable_parameters(model: nn.Module, verbose: bool = True) -> tuple[int, int]:
    """(trainable, total) parameter counts, printing a PEFT-style line when ``verbose``.

    Packed 4-bit weights hold two values per byte; they are counted as values (out·in),
    as PEFT does.
    """
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if getattr(param, "quant_state", None) is not None:  # 4-bit: packed two per uint8
            count = param.quant_state.shape.numel()
        total += count
        if param.requires_grad:
            trainable += count
    if verbose:
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    return trainable, total


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block, every MissLinear returns its base layer's output."""
    layers = [layer for _, layer in miss_layers(model)]
    merged = [layer.name for layer in layers if layer.merged]
    if merged:
        raise ValueError(f"{merged[0]} (and {len(merged) - 1} more) hold merged weights; call qmiss.unmerge(model) first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was
