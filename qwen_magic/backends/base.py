"""The backend seam: what the chat layer needs from whatever writes the replies.

A *backend* turns typed chat messages into a streamed reply. The chat layer
(:class:`qwen_magic.chat.Chat`) talks to nothing else, so the same conversations, views, magics
and history files work whether the model runs in this kernel
(:class:`~qwen_magic.backends.kernel.backend.KernelBackend`, ``transformers``), on a server that
speaks the OpenAI chat-completions API (:class:`~qwen_magic.backends.server.ServerBackend`: vLLM,
SGLang, ``transformers serve``), or is a script (:class:`~qwen_magic.backends.scripted.
ScriptedBackend`, for tests and dry runs).

**What goes in.** :class:`Message`: a role and its content, with room for an action the assistant
asked for (:class:`CodeAction`) and, on the message after it, that action's result
(:class:`ActionResult`). :func:`chat_dicts` is what a chat template or the OpenAI API receives.

**What comes out.** :meth:`Backend.start` begins one reply and returns a :class:`Reply`;
iterating it yields typed events on the caller's thread (where a widget may be updated):

* :class:`TextDelta` — more of the reply's text (:attr:`Reply.text` holds all of it so far);
* :class:`Waiting` — nothing came for a moment (time to look at a Stop click);
* :class:`ActionRequested` — the reply asks for an action (the assistant that acts);
* :class:`ReplyEnd` — the last event: why the reply ended, and what it cost (:class:`ReplyStats`).

Errors are raised from the iteration, on that thread. :meth:`Reply.cancel` really stops the work
(the model stops after its current token; a server stream is closed); the iteration then ends
normally and the partial text stays. Ctrl-C while iterating cancels too, and re-raises once the
work has ended. A reply is a context manager like the ``openai`` SDK's ``Stream``: leaving the
``with`` block (or :meth:`Reply.close`) cancels what is left and waits for it.

:class:`ThreadedReply` is that loop, written once: the work runs on a worker thread and hands
text over a queue; the reading side waits however many interrupts arrive, so no work outlives
its cell, and re-raises the first. Each backend only says how to produce text
(:meth:`ThreadedReply._produce`) and, if it can, how to abort a blocking call
(:meth:`ThreadedReply._abort`).

**Fitting.** :meth:`Backend.count_tokens` and :meth:`Backend.context_length` let the chat layer
fit a conversation into the context before it asks. A backend that learns only when asking that
the prompt is too long (a server's own limit) raises :class:`~qwen_magic.errors.ContextTooLong`
from the iteration, before any text; the chat layer then fits again and asks once more.

What a backend keeps between replies (a KV cache, a compiled graph) is its own business: the
chat layer passes ``conversation``, an opaque key saying which conversation a prompt continues,
and calls :meth:`Backend.forget_conversations` when the conversations are replaced. Nothing
here is a display string: notices are :class:`Notice` codes with their facts, and the front end
words them (:mod:`qwen_magic.notebook.report`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

# The message types are the seam's too; they live below it, beside the options.
from qwen_magic.messages import ActionResult as ActionResult
from qwen_magic.messages import CodeAction as CodeAction
from qwen_magic.messages import Message as Message
from qwen_magic.messages import Messages as Messages
from qwen_magic.messages import chat_dicts as chat_dicts
from qwen_magic.options import GenerationOptions

# -- what comes out -------------------------------------------------------------------------


@dataclass
class ReplyStats:
    """What one reply cost, and how it ended."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_seconds: float | None = None
    total_seconds: float = 0.0
    interrupted: bool = False
    dropped_turns: int = 0
    cached_prompt_tokens: int = 0
    #: Why the reply ended: "eos" (the model finished), "length" (it reached max_new_tokens;
    #: a server's ``finish_reason == "length"``), "cancelled" (Stop, Ctrl-C); None: unknown.
    stop_reason: str | None = None

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first, over the time after the first."""
        if self.first_token_seconds is None or self.new_tokens < 2:
            return 0.0
        decode = self.total_seconds - self.first_token_seconds
        return (self.new_tokens - 1) / decode if decode > 0 else 0.0

    def as_record(self) -> dict[str, Any]:
        """The stats as a saved turn keeps them."""
        record = asdict(self)
        record["tokens_per_second"] = round(self.tokens_per_second, 2)
        return record


@dataclass(frozen=True)
class TextDelta:
    """More of the reply's text."""

    text: str


@dataclass(frozen=True)
class Waiting:
    """Nothing came for a moment; the reply is still being written (or its prompt read)."""


