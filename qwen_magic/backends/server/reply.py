"""One reply streaming from a server: :class:`ServerReply`.

**A reply** (:class:`ServerReply`) does nothing until iterated. Then a worker thread sends the
request and reads the stream into a queue, while the caller's thread takes pieces from the queue
with a short timeout, calling ``on_wait`` between them (a Stop click is seen while the server is
still reading a long prompt). :meth:`ServerReply.cancel` shuts the connection's socket at once,
before the server's headers as after them (the socket is known from the moment it connects:
:mod:`.sockets`): the worker's blocked read returns, and the server sees the client leave.
Ctrl-C while iterating cancels the same way, joins the worker and re-raises, well within a
second. Whether the server stops reading a prompt it has begun is its own affair (vLLM,
SGLang and llama.cpp do; ``transformers serve`` does not): a reply stopped before its first
token elsewhere gets a :attr:`~ServerReply.note` saying the next reply may start late.
``stats.new_tokens`` is the server's ``usage.completion_tokens`` when it sends usage
(``stream_options.include_usage`` is asked for; ``transformers serve`` sends it unasked), else
the number of pieces.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ...backend import Messages, ReplyStats
from ...errors import ContextTooLong, QwenMagicError
from ...options import GenerationOptions
from .connect import estimate_tokens
from .dialects import open_stream, request_fields
from .errors import ServerError, is_transport_error
from .guards import html_answer_message, looks_like_html
from .sockets import sending_for, shut_down

if TYPE_CHECKING:
    from .connect import ServerBackend

#: How often the reading thread wakes up to call ``on_wait`` while no text comes.
POLL_SECONDS = 0.05
#: How long a cancelled or interrupted reply waits for its worker thread.
JOIN_SECONDS = 1.0


class ServerReply:
    """One reply streaming from the server: iterate it for pieces of text (once)."""

    def __init__(
        self, backend: ServerBackend, messages: Messages, options: GenerationOptions
    ) -> None:
        self._backend = backend
        self._messages = messages
        self._options = options
        #: The text so far (all of it once the iteration has ended).
        self.text = ""
        self.stats = ReplyStats()
        #: Called on the reading thread while it waits for text (a Stop click, a wait counter).
        self.on_wait: Callable[[], Any] | None = None
        #: One line about this reply to show with it (options the server did not accept).
        self.note: str | None = None
        #: Why the server stopped: "stop", "length", … (None: cancelled, cut or not yet ended).
        self.finish_reason: str | None = None
        self._pieces: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._cancel = threading.Event()
        self._stream_lock = threading.Lock()
        self._stream: Any = None
        self._socket: socket.socket | None = None
        self._worker: threading.Thread | None = None
        self._usage: Any = None

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called (a Stop click, Ctrl-C)."""
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Cut the connection now, before or after the server's first byte: the worker's read
        returns and the server sees the client leave; the text so far is kept."""
        self._cancel.set()
        with self._stream_lock:
            sock, stream = self._socket, self._stream
        if sock is not None and shut_down(sock):
            return
        if stream is not None:
            _abort(stream)

    def adopt_socket(self, sock: socket.socket) -> None:
        """The socket this reply's request was just connected on (from
        :mod:`.sockets`); cut at once if the reply was cancelled already."""
        with self._stream_lock:
            self._socket = sock
            cut = self._cancel.is_set()
        if cut:
            shut_down(sock)

    def __iter__(self) -> Iterator[str]:
        if self._worker is not None:
            raise RuntimeError("A ServerReply can be iterated only once.")
        started = time.perf_counter()
        self._worker = threading.Thread(
            target=self._read, name="qwen-magic-server-reply", daemon=True
        )
        self._worker.start()
        try:
            yield from self._pieces_until_done(started)
        except BaseException:  # Ctrl-C, an error, or the consumer stopped early
            self.cancel()
            raise
        finally:
            if self._worker.is_alive():
                self.cancel()
                self._worker.join(JOIN_SECONDS)
            self._finish_stats(started)

    def _pieces_until_done(self, started: float) -> Iterator[str]:
        while not self._cancel.is_set():
            try:
                kind, payload = self._pieces.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if self.on_wait is not None:
                    self.on_wait()
                continue
            if kind == "text":
                if self.stats.first_token_seconds is None:
                    self.stats.first_token_seconds = time.perf_counter() - started
                self.text += payload
                self.stats.new_tokens += 1  # replaced by the server's count when it sends one
                yield payload
            elif kind == "note":
                self.note = payload
            elif kind == "error":
                raise self._as_user_error(*payload)
            else:  # "end"
                if self.finish_reason is None and not self._cancel.is_set():
                    raise QwenMagicError(
                        f"The server at {self._backend.base_url} ended the stream before the "
                        f"reply was finished ({len(self.text)} characters came): see the "
                        "server's log; the partial reply is kept."
                    )
                return

    def _read(self) -> None:
        """The worker: send the request, put each piece of text on the queue, then "end"."""
        backend = self._backend
        stream = None
        outcome: tuple[str, Any] = ("end", None)
        try:
            if self._cancel.is_set():
                return  # cancelled before it was sent: send nothing
            fields = request_fields(backend, self._messages, self._options)
            with sending_for(self):
                stream, note = open_stream(backend, fields)
            _check_event_stream(stream, backend.base_url)
            if note:
                self._pieces.put(("note", note))
            with self._stream_lock:
                self._stream = stream
            for chunk in stream:
                if self._cancel.is_set():
                    break
                if getattr(chunk, "usage", None) is not None:
                    self._usage = chunk.usage
                for choice in chunk.choices or ():
                    if choice.index != 0:
                        continue
                    if content := getattr(choice.delta, "content", None):
                        self._pieces.put(("text", content))
                    if choice.finish_reason:
                        self.finish_reason = choice.finish_reason
        except BaseException as error:  # handed to the caller's thread, unless we cut it
            if not self._cancel.is_set():
                outcome = ("error", (error, stream is not None))
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
            self._pieces.put(outcome)

    def _as_user_error(self, error: BaseException, streaming: bool) -> BaseException:
        import openai

        broken = isinstance(error, openai.APIConnectionError) or is_transport_error(error)
        if streaming and isinstance(error, json.JSONDecodeError):
            return ServerError(
                f"The server at {self._backend.base_url} sent an event that is not JSON after "
                f"{len(self.text)} characters ({error.msg} at character {error.pos}): the "
                "partial reply is kept; see the server's log."
            )
        if streaming and broken:
            return ServerError(
                f"The connection to {self._backend.base_url} broke mid-reply after "
                f"{len(self.text)} characters (was the server stopped?): the partial reply is "
                "kept; check the server and ask again."
            )
        if not isinstance(error, openai.OpenAIError):
            return error  # a bug: keep its own type and traceback
        user_error = self._backend._error(error)
        if isinstance(user_error, ContextTooLong):
            self._backend._learn_limit(user_error.limit)
        return user_error

    def _finish_stats(self, started: float) -> None:
        stats = self.stats
        stats.total_seconds = time.perf_counter() - started
        stats.interrupted = stats.interrupted or self._cancel.is_set()
        if stats.interrupted:
            stats.stop_reason = "cancelled"
            if not self.text and self._socket is not None:
                self.note = self.note or self._backend.stopped_in_prefill_note()
        elif self.finish_reason in ("length", "stop"):
            stats.stop_reason = "length" if self.finish_reason == "length" else "eos"
        usage = self._usage
        if usage is not None and not self._cancel.is_set():
            if getattr(usage, "completion_tokens", None):
                stats.new_tokens = usage.completion_tokens
            if getattr(usage, "prompt_tokens", None):
                stats.prompt_tokens = usage.prompt_tokens
            details = getattr(usage, "prompt_tokens_details", None)
            if cached := getattr(details, "cached_tokens", None):
                stats.cached_prompt_tokens = cached
        # Counted here only where that is quick: a cancelled cell must return at once.
        quick = self._backend._tokenizer is not None or not self._backend.counts_exactly
        if not stats.prompt_tokens and (quick or not stats.interrupted):
            try:
                stats.prompt_tokens = self._backend.count_tokens(self._messages)
            except Exception:
                stats.prompt_tokens = estimate_tokens(self._messages)


def _check_event_stream(stream: Any, base_url: str) -> None:
    """Refuse a 200 answer that is not server-sent events (a web page, a JSON document) in one
    line, instead of reading it as a stream that ended with no text."""
    response = getattr(stream, "response", None)
    content_type = response.headers.get("content-type", "") if response is not None else ""
    if not content_type or "event-stream" in content_type:
        return  # no type said: read it as a stream
    if looks_like_html(content_type):
        raise ServerError(html_answer_message(base_url))
    try:
        said = " ".join(response.read().decode("utf-8", "replace").split())[:120]
    except Exception:
        said = ""
    raise ServerError(
        f"The server at {base_url} answered the chat request with {content_type}, not a stream "
        f"of server-sent events ({said!r}): check that the URL is an OpenAI-compatible API."
    )


def _abort(stream: Any) -> None:
    """Make the worker's blocked read on ``stream`` return now, and close the connection.

    Shutting the socket down (not closing it from this thread, which would leave the read
    blocked) sends the server a FIN at once; the worker then closes the response itself.
    """
    response = getattr(stream, "response", None)
    network = getattr(response, "extensions", {}).get("network_stream")
    try:
        sock = network.get_extra_info("socket") if network is not None else None
    except Exception:
        sock = None
    if isinstance(sock, socket.socket):
        try:
            sock.shutdown(socket.SHUT_RDWR)
            return
        except OSError:
            pass
    with contextlib.suppress(Exception):
        stream.close()
