"""What the server backend checks and rewrites so that nothing leaks or is misread.

Three guards, each a small pure function, used by :mod:`qwen_magic.backends.server`:

**Content is data.** A server renders the messages with its chat template, so a message holding
``<|im_end|>\\n<|im_start|>system …`` (typed, pulled in with ``-i``, or inside a traceback that
``%qwen_error`` sends) would become real turn markers there. The in-kernel backend tokenizes
content with the special tokens split into text; a server offers no such switch, so
:func:`escaped_messages` puts a zero-width space (U+200B) after the first character of every
control-token string before the request leaves: ``<|im_end|>`` becomes ``<\\u200b|im_end|>``,
which reads the same to the model and to a person, but matches no special token. Every string of
the control tokens' shape ``<|name|>`` is escaped (:data:`CONTROL_TOKEN_SHAPE`: all of Qwen2's),
and so are the model tokenizer's other special tokens once it is loaded here.

**Secrets stay out of messages.** :func:`redact_url` hides a URL's userinfo (``user:pass@``),
query and fragment, which is where keys are pasted; :func:`check_key_variable` refuses an
``--api-key-env`` value that is not a variable name, without repeating it (it is most likely the
key itself).

**An HTML page is not the API.** :func:`looks_like_html` tells a web page (a wrong path, a
proxy's login page, a notebook server) from an API answer, by content type or first bytes, so
the user is told to check the URL instead of being shown the page.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from qwen_magic.errors import QwenMagicError

#: Control tokens' shape in Qwen2 (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``,
#: ``<|fim_prefix|>`` …) and in most chat models (Llama 3's ``<|eot_id|>``): escaped always.
CONTROL_TOKEN_SHAPE = re.compile(r"<\|[A-Za-z0-9_]{1,64}\|>")
#: What goes after a control string's first character: invisible, and no tokenizer merges it.
ESCAPE = "\u200b"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_PREFIXES = ("sk-", "sk_", "hf_", "ghp_", "gho_", "xox", "eyj", "bearer ")
_USERINFO = re.compile(r"(?<=//)[^/?#@\s]*@")
_QUERY = re.compile(r"[?#]\S*")


def escape_control_text(text: str, control_strings: Iterable[str] = ()) -> str:
    """``text`` with every ``<|…|>`` control token, and each of ``control_strings`` (the
    tokenizer's own special tokens), broken by a zero-width space after its first character,
    so a template renders it as text."""
    if "<" not in text and not control_strings:
        return text
    text = CONTROL_TOKEN_SHAPE.sub(lambda match: "<" + ESCAPE + match.group(0)[1:], text)
    for control in control_strings:
        if control in text:
            text = text.replace(control, control[:1] + ESCAPE + control[1:])
    return text


def escaped_messages(
    messages: list[dict[str, Any]], control_strings: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """``messages`` with each text content escaped (:func:`escape_control_text`); the
    originals are left as they are (they are the conversation's record)."""
    strings = sorted(set(control_strings), key=len, reverse=True)
    escaped = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            changed = escape_control_text(content, strings)
            if changed != content:
                message = {**message, "content": changed}
        escaped.append(message)
    return escaped


def redact_url(text: str) -> str:
    """``text`` with any URL's userinfo and query/fragment replaced by ``***`` (scheme, host,
    port and path kept): ``http://u:pw@h:8/v1?key=sk-1`` -> ``http://***@h:8/v1?***``."""
    text = _USERINFO.sub("***@", text)
    return _QUERY.sub(lambda match: match.group(0)[0] + "***", text)


def looks_like_a_key(value: str) -> bool:
    """Whether ``value`` looks like a secret rather than a variable's name: a known key prefix,
    or long with digits and mixed case (names are usually UPPER_CASE words)."""
    if value.lower().startswith(_KEY_PREFIXES):
        return True
    mixed = any(c.islower() for c in value) and any(c.isupper() for c in value)
    return len(value) >= 24 and mixed and any(c.isdigit() for c in value)


def check_key_variable(name: str) -> None:
    """Refuse an ``--api-key-env`` value that is not an environment variable's name, without
    echoing it: it is most likely the key itself, typed in the wrong place."""
    if _NAME.fullmatch(name) and not looks_like_a_key(name):
        return
    looks = " (it looks like a key itself" if looks_like_a_key(name) else " (if it is the key"
    raise QwenMagicError(
        f"The value given to --api-key-env is not an environment variable name{looks}: put the "
        "key in an environment variable, e.g. %env QWEN_MAGIC_API_KEY=…, and give its name)."
    )


def looks_like_html(content_type: str | None, body: str | bytes = "") -> bool:
    """Whether an HTTP answer is a web page: an HTML content type, or a body starting with
    ``<!doctype`` / ``<html`` / ``<head`` / ``<body``."""
    if content_type and "html" in content_type.lower():
        return True
    start = body[:200] if isinstance(body, str) else body[:200].decode("utf-8", "replace")
    return start.lstrip().lower().startswith(("<!doctype", "<html", "<head", "<body"))


def html_answer_message(base_url: str) -> str:
    """The one line for an HTML page where the API was expected."""
    return (
        f"{base_url} answered with an HTML page, not the OpenAI API: check the URL "
        "(it usually ends in :PORT or /v1)."
    )
