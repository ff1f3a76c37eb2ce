"""Connecting to a chat server: :class:`ServerBackend`, what the chat layer asks of it.

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

The backend keeps no conversation: each request carries the messages it is given (vLLM's and
SGLang's prefix caches make follow-ups cheap on their side).
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from qwen_magic.backends.base import BackendInfo, Messages, Notice
from qwen_magic.backends.server.dialects import (
    OPTIONAL_FIELDS,
    content_as_data,
    left_out_note,
    request_fields,
)
from qwen_magic.backends.server.discovery import (
    STOPS_READING_ON_DISCONNECT,
    TRANSFORMERS_SERVE,
    choose_model,
    context_from_entry,
    context_from_local_config,
    display_name,
    local_tokenizer_source,
    served_models,
    server_kind,
)
from qwen_magic.backends.server.errors import describe_error
from qwen_magic.backends.server.guards import check_key_variable, redact_url
from qwen_magic.backends.server.sockets import track, tracking_client
from qwen_magic.errors import QwenMagicError
from qwen_magic.options import GenerationOptions

if TYPE_CHECKING:
    from .reply import ServerReply

#: Where the API key is looked for when no ``api_key_env`` is given, in this order.
API_KEY_VARIABLES = ("QWEN_MAGIC_API_KEY", "OPENAI_API_KEY")
#: Sent when no key is set: local servers (vLLM without ``--api-key``) ignore it.
PLACEHOLDER_API_KEY = "EMPTY"
#: The context assumed when neither the server nor the model's config says.
DEFAULT_CONTEXT_TOKENS = 4096
#: Longest wait for the next piece of a stream: a long prompt's prefill on a slow server.
STREAM_READ_SECONDS = 600.0
#: The upper estimate of tokens per message: one token per 3 UTF-8 bytes plus the role markers.
ESTIMATE_BYTES_PER_TOKEN = 3
ESTIMATE_MESSAGE_OVERHEAD = 8
#: What a chat template adds around the messages (the generation prompt, a default system line).
ESTIMATE_PROMPT_OVERHEAD = 32


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
            listed = served_models(client, timeout, base_url, key_variable, secret)
            entry = choose_model(listed, model, base_url)
        except BaseException:
            client.close()
            raise
        model_id = str(entry.get("id") or model)
        kind = server_kind(entry)
        candidates = [c for c in (model_id, entry.get("root")) if isinstance(c, str) and c]
        context_tokens = context_from_entry(entry)
        if context_tokens is not None:
            if context_length is not None:
                context_tokens = min(context_tokens, context_length)
        elif context_length is not None:
            context_tokens = context_length
        else:
            context_tokens = context_from_local_config(candidates)
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
            tokenizer_source=local_tokenizer_source(candidates),
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

    def context_advice(self, options: GenerationOptions) -> list[Notice]:
        """Nothing to add: the context is the server's to set."""
        return []

    def info(self) -> BackendInfo:
        return BackendInfo(kind="server", name=self.name, location=self.base_url)

    def count_tokens(self, messages: Messages) -> int:
        """Tokens of ``messages`` as a prompt: exact with the model's local tokenizer, else
        :func:`estimate_tokens` (an upper estimate)."""
        tokenizer = self._load_tokenizer()
        if tokenizer is None:
            return estimate_tokens(messages)
        encoded = tokenizer.apply_chat_template(
            content_as_data(messages, tokenizer),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )
        return len(encoded["input_ids"])

    @property
    def counts_exactly(self) -> bool:
        """Whether :meth:`count_tokens` uses the model's tokenizer (else it estimates)."""
        return self._tokenizer_source is not None

    def notices(self, options: GenerationOptions) -> list[Notice]:
        """Lines to show before a reply, each once: ``--fast`` does nothing here; options the
        server is known to reject."""
        lines = []
        if options.fast:
            lines.append("--fast has no effect on a server: its engine decides how to decode.")
        requested = request_fields(self, [], options, leave_out_unsupported=False)
        if dropped := [
            name
            for name in OPTIONAL_FIELDS
            if name in requested and name in self.unsupported_fields
        ]:
            lines.append(left_out_note(self.base_url, dropped, "they are left out"))
        fresh = [line for line in lines if line and line not in self._said]
        self._said.update(fresh)
        return [Notice("line", {"text": line}) for line in fresh]

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
        from .reply import ServerReply  # it imports this module

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


class ServerRequest:
    """A server to connect to (what ``%qwen_load --server URL`` asks the session for)."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        *,
        api_key_env: str | None = None,
        context_length: int | None = None,
    ) -> None:
        self.url, self.model = url, model
        self.api_key_env, self.context_length = api_key_env, context_length

    def is_open_in(self, backend: Any) -> bool:
        """Connected to the same server and model already (and no new context asked for)."""
        return (
            isinstance(backend, ServerBackend)
            and backend.base_url == normalize_url(self.url)
            and self.model in (None, backend.model_id)
            and self.context_length is None
        )

    def open(self, current: Any, release_current: Callable[[], Any]) -> ServerBackend:
        """Connect first (a wrong URL or model leaves the current backend in use), then let the
        current one go."""
        backend = ServerBackend.connect(
            self.url,
            self.model,
            api_key_env=self.api_key_env,
            context_length=self.context_length,
            progress=None,
        )
        release_current()
        return backend


def request(url: str, model: str | None = None, **how: Any) -> ServerRequest:
    """The registry's factory for servers."""
    return ServerRequest(url, model, **how)
