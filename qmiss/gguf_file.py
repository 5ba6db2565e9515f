"""A GGUF file (what llama.cpp, Ollama and LM Studio use) as a transformers folder qmiss can quantize.

transformers reads GGUF, dequantizing its blocks into float weights, but a model loaded that way
cannot be quantized again by bitsandbytes. So a GGUF file is converted once into a plain folder
(config, safetensors weights, tokenizer) in qmiss's cache, keyed by the file's SHA-256: the same
file is converted once, a changed file again. Small models (under 1B parameters) are stored in
fp32, larger ones in bf16 (half the disk, and what a GPU computes in).

Checks that need only the file's header run before any weight is read (:func:`gguf_config`): an
architecture transformers cannot map, or a tensor type the ``gguf`` package cannot dequantize, is
refused in one line naming the file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from qmiss.hf import forget_quantization
from qmiss.inputs import InputError, few

#: models with fewer parameters are converted to fp32, larger ones to bf16.
FP32_BELOW_PARAMETERS = 1_000_000_000


def cache_dir() -> Path:
    """Where converted models live: ``$QMISS_CACHE`` or ``~/.cache/qmiss``."""
    return Path(os.environ.get("QMISS_CACHE", Path.home() / ".cache" / "qmiss"))


def is_gguf(path: os.PathLike | str) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix)."""
    return str(path).lower().endswith(".gguf")


def _reader(path: Path, what: str):
    try:
        import gguf
    except ImportError:
        raise InputError(f"{what} {path}: reading GGUF needs the gguf package — pip install gguf") from None
    try:
        return gguf, gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise InputError(f"{what} {path}: not a readable GGUF file ({exc})") from None


def _check_tensor_types(gguf, reader, path: Path, what: str) -> None:
    """Dequantize the smallest tensor of each type the file uses: a type gguf cannot read fails here, not after
    minutes of conversion."""
    smallest = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        if kind not in smallest or tensor.n_elements < smallest[kind].n_elements:
            smallest[kind] = tensor
    for kind, tensor in smallest.items():
        try:
            gguf.dequantize(tensor.data, kind)
        except NotImplementedError:
            raise InputError(f"{what} {path}: its tensors of type {kind.name} cannot be dequantized by gguf "
                             f"{importlib.metadata.version('gguf')} — use a GGUF of another quantization (Q4_K_M, "
                             "Q8_0, F16) or the model's safetensors checkpoint") from None


def gguf_config(path: os.PathLike | str, what: str = "--base_model_name_or_path") -> PretrainedConfig:
    """The transformers config of a GGUF file, after checking that transformers and gguf can read all of it.

    Raises:
        InputError: no gguf package, not a GGUF file, an architecture transformers cannot map to a model, or a
            tensor type gguf cannot dequantize; each names the file.
    """
    path = Path(path)
    gguf, reader = _reader(path, what)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ValueError as exc:  # transformers' modeling_gguf_pytorch_utils: "... architecture X is not supported yet"
        raise InputError(f"{what} {path}: transformers cannot read this GGUF ({exc}); it reads the architectures "
                         f"{few(sorted(GGUF_SUPPORTED_ARCHITECTURES), 8)} — use the model's safetensors "
                         "checkpoint instead") from None
    _check_tensor_types(gguf, reader, path, what)
    return config


def file_digest(path: Path) -> str:
    """The file's SHA-256, read 16 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(16 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def converted_folder(path: os.PathLike | str, what: str = "--base_model_name_or_path") -> Path:
    """A transformers folder holding the GGUF file's model in fp32 (bf16 from 1B parameters) safetensors and its
    tokenizer, converted on first use into ``cache_dir()/gguf/<name>-<sha256>``.

    The conversion writes into a temporary folder beside the cache and renames it into place, so an interrupted
    run never leaves a half-written model, and two runs converting at once both end with a whole one.

    Raises:
        InputError: see :func:`gguf_config`.
    """
    path = Path(path)
    target = cache_dir() / "gguf" / f"{path.stem}-{file_digest(path)[:16]}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf, reader = _reader(path, what)
    gguf_config(path, what)
    parameters = sum(int(t.n_elements) for t in reader.tensors)
    dtype = torch.float32 if parameters < FP32_BELOW_PARAMETERS else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    forget_quantization(model)  # the weights are plain floats now: save them as a normal checkpoint
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=target.parent))
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


def load_tokenizer(path: os.PathLike | str):
    """The tokenizer of a model folder, or of a GGUF file (read from its header; no weights are converted)."""
    path = Path(path)
    if is_gguf(path):
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))
