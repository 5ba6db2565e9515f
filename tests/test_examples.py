"""The examples: generate.py queries an adapter with the prompt qmiss-train recorded for it; sft_trl.py (the
README's quick start) trains, saves and reloads."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from qmiss import train

_SPEC = importlib.util.spec_from_file_location("generate", Path(__file__).parents[1] / "examples" / "generate.py")
generate = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(generate)

QUERY = "Tom has 3 apples and gets 4 more. How many apples does Tom have now?"


class ChatTokenizer:
    """The one tokenizer method ``--chat_template`` uses, with a recognisable template."""

    chat_template = "<user>{content}</user><assistant>"

    def apply_chat_template(self, messages: list[dict], tokenize: bool, add_generation_prompt: bool) -> str:
        assert not tokenize and add_generation_prompt
        return self.chat_template.format(content=messages[0]["content"])


def record(folder: Path, **data) -> Path:
    """An adapter folder's ``qmiss_train_args.json``, as ``qmiss-train`` writes it (other sections trimmed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = data.pop("rows", "pairs")
    arguments = {"model": {"base_model_name_or_path": "some/model"},
                 "data": {**asdict(train.DataArguments(**data)), "rows": rows}}
    (folder / "qmiss_train_args.json").write_text(json.dumps(arguments))
    return folder


@pytest.mark.parametrize("recorded,expected", [
    ({"prompt_template": "Q: {query}\nA:"}, f"Q: {QUERY}\nA:"),
    ({}, train.PROMPT.format(query=QUERY)),  # a --data_path run without --prompt_template
    ({"prompt_template": train.DEMO_DEFAULTS["prompt_template"]}, f"{QUERY}\n"),  # the built-in demo
    ({"chat_template": True}, f"<user>{QUERY}</user><assistant>"),
    ({"rows": "conversations"}, f"<user>{QUERY}</user><assistant>"),  # a run on conversations
], ids=["custom", "alpaca", "demo", "chat", "conversations"])
def test_prompt_is_the_recorded_one(tmp_path, recorded: dict, expected: str) -> None:
    adapter = record(tmp_path / "adapter", **recorded)
    assert generate.build_prompts(ChatTokenizer(), [QUERY, "2 + 2?"], adapter)[0] == expected


def test_a_checkpoint_uses_its_runs_record(tmp_path) -> None:
    """qmiss-train records its arguments in the output folder, not in each checkpoint-N inside it."""
    checkpoint = record(tmp_path / "run", prompt_template="Q: {query}\nA:") / "checkpoint-20"
    checkpoint.mkdir()
    assert generate.build_prompts(None, [QUERY], checkpoint) == [f"Q: {QUERY}\nA:"]


def test_flag_overrides_and_no_record_falls_back_to_alpaca(tmp_path) -> None:
    adapter = record(tmp_path / "adapter", chat_template=True)
    assert generate.build_prompts(None, [QUERY], adapter, prompt_template="<{query}>") == [f"<{QUERY}>"]
    bare = tmp_path / "peft-adapter"
    bare.mkdir()
    assert generate.build_prompts(None, [QUERY], bare) == [train.PROMPT.format(query=QUERY)]
    assert generate.build_prompts(ChatTokenizer(), [QUERY], bare, chat_template=True) == [
        f"<user>{QUERY}</user><assistant>"]


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ('{"data": {"prompt_template": 7}}', "data.prompt_template=7 must be a string"),
    ('{"data": {"prompt_template": "no placeholder"}}', r"must contain \{query\}"),
    ('{"data": {"prompt_template": "{query} {other}"}}', r"does not format with only \{query\}"),
    ('{"data": {"chat_template": "yes"}}', "data.chat_template='yes' must be true or false"),
    ('{"data": [1]}', "'data' must be an object"),
], ids=["not-json", "template-int", "no-placeholder", "other-field", "chat-string", "data-list"])
def test_a_malformed_record_names_the_file_and_the_fix(tmp_path, text: str, match: str) -> None:
    (tmp_path / "qmiss_train_args.json").write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        generate.build_prompts(None, [QUERY], tmp_path)
    assert "qmiss_train_args.json" in str(info.value) and "--prompt_template" in str(info.value)


@pytest.mark.slow
def test_peft_quick_start_with_qmiss_reloads_identically_in_peft_and_qmiss(tmp_path, smollm2_dir) -> None:
    """README's quick start (examples/sft_trl.py): SFTTrainer on 4-bit SmolLM2, save_pretrained, then
    peft.PeftModel.from_pretrained and qmiss.from_pretrained give the same logits."""
    pytest.importorskip("trl")
    spec = importlib.util.spec_from_file_location("sft_trl", Path(__file__).parent.parent / "examples" / "sft_trl.py")
    sft_trl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft_trl)
    difference = sft_trl.main(["--max_steps", "1", "--output_dir", str(tmp_path / "miss-sft")])
    assert difference <= 1e-4
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "miss-sft").iterdir()}


def test_generate_runs_an_adapter_with_the_tokenizers_bos(tmp_path, monkeypatch, capsys, tiny_model_dir) -> None:
    """generate.py end to end on a qmiss-train adapter: the prompt ids are the training ones (BOS included)."""
    from qmiss.encode import Encoder

    (tmp_path / "d.jsonl").write_text(json.dumps({"query": "What is 2 + 3?", "response": "5"}) + "\n")
    train.run(["--base_model_name_or_path", tiny_model_dir, "--data_path", str(tmp_path / "d.jsonl"), "--output_dir",
               str(tmp_path / "adapter"), "--miss_r", "16", "--max_steps", "1", "--report_to", "none", "--use_cpu"])
    seen = []
    original = Encoder.prompt_ids
    monkeypatch.setattr(Encoder, "prompt_ids", lambda self, text: seen.append(text) or original(self, text))
    monkeypatch.setattr("sys.argv", ["generate.py", "--adapter", str(tmp_path / "adapter"), "--model", tiny_model_dir,
                                     "--max_new_tokens", "3", QUERY, "What is 1 + 1?"])
    generate.main()
    out = capsys.readouterr().out
    assert out.count("> ") == 2 and QUERY in out
    assert seen == [train.PROMPT.format(query=QUERY), train.PROMPT.format(query="What is 1 + 1?")]
