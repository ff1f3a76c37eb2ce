"""Chatting with a model on a server that speaks the OpenAI chat-completions API.

:class:`ServerBackend` (vLLM, SGLang, llama.cpp, ``transformers serve``, a hosted endpoint) is
the ``Backend`` that ``%qwen_load --server URL`` makes; :mod:`.connect` is its manual.
"""

from .connect import (
    API_KEY_VARIABLES,
    DEFAULT_CONTEXT_TOKENS,
    TRANSFORMERS_SERVE,
    ServerBackend,
    ServerError,
    ServerReply,
    api_key_from_environment,
    describe_error,
    estimate_tokens,
    normalize_url,
)

__all__ = [
    "API_KEY_VARIABLES",
    "DEFAULT_CONTEXT_TOKENS",
    "TRANSFORMERS_SERVE",
    "ServerBackend",
    "ServerError",
    "ServerReply",
    "api_key_from_environment",
    "describe_error",
    "estimate_tokens",
    "normalize_url",
]
