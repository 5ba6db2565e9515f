"""Bad input meets a clear one-line error first: data rows, missing paths (no hub request), flags as typed.

Every qmiss-train case runs the command's own entry point (``train.main``) and checks the exit status 2,
the message (the row, field, path or flag named), that no traceback was printed, and, for data and flag
errors, that the model loader was never called. ``qmiss plan``'s output is checked for its header, its
one unit (GiB) and its card verdicts.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qmiss
from qmiss import cli, demo, inputs, train
from qmiss.data import load_rows
from qmiss.plan import CUDA_CONTEXT_BYTES, GiB, MemoryPlan
from tests.helpers import tiny_llama

GOOD = {"query": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is: 5"}


@pytest.fixture
def loader_calls(monkeypatch) -> list:
    """Records every attempt to load model weights; none may happen before the input is checked."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model loader was called")

    monkeypatch.setattr(train.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(train, "load_model", refuse)
    return calls


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Records (and refuses) every network connection or name look-up: a hub request cannot go unnoticed."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network use in a test that must not touch the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    inputs.hub_reachable.cache_clear()
    yield attempts
    inputs.hub_reachable.cache_clear()


def run_train(capsys, *argv: str) -> tuple[int, str]:
    status = train.main(list(argv))
    err = capsys.readouterr().err
    return status, err


def data_args(model_dir: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--base_model_name_or_path", model_dir, "--data_path", str(data), "--output_dir", str(out),
            "--dataset_field", "query", "response", "--miss_r", "16", "--max_steps", "1", "--use_cpu",
            "--report_to", "none", *extra]


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# name: (file name, contents, what the message must say)
DATA_CASES = {
    "missing-field": ("d.jsonl", jsonl([GOOD, {"query": "What is 1 + 1?"}, GOOD]),
                      r"1 of 3 rows lack text in query / response: d\.jsonl line 2: 'response' is missing"),
    "number-for-text": ("d.jsonl", jsonl([GOOD, GOOD, {"query": 7, "response": "7"}]),
                        r"d\.jsonl line 3: 'query' is int 7, not text"),
    "empty-string": ("d.jsonl", jsonl([{"query": " ", "response": "x"}]), r"line 1: 'query' is an empty string"),
    "many-bad-rows": ("d.jsonl", jsonl([GOOD] + [{"query": "q"}] * 40),
                      r"40 of 41 rows lack text.*line 2: 'response' is missing;.*line 6: .*; … — fix or drop"),
    "empty-file": ("d.jsonl", "", r"d\.jsonl: no rows — the file is empty"),
    "broken-json-line": ("d.jsonl", jsonl([GOOD]) + '{"query": "a" "response": "b"}\n' + jsonl([GOOD]),
                         r"d\.jsonl: line 2, column 15: not valid JSON \(Expecting ',' delimiter\)"),
    "broken-json-array": ("d.json", '[\n  {"query": "a", "response": "b"},\n  {"query": }\n]',
                          r"d\.json: line 3, column 13: not valid JSON \(Expecting value\)"),
    "not-an-object": ("d.jsonl", jsonl([GOOD, ["a", "b"]]), r"line 2 is a JSON list, not an object"),
    "csv-empty-cell": ("d.csv", "query,response\nWhat is 1 + 1?,2\nWhat is 2 + 2?,\n",
                       r"d\.csv line 3: 'response' is an empty string"),
    "no-such-fields": ("d.jsonl", jsonl([{"question": "a", "answer": "b"}]),
                       r"no field\(s\) \['query', 'response'\]; its columns are \['answer', 'question'\] — pass "
                       r"--dataset_field"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_one_clear_line_before_the_model_loads(case, tmp_path, capsys, tiny_model_dir, loader_calls):
    name, text, message = DATA_CASES[case]
    (tmp_path / name).write_text(text)
    status, err = run_train(capsys, *data_args(tiny_model_dir, tmp_path / name, tmp_path / "out"))
    assert status == 2
    assert err.startswith("qmiss-train: error: --data_path ") and err.count("\n") == 1, err
    assert "Traceback" not in err

    assert re.search(message, err), err
    assert loader_calls == []


def chat(*turns: tuple[str, str], key: str = "messages") -> dict:
    """A conversation row: ("user", "hi"), ("assistant", "yo"), ... as OpenAI messages or ShareGPT turns."""
    names = ("role", "content") if key == "messages" else ("from", "value")
    return {key: [{names[0]: role, names[1]: text} for role, text in turns]}


CHAT = chat(("user", "What is 2 + 3?"), ("assistant", "2 + 3 = 5. The answer is: 5"))
SHAREGPT = chat(("human", "What is 2 + 3?"), ("gpt", "2 + 3 = 5. The answer is: 5"), key="conversations")
# name: (rows, what the message must say)
CHAT_CASES = {
    "unknown-role": ([CHAT, chat(("user", "a"), ("bot", "b"))],
                     r"d\.jsonl line 2: messages\[1\]\.role 'bot' is not a role \(system, user, assistant\)"),
    "sharegpt-unknown-role": ([SHAREGPT, chat(("human", "a"), ("bot", "b"), key="conversations")],
                              r"line 2: conversations\[1\]\.from 'bot' is not a role \(system, human, gpt\)"),
    "empty-content": ([chat(("user", " "), ("assistant", "b"))], r"line 1: messages\[0\]\.content is an empty string"),
    "not-text": ([chat(("user", "a"), ("assistant", 5))], r"messages\[1\]\.content is int 5, not text"),
    "no-assistant-turn": ([CHAT, chat(("system", "s"), ("user", "a"))],
                          r"line 2: 'messages' has no assistant turn \(nothing to learn\)"),
    "not-a-list": ([CHAT, {"messages": "hi"}], r"line 2: 'messages' is str, not a list of turns"),
    "empty-list": ([{"messages": []}], r"line 1: 'messages' is an empty list, not a list of turns"),
    "turn-not-an-object": ([{"messages": ["hi"]}], r"line 1: messages\[0\] is str, not an object"),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_bad_conversations_are_one_clear_line_before_the_model_loads(case, tmp_path, capsys, tiny_model_dir,
                                                                     loader_calls) -> None:
    records, message = CHAT_CASES[case]
    (tmp_path / "d.jsonl").write_text(jsonl(records))
    argv = data_args(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "out")
    argv[argv.index("--dataset_field"):argv.index("--dataset_field") + 3] = []  # found by its column
    status, err = run_train(capsys, *argv)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert "are not usable conversations" in err and loader_calls == []


def test_a_template_that_cannot_mark_turns_is_named_by_row_before_loading(tmp_path, capsys, tiny_model_dir,
                                                                          loader_calls) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    rewriting = ("{% for m in messages %}{% if m['role'] == 'assistant' %}>{% if loop.last %}{{ m['content'] }}"
                 "{% else %}[past]{% endif %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}>{% endif %}")  # a past assistant turn is written differently
    (model / "chat_template.jinja").write_text(rewriting)
    two_turns = chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    (tmp_path / "d.jsonl").write_text(jsonl([CHAT, two_turns, CHAT]))
    argv = data_args(str(model), tmp_path / "d.jsonl", tmp_path / "out")
    argv[argv.index("--dataset_field"):argv.index("--dataset_field") + 3] = []
    status, err = run_train(capsys, *argv)
    assert status == 2 and err.count("\n") == 1, err
    assert re.search(r"1 of 3 rows cannot go through the tokenizer's chat template: d\.jsonl line 2: .*cannot mark "
                     r"the assistant turn messages\[1\]", err), err
    assert loader_calls == []


@pytest.mark.parametrize("split,message", [
    ("train[5:]", r"no rows in 'train\[5:\]'"),
    ("train[:abc]", r"--dataset_split 'train\[:abc\]': Unrecognized instruction format"),
    ("test", r"--dataset_split 'test': Unknown split \"test\""),
], ids=["selects-nothing", "does-not-parse", "no-such-split"])
def test_bad_split_is_named(split, message, tmp_path, capsys, tiny_model_dir, loader_calls) -> None:
    (tmp_path / "d.jsonl").write_text(jsonl([GOOD, GOOD]))
    status, err = run_train(capsys, *data_args(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "out",
                                               "--dataset_split", split))
    assert status == 2 and "Traceback" not in err

    assert re.search(message, err), err
    assert loader_calls == []


def test_a_split_checks_only_the_rows_it_selects(tmp_path) -> None:
    (tmp_path / "d.jsonl").write_text(jsonl([GOOD, GOOD, {"query": "q"}]))
    rows = load_rows(str(tmp_path / "d.jsonl"), "train[:2]", ("query", "response")).dataset
    assert len(rows) == 2 and rows[0] == GOOD
    with pytest.raises(inputs.InputError, match=r"d\.jsonl line 3: 'response' is missing"):
        load_rows(str(tmp_path / "d.jsonl"), "train[1:]", ("query", "response")).dataset


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_good_files_of_each_kind_load(suffix, tmp_path) -> None:
    import datasets

    path = tmp_path / f"d{suffix}"
    rows = [GOOD, {"query": "What is 1 + 1?", "response": "2", "extra": "ignored"}]
    if suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    else:
        path.write_text(json.dumps(rows) if suffix == ".json" else jsonl(rows))
    loaded = load_rows(str(path), "train", ("query", "response")).dataset
    assert loaded.column_names == ["query", "response"] and loaded[1]["response"] == "2"


def test_parquet_rows_are_named_by_number(tmp_path) -> None:
    import datasets

    datasets.Dataset.from_list([GOOD, {"query": "q", "response": None}]).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(inputs.InputError, match=r"1 of 2 rows lack text in query / response: row 2: 'response' is "
                                                r"missing"):
        load_rows(str(tmp_path / "d.parquet"), "train", ("query", "response")).dataset


def test_debug_shows_the_traceback(tmp_path, tiny_model_dir, loader_calls, monkeypatch) -> None:
    (tmp_path / "d.jsonl").write_text("")
    argv = data_args(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "out")
    with pytest.raises(inputs.InputError, match="no rows"):
        train.main(argv + ["--debug"])
    monkeypatch.setenv("QMISS_DEBUG", "1")
    with pytest.raises(inputs.InputError, match="no rows"):
        train.main(argv)


# --- missing paths: at once, no hub request ------------------------------------------------------------------


@pytest.mark.parametrize("flag,value", [
    ("--data_path", "./no/such/pairs.jsonl"),
    ("--data_path", "data/pairs.jsonl"),  # a data-file suffix: a path, never a hub id
    ("--data_path", "no/such/folder/"),  # more than owner/name
    ("--base_model_name_or_path", "./no/such/model"),
    ("--base_model_name_or_path", "~/no/such/model"),
    ("--resume_from_checkpoint", "./no/such/checkpoint-10"),
], ids=["data-dot-slash", "data-suffix", "data-folder", "model-dot-slash", "model-home", "resume"])
def test_a_missing_local_path_fails_at_once_without_the_hub(flag, value, tmp_path, capsys, tiny_model_dir,
                                                            loader_calls, no_network) -> None:
    (tmp_path / "d.jsonl").write_text(jsonl([GOOD]))
    argv = data_args(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "out", flag, value)
    start = time.perf_counter()
    status, err = run_train(capsys, *argv)
    assert status == 2 and "Traceback" not in err
    assert f"error: {flag} {value}: no such file or folder" in err, err
    assert no_network == [] and loader_calls == []
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("config", ["./no/such/config.json", "nosuch.json", "/no/such/folder"])
def test_plan_with_a_missing_config_makes_no_hub_request(config, capsys, no_network) -> None:
    assert cli.main(["plan", "--config", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qmiss plan: error: --config {config}: no such file or folder") and "Traceback" not in err
    assert no_network == []


def test_from_pretrained_with_a_missing_folder_makes_no_hub_request(no_network) -> None:
    with pytest.raises(FileNotFoundError, match=r"adapter folder \./no/such/adapter: no such folder$"):
        qmiss.from_pretrained(tiny_llama(), "./no/such/adapter")
    with pytest.raises(FileNotFoundError, match="download it first with huggingface_hub.snapshot_download"):
        qmiss.from_pretrained(tiny_llama(), "someone/an-adapter")
    assert no_network == []


def test_a_hub_id_with_the_hub_unreachable_fails_fast_and_quietly(capsys, caplog, monkeypatch, no_network) -> None:
    """A hub-shaped name is looked up on the hub; where the hub cannot be reached, only the local cache is
    searched: one error, no retries."""
    from huggingface_hub import constants

    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):  # with a proxy there is no probe
        monkeypatch.delenv(proxy, raising=False)
    offline_before = constants.HF_HUB_OFFLINE
    start = time.perf_counter()
    assert cli.main(["plan", "--config", "someone/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "--config someone/no-such-model: not a local file or folder, and no hub model of that name could be " \
           "read (the hub cannot be reached: only the local cache was searched)" in err
    assert time.perf_counter() - start < 10
    assert "Retry" not in caplog.text and "Retry" not in err
    # the connection probe is the one attempt, if any; nothing retried it
    assert len(no_network) <= 1  # none in offline mode (HF_HUB_OFFLINE)
    assert constants.HF_HUB_OFFLINE == offline_before  # offline only for the look-up


def test_the_cli_exits_2_with_one_line(tmp_path) -> None:
    """The installed command, end to end: exit status 2, one line on stderr, no traceback, no hub retries."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qmiss", "train", "--data_path", str(tmp_path / "missing.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"qmiss-train: error: --data_path {tmp_path / 'missing.jsonl'}: no such file or folder — check the path; "
        "a hub id is 'name' or 'owner/name'"]
    assert time.perf_counter() - start < 60  # imports only: no model, no hub


# --- flags named as typed ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (["--miss_r", "0"], r"--miss_r=0 must be a positive int, e.g. --miss_r=64"),
    (["--mode", "bat", "--miss_r", "48"], r"14 of 14 target layers do not fit: model\.layers\.0\.self_attn\.q_proj: "
                                          r"in_features=64, out_features=64 not divisible by --miss_r=48; .*; and "
                                          r"11 more — bat needs r×r blocks: use --mode='default'"),
    (["--miss_r", "128"], r"model\.layers\.0\.self_attn\.q_proj: --miss_r=128 > in_features=64.* pick a smaller "
                          r"--miss_r \(at most 64\)"),
    (["--mode", "mini", "--mini_r", "48"], r"not divisible by --mini_r=48"),
    (["--mode", "mini"], r"--mode='mini' needs --mini_r"),
    (["--bits", "3"], r"--bits '3' is not one of \['4', '8', 'bf16', 'fp16', 'fp32'\]"),
    (["--quant_type", "int4"], r"--quant_type='int4' is not supported"),
    (["--miss_dropout", "1.5"], r"--miss_dropout=1\.5 must be in \[0, 1\)"),
    (["--init_weights", "lora"], r"--init_weights='lora' is not supported"),
    (["--target_modules", "qkv"], r"--target_modules=\['qkv'\] .* matches no linear layer; the model's 15 linear "
                                  r"layers are: .* and 11 more"),
    (["--prompt_template", "Q:"], r"--prompt_template 'Q:' has no \{query\}"),
], ids=["miss_r=0", "bat-r=48", "r>in", "mini_r", "mini-no-mini_r", "bits", "quant_type", "dropout", "init_weights",
        "no-target", "template"])
def test_flag_errors_name_the_flag_before_the_model_loads(extra, message, tmp_path, capsys, tiny_model_dir,
                                                          loader_calls) -> None:

    (tmp_path / "d.jsonl").write_text(jsonl([GOOD]))
    status, err = run_train(capsys, *data_args(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "out", *extra))
    assert status == 2 and "Traceback" not in err
    assert re.search(message, err), err
    assert len(err) < 700  # the first few modules and a count, never all of them
    assert loader_calls == []


def test_prepare_qmiss_keeps_python_names() -> None:
    with pytest.raises(ValueError, match=r"^r=0 must be a positive int, e.g. r=64$"):
        qmiss.prepare_qmiss(tiny_llama(), r=0)


def test_plan_flags_are_named_as_typed(capsys, smollm2_dir) -> None:
    assert cli.main(["plan", "--config", str(smollm2_dir), "--mode", "bat", "--r", "100"]) == 2
    err = capsys.readouterr().err
    assert "not divisible by --r=100" in err and "and 207 more" in err and len(err) < 700
    assert cli.main(["plan", "--config", str(smollm2_dir), "--batch", "0"]) == 2
    assert "--batch=0 must be a positive integer" in capsys.readouterr().err


# --- qmiss plan's output --------------------------------------------------------------------------------------


def test_plan_header_names_the_model_and_every_figure_is_gib(capsys, smollm2_dir, monkeypatch, tmp_path) -> None:
    import shutil

    shutil.copy(Path(smollm2_dir) / "config.json", tmp_path / "config.json")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plan", "--config", "config.json", "--gpu-gib", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"qmiss memory plan: llama, folder {tmp_path.resolve()}"
    items = out[3:out.index("", 3)]  # the breakdown: one figure per line, the peak last
    assert len(items) > 5 and all(line.endswith(" GiB") for line in items) and "peak (" in items[-1]
    assert not [line for line in out if re.search(r'\d GB(?!")', line)]  # one unit: the only "GB" is the card's name
    cards = next(line for line in out if "cards in GiB" in line)
    assert f"peak + {CUDA_CONTEXT_BYTES / GiB:.2f} GiB CUDA context" in cards and "8 yes" in cards
    assert out[-1].startswith("fits a card of 8 GiB: yes (") and "8192 MiB on the card" in out[-1]
    capsys.readouterr()
    assert cli.main(["plan", "--config", str(smollm2_dir), "--gpu-gb", "8"]) == 0  # the old flag still works
    assert f"qmiss memory plan: llama, folder {Path(smollm2_dir).resolve()}" in capsys.readouterr().out


def test_card_verdicts_are_binary_gib() -> None:
    """An "8 GB" card holds 8 GiB (8192 MiB): a step needing 7.8 GiB with the context fits it (decimal GB said
    no, 7% too cautious); one needing 8.1 GiB does not."""
    def plan(needed_gib: float) -> MemoryPlan:
        peak = int(needed_gib * GiB) - CUDA_CONTEXT_BYTES
        return MemoryPlan("llama, test", {}, {"x": peak}, 0, peak, "loss backward", 0)

    assert plan(7.8).fits(8) and plan(7.8).cards()[8] and not plan(7.8).cards()[6]
    assert not plan(8.1).fits(8) and plan(8.1).cards()[12]
    assert plan(7.8).verdict(8) == ("fits a card of 8 GiB: yes (7.80 GiB needed: peak 7.21 GiB + CUDA context "
                                    "0.59 GiB; 8192 MiB on the card)")


# --- flags as argparse reads them ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--learning-rate", "1e-3", "--max-steps", "5"],  # the spellings --help lists
    ["--learning_rate=1e-3", "--max_steps=5"],
    ["--learning_rat", "1e-3", "--max_ste", "5"],  # unambiguous prefixes
], ids=["dashes", "equals", "prefixes"])
def test_demo_mode_keeps_every_flag_the_user_gave(argv) -> None:
    model_args, data, training = train.parse_args(argv)
    assert (training.learning_rate, training.max_steps) == (1e-3, 5)
    # the demo's recipe still fills what was not given
    assert training.per_device_train_batch_size == train.DEMO_DEFAULTS["per_device_train_batch_size"]
    assert data.prompt_template == train.DEMO_DEFAULTS["prompt_template"]
    assert train.given_flags(argv) == {"learning_rate", "max_steps"}


def test_given_flags_reads_negations_and_lists() -> None:
    assert train.given_flags(["--no_chunked_loss", "--target-modules", "q_proj", "v_proj"]) == {
        "chunked_loss", "target_modules"}
    assert train.parse_args(["--no-chunked-loss"])[0].chunked_loss is False


@pytest.mark.parametrize("argv,message", [
    (["--lora_r", "16"], "unknown flag --lora_r; qmiss-train's flag for it is --miss_r"),
    (["--lora-dropout", "0.1"], "unknown flag --lora-dropout; qmiss-train's flag for it is --miss_dropout"),
    (["--lora_alpha", "32"], "unknown flag --lora_alpha; MiSS has no alpha (its update is not scaled): drop the flag"),
    (["--learnin_rate", "1e-3"], "unknown flag --learnin_rate; did you mean --learning_rate?"),
    (["--zzz"], "unknown flag --zzz; qmiss-train --help lists the flags"),
    (["--save", "2"], "ambiguous option: --save could match --save_only_model"),
    (["--max_steps", "x"], "argument --max_steps/--max-steps: invalid int value: 'x'"),
], ids=["lora_r", "lora-dropout", "lora_alpha", "typo", "unknown", "ambiguous", "bad-value"])
def test_flag_mistakes_get_one_line_and_a_suggestion(argv, message, capsys, loader_calls) -> None:
    status, err = run_train(capsys, *argv)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith(f"qmiss-train: error: {message}"), err


def test_an_output_folder_that_is_a_file_fails_before_loading(tmp_path, capsys, loader_calls) -> None:
    (tmp_path / "out").write_text("not a folder")
    for out, message in [(tmp_path / "out", "is a file, not a folder"),
                         (tmp_path / "out" / "run", f"{tmp_path / 'out'} is a file, so no folder can be made")]:
        status, err = run_train(capsys, "--output_dir", str(out), "--max_steps", "1")
        assert status == 2 and err.count("\n") == 1 and message in err, err
    assert not loader_calls


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_output_folder_fails_before_loading(tmp_path, capsys, loader_calls) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    status, err = run_train(capsys, "--output_dir", str(locked / "run"))
    assert status == 2 and "is not writable" in err and not loader_calls


# --- quiet on the CPU, progress while evaluating ----------------------------------------------------------------


def test_a_cpu_run_is_quiet_about_pin_memory(tmp_path, tiny_model_dir, recwarn) -> None:
    (tmp_path / "d.jsonl").write_text(jsonl([GOOD] * 4))
    argv = data_args(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "out", "--per_device_train_batch_size", "2")
    argv.remove("--use_cpu")  # no GPU here: the demo's case (transformers unpins by itself with --use_cpu)
    train.run(argv)
    assert not [w for w in recwarn if "pin_memory" in str(w.message)]
    list(torch.utils.data.DataLoader([1, 2], pin_memory=True))  # what the run would have printed
    assert [w for w in recwarn if "pin_memory" in str(w.message)]
    model_args, data, training = train.parse_args(["--dataloader_pin_memory", "true"])
    assert training.dataloader_pin_memory  # what the user asks for, they get


def test_the_demo_evaluation_shows_progress(tiny_model_dir, capsys) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = qmiss.prepare_qmiss(tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256), r=16)
    rows = demo.arithmetic_problems(3, seed=0)
    data = train.DataArguments(prompt_template="{query}\n")
    prompts = [train.prompt_text(tokenizer, r["query"], data) for r in rows]
    answers = [r["response"] for r in rows]
    accuracy = demo.held_out_accuracy(model, tokenizer, prompts, answers, batch_size=2,
                                      desc="held-out accuracy, before")
    assert 0.0 <= accuracy <= 1.0
    err = capsys.readouterr().err
    assert "held-out accuracy, before" in err and "48/48" in err  # 2 batches × 24 tokens, each one ticked
    demo.held_out_accuracy(model, tokenizer, prompts, answers)
    assert "held-out" not in capsys.readouterr().err  # no label, no bar (benchmarks)
