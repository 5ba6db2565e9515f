"""Adapters on disk: PEFT's MiSS format, exact 16-bit merges, and lossless LoRA export.

Files (the first two are PEFT's, so each side loads the other's):

- ``adapter_config.json``: PEFT ``MissConfig`` fields (``"peft_type": "MISS"``, ``r``, ``mini_r``,
  ``init_weights``, ``target_modules`` …), nothing else, so PEFT loads it without warnings.
- ``adapter_model.safetensors``: ``base_model.model.<module path>.miss_block``.
- ``qmiss_config.json``: qmiss's own settings, which PEFT never reads (version, mode, bits, quant
  type, double quant, compute dtype, each module's base (in, out)); see ``QMissConfig.to_qmiss_dict``.

Reading takes PEFT's MiSS adapters and the older Bone format (``"BONE"``, ``.bone_block``), and
qmiss adapters from before ``qmiss_config.json``, whose settings sat in a ``"qmiss"`` section of
``adapter_config.json``. It reads only JSON and safetensors, never pickle. Everything is checked
before the model changes. Every file is written to a temporary name in its folder and renamed into
place, ``adapter_config.json`` last.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from qmiss import hf, ops, quant
from qmiss.config import QMissConfig
from qmiss.inputs import MissingPathError, looks_like_hub_id
from qmiss.layer import MissLinear
from qmiss.model import WRAPPER_PREFIXES, miss_layers, prepare_qmiss

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
QMISS_CONFIG_NAME = "qmiss_config.json"
PREFIX = "base_model.model."
PathLike = Union[str, os.PathLike]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n"))


def _require_qmiss(model: nn.Module) -> QMissConfig:
    config = getattr(model, "qmiss_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no qmiss adapters; call qmiss.prepare_qmiss(model, ...) first")
    return config


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard (DTensor) is gathered from every rank (a collective call)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _fsdp1_full_params(model: nn.Module) -> contextlib.AbstractContextManager:
    """Inside it, FSDP1-wrapped parameters are whole on every rank (a collective); a no-op without FSDP1."""
    if not torch.distributed.is_available():
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    roots = FSDP.fsdp_modules(model, root_only=True)
    stack = contextlib.ExitStack()
    for root in roots:
        stack.enter_context(FSDP.summon_full_params(root, writeback=False))
    return stack


def _unwrapped_name(key: str) -> str:
    """A state-dict key with the path parts that DDP ("module.") and FSDP1 / checkpoint wrappers insert removed."""
    for prefix in WRAPPER_PREFIXES:
        key = key.replace(prefix, "")
    return key.removeprefix("module.")


def save_adapter(model: nn.Module, directory: PathLike, state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write the model's adapters in PEFT's MiSS format plus ``qmiss_config.json``, each file atomically.

    The weights go first, then ``qmiss_config.json``, then ``adapter_config.json``: the config that
    makes the folder an adapter is written last, so an interrupted save never leaves one that points
    at files not yet written.

    Under FSDP (FSDP2's ``fully_shard`` or FSDP1's ``FullyShardedDataParallel``) every rank
    must call it: the adapter shards are gathered and rank 0 writes.

    Args:
        model: the qmiss model, or its FSDP/DDP wrapper.
        directory: the adapter folder (created if missing).
        state_dict: a full state dict gathered already (what transformers' Trainer hands to
            ``_save`` under FSDP's FULL_STATE_DICT); its adapter entries are written and no
            collective is called.

    Returns:
        The folder.
    """
    config = _require_qmiss(model)
    directory = Path(directory)
    layers = dict(miss_layers(model))
    if state_dict is not None:
        # keys as the wrapper's state_dict() names them: DDP adds "module.", FSDP1 and checkpoint wrappers their own
        entries = {_unwrapped_name(key): value for key, value in state_dict.items() if key.endswith(".adapter.weight")}
        missing = [f"{name}.adapter.weight" for name in layers if f"{name}.adapter.weight" not in entries]
        if missing:
            raise KeyError(f"state_dict lacks {missing[0]} (and {len(missing) - 1} more adapter tensors)")
        blocks = {name: entries[f"{name}.adapter.weight"] for name in layers}
    else:
        with _fsdp1_full_params(model):
            blocks = {name: _full(layer.miss_block).clone() for name, layer in layers.items()}
    tensors = {f"{PREFIX}{name}.miss_block": block.detach().float().cpu().contiguous() for name, block in blocks.items()}
    if state_dict is None and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return directory  # every rank took part in gathering the shards; rank 0 writes
    payload = config.to_peft_dict(list(layers))
    settings = config.to_qmiss_dict({name: (layer.in_features, layer.out_features) for name, layer in layers.items()})
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(directory / QMISS_CONFIG_NAME, settings)
    atomic_write_json(directory / CONFIG_NAME, payload)  # last: see the docstring
    return directory


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def read_adapter(directory: PathLike) -> tuple[QMissConfig, dict[str, torch.Tensor], dict]:
    """Read and check an adapter folder (qmiss, PEFT MiSS or Bone) without touching any model.

    qmiss's settings come from ``qmiss_config.json`` where the folder has one, else from the
    ``"qmiss"`` section of an older qmiss ``adapter_config.json``; a PEFT adapter has neither.

    Returns:
        (config, ``{module path: tensor}``, the ``adapter_config.json`` payload with qmiss's settings,
        wherever they were stored, under ``"qmiss"``).

    Raises:
        MissingPathError (a FileNotFoundError): no such folder, or a file is missing.
        ValueError: malformed JSON, a config value out of range, an unreadable or truncated
            safetensors file, a key that is not an adapter tensor, a non-float or non-finite tensor.
    """
    if not Path(directory).expanduser().is_dir():
        hub = " (qmiss reads adapters from local folders; for one on the hub, download it first with " \
              "huggingface_hub.snapshot_download)" if looks_like_hub_id(os.fspath(directory)) else ""
        raise MissingPathError(f"adapter folder {directory}: no such folder{hub}")
    directory = Path(directory).expanduser()
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise MissingPathError(f"{path} is missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    payload = _read_json(config_path)
    qmiss_path = directory / QMISS_CONFIG_NAME
    if qmiss_path.exists():
        section = _read_json(qmiss_path)
        config = QMissConfig.from_peft_dict(payload, str(config_path), section, str(qmiss_path))
        payload = {**payload, "qmiss": section}
    else:
        config = QMissConfig.from_peft_dict(payload, str(config_path))
    suffix = ".bone_block" if payload["peft_type"] == "BONE" else ".miss_block"
    tensors = {}
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            for key in f.keys():
                if not key.endswith(suffix):
                    raise ValueError(f"{weights_path}: unexpected tensor {key!r}; expected '<module path>{suffix}' keys")
                name = key.removeprefix(PREFIX)[: -len(suffix)]
                tensors[name] = f.get_tensor(key)
    except SafetensorError as exc:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({exc}); the file is truncated or corrupt") from exc
    if not tensors:
        raise ValueError(f"{weights_path}: holds no adapter tensors")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{weights_path}: {name} has dtype {tensor.dtype}; adapter tensors are floating point")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_path}: {name} holds NaN or inf values; refusing a poisoned adapter")
    return config, tensors, payload


