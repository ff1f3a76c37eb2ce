"""Conversations that survive a kernel restart, a read-only folder and a second browser tab.

A notebook's conversations are saved as JSON beside it, ``analysis.ipynb`` →
``analysis.qwen.json``, after every turn, and read back when the extension is loaded in a new
kernel for that notebook. The kernel learns its notebook from ``JPY_SESSION_NAME`` (set by
Jupyter Server, so JupyterLab and Notebook have it) or ``__session__``; elsewhere nothing is saved
automatically, and ``%qwen_save FILE`` / ``%qwen_restore FILE`` work by hand. The kernel's
:class:`~qwen_magic.session.Session` attaches a :class:`HistoryStore` and saves through it; this
module knows files and JSON, not kernels.

**Writing** (:func:`write_atomic`, for every file qwen_magic writes). The text goes to a temporary
file in the same folder, flushed, then ``os.replace`` puts it in place, so a crash leaves either
the old file or the new one. The new file keeps the old one's permission bits (and, where
allowed, its owner); a file that did not exist gets ``0666`` less the user's umask, as an editor
would make it (not ``mkstemp``'s private ``0600``). A path that is a symbolic link is written
*through*: the file it points to is replaced and the link stays a link, so a history kept in a
synced folder and linked beside the notebook keeps working.

**Where files go** (:func:`save_book`, :func:`export_markdown`). A path that is a folder is
refused with a file name to use instead. A missing folder one level deep is created, and the
message says so; deeper missing folders are refused, naming the first one missing (a typo is
likelier than a wish for a new tree). Operating-system errors become one line saying the fix.
``%qwen_export`` writes Markdown whose first line is :data:`EXPORT_MARK`; it overwrites a file
that starts with that mark (one of its own exports) or is empty, any other only with ``--force``.

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

import contextlib
import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from qwen_magic.conversation import (
    Conversation,
    ConversationBook,
    Turn,
    conversation_problem,
    json_type,
)
from qwen_magic.errors import QwenMagicError

FORMAT = "qwen_magic.conversations"
VERSION = 1
SUFFIX = ".qwen.json"
#: A history file larger than this is refused rather than read into memory.
MAX_BYTES = 256 * 1024 * 1024
#: The first line of every ``%qwen_export`` file: an HTML comment, invisible once rendered.
EXPORT_MARK = "<!-- qwen_magic export -->"
#: Seconds a save waits for another kernel's lock on the history file before giving up this time.
LOCK_TIMEOUT = 10.0


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


# -- reading ------------------------------------------------------------------------------------


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


# -- writing ------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one.

    Keeps an existing file's permission bits (a new file: ``0666`` less the umask) and writes
    through a symbolic link to the file it names. The folder must exist. Raises ``OSError``;
    then the old file is intact and no temporary file is left.
    """
    target = _target(Path(path))
    try:
        old = os.stat(target)
    except FileNotFoundError:
        old = None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
    mode = stat.S_IMODE(old.st_mode) if old is not None else 0o666 & ~_umask()
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
        if old is not None and hasattr(os, "chown"):
            # Root saving a user's file must not hand it to root; elsewhere this is a no-op.
            with contextlib.suppress(OSError):
                os.chown(temporary, old.st_uid, old.st_gid)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _sync_folder(target.parent)


def save_book(path: Path, book: ConversationBook, *, store: HistoryStore | None = None) -> str:
    """``%qwen_save``: write every conversation to ``path``; returns the line to show.

    A file there that is not a qwen_magic history is refused, untouched. When ``path`` is the
    file ``store`` autosaves to, the save goes through the store (lock, merge with other
    kernels' turns) and clears its refusal or pause. Every failure is a one-line
    ``QwenMagicError``.
    """
    path = Path(path).expanduser()
    if store is not None and _same_file(path, store.path):
        return store.save_now(book)
    target = _target(path)
    _refuse_folder(path, target)
    if target.exists():
        read_book(target)  # refuses, untouched, a file that is not ours
    created = _prepare_folder(target)
    try:
        write_atomic(target, book_to_json(book))
    except OSError as error:
        raise QwenMagicError(_write_failure(path, error)) from error
    return f"Saved {summary(book)} to {path}{created}."


