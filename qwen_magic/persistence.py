"""Conversations that survive a kernel restart.

A notebook's conversations are saved as JSON beside it, ``analysis.ipynb`` →
``analysis.qwen.json``, after every turn, and read back when the extension is loaded in a new
kernel for that notebook. The kernel learns its notebook from ``JPY_SESSION_NAME`` (set by
Jupyter Server, so JupyterLab and Notebook have it) or ``__session__``; elsewhere nothing is saved
automatically, and ``%qwen_save FILE`` / ``%qwen_restore FILE`` work by hand.

Writes are atomic: a temporary file in the same folder, flushed, then ``os.replace``, so a crash
leaves either the old file or the new one. A file that is not a qwen_magic conversation file
(corrupt JSON, another program's data, a newer format) is refused with a clear message and never
overwritten: autosave stops for it until you move it aside. Every field of every turn is checked
on reading (:func:`qwen_magic.conversation.conversation_problem`), so a file with ``"user": null``
is refused in one line that names the entry, rather than half loaded; so is a file larger than
:data:`MAX_BYTES`, before it is read.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError

from .conversation import Conversation, ConversationBook, conversation_problem, json_type
from .errors import QwenMagicError

FORMAT = "qwen_magic.conversations"
VERSION = 1
SUFFIX = ".qwen.json"
#: A history file larger than this is refused rather than read into memory.
MAX_BYTES = 256 * 1024 * 1024


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
    """Read a conversation file; a one-line ``QwenMagicError`` if it is missing, unreadable,
    corrupt, foreign, too large or has a field of the wrong type. The file is never changed.
    """
    path = Path(path)
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
            f"Cannot read {path} ({_reason(error)}); {untouched}. Make it readable, or move it "
            "aside to start a new history for this notebook."
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


def _reason(error: OSError) -> str:
    """An operating-system error as a short cause a user can act on."""
    reasons = {
        errno.EACCES: "permission denied: it or its folder is read-only for you",
        errno.EPERM: "not permitted: the file or its folder is locked (immutable) or not yours",
        errno.EROFS: "the file system is mounted read-only",
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "your disk quota is used up",
        errno.ENAMETOOLONG: "the file name is too long",
        errno.ELOOP: "its symbolic links loop",
        errno.ENOTDIR: "part of the path is a file, not a folder",
    }
    return reasons.get(error.errno or 0) or error.strerror or str(error)


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
            except UsageError as error:
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
        except UsageError as error:
            self.refused = str(error)
            raise


def summary(book: ConversationBook) -> str:
    """'3 turns in 2 conversations' style text."""
    turns = sum(len(chat) for chat in book.conversations.values())
    count = len(book.conversations)
    return f"{turns} turn{'s' * (turns != 1)} in {count} conversation{'s' * (count != 1)}"


def attach(shell: Any, explicit: str | None = None) -> str | None:
    """Start saving this kernel's conversations to the notebook's history file.

    Restores the file's conversations when this kernel has none yet. Returns a line to show
    the user (restored, or why the file was refused), or None when there is nothing to say.
    """
    from . import _state
    from .chat import notebook_conversations

    if explicit:
        path = Path(explicit).expanduser()
    elif (notebook := notebook_path(shell)) is not None:
        path = history_path_for(notebook)
    else:
        return None
    store = _state.history_store
    if store is not None and store.path == path:
        return None
    store = HistoryStore(path)
    _state.history_store = store
    book = notebook_conversations()
    try:
        saved = store.load()
    except UsageError as error:
        return f"Not saving conversations: {error}"
    if saved is not None and not any(book.conversations.values()):
        saved.default_system_prompt = book.default_system_prompt
        _state.conversations = saved
        return f"Restored {summary(saved)} from {path}."
    return None


def autosave() -> None:
    """Save the kernel's conversations if a history file is attached (after every change)."""
    from . import _state

    store = _state.history_store
    if store is not None and _state.conversations is not None:
        store.save(_state.conversations)
