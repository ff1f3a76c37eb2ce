"""Chat messages, typed: what a conversation holds and what a backend is asked with.

A :class:`Message` is a role and its content (a ``TypedDict``, so a plain
``{"role": "user", "content": "Hi"}`` is one), with room for an action the assistant asked for
(:class:`CodeAction`) and, on the message after it, that action's result (:class:`ActionResult`).
:func:`chat_dicts` is what a chat template or the OpenAI API receives: role and content only.

This module sits below every layer, beside :mod:`qwen_magic.options` and
:mod:`qwen_magic.errors`: conversations, storage, backends and the front end all speak it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict


@dataclass(frozen=True)
class CodeAction:
    """Code the assistant asks to run, in the user's kernel, once the user approves."""

    code: str
    language: str = "python"


@dataclass(frozen=True)
class ActionResult:
    """What running an action gave, as the model is shown it."""

    output: str
    #: "ran" (it ran; ``output`` holds what it printed and returned), "failed" (it raised),
    #: "skipped" (the user did not approve it).
    status: str = "ran"


class _Message(TypedDict):
    role: str  # "system", "user" or "assistant"
    content: str


class Message(_Message, total=False):
    """One chat message. ``action``: on an assistant message, the code it asked to run;
    ``result``: on the message after it, what came of that code."""

    action: CodeAction
    result: ActionResult


Messages = list[Message]


def chat_dicts(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The messages as a chat template and the OpenAI API take them: role and content only (an
    action is in its message's text already; a result's message holds its output)."""
    return [{"role": message["role"], "content": message["content"]} for message in messages]
