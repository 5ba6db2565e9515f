"""Where a model comes from: a transformers config, and the model it describes on the meta device.

A config can be given as a config object or dict, a ``config.json``, a model folder, a GGUF file
(:mod:`qmiss.gguf_file`) or a hub id; a path that does not exist fails at once, without a hub request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from qmiss.gguf_file import gguf_config, is_gguf
from qmiss.inputs import InputError, MissingPathError, check_local_path, hub_access


def load_hf_config(config, what: str = "config"):
    """A transformers config from a config object or dict, a config.json, a model folder, a GGUF file or a hub id.

    Args:
        what: how to name ``config`` in errors, e.g. "--config".

    Raises:
        MissingPathError: a path that does not exist (at once, with no hub request), or no such hub model.
        InputError: a file that is not a transformers config.
    """
    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, dict):
        model_type = config.get("model_type")
        if not model_type:
            raise InputError(f"{what}: the dict has no 'model_type'; pass a transformers config or a config.json path")
        return AutoConfig.for_model(**config)
    name = os.fspath(config)
    path = check_local_path(name, what)
    if path is None:
        with hub_access() as online:
            try:
                return AutoConfig.from_pretrained(name)
            except (OSError, ValueError) as exc:
                reach = "" if online else " (the hub cannot be reached: only the local cache was searched)"
                raise MissingPathError(f"{what} {name}: not a local file or folder, and no hub model of that name "
                                       f"could be read{reach}") from exc
    if path.is_file() and is_gguf(path):
        return gguf_config(path, what)
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise MissingPathError(f"{what} {name}: the folder has no config.json; pass a model folder or a "
                                       "config.json file")
            return AutoConfig.from_pretrained(str(path))
        return AutoConfig.from_pretrained(str(path.parent)) if path.name == "config.json" else _config_from_json(path)
    except InputError:
        raise
    except (OSError, ValueError) as exc:
        raise InputError(f"{what} {name}: not a readable transformers config ({exc})") from exc


def _config_from_json(path: Path):
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(payload, dict) or "model_type" not in payload:
        raise InputError(f"{path}: no 'model_type' field; pass a model's config.json")
    return AutoConfig.for_model(**payload)


def meta_model(config) -> nn.Module:
    """The model ``config`` describes, on the meta device: shapes, no storage."""
    with init_empty_weights(include_buffers=True):
        return AutoModelForCausalLM.from_config(config)
