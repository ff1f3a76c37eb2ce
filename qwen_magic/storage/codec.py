"""The history file's JSON: a conversation book to text and back, refusing what is not ours."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qwen_magic.checks import conversation_problem, json_type
from qwen_magic.conversation import Conversation, ConversationBook
from qwen_magic.errors import QwenMagicError
from qwen_magic.storage.atomic import os_error_reason, refuse_unencodable

FORMAT = "qwen_magic.conversations"


VERSION = 1


SUFFIX = ".qwen.json"


#: A history file larger than this is refused rather than read into memory.
MAX_BYTES = 256 * 1024 * 1024


def book_to_json(book: ConversationBook) -> str:
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "conversations": {name: chat.to_dict() for name, chat in book.conversations.items()},
    }
    return json.dumps(payload, ensure_ascii=False, indent=1)


def read_book(path: Path) -> ConversationBook:
    """Read a conversation file; a one-line ``QwenMagicError`` if it is missing, unreadable,
    corrupt, foreign, too large or has a field of the wrong type. The file is never changed.
    """
    path = Path(path)
    refuse_unencodable(path)
    untouched = "it was left untouched"
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_BYTES:
                raise QwenMagicError(
                    f"{path} is {size / 2**20:.0f} MB, more than the {MAX_BYTES // 2**20} MB "
                    f"qwen_magic reads; {untouched}. Move it aside, or save to another file "
                    "with %qwen_save FILE."
                )
            raw = handle.read()
    except FileNotFoundError as error:
        raise QwenMagicError(f"No conversation file at {path}.") from error
    except IsADirectoryError as error:
        raise QwenMagicError(
            f"{path} is a folder, not a conversation file; give a file, e.g. "
            f"{path / ('chat' + SUFFIX)}."
        ) from error
    except OSError as error:
        raise QwenMagicError(
            f"Cannot read {path} ({os_error_reason(error)}); {untouched}. Make it readable, or "
            "move it aside to start a new history for this notebook."
        ) from error
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise QwenMagicError(
            f"{path} is not readable JSON (cut short or damaged: {error}); {untouched}. Move it "
            "aside to start a new history for this notebook."
        ) from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise QwenMagicError(
            f"{path} is not a qwen_magic conversation file; {untouched}. Move it "
            "aside, or save to another file with %qwen_save FILE."
        )
    if data.get("version") != VERSION:
        raise QwenMagicError(
            f"{path} has format version {data.get('version')!r}, this qwen_magic reads "
            f"version {VERSION}; upgrade qwen_magic or move the file aside."
        )
    if (problem := _book_problem(data)) is not None:
        raise QwenMagicError(f"{path} is damaged ({problem}); {untouched}. Fix or move it aside.")
    book = ConversationBook()
    for name, chat in data["conversations"].items():
        book.conversations[name] = Conversation.from_dict(chat, key=name)
    return book


def _book_problem(data: dict[str, Any]) -> str | None:
    """Why a history file's payload cannot be loaded, naming the entry; None when it can."""
    conversations = data.get("conversations")
    if not isinstance(conversations, dict):
        return f"'conversations' must be an object, not {json_type(conversations)}"
    seen: dict[str, str] = {}
    for name, chat in conversations.items():
        if (problem := conversation_problem(chat, name)) is not None:
            return problem
        for number, turn in enumerate(chat["turns"], start=1):
            turn_id = turn.get("turn_id")
            if turn_id is None:
                continue
            if turn_id in seen and seen[turn_id] != name:
                return (
                    f"conversation {name!r}, turn {number}: 'turn_id' repeats one of "
                    f"conversation {seen[turn_id]!r}"
                )
            seen[turn_id] = name
    return None


def summary(book: ConversationBook) -> str:
    """'3 turns in 2 conversations' style text."""
    turns = sum(len(chat) for chat in book.conversations.values())
    count = len(book.conversations)
    return f"{turns} turn{'s' * (turns != 1)} in {count} conversation{'s' * (count != 1)}"
