"""A server's errors, and the SDK's, as one line each that says what to check.

**Errors** are one line (:class:`~qwen_magic.errors.QwenMagicError`): a server that cannot be
reached (refused, unknown host, timeout) names the URL and what to check; an HTTP error gives
the status and the server's own message; a stream cut mid-reply raises from the iteration with
the partial text still in :attr:`.reply.ServerReply.text`, and so does an event that is not
JSON. A web page where the API should be (a wrong path) and ``https://`` to a plain-HTTP server
each get their own line saying what to change. No message shows a URL's userinfo or query. A prompt
longer than the server's context raises :class:`~qwen_magic.errors.ContextTooLong`, so the chat
layer can trim and try once more. The API key, where the server echoes it, is scrubbed
(:func:`redact`).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any
from urllib.parse import urlsplit

from qwen_magic.backends.server.guards import html_answer_message, looks_like_html
from qwen_magic.errors import ContextTooLong, QwenMagicError

#: How a server's answer says the prompt does not fit (vLLM, SGLang, OpenAI, llama.cpp, TGI).
CONTEXT_TOO_LONG = re.compile(
    r"maximum context length|context length|context_length_exceeded|maximum model length"
    r"|context window|prompt is too long|too many (input )?tokens|exceeds the available context",
    re.IGNORECASE,
)
CONTEXT_LIMIT = re.compile(
    r"(?:maximum context length is|maximum model length of|context length of|"
    r"context length \()\s*(\d+)",
    re.IGNORECASE,
)


class ServerError(QwenMagicError):
    """The server answered with an HTTP error; ``status_code`` is its status (0: no answer)."""

    def __init__(self, message: str, status_code: int = 0) -> None:
        super().__init__(message)
        self.status_code = status_code


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
        if CONTEXT_TOO_LONG.search(said):
            match = CONTEXT_LIMIT.search(said)
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
        if CONTEXT_TOO_LONG.search(said):
            return ContextTooLong(f"The conversation is too long for the server's context: {said}")
        return ServerError(f"The server at {base_url} reported an error mid-reply: {said}")
    return ServerError(f"The server at {base_url} could not be used: {type(error).__name__}.")


def _cause_text(error: BaseException) -> str:
    """The innermost causes' messages (where "connection refused" is said)."""
    parts: list[str] = []
    seen: BaseException | None = error
    while seen is not None and len(parts) < 6:
        if (text := str(seen)) and text not in parts:
            parts.append(text)
        seen = seen.__cause__ or seen.__context__
    return " / ".join(parts[1:] or parts)


def _ssl_reason(cause: str) -> str:
    """The SSL library's own reason, said once: ``[SSL: WRONG_VERSION_NUMBER] …`` -> that."""
    match = re.search(r"\[SSL: ?([A-Z_]+)\]|(record layer failure|wrong version number)", cause)
    if match:
        return (match.group(1) or match.group(2)).replace("_", " ").lower()
    return cause.split(" / ")[0][:120] or "an SSL error"


def is_transport_error(error: BaseException) -> bool:
    """Whether ``error`` is the HTTP library's own (older SDKs let a stream's errors through)."""
    package = type(error).__module__.partition(".")[0]
    return package in ("httpx", "httpx2", "httpcore", "httpcore2") and not isinstance(
        error, (TypeError, ValueError, AttributeError)
    )
