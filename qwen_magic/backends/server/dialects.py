"""The request a reply sends, in each server's dialect, and the retry without optional fields.

**Content is data**: every message's content goes out with its control-token strings escaped
(:func:`content_as_data`, :mod:`.guards`), so the server's chat template cannot read them as
turn markers.

**Options** map to the API's fields: ``max_new_tokens`` → ``max_tokens``, greedy →
``temperature: 0``, ``temperature``, ``top_p``, ``seed``; ``top_k`` and ``repetition_penalty``
are not OpenAI fields and go in the body's extras, which vLLM and SGLang read. ``transformers
serve`` rejects those two and only ever turns sampling *off* (temperature 0), so for it they go
in its own ``generation_config`` field, with ``do_sample`` when sampling is asked for. Only what
was set is sent. If a server answers 400/422 to an optional field, the reply is retried once
without the optional fields (the ones the error names, else all), the backend remembers, and
the reply's :attr:`~.reply.ServerReply.note` says what was left out.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from qwen_magic.backends.base import Messages, chat_dicts
from qwen_magic.backends.kernel.encoding import control_strings
from qwen_magic.backends.server.discovery import TRANSFORMERS_SERVE
from qwen_magic.backends.server.errors import CONTEXT_TOO_LONG, server_message
from qwen_magic.backends.server.guards import escaped_messages
from qwen_magic.options import GenerationOptions

if TYPE_CHECKING:
    from .connect import ServerBackend

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


def request_fields(
    backend: ServerBackend,
    messages: Messages,
    options: GenerationOptions,
    *,
    leave_out_unsupported: bool = True,
) -> dict[str, Any]:
    """The JSON body for a streamed reply: only what was set, less what the server rejects."""
    fields: dict[str, Any] = {
        "model": backend.model_id,
        "messages": content_as_data(messages, backend._tokenizer),
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
    if backend.server_kind == TRANSFORMERS_SERVE:
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
        for name in backend.unsupported_fields:
            fields.pop(name, None)
    return fields


def content_as_data(messages: Messages, tokenizer: Any = None) -> list[dict[str, Any]]:
    """``messages`` with the control tokens' text escaped, so the server's template cannot
    read a message's content as turn markers: every ``<|…|>``, and ``tokenizer``'s other
    special tokens where it is loaded (a reply does not wait for it to load). Role and content
    only: an action is in its message's text already."""
    return escaped_messages(chat_dicts(messages), control_strings(tokenizer) if tokenizer else ())


def open_stream(backend: ServerBackend, fields: dict[str, Any]) -> tuple[Any, str | None]:
    """Send the request; on a 400/422 about optional fields, retry once without them.

    Returns the SDK's stream and a note saying what was left out (or None).
    """
    import openai

    try:
        return _create(backend._client, fields), None
    except openai.APIStatusError as error:
        message = server_message(error)
        if error.status_code not in (400, 422) or CONTEXT_TOO_LONG.search(message):
            raise
        optional = [name for name in OPTIONAL_FIELDS if name in fields]
        named = [name for name in optional if name in message]
        dropped = named or optional
        if not dropped:
            raise
    stream = _create(backend._client, {k: v for k, v in fields.items() if k not in dropped})
    with backend._lock:  # only a retry that worked shows the fields were the trouble
        backend.unsupported_fields.update(dropped)
    shown = [name for name in dropped if OPTIONAL_FIELDS[name]]
    note = None
    if shown:
        note = left_out_note(backend.base_url, shown, "this reply was written without them")
        backend._said.add(left_out_note(backend.base_url, shown, "they are left out"))
    return stream, note


def _create(client: Any, fields: dict[str, Any]) -> Any:
    body = {k: v for k, v in fields.items() if k not in EXTRA_BODY_FIELDS}
    extra = {k: v for k, v in fields.items() if k in EXTRA_BODY_FIELDS}
    return client.chat.completions.create(**body, extra_body=extra or None)


def left_out_note(base_url: str, fields: list[str], consequence: str) -> str:
    """One line: which options the server at ``base_url`` does not take, and ``consequence``."""
    flags = ", ".join(dict.fromkeys(OPTIONAL_FIELDS[name] or name for name in fields))
    return f"The server at {base_url} does not accept {flags}: {consequence}."
