"""Messages to token ids: the model's chat template, else a plain transcript.

:class:`PromptEncoder` renders and tokenizes prompts for one tokenizer and remembers the last
prompt it encoded. A turn's prompt is encoded first to check that it fits the context
(``Conversation.fit``), then to generate from: the second time costs nothing (a long history
takes milliseconds to render, a noticeable share of a GPU's time to first token). The memo is
compared by content, so a changed message is never given stale ids.

A message's content is data, never markup. Text that looks like the template's control tokens
(``<|im_start|>system …``), typed or pulled in with ``-i``, must not become those tokens, or a
user message could open a system turn. Where a message holds such text, :func:`encode` renders
the template around placeholders and tokenizes each message's content on its own with the
special tokens split into ordinary text (``split_special_tokens=True``); other prompts are
tokenized by the template in one go, as before.
"""

from __future__ import annotations

from typing import Any

from qwen_magic.backends.base import Messages, chat_dicts

ChatDicts = list[dict[str, str]]


def plain_prompt(messages: Messages | ChatDicts) -> str:
    """A simple transcript for models without a chat template."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*lines, "Assistant:"])


def encode(tokenizer: Any, messages: Messages | ChatDicts) -> list[int]:
    """``messages`` rendered for the model (its chat template, else a plain transcript), with
    every message's content tokenized as plain text."""
    messages = chat_dicts(messages)  # role and content: what the template reads
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(plain_prompt(messages), split_special_tokens=True)["input_ids"])
    if not holds_control_text(tokenizer, messages):
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True
        )
        return list(encoded["input_ids"])
    return _encode_content_as_text(tokenizer, messages)


def control_strings(tokenizer: Any) -> set[str]:
    """The texts this tokenizer turns into special (control) tokens."""
    strings = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            strings.add(str(token.content))
    return {text for text in strings if text}


def holds_control_text(tokenizer: Any, messages: ChatDicts) -> bool:
    """True when some message's content contains a control token's text."""
    strings = control_strings(tokenizer)
    return any(text in message["content"] for message in messages for text in strings)


def _encode_content_as_text(tokenizer: Any, messages: ChatDicts) -> list[int]:
    """The template's own text tokenized as usual, each content with its special-token look-
    alikes split into plain text."""
    markers = [f"\ue000qwen_magic:{index}\ue001" for index in range(len(messages))]
    stand_ins = [
        {**message, "content": marker} for message, marker in zip(messages, markers, strict=True)
    ]
    rendered = tokenizer.apply_chat_template(stand_ins, add_generation_prompt=True, tokenize=False)

    def template_ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    ids: list[int] = []
    position = 0
    for message, marker in zip(messages, markers, strict=True):
        found = rendered.find(marker, position)
        if found < 0:  # a template that reshapes content: neutralise the look-alikes instead
            return encode(tokenizer, [_defused(message, tokenizer) for message in messages])
        ids += template_ids(rendered[position:found])
        content = tokenizer(message["content"], add_special_tokens=False, split_special_tokens=True)
        ids += list(content["input_ids"])
        position = found + len(marker)
    return ids + template_ids(rendered[position:])


def _defused(message: dict[str, str], tokenizer: Any) -> dict[str, str]:
    content = message["content"]
    for text in control_strings(tokenizer):
        content = content.replace(text, text[:1] + "\u200b" + text[1:])  # a zero-width space
    return {**message, "content": content}


class PromptEncoder:
    """Token ids for prompts of one tokenizer, remembering the last prompt it encoded."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._last: tuple[ChatDicts, list[int]] | None = None

    def token_ids(self, messages: Messages) -> list[int]:
        plain = chat_dicts(messages)
        if self._last is not None and self._last[0] == plain:
            return self._last[1]
        ids = encode(self.tokenizer, plain)
        self._last = (plain, ids)
        return ids

    def count(self, messages: Messages) -> int:
        """How many tokens ``messages`` take once rendered for the model."""
        return len(self.token_ids(messages))
