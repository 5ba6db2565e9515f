"""qmiss-train end to end on a tiny model (SmolLM2's tokenizer), plus TRL's SFTTrainer on a qmiss model."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch

import qmiss
import qmiss.trainer
from qmiss import demo, train
from tests.helpers import train_args as args


def test_encode_masks_the_prompt_and_appends_eos(smollm2_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    data = train.DataArguments(model_max_length=512)
    row = train.encode(tokenizer, "What is 2 + 3?", "2 + 3 = 5. The answer is: 5", data)
    n_prompt = len(tokenizer(train.PROMPT.format(query="What is 2 + 3?"), add_special_tokens=False).input_ids)
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    learned = tokenizer.decode([t for t in row["labels"] if t != -100], skip_special_tokens=True)
    assert learned.strip() == "2 + 3 = 5. The answer is: 5"
    short = train.encode(tokenizer, "What is 2 + 3?", "2 + 3 = 5", train.DataArguments(model_max_length=10))
    assert len(short["input_ids"]) == len(short["labels"]) == 10


def test_train_writes_a_peft_adapter_and_resumes(tmp_path, tiny_model_dir: str, jsonl: str) -> None:
    out = tmp_path / "run"
    summary = train.run(args(tiny_model_dir, jsonl, out, "--max_steps", "4", "--save_strategy", "steps",
                             "--save_steps", "2"))
    assert summary["steps"] == 4 and summary["trainable_params"] > 0
    assert summary["chunked_loss"] is True  # qmiss-train's default: the loss without the full logits
    for folder in (out, out / "checkpoint-2"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
        assert not any(n.startswith("model") and n.endswith(".safetensors") for n in names)  # never the base
    assert "optimizer.pt" in {p.name for p in (out / "checkpoint-2").iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "MISS" and config["r"] == 16
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert (out / "qmiss_train_args.json").is_file()

    resumed = train.run(args(tiny_model_dir, jsonl, tmp_path / "resumed", "--max_steps", "4",
                             "--resume_from_checkpoint", str(out / "checkpoint-2")))
    assert resumed["steps"] == 4  # continued at step 2, ran 2 more
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    final = qmiss.read_adapter(out)[1]
    again = qmiss.read_adapter(tmp_path / "resumed")[1]
    # same data order, seed and starting point: resuming reproduces the uninterrupted run
    assert all(torch.allclose(final[n], again[n], atol=1e-5) for n in final)


@pytest.mark.parametrize("extra,error,match", [
    (["--dataset_field", "query", "response"], ValueError, r"no field\(s\) \['query', 'response'\]; its columns are "
                                                           r"\['answer', 'question'\]"),
    (["--dataset_split", "train[:abc]"], ValueError, "--dataset_split 'train\\[:abc\\]': Unrecognized instruction"),
    (["--bits", "3"], ValueError, "--bits '3' is not one of"),
    (["--mode", "bat", "--miss_r", "48"], ValueError, "not divisible by --miss_r=48"),
    (["--mode", "bat_row", "--miss_r", "48"], ValueError, "not divisible by --miss_r=48.*bat_row needs r×r blocks"),
    (["--loss_chunk_mib", "0"], ValueError, "--loss_chunk_mib 0 must be a positive number of MiB"),
], ids=["missing-fields", "bad-split", "bad-bits", "bat-shapes", "bat_row-shapes", "bad-loss-chunk"])
def test_clear_errors(tmp_path, tiny_model_dir: str, jsonl: str, extra, error, match) -> None:
    with pytest.raises(error, match=match):
        train.run(args(tiny_model_dir, jsonl, tmp_path, "--max_steps", "1", *extra))


def test_missing_model_path(tmp_path, jsonl: str) -> None:
    with pytest.raises(FileNotFoundError, match="--base_model_name_or_path ./no/such/model: no such file or folder"):
        train.run(args("./no/such/model", jsonl, tmp_path, "--max_steps", "1"))


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_each_rank_loads_its_model_on_its_own_gpu(monkeypatch, tiny_model_dir: str, rank: int) -> None:
    """Under torchrun / accelerate on GPUs, rank k trains on cuda:k (TrainingArguments.device); its quantized model
    must be loaded there, or accelerate refuses to train a 4/8-bit model placed on another device."""
    from transformers import AutoModelForCausalLM

    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop after recording the load arguments")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr("qmiss.train.default_compute_dtype", lambda device: torch.bfloat16)  # what CUDA gives
    model_args = train.ModelArguments(base_model_name_or_path=tiny_model_dir)
    with pytest.raises(RuntimeError, match="stop after"):
        train.load_model(model_args, torch.device("cuda", rank))
    assert seen["device_map"] == {"": rank}
    assert seen["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16 and seen["dtype"] == torch.bfloat16
    assert train.device_map_for(torch.device("cpu")) == "cpu"


def test_help_lists_the_reference_flags(capsys) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ["--base_model_name_or_path", "--output_dir", "--miss_r", "--init_weights", "--mode", "--mini_r",
                 "--bits", "--data_path", "--dataset_split", "--dataset_field", "--model_max_length", "--bf16",
                 "--tf32", "--num_train_epochs", "--per_device_train_batch_size", "--gradient_accumulation_steps",
                 "--save_strategy", "--save_steps", "--save_total_limit", "--logging_steps", "--learning_rate",
                 "--weight_decay", "--warmup_ratio", "--report_to", "--gradient_checkpointing", "--optim",
                 "--resume_from_checkpoint", "--chat_template", "--chunked_loss", "--loss_chunk_mib",
                 "--offload_activations", "--embeddings_on_host"]:
        assert flag in text, flag


@pytest.mark.parametrize("chunked_loss,steps", [(False, 3), (True, 2)], ids=["plain-loss", "chunked-loss"])
def test_trl_sft_trainer_trains_a_qmiss_model(tmp_path, tiny_model_dir: str, chunked_loss: bool, steps: int) -> None:
    """With the chunked loss too: TRL computes its loss and metrics with its own fused LM head, per chunk
    (``fused_lm_head=True``); the chunked loss steps aside for that call."""
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install trl)")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = qmiss.prepare_qmiss(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=16, bits=4,
                                chunked_loss=chunked_loss)
    start = {n: layer.miss_block.detach().clone() for n, layer in qmiss.miss_layers(model)}
    rows = [{"prompt": r["query"], "completion": " " + r["response"]} for r in demo.arithmetic_problems(16, 0)]
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                           learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == steps
    assert all(not torch.equal(start[n], layer.miss_block) for n, layer in qmiss.miss_layers(model))
    if chunked_loss:
        logged = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logged) == 2 and all(h["loss"] > 0 and "mean_token_accuracy" in h for h in logged)
        trainer.save_model()
        assert (tmp_path / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["bat", "bat_row"])
def test_paged_adamw_8bit_and_gradient_checkpointing(tmp_path, tiny_model_dir: str, jsonl: str, mode: str) -> None:
    """The QLoRA recipe's optimizer and checkpointing (bitsandbytes falls back to non-paged on the CPU), with
    transformers' own loss (--chunked_loss false) and the long-context switches (no-ops for a CPU's tensors)."""
    summary = train.run(args(tiny_model_dir, jsonl, tmp_path, "--max_steps", "2", "--optim", "paged_adamw_8bit",
                             "--gradient_checkpointing", "--mode", mode, "--chunked_loss", "false",
                             "--offload_activations", "--embeddings_on_host"))
    assert summary["steps"] == 2 and summary["chunked_loss"] is False
    assert qmiss.read_adapter(tmp_path)[0].mode == mode


def test_nonfinite_loss_stops_training_naming_step_and_module(tmp_path, tiny_model_dir: str, jsonl: str) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = qmiss.prepare_qmiss(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=16, bits=4)
    with torch.no_grad():  # inject: one adapter entry of the second layer's MLP goes to inf
        model.model.layers[1].mlp.up_proj.miss_block[0, 0] = float("inf")
    data = train.DataArguments()
    rows = [train.encode(tokenizer, r["query"], r["response"], data) for r in demo.arithmetic_problems(8, 0)]
    trainer = train.QMissTrainer(
        model=model, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        args=train.QMissTrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="steps", save_steps=1))
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(.*\) at step 1; first non-finite output on the "
                                                 r"last micro-batch: model\.layers\.1\.mlp\.up_proj"):
        trainer.train()
    assert not (tmp_path / "adapter_model.safetensors").exists() and not list(tmp_path.glob("checkpoint-*"))
    with torch.no_grad():  # mended, the same trainer trains again: the caught NaN belonged to the last run
        model.model.layers[1].mlp.up_proj.miss_block.zero_()
    trainer.train()
    assert trainer.state.global_step == 3


def test_the_loss_check_syncs_the_host_only_on_steps_that_report(tmp_path, tiny_model_dir: str, monkeypatch) -> None:
    """8 micro-steps (4 steps of 2), logging every 4 steps, no saves: qmiss reads a tensor on the host once (before
    the last step, which logs and ends the run), not once per micro-step; qmiss-train's arguments turn off
    transformers' own per-micro-step read (logging_nan_inf_filter)."""
    import sys

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = qmiss.prepare_qmiss(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=16, bits=4)
    data = train.DataArguments()
    rows = [train.encode(tokenizer, r["query"], r["response"], data) for r in demo.arithmetic_problems(16, 0)]
    reads: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if "qmiss" in Path(caller).parts:
                reads.append(f"{_name} in {caller}")
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    arguments = train.QMissTrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                             gradient_accumulation_steps=2, logging_steps=4, save_strategy="no",
                                             report_to=[], use_cpu=True)
    assert arguments.logging_nan_inf_filter is False
    trainer = train.QMissTrainer(model=model, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                 data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), args=arguments)
    trainer.train()
    assert trainer.state.global_step == 4
    assert reads == [f"item in {Path(qmiss.trainer.__file__)}"], reads


