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

The parts, each with its own manual:

* :mod:`.connect`: :class:`ServerBackend` (connecting, the context, counting tokens);
* :mod:`.discovery`: what ``GET /v1/models`` and the files on this machine say;
* :mod:`.dialects`: the request's fields per server, and the retry without optional ones;
* :mod:`.reply`: :class:`ServerReply`, the stream read on a worker thread, and its cancel;
* :mod:`.sockets`: the socket each request runs on, so that a cancel can always cut it;
* :mod:`.errors`: the SDK's errors as one line each; :mod:`.guards`: escaping and redaction.
"""

from qwen_magic.backends.server.connect import (
    API_KEY_VARIABLES,
    DEFAULT_CONTEXT_TOKENS,
    PLACEHOLDER_API_KEY,
    STREAM_READ_SECONDS,
    ServerBackend,
    api_key_from_environment,
    estimate_tokens,
    normalize_url,
)
from qwen_magic.backends.server.dialects import EXTRA_BODY_FIELDS, OPTIONAL_FIELDS
from qwen_magic.backends.server.discovery import (
    LLAMA_CPP,
    TRANSFORMERS_SERVE,
    display_name,
    server_kind,
)
from qwen_magic.backends.server.errors import ServerError, describe_error, redact, server_message
from qwen_magic.backends.server.reply import ServerReply

__all__ = [
    "API_KEY_VARIABLES",
    "DEFAULT_CONTEXT_TOKENS",
    "EXTRA_BODY_FIELDS",
    "LLAMA_CPP",
    "OPTIONAL_FIELDS",
    "PLACEHOLDER_API_KEY",
    "STREAM_READ_SECONDS",
    "TRANSFORMERS_SERVE",
    "ServerBackend",
    "ServerError",
    "ServerReply",
    "api_key_from_environment",
    "describe_error",
    "display_name",
    "estimate_tokens",
    "normalize_url",
    "redact",
    "server_kind",
    "server_message",
]