def _check_fits(model: nn.Module, config: QMissConfig, tensors: dict[str, torch.Tensor], payload: dict,
                source: Path) -> dict[str, MissLinear]:
    """Every check that must pass before an adapter is copied into a prepared model."""
    have = _require_qmiss(model)
    if (have.mode, have.r) != (config.mode, config.r) or (config.mode == "mini" and have.mini_r != config.mini_r):
        raise ValueError(
            f"{source}: adapter is mode={config.mode!r}, r={config.r}, mini_r={config.mini_r}; the model was prepared "
            f"with mode={have.mode!r}, r={have.r}, mini_r={have.mini_r} — prepare a fresh model with the adapter's "
            "settings, or use qmiss.from_pretrained(model, dir)"
        )
    layers = dict(miss_layers(model))
    missing, unexpected = sorted(set(layers) - set(tensors)), sorted(set(tensors) - set(layers))
    if missing or unexpected:
        raise ValueError(f"{source}: adapter and model disagree — missing for the model's layers: {missing or 'none'}; "
                         f"unexpected (no such qmiss layer): {unexpected or 'none'}")
    recorded = (payload.get("qmiss") or {}).get("modules") or {}
    for name, layer in layers.items():
        shape = tuple(tensors[name].shape)
        if shape != tuple(layer.miss_block.shape):
            raise ValueError(f"{source}: {name} adapter has shape {shape}, the model's layer needs "
                             f"{tuple(layer.miss_block.shape)} (in={layer.in_features}, out={layer.out_features})")
        if name in recorded and list(recorded[name]) != [layer.in_features, layer.out_features]:
            raise ValueError(f"{source}: {name} was trained on a base of (in, out)={tuple(recorded[name])}, "
                             f"this model's is {(layer.in_features, layer.out_features)}")
    return layers


