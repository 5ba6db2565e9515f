"""Exports: a merged 16-bit Hugging Face checkpoint, and default/mini adapters as the LoRA they are.

Both read the model (or an adapter folder) without changing it, and write their folder atomically:
a merged checkpoint is assembled under a temporary name and renamed into place, a LoRA adapter's
files are each written to a temporary name, ``adapter_config.json`` last.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qmiss import ops, quant
from qmiss.config import BLOCK_MODES
from qmiss.adapters import CONFIG_NAME, PREFIX, WEIGHTS_NAME, atomic_write, atomic_write_json, read_adapter, require_qmiss
from qmiss.layer import MissExperts, MissLinear
from qmiss.model import from_conv1d, miss_layers

PathLike = Union[str, os.PathLike]


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
        """The tensor stored under ``key`` (a linear's ``<name>.weight``, a fused expert parameter's path), if any."""
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
        if isinstance(module, MissExperts):  # the fused parameter it stands for, under its name
            skip_prefixes.append(prefix)
            orig = original.get(name) if original is not None else None
            if orig is None:
                yield name, module.fused_weight(merged=True, dtype=dtype)
                continue
            delta = torch.stack([module.delta_weight(e) for e in range(module.experts)])  # (E, out, in)
            yield name, (orig.float() + (delta.transpose(1, 2) if module.transposed else delta)).to(dtype)
            continue
        if isinstance(module, MissLinear) or (quant.is_linear(module) and quant.quant_bits(module) is not None):
            skip_prefixes.append(prefix)
            conv1d = from_conv1d(module)  # the checkpoint holds this weight (in, out), as GPT-2's Conv1D stores it
            orig = original.get(f"{prefix}weight") if original is not None else None
            if orig is not None and conv1d:
                orig = orig.t()  # (out, in)
            if isinstance(module, MissLinear):
                weight = (module.merged_weight(dtype) if orig is None
                          else (orig.float() + module.delta_weight(torch.float32)).to(dtype))
            else:
                weight = quant.dequantize(module, dtype) if orig is None else orig.to(dtype)
            yield f"{prefix}weight", weight.t() if conv1d else weight
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
    with qmiss not installed. A layer that stands for a transformers ``Conv1D`` (GPT-2) is written
    in the Conv1D's (in, out) layout, as its class loads it (:func:`qmiss.model.from_conv1d`). The
    folder is assembled under a temporary name and renamed into place.

    Args:
        model: a qmiss model.
        out_dir: the checkpoint folder (replaced if it exists).
        dtype: dtype of the written weights.
        max_shard_size: bytes or a size like "2GB".
        tokenizer: saved alongside when given.
        original_checkpoint: default/mini only — a folder with the original 16-bit safetensors;
            the adapter's ΔW is added to those weights instead of the dequantized ones, which is
            what users of a 16-bit base want (ΔW of default/mini does not depend on W). bat and
            bat_row are refused: their update multiplies W (W(I + B) + B), and B was trained against
            the dequantized weights, so only they reproduce the trained model.

    Returns:
        The folder.
    """
    config = require_qmiss(model)
    if original_checkpoint is not None and config.mode in BLOCK_MODES:
        raise ValueError(f"original_checkpoint with mode={config.mode!r}: {config.mode}'s update multiplies W and was "
                         f"trained against the dequantized weights; export {config.mode} without original_checkpoint")
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


