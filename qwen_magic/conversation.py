"""Conversations: the messages a notebook has exchanged with the model.

A :class:`Conversation` is a system prompt plus a list of :class:`Turn` objects (one user message
and the assistant's reply each). It renders itself as the ``messages`` list that a tokenizer's
chat template expects and never touches the model.

Turns are keyed by the notebook cell that asked them. JupyterLab sends the cell's id with each
execution; when a ``%%qwen`` cell runs again, its earlier turn and every turn after it are
replaced, so re-running a cell edits the conversation instead of appending a duplicate. Where the
frontend sends no id (nbclient, terminal IPython, plain Python), turns simply append.

A :class:`ConversationBook` holds a notebook's named conversations (``default`` unless you name
another), so one notebook can keep several independent chats.

:meth:`Conversation.fit` keeps a prompt inside the model's context window: it counts tokens with
the model's own tokenizer and drops the oldest turns (never the system prompt) until the history,
the new message and the reply's token budget fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from IPython.core.error import UsageError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_NAME = "default"


@dataclass
class Turn:
    """One exchange: what the user asked, what the model answered, and how."""

    user: str
    assistant: str
    cell_id: str | None = None
    interrupted: bool = False
    model: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def messages(self) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": self.user},
            {"role": "assistant", "content": self.assistant},
        ]


@dataclass
class Conversation:
    """A system prompt and the turns so far."""

    name: str = DEFAULT_NAME
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    turns: list[Turn] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.turns)

    def history_for(self, cell_id: str | None) -> list[Turn]:
        """The turns a new message from ``cell_id`` follows: all, or those before its old turn."""
        index = self._index_of_cell(cell_id)
        return self.turns if index is None else self.turns[:index]

    def messages(
        self,
        user: str | None = None,
        *,
        cell_id: str | None = None,
        system_prompt: str | None = None,
        turns: list[Turn] | None = None,
    ) -> list[dict[str, str]]:
        """The chat-template messages: system prompt, history, and the new ``user`` message."""
        history = self.history_for(cell_id) if turns is None else turns
        system = self.system_prompt if system_prompt is None else system_prompt
        messages = [{"role": "system", "content": system}] if system else []
        for turn in history:
            messages.extend(turn.messages())
        if user is not None:
            messages.append({"role": "user", "content": user})
        return messages

    def record(self, turn: Turn) -> int:
        """Add ``turn``; a turn from the same cell replaces the old one and the turns after it.

        Returns how many turns were replaced (0 when it simply appended).
        """
        index = self._index_of_cell(turn.cell_id)
        if index is None:
            self.turns.append(turn)
            return 0
        replaced = len(self.turns) - index
        self.turns[index:] = [turn]
        return replaced

    def pop(self) -> Turn:
        """Remove and return the last turn."""
        if not self.turns:
            raise UsageError(f"Conversation {self.name!r} has no turns to remove.")
        return self.turns.pop()

    def reset(self) -> int:
        """Forget every turn (the system prompt stays); returns how many were dropped."""
        dropped = len(self.turns)
        self.turns.clear()
        return dropped

    def fit(
        self,
        user: str,
        count_tokens: Callable[[list[dict[str, str]]], int],
        *,
        context_length: int,
        max_new_tokens: int,
        cell_id: str | None = None,
        system_prompt: str | None = None,
    ) -> tuple[list[dict[str, str]], int]:
        """The longest recent history that fits the context, as messages, and how many turns
        were left out. ``count_tokens`` renders messages with the chat template and counts.
        """
        history = list(self.history_for(cell_id))
        budget = context_length - max_new_tokens
        bare = self.messages(user, system_prompt=system_prompt, turns=[])
        if count_tokens(bare) > budget:
            raise UsageError(
                f"The message alone takes {count_tokens(bare)} tokens, more than the "
                f"{budget} this model has room for ({context_length} context − {max_new_tokens} "
                "for the reply). Shorten it or lower --max-new-tokens."
            )
        dropped = 0
        while True:
            messages = self.messages(user, system_prompt=system_prompt, turns=history[dropped:])
            excess = count_tokens(messages) - budget
            if excess <= 0:
                return messages, dropped
            # Drop as many of the oldest turns as their own tokens cover, then count again.
            while excess > 0 and dropped < len(history):
                excess -= count_tokens(history[dropped].messages())
                dropped += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "system_prompt": self.system_prompt,
            "turns": [asdict(turn) for turn in self.turns],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conversation:
        try:
            return cls(
                name=str(data["name"]),
                system_prompt=str(data["system_prompt"]),
                turns=[Turn(**turn) for turn in data["turns"]],
            )
        except (KeyError, TypeError) as error:
            raise UsageError(f"Not a qwen_magic conversation ({error}).") from error

    def to_markdown(self) -> str:
        """The conversation as a readable Markdown document."""
        lines = [f"# Conversation: {self.name}", "", f"*System:* {self.system_prompt}", ""]
        for number, turn in enumerate(self.turns, start=1):
            lines += [f"## {number}. User", "", turn.user, "", "**Assistant**", "", turn.assistant]
            if turn.interrupted:
                lines += ["", "*(interrupted)*"]
            lines.append("")
        return "\n".join(lines)

    def _index_of_cell(self, cell_id: str | None) -> int | None:
        if cell_id is None:
            return None
        for index, turn in enumerate(self.turns):
            if turn.cell_id == cell_id:
                return index
        return None


@dataclass
class ConversationBook:
    """A notebook's conversations by name."""

    conversations: dict[str, Conversation] = field(default_factory=dict)
    default_system_prompt: str = DEFAULT_SYSTEM_PROMPT

    def get(self, name: str = DEFAULT_NAME, *, create: bool = True) -> Conversation:
        """The conversation called ``name``; made empty on first use unless ``create`` is False."""
        if name not in self.conversations:
            if not create:
                known = ", ".join(sorted(self.conversations)) or "none yet"
                raise UsageError(f"No conversation named {name!r} (known: {known}).")
            self.conversations[name] = Conversation(name, self.default_system_prompt)
        return self.conversations[name]

    def names(self) -> list[str]:
        return sorted(self.conversations)