def load_adapter(model: nn.Module, directory: PathLike, trainable: bool = False) -> nn.Module:
    """Load an adapter (qmiss, PEFT MiSS or Bone) into a model prepared with the same settings.

    All checks run before any tensor is copied, so a rejected adapter leaves the model as it was.

    Args:
        model: a model returned by :func:`qmiss.prepare_qmiss` (use :func:`from_pretrained` for a plain one).
        directory: the adapter folder.
        trainable: leave the adapters trainable (to resume training), else frozen for inference.

    Raises:
        ValueError / FileNotFoundError: see :func:`read_adapter`, plus mode/r/key/shape mismatches.
    """
    config, tensors, payload = read_adapter(directory)
    layers = _check_fits(model, config, tensors, payload, Path(directory))
    with torch.no_grad():
        for name, layer in layers.items():
            layer.miss_block.copy_(tensors[name])
            layer.miss_block.requires_grad_(trainable)
    return model


def from_pretrained(model: nn.Module, directory: PathLike, trainable: bool = False, **overrides) -> nn.Module:
    """Prepare a plain transformers model with an adapter's own settings, then load the adapter.

    Args:
        model: a full-precision (or BitsAndBytesConfig-loaded) transformers model.
        directory: the adapter folder.
        trainable: see :func:`load_adapter`.
        **overrides: :func:`prepare_qmiss` arguments to use instead of the recorded ones (e.g. ``bits=8``,
            ``compute_dtype=torch.float32``; the compute dtype recorded at save time is not replayed).
    """
    config, tensors, _ = read_adapter(directory)
    # The recorded compute dtype is not replayed: it belongs to the machine that trained (fp32 on a
    # CPU), not to the adapter; the compute-dtype rule picks one for where this model runs.
    settings = dict(r=config.r, mode=config.mode, mini_r=config.mini_r, bits=config.bits, quant_type=config.quant_type,
                    double_quant=config.double_quant, target_modules=sorted(tensors), dropout=config.dropout)
    if any(quant.is_linear(m) and quant.quant_bits(m) is not None for m in model.modules()):
        settings["bits"] = "auto"  # a BitsAndBytesConfig model keeps its own quantization
    settings.update(overrides)
    return load_adapter(prepare_qmiss(model, **settings), directory, trainable=trainable)


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


def _plain_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return linear


