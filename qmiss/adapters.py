"""Adapters on disk: PEFT's MiSS format, read, checked and written (exports are in :mod:`qmiss.export`).

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
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from qmiss.config import QMissConfig
from qmiss.inputs import MissingPathError, looks_like_hub_id
from qmiss.layer import MissLinear
from qmiss.model import WRAPPER_PREFIXES, miss_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
QMISS_CONFIG_NAME = "qmiss_config.json"
PREFIX = "base_model.model."
PathLike = Union[str, os.PathLike]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
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
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n"))


def require_qmiss(model: nn.Module) -> QMissConfig:
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
    config = require_qmiss(model)
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
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
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
    have = require_qmiss(model)
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