def _lora_pair(block: torch.Tensor, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's (A, B) for one default/mini adapter block: A (r, in) sums the shards, B = Dᵀ (out, r)."""
    r = block.shape[0]
    lora_a = (torch.arange(n_in) % r == torch.arange(r)[:, None]).float()  # (r, in)
    return lora_a, block.t().contiguous()


def _expert_lora(block: torch.Tensor, n_in: int, n_out: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``target_parameters`` LoRA (``lora.ParamWrapper``) for E experts' blocks: PEFT reads ``lora_A``
    (E·r, in) as (E, r, in) and ``lora_B`` (out, r·E) as (out, r, E), rank-major."""
    n_experts, r = block.shape[0], block.shape[1]
    a = torch.zeros(n_experts, r, n_in)
    b = torch.zeros(n_out, r, n_experts)
    for e in range(n_experts):
        d = ops.tile_mini(block[e], n_out) if mode == "mini" else block[e]  # (r, out)
        a[e], b[:, :, e] = _lora_pair(d, n_in)
    return a.reshape(n_experts * r, n_in), b.reshape(n_out, r * n_experts)


def export_lora(source: Union[nn.Module, PathLike], out_dir: PathLike) -> Path:
    """Write a default/mini adapter as the PEFT LoRA adapter it is exactly (scale 1).

    ``A[k, c] = 1 if c % r == k`` (r × in) sums the shards, ``B = Dᵀ`` (out × r), and
    ``lora_alpha = r`` makes the scale 1, so ``B A x = (Σ_j x_j) D``, bit for bit up to float
    rounding, for any in_features (a partial last shard included). vLLM / TGI-style LoRA servers
    load the result. Modules with their own r (``rank_pattern``) get it in LoRA's ``rank_pattern`` and
    ``alpha_pattern``. Fused experts become PEFT's ``target_parameters`` LoRA (one A and B per expert, as
    ``lora.ParamWrapper`` stores them).

    Args:
        source: a qmiss model, or a qmiss adapter folder (which records each module's in_features).
        out_dir: the LoRA adapter folder.

    Raises:
        ValueError: for bat and bat_row, which are not low-rank (use :func:`export_merged`), or an adapter
            folder without recorded module shapes (pass the prepared model instead).
    """
    def refuse_block_modes(config, where: str) -> None:  # noqa: ANN001 — a QMissConfig
        if config.mode in BLOCK_MODES:
            raise ValueError(f"{where}: mode={config.mode!r} is not a low-rank update and has no exact LoRA form; "
                             "use qmiss.export_merged(model, dir) for a merged checkpoint instead")

    if isinstance(source, nn.Module):
        config = require_qmiss(source)
        refuse_block_modes(config, type(source).__name__)
        layers = dict(miss_layers(source))
        blocks = {n: layer.miss_block.detach().float().cpu() for n, layer in layers.items()}
        shapes = {n: (layer.in_features, layer.out_features) for n, layer in layers.items()}
    else:
        config, blocks, payload = read_adapter(source)
        refuse_block_modes(config, str(source))
        recorded = (payload.get("qmiss") or {}).get("modules")
        if not recorded:
            raise ValueError(f"{source}: records no module shapes (not saved by qmiss); pass the prepared model")
        unrecorded = sorted(set(blocks) - set(recorded))
        if unrecorded:
            raise ValueError(f"{source}: the recorded module shapes give no (in, out) for {unrecorded} (they come "
                             "from another save than the adapter); pass the prepared model instead")
        shapes = {n: tuple(recorded[n]) for n in blocks}
    expert_blocks = {n: b for n, b in blocks.items() if b.dim() == 3}  # (E, r, out | mini_r)
    tensors, ranks = {}, {}
    for name, block in blocks.items():
        n_in, n_out = shapes[name]
        if name in expert_blocks:
            module = name.rpartition(".")[0]
            # PEFT nests one ParamWrapper per parameter of a module, the first-registered innermost (each wrapper
            # adds a "base_layer." level for those inside it); transformers registers gate_up/up before down
            siblings = sorted((n for n in expert_blocks if n.rpartition(".")[0] == module), key=_param_order)
            key = f"{PREFIX}{module}." + "base_layer." * (len(siblings) - 1 - siblings.index(name))
            ranks[name] = block.shape[1]
            lora_a, lora_b = _expert_lora(block, n_in, n_out, config.mode)
        else:
            key = f"{PREFIX}{name}."
            ranks[name] = block.shape[0]
            lora_a, lora_b = _lora_pair(ops.tile_mini(block, n_out) if config.mode == "mini" else block, n_in)
        tensors[f"{key}lora_A.weight"], tensors[f"{key}lora_B.weight"] = lora_a, lora_b
    rank = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank is LoRA's r
    pattern = {re.escape(n): k for n, k in sorted(ranks.items()) if k != rank}  # PEFT: a regex matched at name ends
    payload = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": sorted(n for n in blocks if n not in expert_blocks) or None,
        "target_parameters": sorted(expert_blocks) or None, "rank_pattern": pattern, "alpha_pattern": pattern,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": config.base_model_name_or_path,
    }
    out_dir = Path(out_dir)
    atomic_write(out_dir / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(out_dir / CONFIG_NAME, payload)
    return out_dir


def _param_order(name: str) -> int:
    """The order transformers registers an experts module's fused parameters in (gate_up / up first, then down)."""
    return 1 if name.endswith("down_proj") else 0
