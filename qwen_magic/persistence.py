"""Conversations that survive a kernel restart.

A notebook's conversations are saved as JSON beside it, ``analysis.ipynb`` →
``analysis.qwen.json``, after every turn, and read back when the extension is loaded in a new
kernel for that notebook. The kernel learns its notebook from ``JPY_SESSION_NAME`` (set by
Jupyter Server, so JupyterLab and Notebook have it) or ``__session__``; elsewhere nothing is saved
automatically, and ``%qwen_save FILE`` / ``%qwen_restore FILE`` work by hand. The kernel's
:class:`~qwen_magic.session.Session` attaches a :class:`HistoryStore` and saves through it; this
module knows files and JSON, not kernels.

Writes are atomic: a temporary file in the same folder, flushed, then ``os.replace``, so a crash
leaves either the old file or the new one. A file that is not a qwen_magic conversation file
(corrupt JSON, another program's data, a newer format) is refused with a clear message and never
overwritten: autosave stops for it until you move it aside.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .conversation import Conversation, ConversationBook
from .errors import QwenMagicError

FORMAT = "qwen_magic.conversations"
VERSION = 1
SUFFIX = ".qwen.json"


def notebook_path(shell: Any = None) -> Path | None:
    """The running notebook's path, where the frontend tells the kernel; else None."""
    name = os.environ.get("JPY_SESSION_NAME")
    if not name and shell is not None:
        name = shell.user_ns.get("__session__")
    if not name or not str(name).endswith(".ipynb"):
        return None
    return Path(name).expanduser()


def history_path_for(notebook: Path) -> Path:
    """Where a notebook's conversations are kept: beside it, ``NAME.qwen.json``."""
    return notebook.with_name(notebook.name.removesuffix(".ipynb") + SUFFIX)


def book_to_json(book: ConversationBook) -> str:
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "conversations": {name: chat.to_dict() for name, chat in book.conversations.items()},
    }
    return json.dumps(payload, ensure_ascii=False, indent=1)


def read_book(path: Path) -> ConversationBook:
    """Read a conversation file; a ``QwenMagicError`` if it is missing, corrupt or foreign."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise QwenMagicError(f"No conversation file at {path}.") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise QwenMagicError(
            f"{path} is not readable JSON ({error}); it was left untouched. Move it aside to "
            "start a new history for this notebook."
        ) from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise QwenMagicError(
            f"{path} is not a qwen_magic conversation file; it was left untouched. Move it "
            "aside, or save to another file with %qwen_save FILE."
        )
    if data.get("version") != VERSION:
        raise QwenMagicError(
            f"{path} has format version {data.get('version')!r}, this qwen_magic reads "
            f"version {VERSION}; upgrade qwen_magic or move the file aside."
        )
    book = ConversationBook()
    try:
        for name, chat in data["conversations"].items():
            book.conversations[name] = Conversation.from_dict(chat)
    except (AttributeError, KeyError, TypeError) as error:
        raise QwenMagicError(f"{path} is damaged ({error}); it was left untouched.") from error
    return book


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class HistoryStore:
    """Saves a notebook's conversations to one file after each turn."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        #: Set when the file on disk is not ours: we never overwrite it.
        self.refused: str | None = None

    def check_writable(self) -> None:
        """Refuse to take over a file that exists but is not a qwen_magic conversation file."""
        if self.path.exists():
            try:
                read_book(self.path)
            except QwenMagicError as error:
                self.refused = str(error)

    def save(self, book: ConversationBook) -> bool:
        """Write ``book``; False (and nothing written) if the file on disk was refused."""
        if self.refused:
            return False
        write_atomic(self.path, book_to_json(book))
        return True

    def load(self) -> ConversationBook | None:
        """The saved conversations, or None when there is no file yet."""
        if not self.path.exists():
            return None
        try:
            return read_book(self.path)
        except QwenMagicError as error:
            self.refused = str(error)
            raise


def summary(book: ConversationBook) -> str:
    """'3 turns in 2 conversations' style text."""
    turns = sum(len(chat) for chat in book.conversations.values())
    count = len(book.conversations)
    return f"{turns} turn{'s' * (turns != 1)} in {count} conversation{'s' * (count != 1)}"
