"""Replies from a chat server: :class:`ServerBackend`, the ``Backend`` for vLLM, SGLang and co.

Where the in-kernel backend runs the model itself, this one sends the conversation to a server
that speaks the OpenAI chat-completions API (vLLM, SGLang, ``transformers serve``, a hosted
endpoint) and streams the reply back over server-sent events, with the official ``openai``
Python SDK. The model can then live on another machine, or on eight GPUs::

    backend = ServerBackend.connect("http://gpu-box:8000")     # or ".../v1"; one model served
    reply = backend.start([{"role": "user", "content": "Hi"}], GenerationOptions())
    for piece in reply:            # choices[0].delta.content, as the server writes them
        print(piece, end="")
    reply.stats.footer()           # tokens, time to first token, tokens/s

**Connecting** (:meth:`ServerBackend.connect`) asks ``GET /v1/models`` which models are served:
one is used without naming it, a name that is not served is refused with the list. The API key
comes from the environment (``--api-key-env NAME``, else ``QWEN_MAGIC_API_KEY``, else
``OPENAI_API_KEY``, else a placeholder local servers ignore); it never appears in a message, a
repr or a summary. The context length is the server's own where it says it (vLLM and SGLang
put ``max_model_len`` on the model's entry), else ``context_length=``, else the model config's
``max_position_embeddings`` when the model is on this machine (``transformers serve`` names a
model by its folder path; a hub id may be in the local cache), else 4096 with a notice.

**Counting tokens** uses the model's own tokenizer and chat template when it loads from local
files (never ``trust_remote_code``); otherwise :func:`estimate_tokens`, an upper estimate
(UTF-8 bytes / 3, plus each message's and the template's overhead), so trimming errs on the
safe side.

**A reply** (:class:`ServerReply`) does nothing until iterated. Then a worker thread sends the
request and reads the stream into a queue, while the caller's thread takes pieces from the queue
with a short timeout, calling ``on_wait`` between them (a Stop click is seen while the server is
still reading a long prompt). :meth:`ServerReply.cancel` shuts the connection's socket at once,
before the server's headers as after them (the socket is known from the moment it connects:
:mod:`.sockets`): the worker's blocked read returns, and the server sees the
client leave. Ctrl-C while iterating cancels the same way, joins the worker and re-raises, well
within a second. Whether the server stops reading a prompt it has begun is its own affair (vLLM,
SGLang and llama.cpp do; ``transformers serve`` does not): a reply stopped before its first
token elsewhere gets a :attr:`~ServerReply.note` saying the next reply may start late.
``stats.new_tokens`` is the server's ``usage.completion_tokens`` when it sends usage
(``stream_options.include_usage`` is asked for; ``transformers serve`` sends it unasked), else
the number of pieces.

**Content is data**: every message's content goes out with its control-token strings escaped
(:mod:`.guards`), so the server's chat template cannot read them as turn
markers.

**Options** map to the API's fields: ``max_new_tokens`` → ``max_tokens``, greedy →
``temperature: 0``, ``temperature``, ``top_p``, ``seed``; ``top_k`` and ``repetition_penalty``
are not OpenAI fields and go in the body's extras, which vLLM and SGLang read. ``transformers
serve`` rejects those two and only ever turns sampling *off* (temperature 0), so for it they go
in its own ``generation_config`` field, with ``do_sample`` when sampling is asked for. Only what
was set is sent. If a server answers 400/422 to an optional field, the reply is retried once
without the optional fields (the ones the error names, else all), the backend remembers, and
the reply's :attr:`~ServerReply.note` says what was left out.

**Errors** are one line (:class:`~qwen_magic.errors.QwenMagicError`): a server that cannot be
reached (refused, unknown host, timeout) names the URL and what to check; an HTTP error gives
the status and the server's own message; a stream cut mid-reply raises from the iteration with
the partial text still in :attr:`ServerReply.text`, and so does an event that is not JSON. A web
page where the API should be (a wrong path) and ``https://`` to a plain-HTTP server each get
their own line saying what to change. No message shows a URL's userinfo or query. A prompt
longer than the server's context raises :class:`ContextTooLong`, so the chat layer can trim and
try once more. The backend keeps no conversation: each request carries the messages it is given
(vLLM's and SGLang's prefix caches make follow-ups cheap on their side).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ...backend import Messages, ReplyStats
from ...encoding import control_strings
from ...errors import ContextTooLong, QwenMagicError
from ...options import GenerationOptions
from .guards import (
    check_key_variable,
    escaped_messages,
    html_answer_message,
    looks_like_html,
    redact_url,
)
from .sockets import sending_for, shut_down, track, tracking_client

#: Where the API key is looked for when no ``api_key_env`` is given, in this order.
API_KEY_VARIABLES = ("QWEN_MAGIC_API_KEY", "OPENAI_API_KEY")
#: Sent when no key is set: local servers (vLLM without ``--api-key``) ignore it.
PLACEHOLDER_API_KEY = "EMPTY"
#: The context assumed when neither the server nor the model's config says.
DEFAULT_CONTEXT_TOKENS = 4096
#: Longest wait for the next piece of a stream: a long prompt's prefill on a slow server.
STREAM_READ_SECONDS = 600.0
#: How often the reading thread wakes up to call ``on_wait`` while no text comes.
POLL_SECONDS = 0.05
#: How long a cancelled or interrupted reply waits for its worker thread.
JOIN_SECONDS = 1.0
#: The upper estimate of tokens per message: one token per 3 UTF-8 bytes plus the role markers.
ESTIMATE_BYTES_PER_TOKEN = 3
ESTIMATE_MESSAGE_OVERHEAD = 8
#: What a chat template adds around the messages (the generation prompt, a default system line).
ESTIMATE_PROMPT_OVERHEAD = 32

#: Request fields a server may reject, and the option each comes from (for the note).
OPTIONAL_FIELDS = {
    "stream_options": None,  # only asks for usage: leaving it out costs nothing visible
    "seed": "--seed",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "repetition_penalty": "--repetition-penalty",
    "generation_config": "--sample/--top-k/--repetition-penalty",
}
#: Fields the ``openai`` SDK does not know: they travel in ``extra_body``.
EXTRA_BODY_FIELDS = {"top_k", "repetition_penalty", "generation_config"}

TRANSFORMERS_SERVE = "transformers serve"
LLAMA_CPP = "llama.cpp"
#: Servers that drop a request, prompt and all, when its client disconnects: vLLM and SGLang
#: abort it in their engines; llama.cpp's server polls the connection every second and cancels
#: the task between prompt batches. ``transformers serve`` stops only at its next token, so a
#: prompt it is reading is read to the end first (measured here: a 2,830-token prompt stopped
#: at 2 s kept the next reply waiting 20.9 s for its first token, against 0.9 s).
STOPS_READING_ON_DISCONNECT = frozenset({"vLLM", "SGLang", LLAMA_CPP})
#: How a server's answer says the prompt does not fit (vLLM, SGLang, OpenAI, llama.cpp, TGI).
_CONTEXT_TOO_LONG = re.compile(
    r"maximum context length|context length|context_length_exceeded|maximum model length"
    r"|context window|prompt is too long|too many (input )?tokens|exceeds the available context",
    re.IGNORECASE,
)
_CONTEXT_LIMIT = re.compile(
    r"(?:maximum context length is|maximum model length of|context length of|"
    r"context length \()\s*(\d+)",
    re.IGNORECASE,
)


class ServerError(QwenMagicError):
    """The server answered with an HTTP error; ``status_code`` is its status (0: no answer)."""

    def __init__(self, message: str, status_code: int = 0) -> None:
        super().__init__(message)
        self.status_code = status_code


def normalize_url(url: str) -> str:
    """The API's base URL for ``url``: ``http://host:port`` and ``.../v1`` both give ``.../v1``.

    A pasted endpoint (``.../v1/chat/completions``) is trimmed to its base. Anything that is not
    an http(s) URL with a host is a one-line :class:`QwenMagicError`; its messages never show
    the URL's userinfo or query (:func:`.guards.redact_url`).
    """
    text = url.strip()
    shown = repr(redact_url(text))
    if "://" not in text:
        raise QwenMagicError(
            f"{shown} is not a server URL: give it with its scheme, e.g. "
            f"http://{redact_url('//' + text)[2:] or 'HOST'}{'' if ':' in text else ':8000'}."
        )
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - parsing the port is what raises for a bad one
    except ValueError as error:
        why = "its port must be a number" if "port" in str(error).lower() else "it does not parse"
        raise QwenMagicError(f"{shown} is not a valid URL ({why}).") from None
    if parts.scheme not in ("http", "https"):
        raise QwenMagicError(
            f"{shown}: the server URL must start with http:// or https:// (got {parts.scheme}://)."
        )
    if not parts.hostname:
        raise QwenMagicError(f"{shown} has no host: give it as http://HOST:PORT.")
    if parts.username or parts.password:
        raise QwenMagicError(
            f"{shown}: put no credentials in the server URL; set the API key in an environment "
            "variable (--api-key-env NAME, or QWEN_MAGIC_API_KEY)."
        )
    if parts.query or parts.fragment:
        raise QwenMagicError(
            f"{shown}: the server URL takes no query (?…) or fragment (#…); put an API key in "
            "an environment variable (--api-key-env NAME, or QWEN_MAGIC_API_KEY)."
        )
    path = parts.path.rstrip("/")
    for endpoint in ("/chat/completions", "/completions", "/models"):
        if path.endswith(endpoint):
            path = path[: -len(endpoint)]
            break
    if not path.endswith("/v1"):
        path += "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def estimate_tokens(messages: Messages) -> int:
    """An upper estimate of the tokens ``messages`` take as a chat prompt, without a tokenizer.

    One token per 3 UTF-8 bytes (Qwen's tokenizer averages about 4 on English and code and
    3 or more on Chinese), plus each message's role markers and what a template adds.
    """
    total = ESTIMATE_PROMPT_OVERHEAD
    for message in messages:
        content = message.get("content") or ""
        total += ESTIMATE_MESSAGE_OVERHEAD + math.ceil(
            len(content.encode("utf-8")) / ESTIMATE_BYTES_PER_TOKEN
        )
    return total


def api_key_from_environment(api_key_env: str | None = None) -> tuple[str, str | None]:
    """The API key and the variable it came from (``None``: the placeholder).

    ``api_key_env`` names the variable to read; it must then be set. Without it,
    ``QWEN_MAGIC_API_KEY`` and then ``OPENAI_API_KEY`` are tried.
    """
    if api_key_env:
        check_key_variable(api_key_env)
        value = os.environ.get(api_key_env, "")
        if not value:
            raise QwenMagicError(
                f"The environment variable {api_key_env} is not set (or is empty): set it to "
                "the server's API key, e.g. with %env, before connecting."
            )
        return value, api_key_env
    for variable in API_KEY_VARIABLES:
        if value := os.environ.get(variable, ""):
            return value, variable
    return PLACEHOLDER_API_KEY, None


class ServerBackend:
    """A model served over the OpenAI chat-completions API; make one with :meth:`connect`."""

    def __init__(
        self,
        client: Any,
        *,
        base_url: str,
        model_id: str,
        server_kind: str,
        context_tokens: int,
        tokenizer_source: str | None,
        key_variable: str | None,
        api_key: str,
    ) -> None:
        self._client = client
        self.base_url = base_url
        #: The model's id as the server names it (sent with every request).
        self.model_id = model_id
        #: A short name for display: a folder path's last part, else the id.
        self.name = display_name(model_id)
        #: "vLLM", "SGLang", "transformers serve" or "OpenAI-compatible server".
        self.server_kind = server_kind
        self._context_tokens = context_tokens
        self._tokenizer_source = tokenizer_source
        self._tokenizer: Any = None
        self._key_variable = key_variable
        self._secret = api_key if key_variable else ""
        #: Optional request fields the server rejected; left out of later requests.
        self.unsupported_fields: set[str] = set()
        self._said: set[str] = set()
        self._lock = threading.Lock()
        self._replies: weakref.WeakSet[ServerReply] = weakref.WeakSet()
        self._closed = False

    @classmethod
    def connect(
        cls,
        url: str,
        model: str | None = None,
        *,
        api_key_env: str | None = None,
        context_length: int | None = None,
        timeout: float = 10.0,
        progress: Callable[[str], None] | None = print,
        http_client: Any = None,
    ) -> ServerBackend:
        """Connect to the server at ``url`` and pick the model to chat with.

        ``model`` None uses the one model the server lists (several: a one-line error listing
        them). ``context_length`` is used where the server does not report its own, and caps
        it where it does. ``timeout`` bounds connecting (and listing the models); a reply's
        stream may then wait up to :data:`STREAM_READ_SECONDS` between pieces. ``http_client``
        (an ``httpx`` client) replaces the SDK's own, e.g. with a mock transport in tests.
        """
        base_url = normalize_url(url)
        if context_length is not None and context_length < 2:
            raise QwenMagicError(f"--context-length must be at least 2 (got {context_length}).")
        api_key, key_variable = api_key_from_environment(api_key_env)
        try:
            import openai
        except ImportError:
            raise QwenMagicError(
                "Talking to a server needs the openai package: pip install 'qwen_magic[server]'."
            ) from None
        client = openai.OpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=0,  # one clear line now beats three silent tries with back-off
            timeout=openai.Timeout(STREAM_READ_SECONDS, connect=timeout),
            # Each reply's socket is known from its first byte, so a cancel can always cut it.
            http_client=track(http_client) if http_client is not None else tracking_client(),
        )
        secret = api_key if key_variable else ""
        try:
            listed = _served_models(client, timeout, base_url, key_variable, secret)
            entry = _choose_model(listed, model, base_url)
        except BaseException:
            client.close()
            raise
        model_id = entry.get("id") or model
        kind = server_kind(entry)
        candidates = [c for c in (model_id, entry.get("root")) if isinstance(c, str) and c]
        context_tokens = _context_from_entry(entry)
        if context_tokens is not None:
            if context_length is not None:
                context_tokens = min(context_tokens, context_length)
        elif context_length is not None:
            context_tokens = context_length
        else:
            context_tokens = _context_from_local_config(candidates)
            if context_tokens is None:
                context_tokens = DEFAULT_CONTEXT_TOKENS
                if progress is not None:
                    progress(
                        f"The server does not say its context length and {display_name(model_id)}"
                        f"'s config is not on this machine: assuming {DEFAULT_CONTEXT_TOKENS} "
                        "tokens (give --context-length N to set it)."
                    )
        backend = cls(
            client,
            base_url=base_url,
            model_id=model_id,
            server_kind=kind,
            context_tokens=context_tokens,
            tokenizer_source=_local_tokenizer_source(candidates),
            key_variable=key_variable,
            api_key=api_key,
        )
        if progress is not None:
            progress(backend.summary())
        return backend

    # ----- what the chat layer asks -----

    def summary(self) -> str:
        """One line: the model, the server's URL and kind, the context."""
        counting = "" if self._tokenizer_source else "; token counts are estimates"
        return (
            f"Connected to {self.name} at {self.base_url} ({self.server_kind}), "
            f"context {self._context_tokens} tokens{counting}"
        )

    def context_length(self, options: GenerationOptions) -> int:
        """The server's context in tokens (``options.fast`` changes nothing on a server)."""
        return self._context_tokens

    def context_advice(self, options: GenerationOptions) -> str:
        """Nothing to add: the context is the server's to set."""
        return ""

    def count_tokens(self, messages: Messages) -> int:
        """Tokens of ``messages`` as a prompt: exact with the model's local tokenizer, else
        :func:`estimate_tokens` (an upper estimate)."""
        tokenizer = self._load_tokenizer()
        if tokenizer is None:
            return estimate_tokens(messages)
        encoded = tokenizer.apply_chat_template(
            self._as_data(messages), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return len(encoded["input_ids"])

    @property
    def counts_exactly(self) -> bool:
        """Whether :meth:`count_tokens` uses the model's tokenizer (else it estimates)."""
        return self._tokenizer_source is not None

    def notices(self, options: GenerationOptions) -> list[str]:
        """Lines to show before a reply, each once: ``--fast`` does nothing here; options the
        server is known to reject."""
        lines = []
        if options.fast:
            lines.append("--fast has no effect on a server: its engine decides how to decode.")
        requested = self._request_fields([], options, leave_out_unsupported=False)
        if dropped := [
            name
            for name in OPTIONAL_FIELDS
            if name in requested and name in self.unsupported_fields
        ]:
            lines.append(self._left_out_note(dropped, "they are left out"))
        fresh = [line for line in lines if line and line not in self._said]
        self._said.update(fresh)
        return fresh

    def start(
        self,
        messages: Messages,
        options: GenerationOptions,
        *,
        conversation: Hashable | None = None,
    ) -> ServerReply:
        """A reply to ``messages``; the request is sent when it is first iterated.

        ``conversation`` is not used: the server's own prefix cache (vLLM, SGLang) finds the
        shared start of a follow-up.
        """
        if self._closed:
            raise QwenMagicError("This server connection is closed: connect again (%qwen_load).")
        reply = ServerReply(self, list(messages), options)
        self._replies.add(reply)
        return reply

    def forget_conversations(self) -> None:
        """Nothing is kept per conversation."""

    def close(self) -> None:
        """Cancel replies still streaming and close the HTTP client."""
        self._closed = True
        for reply in list(self._replies):
            reply.cancel()
        self._client.close()

    def stopped_in_prefill_note(self) -> str | None:
        """What to say under a reply stopped before its first token: whether the server may
        still be reading its prompt (None where the server drops it when the client leaves)."""
        if self.server_kind in STOPS_READING_ON_DISCONNECT:
            return None
        who = f" ({self.server_kind})" if self.server_kind == TRANSFORMERS_SERVE else ""
        return (
            f"The server{who} may still be reading the prompt (it stops only at its first "
            "token): its next reply can start late."
        )

    def __repr__(self) -> str:
        return f"<ServerBackend {self.model_id!r} at {self.base_url} ({self.server_kind})>"

    # ----- requests -----

    def _request_fields(
        self, messages: Messages, options: GenerationOptions, *, leave_out_unsupported: bool = True
    ) -> dict[str, Any]:
        """The JSON body for a streamed reply: only what was set, less what the server rejects."""
        fields: dict[str, Any] = {
            "model": self.model_id,
            "messages": self._as_data(messages),
            "stream": True,
            "max_tokens": options.max_new_tokens,
        }
        sampling = options.sampling
        if sampling is False:
            fields["temperature"] = 0.0
        else:
            if options.temperature is not None:
                fields["temperature"] = options.temperature
            if options.top_p is not None:
                fields["top_p"] = options.top_p
        if options.seed is not None:
            fields["seed"] = options.seed
        if self.server_kind == TRANSFORMERS_SERVE:
            # Its own dialect: generate() settings as JSON; temperature alone never turns
            # sampling on there. It sends usage in the last chunk without stream_options.
            settings: dict[str, Any] = {}
            if sampling:
                settings["do_sample"] = True
            if options.top_k is not None and sampling is not False:
                settings["top_k"] = options.top_k
            if options.repetition_penalty is not None:
                settings["repetition_penalty"] = options.repetition_penalty
            if settings:
                fields["generation_config"] = json.dumps(settings)
        else:
            fields["stream_options"] = {"include_usage": True}
            if options.top_k is not None and sampling is not False:
                fields["top_k"] = options.top_k
            if options.repetition_penalty is not None:
                fields["repetition_penalty"] = options.repetition_penalty
        if leave_out_unsupported:
            for name in self.unsupported_fields:
                fields.pop(name, None)
        return fields

    def _as_data(self, messages: Messages) -> Messages:
        """``messages`` with the control tokens' text escaped, so the server's template cannot
        read a message's content as turn markers: every ``<|…|>``, and the tokenizer's other
        special tokens where it is loaded (not loaded here: a reply must not wait for it)."""
        tokenizer = self._tokenizer
        return escaped_messages(messages, control_strings(tokenizer) if tokenizer else ())

    def _open_stream(self, fields: dict[str, Any]) -> tuple[Any, str | None]:
        """Send the request; on a 400/422 about optional fields, retry once without them.

        Returns the SDK's stream and a note saying what was left out (or None).
        """
        import openai

        try:
            return self._create(fields), None
        except openai.APIStatusError as error:
            message = server_message(error)
            if error.status_code not in (400, 422) or _CONTEXT_TOO_LONG.search(message):
                raise
            optional = [name for name in OPTIONAL_FIELDS if name in fields]
            named = [name for name in optional if name in message]
            dropped = named or optional
            if not dropped:
                raise
        stream = self._create({k: v for k, v in fields.items() if k not in dropped})
        with self._lock:  # only a retry that worked shows the fields were the trouble
            self.unsupported_fields.update(dropped)
        shown = [name for name in dropped if OPTIONAL_FIELDS[name]]
        note = self._left_out_note(shown, "this reply was written without them") if shown else None
        if note:
            self._said.add(self._left_out_note(shown, "they are left out"))
        return stream, note

    def _create(self, fields: dict[str, Any]) -> Any:
        body = {k: v for k, v in fields.items() if k not in EXTRA_BODY_FIELDS}
        extra = {k: v for k, v in fields.items() if k in EXTRA_BODY_FIELDS}
        return self._client.chat.completions.create(**body, extra_body=extra or None)

    def _left_out_note(self, fields: list[str], consequence: str) -> str:
        flags = ", ".join(dict.fromkeys(OPTIONAL_FIELDS[name] or name for name in fields))
        return f"The server at {self.base_url} does not accept {flags}: {consequence}."

    def _load_tokenizer(self) -> Any:
        """The model's tokenizer from local files, loaded once (None: estimate instead)."""
        if self._tokenizer is None and self._tokenizer_source is not None:
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(
                    self._tokenizer_source, local_files_only=True, trust_remote_code=False
                )
                if not getattr(tokenizer, "chat_template", None):
                    raise ValueError("no chat template")
                self._tokenizer = tokenizer
            except Exception:
                self._tokenizer_source = None  # counted by estimate from now on
        return self._tokenizer

    def _error(self, error: BaseException) -> QwenMagicError:
        """``error`` from the SDK as one line for the user (the API key never in it)."""
        return describe_error(error, self.base_url, self._key_variable, self._secret)

    def _learn_limit(self, limit: int | None) -> None:
        if limit is not None and 2 <= limit < self._context_tokens:
            self._context_tokens = limit


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
            fields = backend._request_fields(self._messages, self._options)
            with sending_for(self):
                stream, note = backend._open_stream(fields)
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

        broken = isinstance(error, openai.APIConnectionError) or _is_transport_error(error)
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


# ----- connecting -----


def display_name(model_id: str) -> str:
    """A model id for display: a folder path's last part (``transformers serve`` names models
    by path), else the id itself."""
    if model_id.startswith(("/", "./", "../", "~")) or Path(model_id).is_dir():
        return Path(model_id.rstrip("/")).name or model_id
    return model_id


def server_kind(entry: dict[str, Any]) -> str:
    """Which server serves a ``/v1/models`` entry, from what each puts there."""
    owner = str(entry.get("owned_by", "")).lower()
    if owner == "vllm":
        return "vLLM"
    if owner == "sglang":
        return "SGLang"
    if owner == "llamacpp":
        return LLAMA_CPP
    if isinstance(entry.get("status"), dict) and "value" in entry["status"]:
        return TRANSFORMERS_SERVE  # its own non-OpenAI field: whether the model is in memory
    return "OpenAI-compatible server"


def _served_models(
    client: Any, timeout: float, base_url: str, key_variable: str | None, secret: str
) -> list[dict[str, Any]] | None:
    """The ``/v1/models`` entries as dicts (None: the server has no such endpoint)."""
    import openai

    try:
        raw = client.models.with_raw_response.list(timeout=timeout)
    except openai.NotFoundError as error:
        if looks_like_html(error.response.headers.get("content-type"), error.response.text):
            raise ServerError(html_answer_message(base_url), 404) from None
        return None
    except openai.OpenAIError as error:
        raise describe_error(error, base_url, key_variable, secret) from None
    answer = raw.http_response
    content_type = answer.headers.get("content-type", "")
    if looks_like_html(content_type, answer.text):
        raise ServerError(html_answer_message(base_url))
    try:
        return [model.to_dict() for model in raw.parse().data]
    except Exception:  # JSON of another shape, or not JSON: not the OpenAI API either
        said = " ".join(answer.text.split())[:120]
        raise ServerError(
            f"{base_url}/models answered with {content_type or 'no content type'} that is not "
            f"the OpenAI API's model list ({redact(said, secret)!r}): check the URL (it "
            "usually ends in :PORT or /v1)."
        ) from None


def _choose_model(
    listed: list[dict[str, Any]] | None, model: str | None, base_url: str
) -> dict[str, Any]:
    if listed is None:
        if model is None:
            raise QwenMagicError(
                f"The server at {base_url} does not list its models (GET /v1/models: 404): check "
                "the URL (it usually ends in :PORT or /v1), or name the model, e.g. "
                f"%qwen_load --server {base_url} MODEL."
            )
        return {"id": model}
    ids = [str(entry.get("id")) for entry in listed]
    if not ids:
        raise QwenMagicError(f"The server at {base_url} serves no model yet: is it still loading?")
    if model is None:
        if len(ids) == 1:
            return listed[0]
        raise QwenMagicError(
            f"The server at {base_url} serves {len(ids)} models: name one of {_listing(ids)}."
        )
    if model in ids:
        return listed[ids.index(model)]
    # A folder's name stands for its path (transformers serve), case aside for hub ids.
    matches = [
        entry
        for entry, served in zip(listed, ids, strict=True)
        if display_name(served) == model or served.lower() == model.lower()
    ]
    if len(matches) == 1:
        return matches[0]
    raise QwenMagicError(
        f"The server at {base_url} does not serve {model!r}; it serves {_listing(ids)}."
    )


def _listing(ids: list[str], most: int = 8) -> str:
    shown = ", ".join(ids[:most])
    return shown if len(ids) <= most else f"{shown} and {len(ids) - most} more"


def _context_from_entry(entry: dict[str, Any]) -> int | None:
    for key in ("max_model_len", "context_length", "context_window", "max_context_length"):
        value = entry.get(key)
        if isinstance(value, int) and value >= 2:
            return value
    return None


def _local_file(model: str, filename: str) -> Path | None:
    """``filename`` of ``model`` on this machine: in its folder, or in the hub cache."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        path = folder / filename
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, filename)
    except Exception:  # not a repo id, no huggingface_hub: not on this machine
        return None
    return Path(found) if isinstance(found, str) else None


def _context_from_local_config(candidates: list[str]) -> int | None:
    for model in candidates:
        path = _local_file(model, "config.json")
        if path is None:
            continue
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for section in (config, config.get("text_config") or {}):
            for key in ("max_position_embeddings", "max_sequence_length", "n_positions"):
                if isinstance(section.get(key), int) and section[key] >= 2:
                    return section[key]
    return None


def _local_tokenizer_source(candidates: list[str]) -> str | None:
    for model in candidates:
        if _local_file(model, "tokenizer_config.json") or _local_file(model, "tokenizer.json"):
            folder = Path(model).expanduser()
            return str(folder) if folder.is_dir() else model
    return None


# ----- errors -----


def server_message(error: Any) -> str:
    """The server's own words from an SDK error: the body's message/detail, in one line."""
    body = getattr(error, "body", None)
    text = _message_from_body(body)
    if not text:
        response = getattr(error, "response", None)
        try:
            text = response.text if response is not None else ""
        except Exception:
            text = ""
    if not text:
        text = getattr(error, "message", "") or str(error)
    return " ".join(str(text).split())[:400]


def _message_from_body(body: Any) -> str:
    if isinstance(body, str):
        return body
    if isinstance(body, list):  # FastAPI's validation errors
        return "; ".join(_message_from_body(item) for item in body)
    if isinstance(body, dict):
        for key in ("message", "detail", "error", "msg"):
            if body.get(key):
                return _message_from_body(body[key])
    return ""


def redact(text: str, secret: str) -> str:
    """``text`` with ``secret`` (and any 8-character piece of it) replaced by ``***``."""
    if not secret:
        return text
    text = text.replace(secret, "***")
    for start in range(max(0, len(secret) - 7)):
        piece = secret[start : start + 8]
        if len(piece) == 8 and piece in text:
            text = text.replace(piece, "***")
    return text


def describe_error(
    error: BaseException, base_url: str, key_variable: str | None = None, secret: str = ""
) -> QwenMagicError:
    """An ``openai`` SDK error as one line that says what to check.

    ``key_variable`` names where the key came from (its value, ``secret``, is scrubbed from
    whatever the server said).
    """
    import openai

    if isinstance(error, openai.APITimeoutError):
        return ServerError(
            f"The server at {base_url} did not answer in time: check that it is up and not "
            "overloaded (a first request may wait for the model to load)."
        )
    if isinstance(error, openai.APIConnectionError):
        cause = _cause_text(error)
        if "refused" in cause.lower():
            why = "connection refused: is the server running, on this host and port?"
        elif any(
            words in cause.lower()
            for words in ("name or service", "nodename", "getaddrinfo", "name resolution")
        ):
            host = urlsplit(base_url).hostname
            why = f"the host name {host!r} is unknown: check the URL's spelling"
        elif "ssl" in cause.lower() or "record layer" in cause.lower():
            hint = " try http:// instead" if base_url.startswith("https:") else " check the server"
            return ServerError(
                f"Cannot reach the server at {base_url}: the TLS (https) handshake failed "
                f"({_ssl_reason(cause)}); if the server speaks plain HTTP,{hint}."
            )
        elif "timed out" in cause.lower():
            why = "it timed out: check the host, port and any firewall"
        else:
            why = f"{redact(cause, secret) or 'no connection'}: check the URL and the server"
        return ServerError(f"Cannot reach the server at {base_url} ({why}).")
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        with contextlib.suppress(Exception):
            if looks_like_html(error.response.headers.get("content-type"), error.response.text):
                return ServerError(html_answer_message(base_url), status)
        said = redact(server_message(error), secret)
        if _CONTEXT_TOO_LONG.search(said):
            match = _CONTEXT_LIMIT.search(said)
            return ContextTooLong(
                f"The conversation is too long for the server's context: {said}",
                int(match.group(1)) if match else None,
            )
        if status in (401, 403):
            where = (
                f"${key_variable}"
                if key_variable
                else "an environment variable (QWEN_MAGIC_API_KEY, or --api-key-env NAME)"
            )
            verb = "refused the API key" if status == 401 else "denied access"
            return ServerError(
                f"The server at {base_url} {verb} ({status}: {said}): set the right key in "
                f"{where}.",
                status,
            )
        if status == 404:
            return ServerError(
                f"The server at {base_url} answered 404 ({said}): check the URL (the API's base, "
                "usually ending in /v1) and the model name.",
                status,
            )
        if status >= 500:
            return ServerError(
                f"The server at {base_url} failed ({status}: {said}): see the server's log.",
                status,
            )
        return ServerError(
            f"The server at {base_url} refused the request ({status}: {said}).", status
        )
    if isinstance(error, openai.APIError):  # an error event in the middle of the stream
        said = redact(server_message(error), secret)
        if _CONTEXT_TOO_LONG.search(said):
            return ContextTooLong(f"The conversation is too long for the server's context: {said}")
        return ServerError(f"The server at {base_url} reported an error mid-reply: {said}")
    return ServerError(f"The server at {base_url} could not be used: {type(error).__name__}.")


def _cause_text(error: BaseException) -> str:
    """The innermost causes' messages (where "connection refused" is said)."""
    parts = []
    seen = error
    while seen is not None and len(parts) < 6:
        if (text := str(seen)) and text not in parts:
            parts.append(text)
        seen = seen.__cause__ or seen.__context__
    return " / ".join(parts[1:] or parts)


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


def _ssl_reason(cause: str) -> str:
    """The SSL library's own reason, said once: ``[SSL: WRONG_VERSION_NUMBER] …`` -> that."""
    match = re.search(r"\[SSL: ?([A-Z_]+)\]|(record layer failure|wrong version number)", cause)
    if match:
        return (match.group(1) or match.group(2)).replace("_", " ").lower()
    return cause.split(" / ")[0][:120] or "an SSL error"


def _is_transport_error(error: BaseException) -> bool:
    """Whether ``error`` is the HTTP library's own (older SDKs let a stream's errors through)."""
    package = type(error).__module__.partition(".")[0]
    return package in ("httpx", "httpx2", "httpcore", "httpcore2") and not isinstance(
        error, (TypeError, ValueError, AttributeError)
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
