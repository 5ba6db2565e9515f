"""encode.py: rows as token ids and labels by the tokenizer's own rules — BOS once where the model uses one, EOS
after the reply, nothing doubled by a chat template, every assistant turn learned and nothing else."""

from __future__ import annotations

import pytest

from qmiss.encode import IGNORE, ChatTemplateError, Encoder, chat_prompt

CONVERSATION = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5. The answer is: 5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "4 + 4 = 8. The answer is: 8"},
]


def learned_runs(labels: list[int]) -> list[list[int]]:
    """The runs of consecutive learned labels."""
    runs, current = [], []
    for label in labels + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


def bos_of(tokenizer) -> list[int]:
    """What the tokenizer itself puts before a text: [] for SmolLM2, [bos] for the Llama-3 and Gemma families."""
    return tokenizer("x").input_ids[: -len(tokenizer("x", add_special_tokens=False).input_ids)]


def test_the_families_differ_as_their_models_do(any_tokenizer) -> None:
    expected = {"<|im_start|>": [], "<|begin_of_text|>": [any_tokenizer.bos_token_id],
                "<bos>": [any_tokenizer.bos_token_id]}[any_tokenizer.bos_token]
    assert Encoder(any_tokenizer, 512).bos == bos_of(any_tokenizer) == expected


def test_a_pair_gets_bos_once_and_eos_after_the_reply(any_tokenizer) -> None:
    tokenizer = any_tokenizer
    row = Encoder(tokenizer, 512).pair("What is 2 + 3?\n", "2 + 3 = 5. The answer is: 5")
    ids, labels = row["input_ids"], row["labels"]
    bos = bos_of(tokenizer)
    assert ids[: len(bos)] == bos and (not bos or ids[1] != bos[0])  # once, first
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    prompt = bos + tokenizer("What is 2 + 3?\n", add_special_tokens=False).input_ids
    assert labels[: len(prompt)] == [IGNORE] * len(prompt) and labels[len(prompt):] == ids[len(prompt):]
    assert tokenizer.decode(labels[len(prompt):], skip_special_tokens=True) == "2 + 3 = 5. The answer is: 5"


def test_a_conversation_learns_every_assistant_turn_and_nothing_else(any_tokenizer) -> None:
    tokenizer = any_tokenizer
    encoder = Encoder(tokenizer, 4096)
    row = encoder.conversation(CONVERSATION)
    ids, labels = row["input_ids"], row["labels"]
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(ids) == text  # the template's rendering, nothing added
    bos = bos_of(tokenizer)
    assert ids[: len(bos)] == bos and (not bos or ids.count(bos[0]) == 1)  # the template's BOS, not a second
    runs = learned_runs(labels)
    assert len(runs) == 2  # both assistant turns
    for run, turn in zip(runs, [CONVERSATION[2], CONVERSATION[4]]):
        assert tokenizer.decode(run[:-1]) == turn["content"]
        assert run[-1] in encoder.special_ids  # the template's end of turn, learned so generation stops
    assert not any(word in tokenizer.decode([t for t in labels if t != IGNORE]) for word in ("What is", "And 4",
                                                                                                "Answer with"))


def test_generation_prompts_are_what_training_saw(any_tokenizer) -> None:
    """The demo's and generate.py's prompts are the training ids up to the first learned token."""
    encoder = Encoder(any_tokenizer, 4096)
    turns = CONVERSATION[1:3]
    row = encoder.conversation(turns)
    first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE)
    assert encoder.prompt_ids(chat_prompt(any_tokenizer, turns[0]["content"])) == row["input_ids"][:first]
    pair = encoder.pair("What is 2 + 3?\n", "5")
    first = next(i for i, label in enumerate(pair["labels"]) if label != IGNORE)
    assert encoder.prompt_ids("What is 2 + 3?\n") == pair["input_ids"][:first]


def test_a_template_that_does_not_close_turns_gets_eos(smollm2_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    row = Encoder(tokenizer, 512).conversation(CONVERSATION[1:])
    runs = learned_runs(row["labels"])
    assert len(runs) == 2 and all(run[-1] == tokenizer.eos_token_id for run in runs)
    assert tokenizer.decode(runs[0][:-1]).strip() == CONVERSATION[2]["content"]


@pytest.mark.parametrize("template,match", [
    (None, "the tokenizer has no chat template"),
    ("{% for m in messages %}{% if m['role'] == 'assistant' %}>{% if loop.last %}{{ m['content'] }}{% else %}[past]"
     "{% endif %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>{% endfor %}"
     "{% if add_generation_prompt %}>{% endif %}",
     r"cannot mark the assistant turn messages\[1\] .* the template rewrites earlier turns"),
    ("{{ raise_exception('only one turn, please') }}", "refused the conversation: only one turn, please"),
], ids=["no-template", "rewrites-earlier-turns", "raises"])
def test_templates_that_cannot_serve_are_refused(smollm2_dir, template, match) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = template
    with pytest.raises(ChatTemplateError, match=match):
        Encoder(tokenizer, 512).conversation(CONVERSATION[1:])


def test_rows_are_cut_at_max_length(any_tokenizer) -> None:
    row = Encoder(any_tokenizer, 7).pair("What is 2 + 3?\n", "2 + 3 = 5. The answer is: 5")
    assert len(row["input_ids"]) == len(row["labels"]) == 7
