"""QMissConfig: every setting of a qmiss adapter, validated once, in one place.

The config speaks two dialects: qmiss's own (``mode="default" | "mini" | "bat" | "bat_row"``,
``bits``) and PEFT's MiSS (``init_weights=True | "mini" | "bat"``), so a user
coming from ``peft.MissConfig`` can keep the spelling they know. ``bat_row`` is qmiss's
own (PEFT has no such mode); qmiss also accepts it as ``init_weights="bat_row"`` and writes
that in a Bat-Row folder's ``adapter_config.json``.
"""

from __future__ import annotations

import importlib.metadata
import difflib
import re
from dataclasses import dataclass, fields
from typing import Literal, Optional, Union

import torch

from qmiss.inputs import InputError, spelled

#: qmiss's version (pyproject.toml's, as installed), recorded in every adapter folder (``qmiss_config.json``).
try:
    __version__ = importlib.metadata.version("qmiss")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

Mode = Literal["default", "mini", "bat", "bat_row"]
MODES: tuple[str, ...] = ("default", "mini", "bat", "bat_row")
#: modes whose adapter is r×r blocks (in % r == 0 and out % r == 0), folded into the weight: no dropout, no LoRA form.
BLOCK_MODES: tuple[str, ...] = ("bat", "bat_row")
#: ``adapter_config.json``'s peft_type for a bat_row adapter. PEFT has no Bat-Row; a MISS config would make PEFT
#: build bat's (or default's) adapter and, where in == out, load Bat-Row's blocks as bat's without a word. A
#: peft_type PEFT does not know makes every PEFT loader stop at its first line (``KeyError`` naming this value).
BAT_ROW_PEFT_TYPE = "QMISS_BAT_ROW (qmiss's Bat-Row, which PEFT cannot load: use qmiss.from_pretrained)"
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
#: dtypes a quantized base can compute in (bitsandbytes' kernels).
COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

#: ``bits``: keep the bitsandbytes quantization a model was loaded with, else quantize to 4-bit.
AUTO = "auto"
MiB = 2**20

# PEFT's init_weights values and the qmiss mode each one means.
_INIT_WEIGHTS_TO_MODE = {True: "default", "mini": "mini", "bat": "bat", "bat_row": "bat_row"}
_MODE_TO_INIT_WEIGHTS = {mode: init for init, mode in _INIT_WEIGHTS_TO_MODE.items()}


def mode_from_init_weights(init_weights: Union[bool, str]) -> str:
    """Translate PEFT's ``init_weights`` into a qmiss mode.

    Raises:
        ValueError: for ``init_weights=False`` (PEFT's random init, which does not
            start at the base model) or any other value.
    """
    if isinstance(init_weights, str) and init_weights.lower() in ("true", "default", "balance"):
        init_weights = True
    if init_weights is True or init_weights in ("mini", "bat", "bat_row"):
        return _INIT_WEIGHTS_TO_MODE[init_weights]
    raise InputError(
        f"{spelled('init_weights')}={init_weights!r} is not supported; use True (MiSS balance, mode='default'), "
        "'mini', 'bat' or 'bat_row' — qmiss always starts from zero-initialised adapters so training begins at the base model"
    )


