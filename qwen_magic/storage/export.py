"""Markdown exports of a conversation (``%qwen_export``): they never overwrite what is not
theirs."""

from __future__ import annotations

from pathlib import Path

from qwen_magic.errors import QwenMagicError
from qwen_magic.storage.atomic import (
    prepare_folder,
    refuse_folder,
    refuse_unencodable,
    resolve_target,
    write_atomic,
    write_failure,
)

#: The first line of every ``%qwen_export`` file: an HTML comment, invisible once rendered.
EXPORT_MARK = "<!-- qwen_magic export -->"


def export_markdown(path: Path, text: str, *, force: bool = False, what: str = "") -> str:
    """``%qwen_export``: write ``text`` as Markdown marked as an export; returns the line to show.

    An existing file is overwritten only when it is one of qwen_magic's exports (its first line
    is :data:`EXPORT_MARK`), is empty, or ``force`` is set. ``what`` names the content in the
    message.
    """
    path = Path(path).expanduser()
    refuse_unencodable(path)
    target = resolve_target(path)
    refuse_folder(path, target, example="chat.md")
    if target.exists() and not force and not is_export(target) and target.stat().st_size:
        raise QwenMagicError(
            f"{path} exists and is not a qwen_magic export; choose another file name, or add "
            "--force to overwrite it."
        )
    created = prepare_folder(target)
    try:
        write_atomic(target, f"{EXPORT_MARK}\n{text}")
    except OSError as error:
        raise QwenMagicError(write_failure(path, error)) from error
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
