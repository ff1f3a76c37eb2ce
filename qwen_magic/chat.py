"""Asking the model: a message in, a streamed reply out, the turn recorded.

:class:`Chat` is what ``%%qwen`` calls, and the same object works from plain Python::

    import qwen_magic
    qwen_magic.load("demo")
    chat = qwen_magic.Chat()
    chat.ask("What is a Python generator? One sentence.")
    chat.ask("Show a three-line example.")       # a follow-up: the history goes along
    chat.conversation().turns                     # what was said, with timings

One :meth:`Chat.ask` renders the conversation (trimmed to fit the model's context), streams the
reply into a view, and records the turn. If generation fails, nothing is recorded. If it is
interrupted (Ctrl-C, the kernel's stop button), the partial reply is recorded and marked so,
then the interrupt goes on to stop the rest of the notebook run. The widget's own Stop button
cancels the generation instead: the partial reply is recorded and marked interrupted just the
same, but the cell ends normally and the notebook run goes on.

In fast mode (``GenerationOptions(fast=True)``) the reply decodes into the model's one static KV
cache (see :mod:`qwen_magic.generation`), whose size is then the context the conversation is
fitted into: the oldest turns are left out sooner. With ``reuse_cache`` the static cache keeps
the prompt prefix across turns just as the per-conversation caches do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _state, loading
from .conversation import DEFAULT_NAME, Conversation, ConversationBook, Turn
from .generation import (
    Generation,
    GenerationOptions,
    PromptCache,
    PromptEncoder,
    fast_cache_tokens,
    fast_mode_note,
)
from .view import TextView, WidgetView, make_view

INTERRUPTED_NOTE = "*(interrupted)*"
STOPPED_NOTE = "*(stopped)*"
MAX_CACHED_CONVERSATIONS = 4


def notebook_conversations() -> ConversationBook:
    """The kernel's conversations; they survive ``%reload_ext``."""
    if _state.conversations is None:
        _state.conversations = ConversationBook()
    return _state.conversations


class Chat:
    """Sends messages to a loaded model and keeps the conversations."""

    def __init__(
        self,
        model: loading.LoadedModel | None = None,
        book: ConversationBook | None = None,
        *,
        reuse_cache: bool = True,
    ) -> None:
        self._model = model
        self._book = book
        #: Keep each conversation's KV cache so a follow-up only prefills its new tokens.
        self.reuse_cache = reuse_cache

    @property
    def book(self) -> ConversationBook:
        """The conversations: the given book, else the kernel's (looked up on each use)."""
        return self._book if self._book is not None else notebook_conversations()

    @property
    def model(self) -> loading.LoadedModel:
        return self._model or loading.require_current()

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
        view: str | TextView | WidgetView | Callable[[], TextView | WidgetView] = "auto",
    ) -> Turn:
        """Send ``message``, stream the reply into ``view``, record and return the turn.

        ``view`` is ``"auto"``, ``"widget"``, ``"text"``, a view object, or a function making
        one (called only once the message is known to fit, so an error leaves no empty widget).
        """
        from IPython.core.error import UsageError

        if not message.strip():
            raise UsageError("The message is empty; write your question in the cell body.")
        model = self.model
        options = options or GenerationOptions()
        if not getattr(model.tokenizer, "chat_template", None) and not model.warned_no_template:
            model.warned_no_template = True
            print(
                f"Note: {model.name} has no chat template; using a plain 'User:/Assistant:' prompt."
            )
        chat = self.conversation(conversation)
        # Fast mode's static cache is the context: the prompt and the reply must fit in it.
        context = fast_cache_tokens(model, options) if options.fast else model.context_length
        encoder = PromptEncoder(model)  # renders the prompt once: to fit it, then to generate
        try:
            messages, dropped = chat.fit(
                message,
                encoder.count,
                context_length=context,
                max_new_tokens=options.max_new_tokens,
                cell_id=cell_id,
                system_prompt=system_prompt,
            )
        except UsageError as error:
            if not options.fast or context == model.context_length:
                raise
            raise UsageError(
                f"{error} (--fast holds {context} tokens in its static cache; raise "
                "QwenMagics.fast_cache_tokens or leave out --fast.)"
            ) from error
        if (note := fast_mode_note(model, options)) is not None:
            print(note)
        generation = Generation(
            model, messages, options, self._prompt_cache(model, chat), encoder=encoder
        )
        generation.stats.dropped_turns = dropped
        if isinstance(view, str):
            shown = make_view(view)
        elif hasattr(view, "update"):  # a view object (TextView, WidgetView or your own)
            shown = view
        else:
            shown = view()
        if (on_stop := getattr(shown, "on_stop", None)) is not None:
            on_stop(generation.cancel)  # the widget's Stop button
        generation.on_wait = getattr(shown, "poll", None)  # Stop clicks, a wait counter
        try:
            for _chunk in generation:
                shown.update(generation.text)
        except KeyboardInterrupt:
            turn = self._record(chat, message, generation, cell_id, options, interrupted=True)
            shown.finish(f"{generation.text}\n\n{INTERRUPTED_NOTE}", generation.stats.footer())
            raise
        # A Stop click cancelled the generation: a normal end, recorded as interrupted.
        stopped = generation.cancelled
        turn = self._record(chat, message, generation, cell_id, options, interrupted=stopped)
        text = f"{generation.text}\n\n{STOPPED_NOTE}" if stopped else generation.text
        shown.finish(text, generation.stats.footer())
        return turn

    def _prompt_cache(
        self, model: loading.LoadedModel, conversation: Conversation
    ) -> PromptCache | None:
        if not self.reuse_cache:
            return None
        # Keyed by the conversation object: two chats never share a cache. (A reused id can only
        # cost speed: PromptCache.take keeps just the prefix the new prompt really shares.)
        key = id(conversation)
        caches = model.prompt_caches
        if key not in caches and len(caches) >= MAX_CACHED_CONVERSATIONS:
            caches.pop(next(iter(caches)))  # forget the oldest conversation's cache
        return caches.setdefault(key, PromptCache())

    def _record(
        self,
        chat: Conversation,
        message: str,
        generation: Generation,
        cell_id: str | None,
        options: GenerationOptions,
        *,
        interrupted: bool,
    ) -> Turn:
        generation.stats.interrupted = interrupted or generation.stats.interrupted
        turn = Turn(
            user=message,
            assistant=generation.text,
            cell_id=cell_id,
            interrupted=generation.stats.interrupted,
            model=self.model.name,
            options=options.as_record(),
            stats=generation.stats.as_record(),
        )
        chat.record(turn)
        return turn


def describe(conversation: Conversation, count_tokens: Any = None) -> str:
    """A short plain-text table of a conversation's turns."""
    lines = [
        f"Conversation {conversation.name!r}: {len(conversation)} "
        f"turn{'s' * (len(conversation) != 1)}; "
        f"system prompt: {conversation.system_prompt!r}"
    ]
    for number, turn in enumerate(conversation.turns, start=1):
        tokens = turn.stats.get("new_tokens", "?")
        mark = " (interrupted)" if turn.interrupted else ""
        lines.append(
            f"{number:>3}. user: {_clip(turn.user)} | assistant ({tokens} tokens){mark}: "
            f"{_clip(turn.assistant)}"
        )
    if count_tokens is not None:
        lines.append(f"History: {count_tokens(conversation.messages())} tokens as a prompt.")
    return "\n".join(lines)


def _clip(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