def merge_and_unload(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A plain transformers model: every MissLinear becomes an ``nn.Linear`` holding dequantize(W) + ΔW.

    The merge is computed in fp32 from the dequantized base, so the result is exact up to
    ``dtype``'s rounding (unlike merging into a 4-bit weight, which re-quantizes). Quantized
    layers left without an adapter are dequantized too. Works in place, one layer at a time.

    Returns:
        The same model object, in ``dtype``, with no qmiss or bitsandbytes modules left.
    """
    _require_qmiss(model)
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(f"{done}.") for done in replaced):  # a MissLinear's own base layer
            continue
        if isinstance(module, MissLinear):
            linear = _plain_linear(module.merged_weight(dtype), module.bias, dtype)
        elif quant.is_linear(module) and quant.quant_bits(module) is not None:
            linear = _plain_linear(quant.dequantize(module, dtype), module.bias, dtype)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        replaced.append(name)
    hf.forget_quantization(model)
    hf.detach(model)
    if callable(getattr(model, "disable_input_require_grads", None)):
        try:
            model.disable_input_require_grads()
        except AttributeError:  # no hook was registered
            pass
    del model.qmiss_config
    return model.to(dtype)


def _parse_size(size: Union[int, str]) -> int:
    """'2GB' -> 2·10⁹ bytes (the Hugging Face convention), ints pass through."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    raise ValueError(f"max_shard_size={size!r}: use bytes or a size like '2GB' / '500MB'")


class _OriginalWeights:
    """Read ``<name>.weight`` tensors from an original safetensors checkpoint folder, lazily."""

    def __init__(self, folder: PathLike) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                self.files = {k: folder / "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")

    def get(self, key: str) -> Optional[torch.Tensor]:
        if key not in self.files:
            return None
        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)


