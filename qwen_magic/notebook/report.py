"""The words the user reads about a reply: footers and notices.

Backends and the chat layer hand over facts (:class:`~qwen_magic.backends.base.ReplyStats`,
:class:`~qwen_magic.backends.base.BackendInfo`, :class:`~qwen_magic.backends.base.Notice` codes);
this module turns them into the lines a notebook shows, so every display string lives in the
front end. :data:`NOTEBOOK` bundles them with the views for the chat layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qwen_magic.backends.base import BackendInfo, Notice, ReplyStats
from qwen_magic.conversation import Conversation
from qwen_magic.notebook.views import make_view
from qwen_magic.presentation import Presentation
from qwen_magic.steps import steps_summary

#: Below this many tokens a reply's speed says nothing, and the footer leaves it out.
RATE_FROM_TOKENS = 4


def footer(stats: ReplyStats, info: BackendInfo | None = None) -> str:
    """One line for under the reply: tokens, time to first token, speed, what was left out,
    and whether the reply was cut (by the token limit, or by an interrupt)."""
    first = "–" if stats.first_token_seconds is None else f"{stats.first_token_seconds:.2f} s"
    parts = [
        f"{stats.new_tokens} token{'s' * (stats.new_tokens != 1)}",
        f"first token {first}",
    ]
    if stats.new_tokens >= RATE_FROM_TOKENS:
        parts.append(f"{stats.tokens_per_second:.1f} tokens/s")
    if info is not None and info.weights:
        parts.append(f"{info.weights} weights")
    if stats.dropped_turns:
        parts.append(f"{stats.dropped_turns} oldest turns left out to fit the context")
    if stats.stop_reason == "length" and not stats.interrupted:
        parts.append(f"stopped at the {stats.new_tokens}-token limit (-n)")
    if stats.interrupted:
        parts.append("interrupted")
    return " · ".join(parts)


def long_prompt_text(facts: dict[str, Any]) -> str:
    """The line before a long prompt is read: how many tokens, about how long, what bounds it."""
    seconds, rate = facts.get("seconds"), facts.get("rate")
    if seconds is None:
        how_long = ""
    elif facts.get("measured"):
        how_long = f" (about {_duration(seconds)} at the {rate:,.0f} tokens/s measured here)"
    else:
        how_long = f" (about {_duration(seconds)} on this CPU, if it reads {rate:,.0f} tokens/s)"
    bound = facts["context"]
    if bound < facts["model_context"]:
        limit = f"QwenMagics.context_tokens ({bound:,} of the model's {facts['model_context']:,})"
    else:
        limit = "%config QwenMagics.context_tokens = 4096"
    return (
        f"Reading {facts['tokens']:,} tokens of conversation before the first word{how_long}; "
        f"Stop or Ctrl-C ends it, and {limit} bounds it."
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(round(seconds), 1)} s"
    return f"{seconds / 60:.0f} min"


_NOTICES: dict[str, Callable[[dict[str, Any]], str]] = {
    # The chat layer: a long prompt to read before the first token (qwen_magic.context_budget).
    "long_prompt": long_prompt_text,
    # A backend of your own may say a line as it is.
    "line": lambda facts: str(facts["text"]),
    # The model in the kernel.
    "no_chat_template": lambda facts: (
        f"Note: {facts['model']} has no chat template; using a plain 'User:/Assistant:' prompt."
    ),
    "fast_not_compiled": lambda facts: (
        f"Note: --fast {facts['why']}; its replies are the same as without it, not faster."
    ),
    "fast_compiles": lambda facts: (
        "Note: this first --fast reply compiles the decoding step with torch.compile "
        "(a minute or more for a 7B model); later replies reuse it."
    ),
    "fast_cache_size": lambda facts: (
        f"--fast holds {facts['tokens']} tokens in its static cache; raise "
        "QwenMagics.fast_cache_tokens or leave out --fast."
    ),
}


def notice_text(notice: Notice) -> str:
    """A notice's words (an unknown code is shown with its facts, never dropped)."""
    words = _NOTICES.get(notice.code)
    if words is None:
        facts = ", ".join(f"{key}={value!r}" for key, value in notice.facts.items())
        return f"Note: {notice.code}" + (f" ({facts})" if facts else "")
    return words(notice.facts)


def register_notice(code: str, words: Callable[[dict[str, Any]], str]) -> None:
    """Word a notice code of your own backend's."""
    _NOTICES[code] = words


NOTEBOOK = Presentation(
    make_view=make_view,
    footer=footer,
    notice_text=notice_text,
    say=print,
)


#: How many of the latest turns ``%qwen_history`` shows unless asked for all.
HISTORY_SHOWN = 20


def describe_conversation(
    conversation: Conversation, count_tokens: Any = None, *, last: int | None = HISTORY_SHOWN
) -> str:
    """A short plain-text table of a conversation's latest ``last`` turns (None: all)."""
    turns = conversation.turns
    lines = [
        f"Conversation {conversation.name!r}: {len(turns)} turn{'s' * (len(turns) != 1)}; "
        f"system prompt: {conversation.system_prompt!r}"
    ]
    first = 0 if last is None else max(0, len(turns) - last)
    if first:
        lines.append(f"     … {first} earlier turns (--all shows them)")
    for number, turn in enumerate(turns[first:], start=first + 1):
        tokens = turn.stats.get("new_tokens", "?")
        mark = " (interrupted)" if turn.interrupted else ""
        if turn.steps:
            mark += f" [{steps_summary(turn.steps)}]"
        lines.append(
            f"{number:>3}. user: {_clip(turn.user)} | assistant ({tokens} tokens){mark}: "
            f"{_clip(turn.assistant)}"
        )
    if count_tokens is not None and len(turns) <= HISTORY_SHOWN:
        lines.append(f"History: {count_tokens(conversation.messages())} tokens as a prompt.")
    if conversation.left_out:
        lines.append(
            f"The last prompt left out the {conversation.left_out} oldest turns to fit the context."
        )
    return "\n".join(lines)


def _clip(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
