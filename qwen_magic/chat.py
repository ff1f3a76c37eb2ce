"""Asking the model: a message in, a streamed reply out, the turn recorded.

:class:`Chat` is what ``%%qwen`` calls, and the same object works from plain Python::

    import qwen_magic
    qwen_magic.load("demo")
    chat = qwen_magic.Chat()
    chat.ask("What is a Python generator? One sentence.")
    chat.ask("Show a three-line example.")       # a follow-up: the history goes along
    chat.conversation().turns                     # what was said, with timings

One :meth:`Chat.ask` fits the conversation into the backend's context (the oldest turns are
left out first), streams the reply into a view, and records the turn. It knows the backend only
through :class:`qwen_magic.backend.Backend`, so it works the same with a model in the kernel and
with a server. If generation fails, nothing is recorded. If it is interrupted (Ctrl-C, the
kernel's stop button), the partial reply is recorded and marked so, then the interrupt goes on
to stop the rest of the notebook run. The widget's own Stop button cancels the reply instead:
the partial reply is recorded and marked interrupted just the same, but the cell ends normally
and the notebook run goes on. A reply cut short is not recorded when it is a re-run of a cell
(the cell's earlier turn, and the turns after it, stay as they were) or when it had no text yet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from . import session as kernel_session
from .backend import Backend, Reply
from .conversation import DEFAULT_NAME, Conversation, ConversationBook, Turn
from .errors import ContextTooLong, QwenMagicError
from .options import GenerationOptions
from .steps import steps_summary
from .view import View, make_view

INTERRUPTED_NOTE = "*(interrupted)*"
STOPPED_NOTE = "*(stopped)*"
FAILED_NOTE = "*(the reply broke off here and was not recorded; the error follows)*"

ViewChoice = str | View | Callable[[], View]


class Chat:
    """Sends messages to a backend and keeps the conversations.

    By default both are the kernel session's, looked up on each use (so a ``%qwen_load`` or a
    ``%qwen_restore`` in between is seen); give ``backend`` or ``book`` to use others.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        book: ConversationBook | None = None,
        *,
        reuse_cache: bool = True,
    ) -> None:
        self._backend = backend
        self._book = book
        #: Let the backend keep per-conversation state (a KV cache) for cheap follow-ups.
        self.reuse_cache = reuse_cache

    @property
    def book(self) -> ConversationBook:
        return self._book if self._book is not None else kernel_session.current().conversations

    @property
    def backend(self) -> Backend:
        if self._backend is not None:
            return self._backend
        return kernel_session.current().require_backend()

    def conversation(self, name: str = DEFAULT_NAME, *, create: bool = True) -> Conversation:
        return self.book.get(name, create=create)

    def ask(
        self,
        message: str,
        *,
        conversation: str = DEFAULT_NAME,
        options: GenerationOptions | None = None,
        system_prompt: str | None = None,
        cell_id: str | None = None,
        view: ViewChoice = "auto",
    ) -> Turn:
        """Send ``message``, stream the reply into ``view``, record and return the turn.

        ``view`` is ``"auto"``, ``"widget"``, ``"text"``, a :class:`~qwen_magic.view.View` (or
        any object with its ``update(text)`` and ``finish(text, footer)``; ``start`` is
        optional), or a function making one (called only once the message is known to fit, so
        an error leaves no empty widget).
        """
        if not message.strip():
            raise QwenMagicError("The message is empty; write your question in the cell body.")
        check_text(message, "The message")
        if system_prompt is not None:
            check_text(system_prompt, "The system prompt")
        backend = self.backend
        options = options or GenerationOptions()
        chat = self.conversation(conversation)
        check_text(chat.system_prompt, f"The system prompt of {chat.name!r}")
        shown: View | None = None
        for attempt in (1, 2):
            messages, dropped = self._fit(backend, chat, message, options, cell_id, system_prompt)
            for notice in backend.notices(options):
                print(notice)
            reply = backend.start(
                messages, options, conversation=id(chat) if self.reuse_cache else None
            )
            reply.stats.dropped_turns = dropped
            shown = shown or _make(view)
            if (start := getattr(shown, "start", None)) is not None:  # optional for your own
                start(reply)
            try:
                return self._stream(chat, message, reply, shown, cell_id, options)
            except ContextTooLong:
                if attempt == 2 or reply.text:
                    raise
                # The backend's real limit was smaller than it knew (a server's): it has
                # learnt the limit, so fitting again leaves out more of the oldest turns.
        raise AssertionError("unreachable")  # pragma: no cover

    def _fit(
        self,
        backend: Backend,
        chat: Conversation,
        message: str,
        options: GenerationOptions,
        cell_id: str | None,
        system_prompt: str | None,
    ) -> tuple[list[dict[str, str]], int]:
        context = backend.context_length(options)
        if options.max_new_tokens >= context:
            raise QwenMagicError(
                f"--max-new-tokens {options.max_new_tokens} leaves no room for the message in "
                f"this model's {context}-token context; give less, e.g. -n {context // 4}."
            )
        try:
            return chat.fit(
                message,
                backend.count_tokens,
                context_length=context,
                max_new_tokens=options.max_new_tokens,
                cell_id=cell_id,
                system_prompt=system_prompt,
            )
        except QwenMagicError as error:
            if advice := backend.context_advice(options):
                raise QwenMagicError(f"{error} ({advice})") from error
            raise

    def _stream(
        self,
        chat: Conversation,
        message: str,
        reply: Reply,
        shown: View,
        cell_id: str | None,
        options: GenerationOptions,
    ) -> Turn:
        """Show the reply as it comes, then record it; an interrupt records the partial turn
        and goes on, a failure records nothing and leaves the partial text on screen."""
        pieces = iter(reply)
        try:
            for _piece in pieces:
                shown.update(reply.text)
        except KeyboardInterrupt:
            _close(pieces)  # the work has ended before anything is recorded
            turn, why_not = self._record(chat, message, reply, cell_id, options, interrupted=True)
            shown.finish(_with_note(reply.text, INTERRUPTED_NOTE, why_not), reply.stats.footer())
            raise
        except ContextTooLong:
            raise  # nothing was shown: the caller fits again, or reports it
        except Exception:
            if reply.text:  # keep what came on screen; the error follows below it
                shown.finish(f"{reply.text}\n\n{FAILED_NOTE}", reply.stats.footer())
            raise
        # A Stop click cancelled the reply: a normal end, recorded as interrupted.
        stopped = reply.cancelled
        turn, why_not = self._record(chat, message, reply, cell_id, options, interrupted=stopped)
        text = _with_note(reply.text, STOPPED_NOTE, why_not) if stopped else reply.text
        shown.finish(text, reply.stats.footer())
        if note := getattr(reply, "note", None):  # replies of your own may have no note
            print(note)
        return turn

    def _record(
        self,
        chat: Conversation,
        message: str,
        reply: Reply,
        cell_id: str | None,
        options: GenerationOptions,
        *,
        interrupted: bool,
    ) -> tuple[Turn, str | None]:
        """Record the reply as a turn; returns it, and why it was not recorded, if it was not:
        a re-run cut short keeps the cell's earlier turn (and the turns after it), and a reply
        cut short before its first word has nothing to keep."""
        reply.stats.interrupted = interrupted or reply.stats.interrupted
        turn = Turn(
            user=message,
            assistant=reply.text,
            cell_id=cell_id,
            interrupted=reply.stats.interrupted,
            model=self.backend.name,
            options=options.as_record(),
            stats=reply.stats.as_record(),
        )
        if turn.interrupted and chat.turn_index_of_cell(cell_id) is not None:
            return turn, "this cell's earlier turn stays"
        if turn.interrupted and not turn.assistant:
            return turn, "nothing was written yet"
        chat.record(turn)
        return turn, None