def _export_tensors(model: nn.Module, dtype: torch.dtype,
                    original: Optional[_OriginalWeights]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of the merged checkpoint, one module at a time; tied parameters once."""
    seen: set[int] = set()
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, MissLinear) or (quant.is_linear(module) and quant.quant_bits(module) is not None):
            skip_prefixes.append(prefix)
            orig = original.get(f"{prefix}weight") if original is not None else None
            if isinstance(module, MissLinear):
                weight = (module.merged_weight(dtype) if orig is None
                          else (orig.float() + module.delta_weight(torch.float32)).to(dtype))
            else:
                weight = quant.dequantize(module, dtype) if orig is None else orig.to(dtype)
            yield f"{prefix}weight", weight
            if module.bias is not None:
                yield f"{prefix}bias", module.bias.detach().to(dtype)
            continue
        for pname, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield f"{prefix}{pname}", param.detach().to(dtype)
        for bname, buffer in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                yield f"{prefix}{bname}", buffer.detach()


def export_merged(
    model: nn.Module,
    out_dir: PathLike,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: Union[int, str] = "2GB",
    tokenizer=None,
    original_checkpoint: Optional[PathLike] = None,
) -> Path:
    """Write a standard Hugging Face checkpoint of the merged model, without changing ``model``.

    Weights are dequantize(W) + ΔW (bat: W(I + B) + B blockwise), computed in fp32 one layer at
    a time and written in safetensors shards of at most ``max_shard_size``, so memory stays near
    the quantized model plus one shard. ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it
    with qmiss not installed. The folder is assembled under a temporary name and renamed into place.

    Args:
        model: a qmiss model.
        out_dir: the checkpoint folder (replaced if it exists).
        dtype: dtype of the written weights.
        max_shard_size: bytes or a size like "2GB".
        tokenizer: saved alongside when given.
        original_checkpoint: default/mini only — a folder with the original 16-bit safetensors;
            the adapter's ΔW is added to those weights instead of the dequantized ones, which is
            what users of a 16-bit base want (ΔW of default/mini does not depend on W). bat is
            refused: its update W(I + B) + B multiplies W, and B was trained against the
            dequantized weights, so only they reproduce the trained model.

    Returns:
        The folder.
    """
    config = _require_qmiss(model)
    if original_checkpoint is not None and config.mode == "bat":
        raise ValueError("original_checkpoint with mode='bat': bat's update multiplies W and was trained against the "
                         "dequantized weights; export bat without original_checkpoint")
    original = _OriginalWeights(original_checkpoint) if original_checkpoint is not None else None
    limit = _parse_size(max_shard_size)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shards: list[dict[str, str]] = []  # key -> temp shard file
        current: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal current, size
            if current:
                path = tmp / f"shard-{len(shards):05d}.tmp"
                save_file({k: v.contiguous() for k, v in current.items()}, str(path), metadata={"format": "pt"})
                shards.append({k: path.name for k in current})
                current, size = {}, 0

        total = 0
        with torch.no_grad():
            for key, tensor in _export_tensors(model, dtype, original):
                nbytes = tensor.numel() * tensor.element_size()
                if current and size + nbytes > limit:
                    flush()
                current[key] = tensor.cpu()
                size += nbytes
                total += nbytes
            flush()
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for name, shard in zip(names, shards):
            os.replace(tmp / next(iter(shard.values())), tmp / name)
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf_config = copy.deepcopy(model.config)
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        setattr(hf_config, "dtype" if hasattr(hf_config, "dtype") else "torch_dtype", dtype)  # transformers 5 / 4
        hf_config.use_cache = True
        hf_config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is set aside first and removed after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_lora(source: Union[nn.Module, PathLike], out_dir: PathLike) -> Path:
    """Write a default/mini adapter as the PEFT LoRA adapter it is exactly (rank r, scale 1).

    ``A[k, c] = 1 if c % r == k`` (r × in) sums the shards, ``B = Dᵀ`` (out × r), and
    ``lora_alpha = r`` makes the scale 1, so ``B A x = (Σ_j x_j) D``, bit for bit up to float
    rounding, for any in_features (a partial last shard included). vLLM / TGI-style LoRA servers
    load the result.

    Args:
        source: a qmiss model, or a qmiss adapter folder (which records each module's in_features).
        out_dir: the LoRA adapter folder.

    Raises:
        ValueError: for bat, which is not low-rank (use :func:`export_merged`), or an adapter
            folder without recorded module shapes (pass the prepared model instead).
    """
    if isinstance(source, nn.Module):
        config = _require_qmiss(source)
        layers = dict(miss_layers(source))
        blocks = {n: layer.miss_block.detach().float().cpu() for n, layer in layers.items()}
        shapes = {n: (layer.in_features, layer.out_features) for n, layer in layers.items()}
    else:
        config, blocks, payload = read_adapter(source)
        recorded = (payload.get("qmiss") or {}).get("modules")
        if not recorded:
            raise ValueError(f"{source}: records no module shapes (not saved by qmiss); pass the prepared model")
        unrecorded = sorted(set(blocks) - set(recorded))
        if unrecorded:
            raise ValueError(f"{source}: the recorded module shapes give no (in, out) for {unrecorded} (they come "
                             "from another save than the adapter); pass the prepared model instead")
        shapes = {n: tuple(recorded[n]) for n in blocks}
    if config.mode == "bat":
        raise ValueError("mode='bat' is not a low-rank update and has no exact LoRA form; "
                         "use qmiss.export_merged(model, dir) for a merged checkpoint instead")
    tensors = {}
    for name, block in blocks.items():
        n_in, n_out = shapes[name]
        d = ops.tile_mini(block, n_out) if config.mode == "mini" else block  # (r, out)
        lora_a = (torch.arange(n_in) % config.r == torch.arange(config.r)[:, None]).float()  # (r, in)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = lora_a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = d.t().contiguous()  # (out, r)
    payload = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r, "lora_alpha": config.r, "lora_dropout": 0.0,
        "target_modules": sorted(blocks), "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": config.base_model_name_or_path,
    }
    out_dir = Path(out_dir)
    _atomic_write(out_dir / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(out_dir / CONFIG_NAME, payload)
    return out_dir