def export_markdown(path: Path, text: str, *, force: bool = False, what: str = "") -> str:
    """``%qwen_export``: write ``text`` as Markdown marked as an export; returns the line to show.

    An existing file is overwritten only when it is one of qwen_magic's exports (its first line
    is :data:`EXPORT_MARK`), is empty, or ``force`` is set. ``what`` names the content in the
    message.
    """
    path = Path(path).expanduser()
    target = _target(path)
    _refuse_folder(path, target, example="chat.md")
    if target.exists() and not force and not is_export(target) and target.stat().st_size:
        raise QwenMagicError(
            f"{path} exists and is not a qwen_magic export; choose another file name, or add "
            "--force to overwrite it."
        )
    created = _prepare_folder(target)
    try:
        write_atomic(target, f"{EXPORT_MARK}\n{text}")
    except OSError as error:
        raise QwenMagicError(_write_failure(path, error)) from error
    return f"Wrote {what or 'the conversation'} to {path}{created}."


def is_export(path: Path) -> bool:
    """Whether ``path`` starts with :data:`EXPORT_MARK` (a file ``%qwen_export`` wrote)."""
    mark = EXPORT_MARK.encode()
    try:
        with Path(path).open("rb") as handle:
            head = handle.read(len(mark) + 2)
    except OSError:
        return False
    return head.startswith(mark) and head[len(mark) : len(mark) + 1] in (b"\n", b"\r", b"")


def _target(path: Path) -> Path:
    """The file a write to ``path`` replaces: the final target of a symbolic link, else ``path``."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _same_file(one: Path, other: Path) -> bool:
    return os.path.realpath(one) == os.path.realpath(other)


def _refuse_folder(path: Path, target: Path, example: str = "chat" + SUFFIX) -> None:
    if target.is_dir():
        raise QwenMagicError(f"{path} is a folder; give a file name, e.g. {path / example}.")


def _prepare_folder(target: Path) -> str:
    """Make sure ``target``'s folder exists, creating one missing level; a note when it did."""
    folder = target.parent
    if folder.is_dir():
        return ""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise QwenMagicError(f"{existing} is a file, not a folder; check the path {target}.")
    if existing != folder.parent:
        missing = next(p for p in [folder, *folder.parents] if p.parent == existing)
        raise QwenMagicError(
            f"The folder {missing} does not exist; check the path, or create it first "
            f"(e.g. !mkdir -p {folder})."
        )
    try:
        folder.mkdir()
    except OSError as error:
        raise QwenMagicError(
            f"Could not create the folder {folder} ({_reason(error)}); choose another place."
        ) from error
    return f" (created the folder {folder})"


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); harmless to skip where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back (the only portable way to read it)
    os.umask(mask)
    return mask


def _reason(error: OSError) -> str:
    """An operating-system error as a short cause a user can act on."""
    from filelock import Timeout

    if isinstance(error, Timeout):
        return f"another kernel held its lock for more than {LOCK_TIMEOUT:.0f} s"
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


def _write_failure(path: Path, error: OSError) -> str:
    return f"Could not write {path} ({_reason(error)}); nothing was changed. Choose another place."


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
        if self.refused and _signature(_target(self.path)) == self._refused_signature:
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
            reason = _reason(error) if isinstance(error, OSError) else str(error).rstrip(".")
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
            raise QwenMagicError(_write_failure(self.path, error)) from error
        self.refused = self.failing = None
        return " ".join([f"Saved {summary(book)} to {self.path}.", *notes])

    def _refuse(self, message: str) -> None:
        self.refused = message
        self._refused_signature = _signature(_target(self.path))

    def _write(self, book: ConversationBook) -> list[str]:
        """Lock, re-read, merge, write; returns notes. Raises _Refused, QwenMagicError, OSError."""
        from filelock import FileLock

        target = _target(self.path)
        _refuse_folder(self.path, target)
        notes = [created.strip(" ()") + "."] if (created := _prepare_folder(target)) else []
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


def summary(book: ConversationBook) -> str:
    """'3 turns in 2 conversations' style text."""
    turns = sum(len(chat) for chat in book.conversations.values())
    count = len(book.conversations)
    return f"{turns} turn{'s' * (turns != 1)} in {count} conversation{'s' * (count != 1)}"
