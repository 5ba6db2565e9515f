"""Model surgery: find the target linears, quantize and wrap them in MissLinear, and take them out again.

What a prepared model is for (dtypes, checkpointing, the loss, transformers' flags) is decided in
:mod:`qmiss.prepare`; this module only selects layers and swaps modules.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Optional, Union

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qmiss import quant
from qmiss.config import QMissConfig, pattern_key
from qmiss.experts import IMPLEMENTATION, expert_params, experts_shape, is_experts_module
from qmiss.inputs import InputError, few, spelled
from qmiss.layer import MissAdapter, MissExperts, MissLinear, shape_problem


def _matches(name: str, pattern: Union[str, list[str], tuple, set, None]) -> bool:
    """PEFT's rule: a string is a full-match regex, a list matches names exactly or by ``.suffix``."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def output_head(model: nn.Module) -> Optional[nn.Module]:
    """The model's output projection (lm_head) as transformers reports it, if it does."""
    get_out = getattr(model, "get_output_embeddings", None)
    return get_out() if callable(get_out) else None


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the output projection(s) (lm_head), which "all-linear" leaves alone as QLoRA does."""
    head = output_head(model)
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names or {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}


#: name parts of mixture-of-experts routers and gates: linears whose few outputs pick or weigh experts.
#: "all-linear" leaves them alone (16-bit, frozen), as transformers' bitsandbytes integration does.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def is_router(name: str) -> bool:
    """Whether the module at ``name`` is a mixture-of-experts router or gate (see :data:`ROUTER_NAMES`), or a
    linear inside one (HunYuan's ``mlp.gate.wg``, JetMoE's ``router.layer``, LongCat's ``router.classifier``)."""
    return any(part in ROUTER_NAMES for part in name.split("."))


def keeps_in_float(model: nn.Module, name: str) -> bool:
    """Whether the model class asks to keep the module at ``name`` in floating point when quantized
    (``_keep_in_fp32_modules``, e.g. DeepSeek-V3.2's ``indexer.weights_proj``, whose dtype its forward reads):
    transformers' bitsandbytes loader leaves those unconverted, and "all-linear" leaves them alone too. A key
    matches as transformers matches it: from the start up to a module boundary, as a regex, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    keys = getattr(model, "_keep_in_fp32_modules", None) or ()
    return any(re.match(rf"(?:{key}){boundary}", name) or name.endswith(key) for key in keys)


#: ``nn.Linear`` subclasses with a forward of their own that is still the plain product x·Wᵀ + b (Falcon's)
PLAIN_FORWARD = ("FalconLinear",)


def is_plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` computes x·Wᵀ + b and nothing else, so a quantized linear can stand in for it: an
    ``nn.Linear`` that keeps ``nn.Linear.forward`` (or :data:`PLAIN_FORWARD`'s), or a bitsandbytes linear.
    A subclass with its own forward (DeepSeek-V4's grouped, block-diagonal ``o_a_proj``) is not."""
    if not quant.is_linear(module):
        return False
    return (type(module).forward is nn.Linear.forward or quant.quant_bits(module) is not None
            or type(module).__name__ in PLAIN_FORWARD)


#: parameters of two dimensions or more that hold no matmul weight: state-space decays (A_log, RWKV's time_*) act
#: elementwise, position tables (absolute, axial, relative) are looked up or added, biases are added
NOT_MATMUL = re.compile(r"(\bA_log|\btime_(mix|decay|first)\w*|position_embeddings\b.*|\bpos_embed|\brel_pos_\w+|"
                        r"relative_attention_bias|bias)$")


def is_matmul_weight(name: str, param: torch.Tensor) -> bool:
    """Whether the parameter at ``name`` (its full path) can be a matmul weight: floating point, two dimensions
    over 1, not a norm's, nothing :data:`NOT_MATMUL` names."""
    return (param.is_floating_point() and sum(n > 1 for n in param.shape) >= 2
            and "norm" not in name.rpartition(".")[2] and not NOT_MATMUL.search(name))


def unreachable_weights(model: nn.Module) -> dict[str, int]:
    """Matmul weights no qmiss layer holds and no rule leaves alone, by name, with their sizes; ``prepare_qmiss``
    warns about them after wrapping.

    That is every floating-point parameter with two dimensions over 1 outside a quantized or adapted layer, the
    plain linears left as they are (routers, the output head, what the user excluded), embeddings, norms,
    convolutions and :data:`NOT_MATMUL`: fused experts an experts module transformers does not route through
    its experts interface holds (DBRX, JetMoE, Llama 4) or the user excluded, linears with a forward of their
    own (:func:`is_plain_linear`), and matmul weights held as raw parameters (XLNet's attention, an
    ``nn.MultiheadAttention``'s ``in_proj_weight``). Routers and gates (:func:`is_router`) and what the class
    keeps in fp32 (:func:`keeps_in_float`) are not named.
    """
    found: dict[str, int] = {}
    heads, done = set(output_layer_names(model)), ()
    for name, module in model.named_modules():
        if name.startswith(done):
            continue
        if isinstance(module, MissAdapter) or (quant.is_linear(module) and quant.quant_bits(module) is not None):
            done = (*done, f"{name}.")
            continue
        if (name in heads or is_router(name) or keeps_in_float(model, name) or is_plain_linear(module)
                or is_conv1d(module) or isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d))
                or "norm" in type(module).__name__.lower()):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{name}.{param_name}" if name else param_name
            if is_matmul_weight(full, param):
                found[full] = param.numel()
    return found


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (GPT-2 style): a linear whose weight is stored (in, out)."""
    return isinstance(module, Conv1D)


def target_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear target: a plain or quantized linear, or a ``Conv1D``."""
    if is_conv1d(module):
        n_in, n_out = module.weight.shape  # stored (in, out)
        return n_in, n_out
    return quant.in_out_features(module)


