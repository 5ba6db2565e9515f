"""Hostile adapter folders: 240 seeded mutations of the whole folder and 160 of qmiss_config.json, each rejected
with a clear error, the model unchanged."""

from __future__ import annotations

import json
import random
import struct
from typing import Optional

import pytest
import torch

import qmiss
from tests.helpers import randomize_adapters, tiny_llama

N_CASES = 240
N_SETTINGS_CASES = 160


def _header(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _pack(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _tensor_keys(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def mutate_settings(rng: random.Random, settings: dict) -> tuple[str, str]:
    """An invalid ``qmiss_config.json``: (what was done, its text) — a field of the wrong type or range, a field
    missing, cut JSON, or no object."""
    how = rng.choice(["field", "drop", "syntax", "not-object"])
    if how == "syntax":
        text = json.dumps(settings)
        return how, text[: rng.randrange(1, len(text) - 1)]
    if how == "not-object":
        return how, json.dumps(rng.choice([[1], "qmiss", 3, None, True, []]))
    changed = json.loads(json.dumps(settings))
    if how == "drop":  # a required field (rank_pattern is optional: older folders have none)
        del changed[rng.choice(sorted(set(changed) - {"rank_pattern"}))]
        return how, json.dumps(changed)
    name = rng.choice(sorted(settings["modules"]))
    n_in, n_out = settings["modules"][name]
    invalid = {  # wrong type or range for each field (null where it is valid: bits, compute_dtype, not used)
        "version": [1, None, ["0.1.0"], 0.1],
        "mode": ["lora", "bat", "mini", 3, None, True],  # bat, mini: contradict init_weights=True
        "bits": [3, "4", 4.0, float("nan"), float("inf"), True, [4], 32],
        "quant_type": ["int4", None, 4, ["nf4"], "NF4"],
        "double_quant": ["false", 0, 1, None, float("nan")],
        "compute_dtype": ["float64", 32, ["float32"], float("nan"), "", "torch.float32"],
        "modules": [None, [], "all", {name: [0, n_out]}, {name: [float("nan"), n_out]}, {name: [n_in]},
                    {name: [n_in, n_out, 1]}, {name: [n_in + 1, n_out]}, {name: [n_in, n_out + 16]},
                    {name: [float(n_in), n_out]}, {name: [True, n_out]}],  # the last ones: well typed, wrong shape
        "rank_pattern": [{}, "experts", ["experts"], {"experts": 0}, {"experts": 8.0}, {"experts(": 8},
                         {"experts": True}],
    }
    field = rng.choice(sorted(invalid))
    changed[field] = rng.choice(invalid[field])
    return f"field:{field}", json.dumps(changed)


def mutate(rng: random.Random, config: dict, settings: dict, raw: bytes) -> tuple[str, object, Optional[str], bytes]:
    """One invalid variant of a valid adapter: (what was done, adapter_config.json as an object or raw text,
    qmiss_config.json text or None for none, weights bytes)."""
    kind, cfg, weights = mutate_peft(rng, config, raw)
    text: Optional[str] = json.dumps(settings)
    if kind == "qmiss-file":
        text = mutate_settings(rng, settings)[1]
    elif isinstance(cfg, dict) and "qmiss" in cfg:
        text = None  # an older qmiss adapter: its settings inside adapter_config.json, no qmiss_config.json
    return kind, cfg, text, weights


def mutate_peft(rng: random.Random, config: dict, raw: bytes) -> tuple[str, object, bytes]:
    """One invalid variant of the PEFT files: (what was done, new config or raw text, new weights bytes);
    kind "qmiss-file" leaves them as they are for :func:`mutate_settings`."""
    header, data = _header(raw)
    key = rng.choice(_tensor_keys(header))
    kind = rng.choice(["truncate", "header-length", "dtype", "shape", "offsets", "nonfinite", "drop-key",
                       "extra-key", "json-type", "json-syntax", "peft-type", "r-range", "huge-shape", "qmiss-file"])
    header = json.loads(json.dumps(header))
    cfg = json.loads(json.dumps(config))
    if kind == "truncate":
        return kind, cfg, raw[: rng.randrange(0, len(raw) - 1)]
    if kind == "header-length":
        return kind, cfg, struct.pack("<Q", rng.choice([2**40, 2**63, len(raw) * 4, 1])) + raw[8:]
    if kind == "dtype":
        header[key]["dtype"] = rng.choice(["I32", "U8", "BOOL", "I64", "F99", ""])
    elif kind == "shape":
        shape = header[key]["shape"]
        shape[rng.randrange(len(shape))] += rng.choice([-3, -1, 1, 5])
        header[key]["shape"] = [max(1, s) for s in shape]
    elif kind == "offsets":
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = rng.choice([[end, begin], [begin, end + 4096], [begin + 1, end], [-1, end]])
    elif kind == "nonfinite":
        begin, end = header[key]["data_offsets"]
        index = rng.randrange((end - begin) // 4)
        value = rng.choice([float("nan"), float("inf"), float("-inf")])
        data = data[: begin + 4 * index] + struct.pack("<f", value) + data[begin + 4 * index + 4 :]
    elif kind == "drop-key":
        begin, end = header.pop(key)["data_offsets"]
        data = data[:begin] + data[end:]
        for other in _tensor_keys(header):  # keep the file well formed: only the key set is wrong
            b, e = header[other]["data_offsets"]
            if b >= end:
                header[other]["data_offsets"] = [b - (end - begin), e - (end - begin)]
    elif kind == "extra-key":
        header[f"base_model.model.model.layers.{rng.randrange(2, 9)}.mlp.up_proj.miss_block"] = {
            "dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
        data = data + struct.pack("<f", 0.0)
    elif kind == "json-type":
        field = rng.choice(["r", "init_weights", "mini_r", "target_modules", "miss_dropout", "qmiss"])
        invalid = {  # values of the wrong type or range for each field (null is valid for some: not used)
            "r": ["16", 16.0, None, [16], True],
            "init_weights": [None, 3.5, [16], {"a": 1}, "lora", False],
            "mini_r": ["16", [16], {"a": 1}, 3.5, True, -1, 0],
            "target_modules": [[1, 2], {"a": 1}, 3.5, True, [None]],
            "miss_dropout": ["0.1", [0.1], {"a": 1}, True, -1, 7],
            "qmiss": ["16", [16], 3.5, True, -1, {"modules": {"x": [0, 1]}}, {"bits": 3}, {"quant_type": "int4"}],
        }[field]
        cfg[field] = rng.choice(invalid)
        return kind, cfg, _pack(header, data)
    elif kind == "json-syntax":
        text = json.dumps(config)
        cut = rng.randrange(1, len(text) - 1)
        return kind, text[:cut], raw
    elif kind == "peft-type":
        cfg["peft_type"] = rng.choice(["LORA", "miss", "", None, 3])
        return kind, cfg, raw
    elif kind == "r-range":
        cfg["r"] = rng.choice([0, -16, 2**20, 8, 32])
        return kind, cfg, raw
    elif kind == "huge-shape":
        header[key]["shape"] = [2**31, 2**31]
    elif kind == "qmiss-file":
        return kind, cfg, raw
    return kind, cfg, _pack(header, data)


def test_every_mutated_adapter_is_rejected_and_the_model_unchanged(tmp_path) -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4)
    randomize_adapters(model)
    good = tmp_path / "good"
    qmiss.save_adapter(model, good)
    config = json.loads((good / "adapter_config.json").read_text())
    settings = json.loads((good / "qmiss_config.json").read_text())
    raw = (good / "adapter_model.safetensors").read_bytes()
    target = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4)
    before = {n: layer.miss_block.detach().clone() for n, layer in qmiss.miss_layers(target)}
    rng = random.Random(0)
    kinds = {}
    for i in range(N_CASES):
        kind, cfg, settings_text, weights = mutate(rng, config, settings, raw)
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        if settings_text is not None:
            (folder / "qmiss_config.json").write_text(settings_text)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            qmiss.load_adapter(target, folder)
        message = str(info.value)
        assert str(folder) in message or "adapter" in message, (kind, message)
        kinds[kind] = kinds.get(kind, 0) + 1
        for name, layer in qmiss.miss_layers(target):
            assert torch.equal(layer.miss_block, before[name]), (kind, name)
    assert len(kinds) == 14 and sum(kinds.values()) == N_CASES


def test_every_mutated_qmiss_config_is_rejected_and_the_model_unchanged(tmp_path) -> None:
    model = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4)
    randomize_adapters(model)
    good = tmp_path / "good"
    qmiss.save_adapter(model, good)
    settings = json.loads((good / "qmiss_config.json").read_text())
    target = qmiss.prepare_qmiss(tiny_llama(), r=16, bits=4)
    qmiss.load_adapter(target, good)  # the unmutated folder loads
    before = {n: layer.miss_block.detach().clone() for n, layer in qmiss.miss_layers(target)}
    rng = random.Random(1)
    kinds = {}
    for i in range(N_SETTINGS_CASES):
        kind, text = mutate_settings(rng, settings)
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (folder / name).write_bytes((good / name).read_bytes())
        (folder / "qmiss_config.json").write_text(text)
        with pytest.raises(ValueError) as info:
            qmiss.load_adapter(target, folder)
        message = str(info.value)
        assert str(folder) in message, (kind, text, message)
        kinds[kind] = kinds.get(kind, 0) + 1
        for name, layer in qmiss.miss_layers(target):
            assert torch.equal(layer.miss_block, before[name]), (kind, name)
    fields = {"version", "mode", "bits", "quant_type", "double_quant", "compute_dtype", "modules", "rank_pattern"}
    assert set(kinds) == {"drop", "syntax", "not-object"} | {f"field:{f}" for f in fields}, kinds
