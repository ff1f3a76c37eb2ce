"""Conversations: the messages a notebook has exchanged with the model.

A :class:`Conversation` is a system prompt plus a list of :class:`Turn` objects (one user message
and the assistant's reply each). It renders itself as the ``messages`` list that a tokenizer's
chat template expects and never touches the model.

Turns are keyed by the notebook cell that asked them. JupyterLab sends the cell's id with each
execution; when a ``%%qwen`` cell runs again, its earlier turn and every turn after it are
replaced, so re-running a cell edits the conversation instead of appending a duplicate. Where the
frontend sends no id (nbclient, terminal IPython, plain Python), turns simply append.

A :class:`ConversationBook` holds a notebook's named conversations (``default`` unless you name
another), so one notebook can keep several independent chats. A name is any one-line text (slashes
are fine: a name is never a path); an empty name, a line break or surrounding spaces are refused.

Every turn carries a ``turn_id`` (a random hex string made when the turn is), so two kernels
writing one history file can tell their turns apart (see :mod:`qwen_magic.storage.history`). Files
from before ``turn_id`` existed (or written by hand or by a script) still load; a turn without an
id gets one made from its content and place (:func:`content_turn_id`), so every reading of that
file, in this kernel or another, gives the turn the same id and the merge never takes it for
another kernel's turn.

Saved conversations are checked field by field when they are read back
(:func:`conversation_problem`): a file whose turns have the wrong types (``"user": null``, stats
that are not an object, ``interrupted: 1``) is refused with one line naming the entry, instead of
being half loaded and failing later.

:meth:`Conversation.fit` keeps a prompt inside the model's context window: it counts tokens with
the model's own tokenizer and leaves out the oldest turns (never the system prompt) until the
history, the new message and the reply's token budget fit; in steps of a quarter of the context,
so that follow-ups keep reusing the backend's cached prefix.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from qwen_magic.checks import conversation_problem, name_problem
from qwen_magic.errors import QwenMagicError
from qwen_magic.messages import Message
from qwen_magic.steps import step_messages, steps_markdown

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_NAME = "default"


def new_turn_id() -> str:
    """A fresh, practically unique turn id (uuid4 as 32 hex digits)."""
    return uuid.uuid4().hex


def content_turn_id(conversation: str, index: int, turn: dict[str, Any]) -> str:
    """The id of a saved turn that has none: a hash of its conversation, place and content.

    The same file read twice (at ``%load_ext``, then again under the lock before a save, or by
    a second kernel) gives the same ids, so the turns are recognised as the ones already held.
    """
    fields = [conversation, index, turn.get("user"), turn.get("assistant"), turn.get("created")]
    digest = hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:32]


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
    turn_id: str = field(default_factory=new_turn_id)
    #: What the assistant did before its answer (``%%qwen --run``): see :mod:`qwen_magic.steps`.
    steps: list[dict[str, Any]] = field(default_factory=list)

    def messages(self) -> list[Message]:
        """The turn as chat messages: the question, any steps, the answer."""
        if not self.steps:
            return [
                {"role": "user", "content": self.user},
                {"role": "assistant", "content": self.assistant},
            ]
        messages: list[Message] = [
            {"role": "user", "content": self.user},
            *step_messages(self.steps),
        ]
        if self.assistant or messages[-1]["role"] == "user":
            messages.append({"role": "assistant", "content": self.assistant})
        return messages

    def as_record(self) -> dict[str, Any]:
        """The turn as the history file keeps it (no ``steps`` field when it has none, so files
        stay readable by versions from before steps)."""
        record = asdict(self)
        if not self.steps:
            del record["steps"]
        return record


@dataclass
class Conversation:
    """A system prompt and the turns so far."""

    name: str = DEFAULT_NAME
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    turns: list[Turn] = field(default_factory=list)
    #: Ids of every turn this conversation has held, popped or replaced ones too: the history
    #: file's merge deletes only turns this kernel held (see qwen_magic.storage.history).
    held_ids: set[str] = field(default_factory=set, compare=False, repr=False)
    #: How many of the oldest turns the last prompt left out (kept while the rest fits).
    left_out: int = field(default=0, repr=False, compare=False)
    _token_memo: dict[int, tuple[Turn, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _counted_with: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.held_ids.update(turn.turn_id for turn in self.turns)

    def __len__(self) -> int:
        return len(self.turns)

    def history_for(self, cell_id: str | None) -> list[Turn]:
        """The turns a new message from ``cell_id`` follows: all, or those before its old turn."""
        index = self.turn_index_of_cell(cell_id)
        return self.turns if index is None else self.turns[:index]

    def messages(
        self,
        user: str | None = None,
        *,
        cell_id: str | None = None,
        system_prompt: str | None = None,
        turns: list[Turn] | None = None,
    ) -> list[Message]:
        """The chat-template messages: system prompt, history, and the new ``user`` message."""
        history = self.history_for(cell_id) if turns is None else turns
        system = self.system_prompt if system_prompt is None else system_prompt
        messages: list[Message] = [{"role": "system", "content": system}] if system else []
        for turn in history:
            messages.extend(turn.messages())
        if user is not None:
            messages.append({"role": "user", "content": user})
        return messages

    def record(self, turn: Turn) -> int:
        """Add ``turn``; a turn from the same cell replaces the old one and the turns after it.

        Returns how many turns were replaced (0 when it simply appended).
        """
        self.held_ids.add(turn.turn_id)
        index = self.turn_index_of_cell(turn.cell_id)
        if index is None:
            self.turns.append(turn)
            return 0
        replaced = len(self.turns) - index
        self.turns[index:] = [turn]
        return replaced

    def pop(self) -> Turn:
        """Remove and return the last turn."""
        if not self.turns:
            raise QwenMagicError(f"Conversation {self.name!r} has no turns to remove.")
        return self.turns.pop()

    def reset(self) -> int:
        """Forget every turn (the system prompt stays); returns how many were dropped."""
        dropped = len(self.turns)
        self.turns.clear()
        self.left_out = 0
        return dropped

    def fit(
        self,
        user: str,
        count_tokens: Callable[[list[Message]], int],
        *,
        context_length: int,
        max_new_tokens: int,
        cell_id: str | None = None,
        system_prompt: str | None = None,
    ) -> tuple[list[Message], int]:
        """The recent history that fits the context, as messages, and how many of the oldest
        turns were left out. ``count_tokens`` renders messages with the chat template and counts.

        Each turn's tokens are counted once and remembered, and only the turns that can fit are
        looked at, so a history of any length costs the same. Turns are left out in steps: once
        the context overflows, enough of the oldest turns go to free a quarter of it, and they
        stay out while the rest fits, so the prompt's start, and with it the backend's cached
        prefix, stays the same from turn to turn.
        """
        history = self.history_for(cell_id)
        budget = context_length - max_new_tokens
        bare = count_tokens(self.messages(user, system_prompt=system_prompt, turns=[]))
        if bare > budget:
            raise QwenMagicError(
                f"The message alone takes {bare} tokens, more than the {budget} this model has "
                f"room for ({context_length} context − {max_new_tokens} for the reply). "
                "Shorten it or lower --max-new-tokens."
            )
        room = budget - bare
        fits_from, _ = self._turns_within(history, count_tokens, room)
        start = min(self.left_out, len(history))
        if start < fits_from:  # overflow: leave out enough to free a quarter of the context
            start, _ = self._turns_within(history, count_tokens, room - context_length // 4)
            start = max(start, fits_from)
        elif start > fits_from and self._tokens_from(history, start, count_tokens) < room // 2:
            start = fits_from  # far more room than needed (a larger context): take turns back
        self.left_out = start
        while True:
            messages = self.messages(user, system_prompt=system_prompt, turns=history[start:])
            if start >= len(history) or count_tokens(messages) <= budget:
                return messages, start
            start += 1  # the turns' own counts fell short of the whole prompt's: one more out

    def _turns_within(
        self, history: list[Turn], count_tokens: Callable[..., int], room: int
    ) -> tuple[int, int]:
        """Where the newest turns that fit in ``room`` tokens start, and their tokens."""
        start, total = len(history), 0
        while start > 0:
            cost = self._turn_tokens(history[start - 1], count_tokens)
            if total + cost > room:
                break
            total += cost
            start -= 1
        return start, total

    def _tokens_from(self, history: list[Turn], start: int, count_tokens: Callable) -> int:
        return sum(self._turn_tokens(turn, count_tokens) for turn in history[start:])

    def _turn_tokens(self, turn: Turn, count_tokens: Callable[..., int]) -> int:
        """A turn's tokens in a prompt, counted once per tokenizer and remembered."""
        counter = getattr(count_tokens, "__self__", count_tokens)
        if counter is not self._counted_with:
            self._token_memo.clear()
            self._counted_with = counter
        remembered = self._token_memo.get(id(turn))
        if remembered is not None and remembered[0] is turn:
            return remembered[1]
        try:  # the turn's share of a prompt: with and without it, beside an empty system prompt
            empty = [{"role": "system", "content": ""}]
            tokens = count_tokens([*empty, *turn.messages()]) - count_tokens(empty)
        except Exception:  # a chat template that refuses a system message: count it alone
            tokens = count_tokens(turn.messages())
        self._token_memo[id(turn)] = (turn, tokens)
        if len(self._token_memo) > 2 * len(self.turns) + 64:  # forget removed turns
            alive = {id(kept) for kept in self.turns}
            self._token_memo = {k: v for k, v in self._token_memo.items() if k in alive}
        return tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "system_prompt": self.system_prompt,
            "turns": [turn.as_record() for turn in self.turns],
        }

    @classmethod
    def from_dict(cls, data: Any, *, key: str | None = None) -> Conversation:
        """The conversation ``to_dict`` made; a ``QwenMagicError`` naming the first bad field.

        ``key`` is the name the conversation is filed under, which its own name must match.
        """
        if (problem := conversation_problem(data, key)) is not None:
            raise QwenMagicError(f"Not a qwen_magic conversation ({problem}).")
        return cls(
            name=data["name"],
            system_prompt=data["system_prompt"],
            turns=[
                Turn(**turn)
                if "turn_id" in turn
                else Turn(**turn, turn_id=content_turn_id(data["name"], index, turn))
                for index, turn in enumerate(data["turns"])
            ],
        )

    def to_markdown(self) -> str:
        """The conversation as a readable Markdown document."""
        lines = [f"# Conversation: {self.name}", "", f"*System:* {self.system_prompt}", ""]
        for number, turn in enumerate(self.turns, start=1):
            lines += [f"## {number}. User", "", turn.user, "", *steps_markdown(turn.steps)]
            lines += ["**Assistant**", "", turn.assistant]
            if turn.interrupted:
                lines += ["", "*(interrupted)*"]
            lines.append("")
        return "\n".join(lines)

    def turn_index_of_cell(self, cell_id: str | None) -> int | None:
        """Where the turn asked by ``cell_id`` stands, if that cell has one."""
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
                raise QwenMagicError(f"No conversation named {name!r} (known: {known}).")
            if (problem := name_problem(name)) is not None:
                raise QwenMagicError(
                    f"The conversation name {name!r} {problem}; choose a one-line name such "
                    "as -c notes."
                )
            self.conversations[name] = Conversation(name, self.default_system_prompt)
        return self.conversations[name]

    def names(self) -> list[str]:
        return sorted(self.conversations)
