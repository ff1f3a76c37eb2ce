"""Asking the model: a message in, a streamed reply out, the turn recorded.

:class:`Chat` is what ``%%qwen`` calls, and the same object works from plain Python::

    import qwen_magic
    qwen_magic.load("demo")
    chat = qwen_magic.Chat()
    chat.ask("What is a Python generator? One sentence.")
    chat.ask("Show a three-line example.")       # a follow-up: the history goes along
    chat.conversation().turns                     # what was said, with timings

One :meth:`Chat.ask` fits the conversation into the backend's context (the oldest turns are left
out first), streams the reply into a view, and records the turn. It knows the backend only
through :class:`qwen_magic.backends.base.Backend`, so it works the same with a model in the
kernel and with a server. If generation fails, nothing is recorded. If it is interrupted
(Ctrl-C, the kernel's stop button), the partial reply is recorded and marked so, then the
interrupt goes on to stop the rest of the notebook run. The widget's own Stop button cancels the
reply instead: the partial reply is recorded and marked interrupted just the same, but the cell
ends normally and the notebook run goes on. A reply cut short is not recorded when it is a
re-run of a cell (the cell's earlier turn, and the turns after it, stay as they were) or when
it had no text yet. The conversation is fitted into a context budget, and an ask that must read
a long prompt first says so before the wait (:mod:`qwen_magic.context_budget`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qwen_magic import session as kernel_session
from qwen_magic.backends.base import Backend, Message, Notice, Reply, TextDelta, Waiting
from qwen_magic.context_budget import LONG_READ_TOKENS, PrefillMeter, context_for
from qwen_magic.conversation import DEFAULT_NAME, Conversation, ConversationBook, Turn
from qwen_magic.errors import ContextTooLong, QwenMagicError
from qwen_magic.options import GenerationOptions
from qwen_magic.presentation import Presentation, View, default_presentation

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
        presentation: Presentation | None = None,
    ) -> None:
        self._backend = backend
        self._book = book
        #: Views and words from the front end (default: the package's, the notebook's).
        self.presentation = presentation or default_presentation()
        #: Let the backend keep per-conversation state (a KV cache) for cheap follow-ups.
        self.reuse_cache = reuse_cache
        #: The most context one ask may read (``QwenMagics.context_tokens``); None or 0: 8192
        #: tokens on a CPU, the model's whole context elsewhere (see qwen_magic.context_budget).
        self.context_tokens: int | None = None
        self.prefill = PrefillMeter()

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

        ``view`` is ``"auto"``, ``"widget"``, ``"text"``, a
        :class:`~qwen_magic.notebook.views.View` (or any object with its ``update(text)`` and
        ``finish(text, footer)``; ``start`` is optional), or a function making one (called only
        once the message is known to fit, so an error leaves no empty widget).
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
            notices = backend.notices(options)
            if (
                long_read := self._long_read(backend, chat, messages, dropped, options)
            ) is not None:
                notices.append(long_read)
            for notice in notices:
                self.presentation.say(self.presentation.notice_text(notice))
            reply = backend.start(
                messages, options, conversation=id(chat) if self.reuse_cache else None
            )
            reply.stats.dropped_turns = dropped
            shown = shown or self._make(view)
            if (start := getattr(shown, "start", None)) is not None:  # optional for your own
                start(reply)
            try:
                try:
                    return self._stream(chat, message, reply, shown, cell_id, options)
                finally:
                    self.prefill.after(backend, id(chat), reply.stats)
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
    ) -> tuple[list[Message], int]:
        context = context_for(backend, options, self.context_tokens)
        if options.max_new_tokens >= context:
            model_context = backend.context_length(options)
            where = (
                f"this model's {context}-token context"
                if context == model_context
                else f"the {context}-token context budget (QwenMagics.context_tokens; the "
                f"model's context is {model_context})"
            )
            raise QwenMagicError(
                f"--max-new-tokens {options.max_new_tokens} leaves no room for the message in "
                f"{where}; give less, e.g. -n {context // 4}."
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
                words = "; ".join(self.presentation.notice_text(notice) for notice in advice)
                raise QwenMagicError(f"{error} ({words})") from error
            raise

    def _long_read(
        self,
        backend: Backend,
        chat: Conversation,
        messages: list[Message],
        dropped: int,
        options: GenerationOptions,
    ) -> Notice | None:
        """The notice for an ask that reads a long prompt before its first token, if it does."""
        context = context_for(backend, options, self.context_tokens)
        if context < LONG_READ_TOKENS:
            return None
        return self.prefill.before(
            backend,
            id(chat),
            backend.count_tokens(messages),
            dropped,
            reuse_cache=self.reuse_cache,
            context=context,
            model_context=backend.context_length(options),
        )

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
        footer = self._footer
        try:
            show_events(reply, shown)
        except KeyboardInterrupt:
            turn, why_not = self._record(chat, message, reply, cell_id, options, interrupted=True)
            shown.finish(_with_note(reply.text, INTERRUPTED_NOTE, why_not), footer(reply))
            self._say_notes(reply)  # e.g. a server still reading the prompt
            raise
        except ContextTooLong:
            raise  # nothing was shown: the caller fits again, or reports it
        except Exception:
            if reply.text:  # keep what came on screen; the error follows below it
                shown.finish(f"{reply.text}\n\n{FAILED_NOTE}", footer(reply))
            raise
        # A Stop click cancelled the reply: a normal end, recorded as interrupted.
        stopped = reply.cancelled
        turn, why_not = self._record(chat, message, reply, cell_id, options, interrupted=stopped)
        text = _with_note(reply.text, STOPPED_NOTE, why_not) if stopped else reply.text
        shown.finish(text, footer(reply))
        self._say_notes(reply)
        return turn

    def _say_notes(self, reply: Reply) -> None:
        for note in getattr(reply, "notes", ()):  # replies of your own may have none
            self.presentation.say(self.presentation.notice_text(note))

    def _footer(self, reply: Reply) -> str:
        return self.presentation.footer(reply.stats, self.backend.info())

    def _make(self, view: ViewChoice) -> View:
        if isinstance(view, str):
            return self.presentation.make_view(view)
        if isinstance(view, View) or (hasattr(view, "update") and hasattr(view, "finish")):
            return view  # type: ignore[return-value]  # any object with update and finish
        return view()

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
            stats=self._stats_record(reply),
        )
        if turn.interrupted and chat.turn_index_of_cell(cell_id) is not None:
            return turn, "this cell's earlier turn stays"
        if turn.interrupted and not turn.assistant:
            return turn, "nothing was written yet"
        chat.record(turn)
        return turn, None

    def _stats_record(self, reply: Reply) -> dict[str, Any]:
        record = reply.stats.as_record()
        if weights := self.backend.info().weights:  # kept as history files always had it
            record["quantization"] = weights
        return record


def show_events(reply: Reply, shown: View) -> None:
    """Show ``reply`` in ``shown`` as its events come; leaving early (Ctrl-C) cancels the work
    and waits for it (the reply is a context manager)."""
    wait = getattr(shown, "wait", None)  # optional for views of your own
    with reply:
        for event in reply:
            if isinstance(event, TextDelta):
                shown.update(reply.text)
            elif isinstance(event, Waiting) and wait is not None:
                wait()


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


def _with_note(text: str, note: str, why_not_recorded: str | None) -> str:
    if why_not_recorded:
        note = note.replace(")*", f"; not recorded: {why_not_recorded})*")
    return f"{text}\n\n{note}"