@dataclass(frozen=True)
class ActionRequested:
    """The reply asks for an action (code to run, with the user's approval)."""

    action: CodeAction


@dataclass(frozen=True)
class ReplyEnd:
    """The reply's last event."""

    reason: str | None
    stats: ReplyStats


ReplyEvent = TextDelta | Waiting | ActionRequested | ReplyEnd
WAITING = Waiting()


@dataclass(frozen=True)
class Notice:
    """Something to tell the user about a reply or a backend, as a code and its facts; the
    front end words it (``qwen_magic.notebook.report.notice_text``)."""

    code: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendInfo:
    """What a backend is, for the front end's lines (footers, ``%qwen_unload``)."""

    #: "kernel" (a model in this kernel), "server", "scripted", or a kind of your own.
    kind: str
    #: A short name for the model.
    name: str
    #: Where it runs: a device list ("cpu", "cuda:0+cuda:1") or a server's URL.
    location: str = ""
    #: How the weights are stored, where that changes the replies ("int8", "int4"; "": as
    #: trained). Shown in each reply's footer and kept in saved turns.
    weights: str = ""


@runtime_checkable
class Reply(Protocol):
    """One reply being written: iterate it for :data:`ReplyEvent` values."""

    #: The text so far (all of it once the iteration has ended).
    text: str
    stats: ReplyStats
    #: Things to tell the user under the finished reply (e.g. options a server left out).
    notes: list[Notice]

    def __iter__(self) -> Iterator[ReplyEvent]: ...

    def cancel(self) -> None:
        """Stop the work after the current token; the iteration ends, the text is kept."""

    @property
    def cancelled(self) -> bool: ...

    def close(self) -> None:
        """Cancel what is left and wait until the work has ended."""

    def __enter__(self) -> Reply: ...

    def __exit__(self, *exc_info: object) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """Whatever writes the replies: a model in this kernel, a server, a script."""

    #: A short name for the model, shown in summaries and kept in saved turns.
    name: str

    def info(self) -> BackendInfo:
        """What this backend is and where it runs."""

    def summary(self) -> str:
        """One line: what this backend is and where it runs."""

    def context_length(self, options: GenerationOptions) -> int:
        """The most tokens (prompt + reply) one reply with ``options`` may use."""

    def context_advice(self, options: GenerationOptions) -> list[Notice]:
        """What to add to a "does not fit" message for ``options`` (nothing: [])."""

    def count_tokens(self, messages: Messages) -> int:
        """How many tokens ``messages`` take as a prompt (an upper estimate is fine)."""

    def notices(self, options: GenerationOptions) -> list[Notice]:
        """What to tell the user before a reply with ``options`` starts (each said once)."""

    def start(
        self,
        messages: Messages,
        options: GenerationOptions,
        *,
        conversation: Hashable | None = None,
    ) -> Reply:
        """Begin a reply to ``messages``; ``conversation`` says which one it continues (None:
        keep nothing for a follow-up). Nothing runs until the reply is iterated."""

    def forget_conversations(self) -> None:
        """Drop whatever is kept per conversation (the conversations were replaced)."""

    def close(self) -> None:
        """Free what the backend holds (GPU memory, connections); it is not used again."""


# -- the one threaded reply -----------------------------------------------------------------