def check_text(text: str, what: str) -> None:
    """Refuse text no tokenizer can take: lone surrogates (from binary data, or a broken
    decode), which have no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise QwenMagicError(
            f"{what} holds a character that is not valid Unicode ({text[error.start]!r} at "
            f"position {error.start}, a lone surrogate); remove it, or decode the data it came "
            "from with errors='replace'."
        ) from None


def _close(pieces: Any) -> None:
    """Close a reply's iterator early: its work is cancelled and waited for. A second
    interrupt meanwhile changes nothing: the first is already on its way."""
    close = getattr(pieces, "close", None)
    if close is not None:
        with contextlib.suppress(KeyboardInterrupt):
            close()


def _with_note(text: str, note: str, why_not_recorded: str | None) -> str:
    if why_not_recorded:
        note = note.replace(")*", f"; not recorded: {why_not_recorded})*")
    return f"{text}\n\n{note}"


def _make(view: ViewChoice) -> View:
    if isinstance(view, str):
        return make_view(view)
    if isinstance(view, View) or (hasattr(view, "update") and hasattr(view, "finish")):
        return view  # a View, or any object with update(text) and finish(text, footer)
    return view()


#: How many of the latest turns ``%qwen_history`` shows unless asked for all.
HISTORY_SHOWN = 20


def describe(
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
