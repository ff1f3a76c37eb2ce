"""One reply streaming from a server: :class:`ServerReply`.

**A reply** (:class:`ServerReply`) does nothing until iterated. Then a worker thread sends the
request and reads the stream into a queue, while the caller's thread takes pieces from the queue
with a short timeout, yielding a ``Waiting`` event between them (a Stop click is seen while the
server is still reading a long prompt). :meth:`ServerReply.cancel` shuts the connection's socket at
once,
before the server's headers as after them (the socket is known from the moment it connects:
:mod:`.sockets`): the worker's blocked read returns, and the server sees the client leave.
Ctrl-C while iterating cancels the same way, joins the worker and re-raises, well within a
second. Whether the server stops reading a prompt it has begun is its own affair (vLLM,
SGLang and llama.cpp do; ``transformers serve`` does not): a reply stopped before its first
token elsewhere gets a :attr:`~ServerReply.note` saying the next reply may start late.
``stats.new_tokens`` is the server's ``usage.completion_tokens`` when it sends usage
(``stream_options.include_usage`` is asked for; ``transformers serve`` sends it unasked), else
the number of pieces. The worker thread, the queue and the held interrupts are
:class:`~qwen_magic.backends.base.ThreadedReply`'s, shared with the in-kernel reply.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qwen_magic.backends.base import Messages, Notice, ReplyStats, ThreadedReply
from qwen_magic.backends.server.connect import estimate_tokens
from qwen_magic.backends.server.dialects import open_stream, request_fields
from qwen_magic.backends.server.errors import ServerError, is_transport_error
from qwen_magic.backends.server.guards import html_answer_message, looks_like_html
from qwen_magic.backends.server.sockets import sending_for, shut_down
from qwen_magic.errors import ContextTooLong, QwenMagicError
from qwen_magic.options import GenerationOptions

if TYPE_CHECKING:
    from .connect import ServerBackend

#: How often the reading thread wakes up to call ``on_wait`` while no text comes.
POLL_SECONDS = 0.05
#: How long a cancelled or interrupted reply waits for its worker thread.
JOIN_SECONDS = 1.0


class ServerReply(ThreadedReply):
    """One reply streaming from the server: iterate it for events (once)."""

    #: A cancelled reply waits at most this long for its worker (one blocked in a TCP connect
    #: that no socket can cut yet ends at the connect timeout, holding nothing).
    join_seconds = JOIN_SECONDS
    #: The SDK's errors can quote the request (a key a server echoed): the one-line error
    #: says all there is to say.
    chain_errors = False

    def __init__(
        self, backend: ServerBackend, messages: Messages, options: GenerationOptions
    ) -> None:
        super().__init__(ReplyStats())
        self._backend = backend
        self._messages = messages
        self._options = options
        #: Why the server stopped: "stop", "length", … (None: cancelled, cut or not yet ended).
        self.finish_reason: str | None = None
        self._stream_lock = threading.Lock()
        self._stream: Any = None
        self._socket: socket.socket | None = None
        self._usage: Any = None
        self._streaming = False

    @property
    def note(self) -> str | None:
        """The lines said with this reply, as one (options left out, a server still reading)."""
        return (
            "; ".join(str(notice.facts.get("text", notice.code)) for notice in self.notes) or None
        )

    def _abort(self) -> None:
        """Cut the connection now, before or after the server's first byte: the worker's read
        returns and the server sees the client leave; the text so far is kept."""
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

    def _produce(self, emit: Callable[[str], None]) -> None:
        """The worker: send the request and hand each piece of text over."""
        backend = self._backend
        stream = None
        try:
            if self.cancelled:
                return  # cancelled before it was sent: send nothing
            fields = request_fields(backend, self._messages, self._options)
            with sending_for(self):
                stream, note = open_stream(backend, fields)
            self._streaming = True
            _check_event_stream(stream, backend.base_url)
            if note:
                self.notes.append(Notice("line", {"text": note}))
            with self._stream_lock:
                self._stream = stream
            for chunk in stream:
                if self.cancelled:
                    break
                if getattr(chunk, "usage", None) is not None:
                    self._usage = chunk.usage
                for choice in chunk.choices or ():
                    if choice.index != 0:
                        continue
                    if content := getattr(choice.delta, "content", None):
                        emit(content)
                    if choice.finish_reason:
                        self.finish_reason = choice.finish_reason
        except BaseException:
            if self.cancelled:
                return  # we cut it ourselves: not an error
            raise
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
        if self.finish_reason is None and not self.cancelled:
            raise QwenMagicError(
                f"The server at {backend.base_url} ended the stream before the reply was "
                "finished: see the server's log; the partial reply is kept."
            )

    def _on_text(self, text: str) -> None:
        if self.stats.first_token_seconds is None:
            self.stats.first_token_seconds = time.perf_counter() - self._started
        self.stats.new_tokens += 1  # replaced by the server's count when it sends one

    def _explain(self, error: BaseException) -> BaseException:
        return self._as_user_error(error, self._streaming)

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

    def _settle(self) -> None:
        """How the reply ended, and what it cost (the server's own count where it sent one)."""
        stats = self.stats
        if stats.interrupted:
            stats.stop_reason = "cancelled"
            silent = not self.text and self._socket is not None and not self.notes
            if silent and (note := self._backend.stopped_in_prefill_note()):
                self.notes.append(Notice("line", {"text": note}))
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
    if response is None or not content_type or "event-stream" in content_type:
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