def conversations(n: int) -> list[list[dict[str, str]]]:
    """Multi-turn conversations built from the arithmetic problems: two questions, two worked answers."""
    problems = demo.arithmetic_problems(2 * n, seed=5)
    return [[{"role": "system", "content": "Answer with a worked sum."},
             {"role": "user", "content": a["query"]}, {"role": "assistant", "content": a["response"]},
             {"role": "user", "content": b["query"]}, {"role": "assistant", "content": b["response"]}]
            for a, b in zip(problems[::2], problems[1::2])]


def write_conversations(path, form: str, talks: list) -> str:
    from datasets import Dataset

    sharegpt = [[{"from": {"user": "human", "assistant": "gpt"}.get(t["role"], t["role"]), "value": t["content"]}
                 for t in talk] for talk in talks]
    if form == "messages-jsonl":
        path = path / "chat.jsonl"
        path.write_text("".join(json.dumps({"messages": t}) + "\n" for t in talks))
    elif form == "sharegpt-json":
        path = path / "chat.json"
        path.write_text(json.dumps([{"conversations": t, "id": i} for i, t in enumerate(sharegpt)]))
    elif form == "messages-parquet":
        path = path / "chat.parquet"
        Dataset.from_list([{"messages": t} for t in talks]).to_parquet(str(path))
    else:  # a folder written by datasets' save_to_disk
        path = path / "saved"
        Dataset.from_list([{"conversations": t} for t in sharegpt]).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("form", ["messages-jsonl", "sharegpt-json", "messages-parquet", "sharegpt-saved-dataset"])
