"""What a server says about itself, and what this machine knows about its model.

``GET /v1/models`` lists what is served: :func:`served_models` reads it (a web page or another
document where the list should be is one line saying to check the URL), :func:`choose_model`
picks the one to chat with (the only one, or the one named: a folder's name stands for its path,
as ``transformers serve`` names models by path) and :func:`server_kind` tells vLLM, SGLang,
llama.cpp and ``transformers serve`` apart by what each puts on the entry. The context length is
the entry's where it has one (:func:`context_from_entry`), else the model config's when the
model is on this machine (:func:`context_from_local_config`, a folder or the hub cache), where
its tokenizer may be too (:func:`local_tokenizer_source`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen_magic.backends.server.errors import ServerError, describe_error, redact
from qwen_magic.backends.server.guards import html_answer_message, looks_like_html
from qwen_magic.errors import QwenMagicError

TRANSFORMERS_SERVE = "transformers serve"
LLAMA_CPP = "llama.cpp"
#: Servers that drop a request, prompt and all, when its client disconnects: vLLM and SGLang
#: abort it in their engines; llama.cpp's server polls the connection every second and cancels
#: the task between prompt batches. ``transformers serve`` stops only at its next token, so a
#: prompt it is reading is read to the end first (measured here: a 2,830-token prompt stopped
#: at 2 s kept the next reply waiting 20.9 s for its first token, against 0.9 s).
STOPS_READING_ON_DISCONNECT = frozenset({"vLLM", "SGLang", LLAMA_CPP})


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


def served_models(
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


def choose_model(
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


def context_from_entry(entry: dict[str, Any]) -> int | None:
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


def context_from_local_config(candidates: list[str]) -> int | None:
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


def local_tokenizer_source(candidates: list[str]) -> str | None:
    for model in candidates:
        if _local_file(model, "tokenizer_config.json") or _local_file(model, "tokenizer.json"):
            folder = Path(model).expanduser()
            return str(folder) if folder.is_dir() else model
    return None