def default_compute_dtype(device: Union[torch.device, str]) -> torch.dtype:
    """The compute-dtype rule, for a layer whose ``compute_dtype`` the user did not set.

    bf16 on a CUDA device (fp16 where the GPU has no bf16: pre-Ampere cards), fp32
    elsewhere (bf16 matmuls are slow on CPUs). It is applied where the layer runs: a
    model prepared on the CPU and then moved to a GPU computes in bf16 there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def check_compute_dtype(dtype: Optional[torch.dtype], bits: Optional[int], where: str = "compute_dtype") -> None:
    """Refuse a compute dtype that cannot be right for this base.

    Raises:
        TypeError: not a floating-point ``torch.dtype``.
        ValueError: fp64 on a 4/8-bit base: bitsandbytes has no fp64 kernels (its CPU
            4-bit dequantization returns uninitialised memory for fp64).
    """
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{where}={dtype!r} is not a floating-point torch.dtype; use torch.bfloat16, torch.float16 "
                        "or torch.float32, or None for the default (bf16 on CUDA, fp32 on the CPU)")
    if bits is not None and dtype not in COMPUTE_DTYPES:
        base = "4/8" if bits == AUTO else bits
        raise ValueError(f"{where}={dtype} on a {base}-bit base: bitsandbytes computes in bf16, fp16 or fp32 only; "
                         "use one of those, or None for the default (bf16 on CUDA, fp32 on the CPU)")


#: the fields of ``qmiss_config.json`` (:meth:`QMissConfig.to_qmiss_dict`), each one required there.
QMISS_FIELDS: tuple[str, ...] = ("version", "mode", "bits", "quant_type", "double_quant", "compute_dtype", "modules")
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_size(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0


def _check_qmiss_section(extra: dict, where: str, mode: str, peft_mode_source: str, required: bool) -> None:
    """Type- and range-check qmiss's settings (``qmiss_config.json``, or an older inline ``"qmiss"`` section).

    Args:
        extra: the settings.
        where: the error prefix, naming the file (and section).
        mode: the mode PEFT's ``init_weights`` means; a recorded ``mode`` must agree.
        peft_mode_source: what ``mode`` was read from, for the error.
        required: every field of :data:`QMISS_FIELDS` must be there (``qmiss_config.json``), ``modules``
            not null; else absent fields take their defaults (the older inline section).

    Raises:
        ValueError: naming the field, the value and the fix.
    """
    missing = [f for f in QMISS_FIELDS if f not in extra] if required else []
    if missing:
        raise ValueError(f"{where}missing field(s) {missing}; qmiss writes all of {list(QMISS_FIELDS)} — save the "
                         "adapter again with qmiss.save_adapter, or delete the file to load the folder as a PEFT "
                         "adapter (4-bit nf4 defaults)")
    if "version" in extra and not isinstance(extra["version"], str):
        raise ValueError(f"{where}version={extra['version']!r} must be a string such as '0.1.0'")
    if "mode" in extra:
        if not isinstance(extra["mode"], str) or extra["mode"] not in MODES:
            raise ValueError(f"{where}mode={extra['mode']!r} must be one of {MODES}")
        if extra["mode"] != mode:
            raise ValueError(f"{where}mode={extra['mode']!r} contradicts {peft_mode_source} (mode {mode!r}): "
                             "the settings come from different saves (e.g. PEFT saved over a qmiss adapter) — save "
                             "the adapter again with qmiss.save_adapter")
    bits = extra.get("bits", 4)
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or bits not in (4, 8, 16)):
        raise ValueError(f"{where}bits={bits!r} must be 4, 8 or null (an unquantized base)")
    quant_type = extra.get("quant_type", "nf4")
    if not isinstance(quant_type, str) or quant_type not in QUANT_TYPES:
        raise ValueError(f"{where}quant_type={quant_type!r} must be one of {QUANT_TYPES}")
    if not isinstance(extra.get("double_quant", True), bool):
        raise ValueError(f"{where}double_quant={extra['double_quant']!r} must be true or false")
    dtype_name = extra.get("compute_dtype")
    if dtype_name is not None and (not isinstance(dtype_name, str) or dtype_name not in _DTYPE_NAMES):
        raise ValueError(f"{where}compute_dtype={dtype_name!r} must be float32, bfloat16, float16 or null")
    if extra.get("rank_pattern") is not None:
        try:
            _check_rank_pattern(extra["rank_pattern"])
        except InputError as exc:
            raise ValueError(f"{where}{exc}") from exc
    modules = extra.get("modules")
    if (modules is not None or required) and not (isinstance(modules, dict) and all(
            isinstance(v, list) and len(v) == 2 and all(_is_size(n) for n in v) for v in modules.values())):
        raise ValueError(f"{where}modules must map module names to [in_features, out_features] (positive ints)")


def pattern_key(patterns: dict[str, object], name: str) -> Optional[str]:
    r"""The first key of ``patterns`` that matches the end of ``name`` on a name boundary, as PEFT's
    ``get_pattern_key`` matches ``rank_pattern`` (``re.match(rf"(.*\.)?({key})$", name)``); None if none does."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), None)


