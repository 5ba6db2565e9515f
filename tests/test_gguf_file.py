"""gguf_file.py: a GGUF file as the model — converted once into the cache by its hash, trained in 4-bit as the demo
is; one clear line, before any weight is read, for a GGUF transformers or gguf cannot read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qmiss import cli, gguf_file, smollm, train


def write_gguf(path: Path, architecture: str, tensor_type: str = "F32") -> Path:
    """A minimal GGUF: a one-layer Llama-shaped header and one tensor of ``tensor_type``."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(10)
    kind = gguf.GGMLQuantizationType[tensor_type]
    if kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    else:  # one block of raw bytes of that type
        size = gguf.GGML_QUANT_SIZES[kind][1]
        writer.add_tensor("token_embd.weight", np.zeros((1, size), dtype=np.uint8), raw_shape=(1, size),
                          raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow
def test_smollm2s_gguf_file_trains_as_the_model(tmp_path, smollm2_dir, monkeypatch) -> None:
    """The demo's own GGUF through --base_model_name_or_path: same cache entry as the demo (keyed by the file's
    hash, so no second conversion), loaded in 4-bit, trained, its adapter recorded with the file as its base."""
    conversions = []
    convert = gguf_file.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(gguf_file.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (conversions.append(a) if "gguf_file" in k else None) or convert(*a, **k))
    source = smollm.gguf_path()
    assert gguf_file.converted_folder(source) == smollm2_dir and not conversions
    assert smollm2_dir.name == f"{source.stem}-{gguf_file.file_digest(source)[:16]}"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"query": f"What is {i} + 1?", "response": str(i + 1)}) + "\n"
                                              for i in range(8)))
    summary = train.run(["--base_model_name_or_path", str(source), "--data_path", str(tmp_path / "d.jsonl"),
                         "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--per_device_train_batch_size",
                         "2", "--report_to", "none", "--use_cpu"])
    assert summary["steps"] == 1 and not conversions
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(source) and config["r"] == 64


def test_a_new_file_is_converted_once_atomically(tmp_path, monkeypatch, smollm2_dir) -> None:
    """A copy of the file converts into a folder of its own hash; a second call finds it."""
    import shutil

    monkeypatch.setenv("QMISS_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "model.gguf"
    shutil.copy(smollm.gguf_path(), copy)
    folder = gguf_file.converted_folder(copy)
    assert folder.parent == tmp_path / "cache" / "gguf" and folder.name.startswith("model-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf_file.converted_folder(copy) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"  # under 1B parameters


@pytest.mark.parametrize("architecture,tensor_type,message", [
    ("qmissnet", "F32", r"transformers cannot read this GGUF \(GGUF model with architecture qmissnet is not "
                        r"supported yet\.\); it reads the architectures .* — use the model's safetensors checkpoint"),
    ("llama", "Q8_K", r"its tensors of type Q8_K cannot be dequantized by gguf [\d.]+ — use a GGUF of another "
                      r"quantization"),
], ids=["architecture", "tensor-type"])
def test_a_gguf_transformers_cannot_read_is_one_line_before_loading(architecture, tensor_type, message, tmp_path,
                                                                    capsys, monkeypatch) -> None:
    import re

    path = write_gguf(tmp_path / "m.gguf", architecture, tensor_type)
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("the model loader was called"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"query": "q", "response": "r"}) + "\n")
    status = train.main(["--base_model_name_or_path", str(path), "--data_path", str(tmp_path / "d.jsonl"),
                         "--output_dir", str(tmp_path / "out"), "--use_cpu"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and re.search(f"--base_model_name_or_path {path}: {message}", err), err
    assert cli.main(["plan", "--config", str(path)]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.slow
def test_qmiss_plan_reads_a_gguf_files_config(capsys) -> None:
    assert cli.main(["plan", "--config", str(smollm.gguf_path()), "--gpu-gib", "8"]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and str(smollm.gguf_path()) in out
