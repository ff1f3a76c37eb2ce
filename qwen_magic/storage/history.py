"""Conversations that survive a kernel restart, a read-only folder and a second browser tab.

A notebook's conversations are saved as JSON beside it, ``analysis.ipynb`` →
``analysis.qwen.json``, after every turn, and read back when the extension is loaded in a new
kernel for that notebook. The kernel learns its notebook from ``JPY_SESSION_NAME`` (set by
Jupyter Server, so JupyterLab and Notebook have it) or ``__session__``; elsewhere nothing is saved
automatically, and ``%qwen_save FILE`` / ``%qwen_restore FILE`` work by hand. The kernel's
:class:`~qwen_magic.session.Session` attaches a :class:`HistoryStore` and saves through it; this
module knows files and JSON, not kernels.

**Refusing what is not ours** (:func:`read_book`). A file that is not a qwen_magic conversation
file (corrupt or half-written JSON, another program's data, a newer format, a field of the wrong
type, more than :data:`MAX_BYTES`) is refused with one line and never overwritten. Autosave
stops for it, but looks again at each later save: once the file is gone, or is a qwen_magic
history again, autosave resumes and says so once.

**A file that cannot be written** (read-only mount, immutable file, no permission, full disk):
autosave keeps the turns in memory, shows one line once, and tries again after every later
change; the first save that works again says so once. The cell itself never fails for it.

**Two kernels, one notebook** (two browser tabs). :meth:`HistoryStore.save` holds a lock (the
hidden file ``.NAME.qwen.json.lock`` beside the history) while it re-reads the file, merges and
writes it back. The merge goes turn by turn, a turn known by its ``turn_id``:

- every turn this kernel holds is written as it holds it;
- a turn in the file that this kernel once held but no longer does (popped, reset, replaced by a
  re-run cell, or dropped by ``%qwen_restore``) is deleted: this kernel deleted it;
- a turn in the file that this kernel never held was written by another kernel: it is kept, in
  its conversation, placed among this kernel's turns by creation time, and a one-line note says
  so the first time. It is *not* added to this kernel's memory (its prompts use its own turns);
  ``%qwen_restore`` loads the merged file. Conversations found only in the file are kept likewise;
  for a conversation both have, this kernel's system prompt wins.

So a kernel never erases another kernel's turns; at worst a turn both kernels held, deleted by
one, is written back by the other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qwen_magic.conversation import (
    Conversation,
    ConversationBook,
    Turn,
)
from qwen_magic.errors import QwenMagicError
from qwen_magic.storage.atomic import (
    LOCK_TIMEOUT,
    os_error_reason,
    prepare_folder,
    refuse_folder,
    refuse_unencodable,
    resolve_target,
    same_file,
    write_atomic,
    write_failure,
)
from qwen_magic.storage.codec import SUFFIX, book_to_json, read_book, summary


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


# -- reading ------------------------------------------------------------------------------------


# -- writing ------------------------------------------------------------------------------------


def save_book(path: Path, book: ConversationBook, *, store: HistoryStore | None = None) -> str:
    """``%qwen_save``: write every conversation to ``path``; returns the line to show.

    A file there that is not a qwen_magic history is refused, untouched. When ``path`` is the
    file ``store`` autosaves to, the save goes through the store (lock, merge with other
    kernels' turns) and clears its refusal or pause. Every failure is a one-line
    ``QwenMagicError``.
    """
    path = Path(path).expanduser()
    refuse_unencodable(path)
    if store is not None and same_file(path, store.path):
        return store.save_now(book)
    target = resolve_target(path)
    refuse_folder(path, target, "chat" + SUFFIX)
    if target.exists():
        read_book(target)  # refuses, untouched, a file that is not ours
    created = prepare_folder(target)
    try:
        write_atomic(target, book_to_json(book))
    except OSError as error:
        raise QwenMagicError(write_failure(path, error)) from error
    return f"Saved {summary(book)} to {path}{created}."


# -- the notebook's history file ----------------------------------------------------------------


def merge_books(
    ours: ConversationBook, disk: ConversationBook | None, known: set[str], known_names: set[str]
) -> tuple[ConversationBook, set[str]]:
    """The book to write over ``disk``: ``ours``, plus the turns on disk this kernel never held.

    ``known`` holds the ids of every turn this kernel has held, ``known_names`` every
    conversation name; see the module docstring for the rule. Returns the merged book and the
    ids of the other kernels' turns it kept.
    """
    merged = ConversationBook(default_system_prompt=ours.default_system_prompt)
    theirs_on_disk = disk.conversations if disk is not None else {}
    ours_ids = {turn.turn_id for chat in ours.conversations.values() for turn in chat.turns}
    kept: set[str] = set()
    for name in [*ours.conversations, *(n for n in theirs_on_disk if n not in ours.conversations)]:
        on_disk = theirs_on_disk.get(name)
        theirs = [
            turn
            for turn in (on_disk.turns if on_disk is not None else [])
            if turn.turn_id not in known and turn.turn_id not in ours_ids
        ]
        mine = ours.conversations.get(name)
        if mine is not None:
            merged.conversations[name] = Conversation(
                name, mine.system_prompt, _by_creation(mine.turns, theirs)
            )
        elif on_disk is not None and (theirs or name not in known_names):
            merged.conversations[name] = Conversation(name, on_disk.system_prompt, theirs)
        kept.update(turn.turn_id for turn in theirs)
    return merged, kept


def _by_creation(ours: list[Turn], theirs: list[Turn]) -> list[Turn]:
    """Both lists interleaved by creation time, each keeping its own order."""
    result: list[Turn] = []
    i = j = 0
    while i < len(ours) and j < len(theirs):
        if theirs[j].created < ours[i].created:
            result.append(theirs[j])
            j += 1
        else:
            result.append(ours[i])
            i += 1
    return result + ours[i:] + theirs[j:]


def _signature(path: Path) -> tuple[int, int, int] | None:
    """Cheap identity of a file's current content (a new inode per atomic replace)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


class _Refused(QwenMagicError):
    """The file on disk is not a qwen_magic history: never write over it."""


class HistoryStore:
    """Saves a notebook's conversations to one file after each turn.

    :meth:`save` is autosave: it never raises for the file's sake and returns a line to show
    (or None). :meth:`save_now` is ``%qwen_save``: the same write, with errors raised.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        #: Why the file on disk is not ours (we never overwrite it); None when it is ours.
        self.refused: str | None = None
        #: Why the last write failed (autosave then retries on each save); None when it worked.
        self.failing: str | None = None
        self._refused_signature: tuple[int, int, int] | None = None
        self._known: set[str] = set()  # ids of every turn this kernel has held
        self._known_names: set[str] = set()
        self._reported: set[str] = set()  # other kernels' turns already mentioned
        self._disk: tuple[tuple[int, int, int] | None, ConversationBook] | None = None

    def check_writable(self) -> None:
        """Refuse to take over a file that exists but is not a qwen_magic conversation file."""
        if self.path.exists():
            try:
                read_book(self.path)
            except QwenMagicError as error:
                self._refuse(str(error))

    def load(self) -> ConversationBook | None:
        """The saved conversations, or None when there is no file yet."""
        if not self.path.exists():
            return None
        try:
            return read_book(self.path)
        except QwenMagicError as error:
            self._refuse(str(error))
            raise

    def save(self, book: ConversationBook) -> str | None:
        """Autosave ``book``, merged with other kernels' turns; never raises ``OSError``.

        Returns one line to show, or None: why saving stopped (once), that it works again
        (once), or that other kernels' turns were kept.
        """
        if self.refused and _signature(resolve_target(self.path)) == self._refused_signature:
            return None  # the refused file is still there, unchanged
        was_stopped = self.refused is not None or self.failing is not None
        try:
            notes = self._write(book)
        except _Refused as error:
            first = self.refused is None
            self._refuse(str(error))
            return f"Not saving conversations: {error}" if first else None
        except (OSError, QwenMagicError) as error:
            first = self.failing is None
            reason = (
                os_error_reason(error) if isinstance(error, OSError) else str(error).rstrip(".")
            )
            self.failing = (
                f"Could not save conversations to {self.path} ({reason}); they are kept in "
                "this kernel, and saving resumes by itself once the file can be written."
            )
            return self.failing if first else None
        self.refused = self.failing = None
        if was_stopped:
            notes.insert(0, f"Saving conversations to {self.path} again.")
        return " ".join(notes) or None

    def save_now(self, book: ConversationBook) -> str:
        """``%qwen_save`` to this file: write now, raising a one-line ``QwenMagicError``."""
        try:
            notes = self._write(book)
        except _Refused as error:
            self._refuse(str(error))
            raise QwenMagicError(str(error)) from error
        except OSError as error:
            raise QwenMagicError(write_failure(self.path, error)) from error
        self.refused = self.failing = None
        return " ".join([f"Saved {summary(book)} to {self.path}.", *notes])

    def _refuse(self, message: str) -> None:
        self.refused = message
        self._refused_signature = _signature(resolve_target(self.path))

    def _write(self, book: ConversationBook) -> list[str]:
        """Lock, re-read, merge, write; returns notes. Raises _Refused, QwenMagicError, OSError."""
        from filelock import FileLock

        refuse_unencodable(self.path)
        target = resolve_target(self.path)
        refuse_folder(self.path, target, "chat" + SUFFIX)
        notes = [created.strip(" ()") + "."] if (created := prepare_folder(target)) else []
        for chat in book.conversations.values():
            self._known.update(chat.held_ids, (turn.turn_id for turn in chat.turns))
        self._known_names.update(book.conversations)
        with FileLock(str(target.with_name(f".{target.name}.lock")), timeout=LOCK_TIMEOUT):
            signature = _signature(target)
            if signature is None:
                disk = None
            elif self._disk is not None and self._disk[0] == signature:
                disk = self._disk[1]  # unchanged since we last wrote or read it
            else:
                try:
                    disk = read_book(target)
                except QwenMagicError as error:
                    raise _Refused(str(error)) from error
                self._disk = (signature, disk)
            merged, kept = merge_books(book, disk, self._known, self._known_names)
            write_atomic(target, book_to_json(merged))
            self._disk = (_signature(target), merged)
        if new := kept - self._reported:
            self._reported |= new
            notes.append(
                f"Kept {len(new)} turn{'s' * (len(new) != 1)} that another kernel wrote to "
                f"{self.path} (they stay in the file; %qwen_restore loads them here)."
            )
        return notes