class ThreadedReply:
    """A :class:`Reply` whose work runs on a worker thread, read on the caller's thread.

    Subclasses write :meth:`_produce` (the work, on the worker: call ``emit(text)`` for each
    piece; raise on failure) and may write :meth:`_abort` (unblock the work at once on a cancel:
    close a socket), :meth:`_settle` (after the worker ended, on the reading thread: how the
    reply ended), :meth:`_explain` (turn a worker's error into the one to raise) and
    :meth:`_submit` (run the work on a thread of their own choosing).
    """

    #: How long the reading side waits for text before it yields :data:`WAITING`.
    poll_seconds = 0.05
    #: How long a *cancelled* reply waits for its worker (None: until it ends). A backend whose
    #: work can block where no cancel reaches it (a TCP connect) sets a bound.
    join_seconds: float | None = None
    #: Whether an explained error keeps the worker's as its cause (a server's may quote a key).
    chain_errors = True

    def __init__(self, stats: ReplyStats | None = None) -> None:
        self.text = ""
        self.stats = stats or ReplyStats()
        self.notes: list[Notice] = []
        #: The worker's exception, if it raised (re-raised by the iteration).
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._pieces: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # A weak reference, so a reader that drops the iteration (an exception in its loop)
        # finalizes it at once, which cancels and waits for the work as close() would.
        self._events: weakref.ref[Any] | None = None
        self._iterated = False
        self._ended = False  # the work has ended and been waited for
        self._started = 0.0

    # -- the Reply protocol

    def cancel(self) -> None:
        """Ask the work to stop (after the current token); it is waited for by the reader."""
        self._cancel.set()
        with contextlib.suppress(Exception):  # aborting is best effort; the wait is not
            self._abort()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[ReplyEvent]:
        if self._iterated:
            raise RuntimeError("A reply can be iterated only once.")
        self._iterated = True
        events = self._run()
        self._events = weakref.ref(events)
        return events

    def close(self) -> None:
        """Cancel what is left and wait for the worker; a second interrupt meanwhile changes
        nothing (the first is already on its way)."""
        if self._ended:
            return
        events = self._events() if self._events is not None else None
        if events is None:  # never iterated: nothing runs, and nothing will
            self.cancel()
            return
        with contextlib.suppress(KeyboardInterrupt):
            events.close()

    def __enter__(self) -> ThreadedReply:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(self) -> str:
        """Read the whole reply without showing it; return its text."""
        with self:
            for _event in self:
                pass
        return self.text

    # -- for subclasses

    def _produce(self, emit: Callable[[str], None]) -> None:
        """The work, on the worker thread: write the reply, ``emit`` each piece of text."""
        raise NotImplementedError

    def _abort(self) -> None:
        """Unblock the work at once after a cancel (e.g. close its connection)."""

    def _settle(self) -> None:
        """After the worker ended, on the reading thread: fill in how the reply ended."""
        if self.cancelled:
            self.stats.stop_reason = "cancelled"

    def _explain(self, error: BaseException) -> BaseException:
        """The exception to raise for the worker's ``error``."""
        return error

    def _exclusive(self) -> contextlib.AbstractContextManager[Any]:
        """Held while the reply runs (e.g. one generation per model at a time)."""
        return contextlib.nullcontext()

    def _submit(self, work: Callable[[], None], done: threading.Event) -> None:
        """Run ``work`` on a new daemon thread; set ``done`` once it has ended."""

        def work_then_done() -> None:
            try:
                work()
            finally:
                done.set()

        self._thread = threading.Thread(target=work_then_done, name="qwen_magic-reply", daemon=True)
        self._thread.start()

    def _on_text(self, text: str) -> None:
        """Called on the reading thread for each piece, before it is yielded."""

    # -- the loop

    def _work(self) -> None:
        try:
            self._produce(self._pieces.put)
        except BaseException as error:  # re-raised on the reading thread
            self.error = error

    def _run(self) -> Iterator[ReplyEvent]:
        with self._exclusive():
            self._started = time.perf_counter()
            self._prepare()
            try:
                self._submit(self._work, self._done)
                yield from self._read()
            except BaseException:  # Ctrl-C, or the reader stopped early: stop the work too
                self.cancel()
                raise
            finally:
                held = self._wait_for_worker()
                self._ended = True
                self.stats.total_seconds = time.perf_counter() - self._started
                self.stats.interrupted = self.cancelled
                self._settle()
                if held is not None:
                    raise held
            if self.error is not None:
                explained = self._explain(self.error)
                if explained is self.error:
                    raise explained
                raise explained from (self.error if self.chain_errors else None)
            self._finish()
        yield ReplyEnd(self.stats.stop_reason, self.stats)

    def _prepare(self) -> None:
        """On the reading thread, just before the worker starts."""

    def _finish(self) -> None:
        """On the reading thread, once the reply ended without an error."""

    def _read(self) -> Iterator[ReplyEvent]:
        while True:
            try:
                piece = self._pieces.get(timeout=self.poll_seconds)
            except queue.Empty:
                if self._done.is_set() and self._pieces.empty():
                    return
                yield WAITING
                continue
            self.text += piece
            self._on_text(piece)
            yield TextDelta(piece)

    def _wait_for_worker(self) -> BaseException | None:
        """Wait until the worker has ended (cancelled if the cell is being left early).
        Interrupts arriving meanwhile cancel again and are held; the first is returned."""
        held: BaseException | None = None
        deadline: float | None = None
        while not self._done.is_set():
            if self.cancelled and self.join_seconds is not None:
                deadline = deadline or time.perf_counter() + self.join_seconds
                if time.perf_counter() >= deadline:
                    return held  # the worker holds nothing and ends by itself
            try:
                self._done.wait(None if deadline is None else 0.05)
            except KeyboardInterrupt as interrupt:
                self.cancel()
                held = held or interrupt
        if self._thread is not None:
            self._thread.join()
        return held