def _check_rank_pattern(rank_pattern: object) -> None:
    """A ``{regex: r}`` dict with valid regexes and positive int ranks, or None."""
    name = spelled("rank_pattern")
    if rank_pattern is None:
        return
    if not isinstance(rank_pattern, dict) or not rank_pattern:
        raise InputError(f"{name}={rank_pattern!r} must be a non-empty dict of module-name regex -> r, "
                         'e.g. {"experts": 16}, or None')
    for key, rank in rank_pattern.items():
        if not isinstance(key, str):
            raise InputError(f"{name}: key {key!r} must be a string (a regex matching the end of module names)")
        try:
            re.compile(key)
        except re.error as exc:
            raise InputError(f"{name}: key {key!r} is not a valid regex ({exc}); escape special characters") from exc
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise InputError(f"{name}[{key!r}]={rank!r} must be a positive int, e.g. 16")


def init_weights_from_mode(mode: str) -> Union[bool, str]:
    """PEFT's ``init_weights`` value for a qmiss mode (``"default"`` -> ``True``)."""
    return _MODE_TO_INIT_WEIGHTS[mode]


@dataclass
class QMissConfig:
    """Every setting of :func:`qmiss.prepare_qmiss`, with its default: the one place they are stated.

    The planner (:func:`qmiss.plan_memory`), ``qmiss-train`` and the adapter folder read their
    defaults from here too; where a front end defaults differently on purpose, :data:`FRONT_END_DEFAULTS`
    says so and why. The first group is the adapter's (saved in its folder: PEFT's fields in
    ``adapter_config.json``, qmiss's in ``qmiss_config.json``); the second says how the model is set up
    for training and is not saved.

    Raises:
        ValueError / TypeError: on any value out of range, naming the field, the value and the fix.
    """

    # --- the adapter ---------------------------------------------------------------------------------------------
    r: int = 64  # shard size along in_features; the adapter rank
    rank_pattern: Optional[dict[str, int]] = None  # per-module r, PEFT's LoraConfig spelling: {regex: r}, the
    #   first key matching the end of a module's path wins; {"experts": 16} covers fused experts; others take r
    mode: Mode = "default"  # "default" (MiSS balance), "mini", "bat" or "bat_row" (one r×r block per input
    #   block: bat's form at default's cost); PEFT's init_weights=True/"mini"/"bat"
    mini_r: Optional[int] = None  # mini: width of the tiled adapter along out_features
    bits: Union[int, str, None] = AUTO  # 4 or 8 (bitsandbytes), None/16: unquantized; "auto": as loaded, else 4
    quant_type: str = "nf4"  # 4-bit data type: "nf4" or "fp4"
    double_quant: bool = True  # 4-bit: quantize the absmax constants too (QLoRA's double quantization)
    target_modules: Union[str, list[str]] = "all-linear"  # "all-linear" (every linear but the output head), a
    #   full-match regex, or a list of names / name suffixes
    exclude_modules: Optional[Union[str, list[str]]] = None  # same syntax; wins over target_modules
    dropout: float = 0.0  # dropout on the adapter's input (default and mini)
    compute_dtype: Optional[torch.dtype] = None  # None: a 16-bit bnb_4bit_compute_dtype the model was loaded
    #   with, else each layer follows its device (default_compute_dtype), also after a move; else fixed
    bat_chunk_bytes: int = 64 * MiB  # bat (and experts): byte budget of one dequantized chunk of weight rows
    base_model_name_or_path: Optional[str] = None  # recorded in the PEFT adapter config

    # --- how the model is set up for training (prepare_qmiss; not saved) -------------------------------------------
    gradient_checkpointing: bool = False  # transformers' non-reentrant checkpointing, KV cache off
    quant_storage: Optional[torch.dtype] = None  # 4-bit: store the packed weights as this float dtype (FSDP1)
    fp32_norms: bool = False  # QLoRA's habit: norms and the output head upcast to fp32
    chunked_loss: bool = False  # training loss chunk by chunk of tokens; logits=None (qmiss.loss)
    loss_chunk_bytes: Optional[int] = None  # chunked loss: byte budget of one chunk of logits and gradient; None:
    #   chunks as large as the head, at most a quarter of the free GPU memory (qmiss.loss.auto_chunk_tokens)
    offload_activations: bool = False  # what autograd saves outside checkpointed layers waits in host memory
    embeddings_on_host: bool = False  # the input embedding table stays in host memory (qmiss.offload)

    def __post_init__(self) -> None:
        r, mode, mini_r, bits = (spelled(n) for n in ("r", "mode", "mini_r", "bits"))
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise TypeError(f"{r}={self.r!r} must be an int, e.g. {r}=64")
        if self.r <= 0:
            raise InputError(f"{r}={self.r} must be a positive int, e.g. {r}=64")
        _check_rank_pattern(self.rank_pattern)
        if self.mode not in MODES:
            raise InputError(f"{mode}={self.mode!r} is not one of {MODES}; PEFT's init_weights=True/'mini'/'bat' "
                             "also work")
        if self.mode == "mini":
            if self.mini_r is None:
                raise InputError(f"{mode}='mini' needs {mini_r} (the adapter width along out_features), e.g. {mini_r}=16")
            if isinstance(self.mini_r, bool) or not isinstance(self.mini_r, int) or self.mini_r <= 0:
                raise InputError(f"{mini_r}={self.mini_r!r} must be a positive int dividing every target's "
                                 "out_features")
        if self.bits == 16:
            self.bits = None
        if isinstance(self.bits, bool) or self.bits not in (4, 8, None, AUTO):
            raise InputError(f"{bits}={self.bits!r} is not supported; use 4, 8, None (or 16) for no quantization, "
                             "or 'auto'")
        if self.quant_type not in QUANT_TYPES:
            raise InputError(f"{spelled('quant_type')}={self.quant_type!r} is not supported; use 'nf4' or 'fp4'")
        dropout = spelled("dropout")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"{dropout}={self.dropout!r} must be in [0, 1)")
        if self.mode in BLOCK_MODES and self.dropout > 0:
            raise InputError(
                f"{dropout}={self.dropout} with {mode}={self.mode!r}: {self.mode} folds the adapter into the weight, "
                f"so there is no separate adapter input to drop; use {dropout}=0.0, or {mode}='default'"
            )
        check_compute_dtype(self.compute_dtype, self.bits)
        for name in ("bat_chunk_bytes", "loss_chunk_bytes"):
            value = getattr(self, name)
            if value is None and name == "loss_chunk_bytes":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{spelled(name)}={value!r} must be a positive number of bytes, e.g. 64 * 2**20")
        if not isinstance(self.target_modules, (str, list, tuple, set)):
            raise TypeError(f"target_modules={self.target_modules!r} must be 'all-linear', a regex or a list of names")

    @classmethod
    def from_settings(cls, settings: dict, where: str = "prepare_qmiss") -> "QMissConfig":
        """Build from keyword settings, turning an unknown name into one line that suggests the right one.

        Raises:
            TypeError: a name that is not a setting (``lora_r`` -> did you mean ``r``?).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0].removeprefix("lora_").removeprefix("miss_"), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the settings are {sorted(known)}"
            raise TypeError(f"{where}() got an unexpected setting {unknown[0]!r}{hint}")
        return cls(**settings)

    def rank_for(self, name: str, expert: bool = False) -> int:
        """The r of the module at ``name``: :attr:`rank_pattern`'s first key that matches the end of the path on a
        name boundary (PEFT's ``get_pattern_key`` rule), else :attr:`r`. A fused expert parameter (``expert``,
        ``….experts.gate_up_proj``) is also matched through the module that holds it, so ``{"experts": 16}``
        covers every expert projection."""
        patterns = self.rank_pattern or {}
        key = pattern_key(patterns, name)
        if key is None and expert:
            key = pattern_key(patterns, name.rpartition(".")[0])
        return patterns[key] if key is not None else self.r

    @property
    def init_weights(self) -> Union[bool, str]:
        """PEFT's spelling of :attr:`mode`."""
        return init_weights_from_mode(self.mode)

    def to_peft_dict(self, target_modules: list[str]) -> dict:
        """The ``adapter_config.json`` payload: PEFT's ``MissConfig`` fields and nothing else.

        PEFT warns about any key it does not know, so qmiss's own settings go to
        ``qmiss_config.json`` (:meth:`to_qmiss_dict`).

        Args:
            target_modules: the module names to record (PEFT matches them exactly or by suffix).
        """
        return {
            "peft_type": BAT_ROW_PEFT_TYPE if self.mode == "bat_row" else "MISS",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "mini_r": self.mini_r if self.mini_r is not None else 1,
            "miss_dropout": self.dropout,
            "init_weights": self.init_weights,
            "target_modules": sorted(target_modules),
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "modules_to_save": None,
            "inference_mode": True,
        }

    def to_qmiss_dict(self, modules: dict[str, tuple[int, int]]) -> dict:
        """The ``qmiss_config.json`` payload: what qmiss needs beyond PEFT's fields to rebuild the model.

        Args:
            modules: each adapted module's path and its base's (in_features, out_features).
        """
        return {
            "version": __version__,
            "mode": self.mode,
            "bits": self.bits,
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch.") if self.compute_dtype else None,
            "rank_pattern": dict(self.rank_pattern) if self.rank_pattern else None,
            "modules": {name: [int(n_in), int(n_out)] for name, (n_in, n_out) in sorted(modules.items())},
        }

    @classmethod
    def from_peft_dict(cls, payload: dict, source: str = "adapter_config.json", qmiss_section: object = None,
                       qmiss_source: Optional[str] = None) -> "QMissConfig":
        """Read PEFT's MiSS (``"peft_type": "MISS"``) or Bone (``"BONE"``) config, or qmiss's Bat-Row
        (:data:`BAT_ROW_PEFT_TYPE`), and qmiss's settings if present.

        Args:
            payload: the ``adapter_config.json`` object.
            source: its name in errors.
            qmiss_section: the ``qmiss_config.json`` object (see :meth:`to_qmiss_dict`); every field is required.
            qmiss_source: the file ``qmiss_section`` was read from. None: there is no such file, and the
                ``"qmiss"`` section older qmiss versions wrote inside ``payload`` is read if present (missing
                fields take their defaults); a PEFT adapter has neither and gets 4-bit nf4 defaults.

        Raises:
            ValueError: a wrong peft_type, a field of the wrong type or out of range, a missing qmiss field, or
                a qmiss mode contradicting ``init_weights``, naming the file and the field.
        """
        if not isinstance(payload, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(payload).__name__}")
        peft_type = payload.get("peft_type")
        if peft_type not in ("MISS", "BONE", BAT_ROW_PEFT_TYPE):
            raise ValueError(f"{source}: peft_type={peft_type!r} is not a MiSS adapter; expected 'MISS', 'BONE' or "
                             f"qmiss's {BAT_ROW_PEFT_TYPE!r}")
        r = payload.get("r")
        if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= 2**16:
            raise ValueError(f"{source}: r={r!r} must be an int in 1..65536")
        if qmiss_source is None:
            extra, where = payload.get("qmiss"), f"{source}: qmiss."
            extra = {} if extra is None else extra
            if not isinstance(extra, dict):
                raise ValueError(f"{source}: 'qmiss' must be an object, got {type(extra).__name__}")
        else:
            extra, where = qmiss_section, f"{qmiss_source}: "
            if not isinstance(extra, dict):
                raise ValueError(f"{qmiss_source}: expected a JSON object, got {type(extra).__name__}")
        init_weights = payload.get("init_weights", True)
        if not isinstance(init_weights, (bool, str)):
            raise ValueError(f"{source}: init_weights={init_weights!r} must be true, 'mini', 'bat' or 'bat_row'")
        mode = mode_from_init_weights(init_weights)
        if (peft_type == BAT_ROW_PEFT_TYPE) != (mode == "bat_row"):
            raise ValueError(f"{source}: peft_type={peft_type!r} with init_weights={init_weights!r}: a Bat-Row adapter "
                             f"is peft_type {BAT_ROW_PEFT_TYPE!r} with init_weights 'bat_row', and only it — PEFT's "
                             "MissConfig has no Bat-Row: in code pass mode='bat_row' to qmiss.prepare_qmiss; for a "
                             "folder, save the adapter again with qmiss.save_adapter")
        _check_qmiss_section(extra, where, mode, f"{source}'s init_weights={init_weights!r}",
                             required=qmiss_source is not None)
        mini_r = payload.get("mini_r")
        if mini_r is not None and (isinstance(mini_r, bool) or not isinstance(mini_r, int) or mini_r <= 0):
            raise ValueError(f"{source}: mini_r={mini_r!r} must be a positive int")
        mini_r = mini_r if mode == "mini" else None
        dropout = payload.get("miss_dropout", payload.get("bone_dropout", 0.0))
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{source}: miss_dropout={dropout!r} must be a number in [0, 1)")
        dropout = dropout if mode not in BLOCK_MODES else 0.0
        targets = payload.get("target_modules") or "all-linear"
        if not isinstance(targets, str) and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise ValueError(f"{source}: target_modules={targets!r} must be a string or a list of strings")
        dtype_name = extra.get("compute_dtype")
        compute_dtype = _DTYPE_NAMES[dtype_name] if dtype_name is not None else None
        base = payload.get("base_model_name_or_path")
        try:
            return cls(
                r=r,
                mode=mode,
                mini_r=mini_r,
                bits=extra.get("bits", 4),
                quant_type=extra.get("quant_type", "nf4"),
                double_quant=extra.get("double_quant", True),
                target_modules=targets,
                dropout=float(dropout),
                compute_dtype=compute_dtype,
                base_model_name_or_path=base if isinstance(base, str) else None,
                rank_pattern=extra.get("rank_pattern"),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from exc


#: Where a front end's default differs from :class:`QMissConfig`'s, on purpose, and why. The API
#: changes nothing a caller did not ask for (``chunked_loss`` makes ``logits`` None in training;
#: checkpointing trades compute for memory); the front ends serve one known use.
FRONT_END_DEFAULTS: dict[str, dict[str, object]] = {
    # a training command never needs the (tokens x vocabulary) logits, and the chunked loss is exact
    "qmiss-train": {"chunked_loss": True},
    # the planner plans a GPU run (the compute-dtype rule picks bf16 on CUDA) of a model too big to train
    # without checkpointing on one card, which is what it is asked about
    "plan_memory": {"gradient_checkpointing": True, "compute_dtype": torch.bfloat16},
}
#: the defaults, read as attributes (``DEFAULTS.r``).
DEFAULTS = QMissConfig()
