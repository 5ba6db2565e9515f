"""Training rows as token ids and labels, by the tokenizer's own rules.

Two kinds of rows (:mod:`qmiss.data` reads and checks them):

- **pairs** (a prompt, a response): ``[BOS] prompt response EOS``, labels on ``response EOS`` only.
  BOS is whatever the tokenizer itself puts before a text (Llama-3's ``<|begin_of_text|>``,
  Gemma's ``<bos>``; nothing for SmolLM2 or Qwen), found by asking it, never assumed.
- **conversations** (OpenAI ``messages``): the tokenizer's chat template renders the whole
  conversation, and every assistant turn is learned (its text and the template's end-of-turn
  token), nothing else. A template already writes BOS and closes each turn, so nothing is added
  twice; a template that does not close a turn with a special token gets EOS after it.

Assistant spans are found by rendering: turn ``i`` starts where the rendering of the turns before
it plus the generation prompt ends, and stops where the rendering through turn ``i`` ends. That
holds for every template whose rendering of a conversation begins with the rendering of its
start; a template that rewrites earlier turns (e.g. one that drops past reasoning) cannot be
marked this way and is refused with :class:`ChatTemplateError`, naming the turn.
"""

from __future__ import annotations

from typing import Optional

IGNORE = -100  # the label transformers' loss skips


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot render a conversation, or cannot mark where its assistant turns are."""


class Encoder:
    """Encodes rows for one tokenizer; the special tokens it adds are read from it once.

    Args:
        tokenizer: a transformers tokenizer.
        max_length: longer rows are cut to this many tokens (the end is cut).
    """

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos = _added_prefix(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, token in tokenizer.added_tokens_decoder.items() if token.special}

    def prompt_ids(self, text: str) -> list[int]:
        """The ids of a prompt to generate from: the tokenizer's BOS (unless ``text``, e.g. a rendered chat
        template, already starts with it) and the text."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return ids if self.bos and ids[: len(self.bos)] == self.bos else self.bos + ids

    def pair(self, prompt: str, response: str) -> dict[str, list[int]]:
        """``[BOS] prompt response EOS`` and labels on ``response EOS``; a response follows a prompt that ends
        in a letter, digit or ":" after one space."""
        head = self.prompt_ids(prompt)
        separator = " " if prompt[-1:].isalnum() or prompt.endswith(":") else ""
        answer = self.tokenizer(separator + response, add_special_tokens=False).input_ids
        if self.eos is not None and answer[-1:] != [self.eos]:
            answer = answer + [self.eos]
        return self._cut(head + answer, [IGNORE] * len(head) + answer)

    def conversation(self, messages: list[dict[str, str]]) -> dict[str, list[int]]:
        """The chat template's rendering of ``messages``, labels on every assistant turn.

        Raises:
            ChatTemplateError: no chat template, the template fails on these messages, or it cannot mark an
                assistant turn (its rendering of the turns so far is not where the full rendering begins).
        """
        text, spans = self.assistant_spans(messages)
        ids: list[int] = []
        labels: list[int] = []
        start = 0
        for a, b in spans:
            for segment, learned in ((text[start:a], False), (text[a:b], True)):
                if segment:
                    piece = self.tokenizer(segment, add_special_tokens=False).input_ids
                    ids += piece
                    labels += piece if learned else [IGNORE] * len(piece)
            if self.eos is not None and (not ids or ids[-1] not in self.special_ids):
                ids.append(self.eos)  # this template does not close the turn with a special token
                labels.append(self.eos)
            start = b
        rest = self.tokenizer(text[start:], add_special_tokens=False).input_ids if text[start:] else []
        ids, labels = ids + rest, labels + [IGNORE] * len(rest)
        if self.bos and ids[: len(self.bos)] != self.bos:
            ids, labels = self.bos + ids, [IGNORE] * len(self.bos) + labels
        return self._cut(ids, labels)

    def assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant turn in it (its text and the
        template's end-of-turn marker, without the whitespace after).

        Raises:
            ChatTemplateError: see :meth:`conversation`.
        """
        text = self._render(messages, generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], generation_prompt=True)
            through = self._render(messages[: i + 1], generation_prompt=False).rstrip()
            if not (text.startswith(through) and through.startswith(before) and len(through) > len(before)):
                raise ChatTemplateError(
                    f"the tokenizer's chat template cannot mark the assistant turn messages[{i}] (its rendering of "
                    "the turns before it is not where the whole conversation's rendering begins: the template "
                    "rewrites earlier turns) — split the conversation at that turn, or train on pairs")
            spans.append((len(before), len(through)))
        return text, spans

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if not self.tokenizer.chat_template:
            raise ChatTemplateError("the tokenizer has no chat template — use an instruct model's tokenizer, or "
                                    "query/response pairs")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises its own errors and templates raise_exception() with any text
            raise ChatTemplateError(f"the tokenizer's chat template refused the conversation: "
                                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def _cut(self, ids: list[int], labels: list[int]) -> dict[str, list[int]]:
        return {"input_ids": ids[: self.max_length], "labels": labels[: self.max_length]}


def _added_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text by itself (its BOS), [] where it adds none."""
    plain = tokenizer("x", add_special_tokens=False).input_ids
    full = tokenizer("x").input_ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def chat_prompt(tokenizer, query: str, system: Optional[str] = None) -> str:
    """A one-turn conversation rendered up to where the assistant's reply begins (for generation)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": query}]
    if not tokenizer.chat_template:
        raise ChatTemplateError("the tokenizer has no chat template — use an instruct model's tokenizer, or a "
                                "prompt template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