def test_conversations_train_on_every_assistant_turn(form: str, tmp_path, tiny_model_dir: str) -> None:
    from transformers import AutoTokenizer

    talks = conversations(12)
    data = write_conversations(tmp_path, form, talks)
    rows = train.load_rows(train.DataArguments(data_path=data))
    assert rows.kind == "conversations" and rows.dataset[0]["messages"] == talks[0]  # ShareGPT made OpenAI-style
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = train.encode_rows(rows, tokenizer, train.DataArguments(data_path=data))
    learned = tokenizer.decode([t for t in encoded[0]["labels"] if t != -100])
    assert learned == f"{talks[0][2]['content']}<|im_end|>{talks[0][4]['content']}<|im_end|>"  # both answers only

    summary = train.run(["--base_model_name_or_path", tiny_model_dir, "--data_path", data, "--output_dir",
                         str(tmp_path / "out"), "--miss_r", "16", "--max_steps", "2", "--per_device_train_batch_size",
                         "2", "--report_to", "none", "--use_cpu"])
    assert summary["rows"] == "conversations" and summary["steps"] == 2 and summary["row_count"] == 12
    recorded = json.loads((tmp_path / "out" / "qmiss_train_args.json").read_text())
    assert recorded["data"]["rows"] == "conversations"  # generate.py prompts such an adapter with the template


def test_packing_false_pads_each_batch_and_trains_the_same_rows(tmp_path, tiny_model_dir: str, jsonl: str) -> None:
    packed = train.run(args(tiny_model_dir, jsonl, tmp_path / "packed", "--max_steps", "2"))
    padded = train.run(args(tiny_model_dir, jsonl, tmp_path / "padded", "--max_steps", "2", "--packing", "false"))
    assert packed["packing"] and not padded["packing"]
    assert packed["row_tokens"] == padded["row_tokens"] and padded["sequences"] == padded["row_count"] == 20
    assert packed["sequences"] < packed["row_count"]  # 20 short rows share a few 512-token sequences