def target_bits(module: nn.Module) -> Optional[int]:
    """How a target was loaded: 4 or 8 for a bitsandbytes linear, None for a plain one or a ``Conv1D``."""
    return None if is_conv1d(module) else quant.quant_bits(module)


def from_conv1d(module: nn.Module) -> bool:
    """Whether a linear stands for a ``Conv1D`` of the original model, whose checkpoint holds its weight (in, out).

    transformers marks the bitsandbytes layers it puts in place of a model's linears with the class they
    replace (``source_cls``, set in ``integrations/bitsandbytes.py``'s ``replace_with_bnb_linear`` and read by
    its weight loader, which transposes a Conv1D's checkpoint weight); :func:`linear_from_conv1d` sets the same
    mark, so a model quantized by transformers or by qmiss exports alike. A :class:`MissLinear` answers for its
    base layer.
    """
    if isinstance(module, MissLinear):
        module = module.base_layer
    return issubclass(getattr(module, "source_cls", type(module)), Conv1D)


def linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what ``conv`` (a ``Conv1D``) computes: its weight transposed to (out, in), its bias,
    on its device and in its dtype, marked as :func:`from_conv1d` reads it."""
    n_in, n_out = target_features(conv)
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=False)  # (out, in)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    linear.source_cls = type(conv)
    return linear


def target_shape(modules: dict[str, nn.Module], name: str) -> tuple[int, int, Optional[int]]:
    """(in_features, out_features, experts) of a target: a linear (experts None) or a fused expert parameter
    (``<experts module>.<parameter>``, per expert)."""
    if name in modules:
        return (*target_features(modules[name]), None)
    parent, _, param = name.rpartition(".")
    n_experts, n_in, n_out = experts_shape(modules[parent], param)
    return n_in, n_out, n_experts


def find_targets(model: nn.Module, config: QMissConfig) -> list[str]:
    """Names of the linear layers and fused expert parameters ``config`` selects, in model order.

    A fused expert parameter (``model.layers.0.mlp.experts.gate_up_proj``) is named by its path, as PEFT's
    ``target_parameters`` names it; "all-linear" selects every one of them, routers and gates never.
    transformers ``Conv1D`` layers (GPT-2) count as linears (:func:`wrap_targets` turns each into an ``nn.Linear``).

    Raises:
        ValueError: nothing matches; the message lists the model's linear layers.
    """
    linear_names, targets = [], []
    skip = output_layer_names(model)

    def select(name: str, default: bool) -> None:
        selected = default if config.target_modules == "all-linear" else _matches(name, config.target_modules)
        if selected and not _matches(name, config.exclude_modules):
            targets.append(name)

    for name, module in model.named_modules():
        if is_experts_module(module) and not isinstance(module, MissExperts):
            for param in expert_params(module):
                if isinstance(getattr(module, param), nn.Parameter):
                    select(f"{name}.{param}", True)
            continue
        if not (is_plain_linear(module) or is_conv1d(module)):
            continue
        linear_names.append(name)
        select(name, name not in skip and not is_router(name) and not keeps_in_float(model, name))
    if not targets:
        raise InputError(
            f"{spelled('target_modules')}={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
            f"matches no linear layer; the model's {len(linear_names)} linear layers are: {few(linear_names) or '(none)'}"
        )
    modules = dict(model.named_modules())
    unused = [key for key in config.rank_pattern or {}
              if not any(pattern_key({key: 0}, n) or (n not in modules and pattern_key({key: 0}, n.rpartition(".")[0]))
                         for n in targets)]
    if unused:
        raise InputError(
            f"{spelled('rank_pattern')} key {unused[0]!r} matches none of the {len(targets)} target modules "
            f"({few(targets)}); a key is a regex matched against the end of a module's path (PEFT's rule), e.g. "
            "'experts' or 'self_attn\\.q_proj'"
        )
    return targets


def _check_shapes(model: nn.Module, targets: list[str], config: QMissConfig) -> None:
    """Validate r / mini_r (and ``rank_pattern``'s ranks) against every target at once: the first offenders and
    how many there are.

    Raises:
        InputError: r exceeds a target's in_features, or (bat, bat_row) r does not divide its shape, or
            (mini) mini_r does not divide its out_features, or a 4-bit expert's in × out is not a multiple
            of the 4-bit block size.
    """
    modules = dict(model.named_modules())
    r, mini_r, mode = spelled("r"), spelled("mini_r"), spelled("mode")
    problems, smallest = [], None
    for name in targets:
        n_in, n_out, n_experts = target_shape(modules, name)
        rank = config.rank_for(name, expert=n_experts is not None)
        r_is = f"{r}={rank}" if rank == config.r else f"r={rank} (from {spelled('rank_pattern')})"
        smallest = n_in if smallest is None else min(smallest, n_in)
        problem = shape_problem(n_in, n_out, rank, config.mode, config.mini_r)  # the layer's rule
        if problem == "r":
            problems.append(f"{name}: {r_is} > in_features={n_in}")
        elif problem == "bat":
            problems.append(f"{name}: in_features={n_in}, out_features={n_out} not divisible by {r_is}")
        elif problem == "mini":
            problems.append(f"{name}: out_features={n_out} is not divisible by {mini_r}={config.mini_r}")
        elif n_experts and config.bits in (4, "auto") and (n_in * n_out) % quant.BLOCKSIZE:
            problems.append(f"{name}: 4-bit experts need in_features × out_features divisible by {quant.BLOCKSIZE} "
                            f"(the 4-bit block), got {n_in} × {n_out}")
    if problems:
        hint = {
            "bat": f"bat needs r×r blocks: use {mode}='default', an {r} dividing every shape, or exclude these modules",
            "bat_row": f"bat_row needs r×r blocks: use {mode}='default', an {r} dividing every shape, or exclude "
                       "these modules",
            "mini": f"pick a {mini_r} dividing every target's out_features, or exclude these modules",
            "default": f"pick a smaller {r} (at most {smallest}), or exclude these modules",
        }[config.mode]
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise InputError(f"{len(problems)} of {len(targets)} target layers do not fit: {shown} — {hint}")


def check_targets(model: nn.Module, config: QMissConfig) -> list[str]:
    """The layers ``config`` adapts in ``model`` (a real one or a meta-device copy), after checking r / mini_r
    against each of them; see :func:`find_targets` and :func:`_check_shapes` for what is raised."""
    targets = find_targets(model, config)
    _check_shapes(model, targets, config)
    return targets


#: Path parts that FSDP1 and activation-checkpoint wrappers insert; module names are reported without them.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def miss_layers(model: nn.Module) -> Iterator[tuple[str, MissAdapter]]:
    """(name, layer) for every adapter layer in ``model`` (:class:`MissLinear` and :class:`MissExperts`);
    names as in the unwrapped model."""
    for name, module in model.named_modules():
        if isinstance(module, MissAdapter):
            for prefix in WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            yield name, module


def wrap_targets(model: nn.Module, targets: list[str], config: QMissConfig,
                 storage: Optional[torch.dtype] = None) -> None:
    """Replace each target by a :class:`MissLinear` around it, one layer at a time: a ``Conv1D`` first becomes
    the ``nn.Linear`` it stands for (:func:`linear_from_conv1d`), and a full-precision layer is quantized
    (``config.bits``; 4-bit stored as ``storage``, else packed uint8); a fused expert
    parameter by a :class:`MissExperts` under its name, and its experts module switched to qmiss's experts
    implementation (:mod:`qmiss.experts`)."""
    modules = dict(model.named_modules())
    before = {id(m.config): m.config._experts_implementation for m in modules.values() if is_experts_module(m)}
    settings = dict(mode=config.mode, mini_r=config.mini_r, dropout=config.dropout,
                    compute_dtype=config.compute_dtype, bat_chunk_bytes=config.bat_chunk_bytes)
    quantized = dict(quant_type=config.quant_type, double_quant=config.double_quant,
                     compute_dtype=config.compute_dtype, quant_storage=storage or torch.uint8)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        if name not in modules:  # a fused expert parameter
            weight = getattr(parent, child)
            bits = config.bits if config.bits != 16 else None
            base = quant.quantize_experts(weight, parent.is_transposed, bits, **quantized).requires_grad_(False)
            layer = MissExperts(base, weight.shape[0], r=config.rank_for(name, expert=True), name=name,
                                transposed=parent.is_transposed, weight_dtype=weight.dtype,
                                implementation=before[id(parent.config)], **settings)
            del weight
            delattr(parent, child)  # the 16-bit parameter goes; the module takes its name
            parent.config._experts_implementation = IMPLEMENTATION
            setattr(parent, child, layer)
            continue
        base = modules[name]
        if is_conv1d(base):
            base = linear_from_conv1d(base)
        if config.bits is not None and quant.quant_bits(base) is None:
            source = getattr(base, "source_cls", None)
            base = quant.quantize_linear(base, config.bits, **quantized)
            if source is not None:
                base.source_cls = source
        base.requires_grad_(False)
        layer = MissLinear(base, r=config.rank_for(name), name=name, **settings)
        setattr(parent, child, layer)
        del modules[name], base  # drop our references so the full-precision weight can be freed


def _plain_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype,
                  conv1d: bool = False) -> nn.Module:
    """A frozen ``nn.Linear`` holding ``weight`` (out, in) and ``bias`` in ``dtype``; with ``conv1d``, the
    transformers ``Conv1D`` holding them, its weight stored transposed (in, out) as its checkpoint has it."""
    n_out, n_in = weight.shape
    if conv1d:
        with torch.device("meta"):
            layer = Conv1D(n_out, n_in)
        layer.weight = nn.Parameter(weight.t().contiguous().to(dtype), requires_grad=False)  # (in, out)
        # Conv1D.forward adds its bias unconditionally
        bias = bias if bias is not None else torch.zeros(n_out, dtype=dtype, device=weight.device)
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        return layer
    linear = nn.Linear(n_in, n_out, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return linear


def _put_back_experts(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Give the experts module at ``name``'s parent its fused parameter back, frozen."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    delattr(parent, child)
    setattr(parent, child, nn.Parameter(weight, requires_grad=False))


def _restore_implementation(model: nn.Module, layers: list[MissExperts]) -> None:
    """Once no MissExperts is left, switch the experts back to the implementation they had before qmiss's."""
    if not any(isinstance(m, MissExperts) for m in model.modules()):
        for module in model.modules():
            if is_experts_module(module):
                module.config._experts_implementation = layers[0].implementation


def unwrap_merged(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace every MissLinear by an ``nn.Linear`` holding dequantize(W) + ΔW, every MissExperts by the fused
    parameter it took the place of (W + ΔW per expert, in its layout), and every other quantized linear by its
    dequantized weight, in ``dtype``, one layer at a time (merged in fp32: exact up to ``dtype``'s rounding). A
    layer that stands for a ``Conv1D`` (:func:`from_conv1d`) becomes that ``Conv1D`` again, so the model saves the
    checkpoint layout its class loads."""
    replaced: list[str] = []
    experts: list[MissExperts] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(f"{done}.") for done in replaced):  # a MissLinear's own base layer
            continue
        if isinstance(module, MissExperts):
            _put_back_experts(model, name, module.fused_weight(merged=True, dtype=dtype))
            replaced.append(name)
            experts.append(module)
            continue
        if isinstance(module, MissLinear):
            linear = _plain_linear(module.merged_weight(dtype), module.bias, dtype, from_conv1d(module))
        elif quant.is_linear(module) and quant.quant_bits(module) is not None:
            linear = _plain_linear(quant.dequantize(module, dtype), module.bias, dtype, from_conv1d(module))
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        replaced.append(name)
    if experts:
        _restore_implementation(model, experts)


def unwrap(model: nn.Module) -> None:
    """Put each MissLinear's base layer (quantized as it is) back in its place (an unquantized one that stands for a
    ``Conv1D`` becomes that ``Conv1D`` again, weights as they are). Unquantized experts get their
    fused parameter back; quantized experts have no transformers form, so their MissExperts stays, its adapter
    zeroed, frozen and switched off (the output is the quantized base's)."""
    experts = [layer for _, layer in miss_layers(model) if isinstance(layer, MissExperts)]
    for name, layer in list(miss_layers(model)):
        if isinstance(layer, MissExperts):
            if layer.bits is None:
                _put_back_experts(model, name, layer.fused_weight(merged=False))
            else:
                with torch.no_grad():
                    layer.miss_block.zero_().requires_grad_(False)
                layer.disabled = True
            continue
        base = layer.base_layer
        if from_conv1d(base) and quant.quant_bits(base) is None:  # the Conv1D it was made from, as it now is
            base = _plain_linear(base.weight.detach(), base.bias, base.weight.dtype, conv1d=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
    if experts:
        _restore_implementation(model, experts)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its unquantized (bits=None) base weight, in place; see :meth:`MissLinear.merge`."""
    for _, layer in miss_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` in place."""
    for _, layer in miss_layers(model):
        layer.unmerge()
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
