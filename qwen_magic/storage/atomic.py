"""Every file qwen_magic writes, written so that a crash leaves the old file or the new one.

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

:func:`move_into_place` does the same for a whole folder (a converted model, quantized weights):
built aside, then put in place with one ``os.replace``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from qwen_magic.errors import QwenMagicError

#: Seconds a save waits for another kernel's lock on a file before giving up this time.
LOCK_TIMEOUT = 10.0


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one.

    Keeps an existing file's permission bits (a new file: ``0666`` less the umask) and writes
    through a symbolic link to the file it names. The folder must exist. Raises ``OSError``;
    then the old file is intact and no temporary file is left.
    """
    target = resolve_target(Path(path))
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
    sync_folder(target.parent)


def resolve_target(path: Path) -> Path:
    """The file a write to ``path`` replaces: the final target of a symbolic link, else ``path``."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def refuse_unencodable(path: Path) -> None:
    """Refuse, in one line, a path this system cannot name: a kernel started with an ASCII
    locale (``LC_ALL=C`` with ``PYTHONUTF8=0``) cannot encode ``é`` in a file name."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError as error:
        char = error.object[error.start : error.end]
        raise QwenMagicError(
            f"The path {str(path)!a} cannot be used on this system: file names here are "
            f"{sys.getfilesystemencoding()} only (the kernel runs with an ASCII locale, such as "
            f"LC_ALL=C) and {char!a} is not; use a name in plain ASCII, or start Jupyter with a "
            "UTF-8 locale (LANG=C.UTF-8, or PYTHONUTF8=1)."
        ) from None


def same_file(one: Path, other: Path) -> bool:
    return os.path.realpath(one) == os.path.realpath(other)


def refuse_folder(path: Path, target: Path, example: str) -> None:
    if target.is_dir():
        raise QwenMagicError(f"{path} is a folder; give a file name, e.g. {path / example}.")


def prepare_folder(target: Path) -> str:
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
            f"Could not create the folder {folder} ({os_error_reason(error)}); "
            "choose another place."
        ) from error
    return f" (created the folder {folder})"


def sync_folder(folder: Path) -> None:
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


def os_error_reason(error: OSError) -> str:
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


def write_failure(path: Path, error: OSError) -> str:
    reason = os_error_reason(error)
    return f"Could not write {path} ({reason}); nothing was changed. Choose another place."


def move_into_place(built: Path, target: Path) -> None:
    """Make the finished folder ``built`` the one at ``target`` with one ``os.replace``; a
    damaged folder left there is moved aside first, then deleted."""
    if target.exists():
        stale = target.with_name(f".stale-{os.getpid()}-{target.name}")
        os.replace(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(built, target)
