"""Saving conversations: atomic writes, refusing foreign files, restoring in a new kernel.

The magics' tests reply with a scripted backend, except where the record of a real reply (the
model's name, its stats) is checked."""

from __future__ import annotations

import json
import os

import pytest
from IPython.core.error import UsageError

from qwen_magic.conversation import ConversationBook, Turn
from qwen_magic.session import current as session
from qwen_magic.storage import atomic, codec
from qwen_magic.storage.atomic import write_atomic
from qwen_magic.storage.codec import book_to_json, read_book
from qwen_magic.storage.history import HistoryStore

FAST = "-n 5 --greedy --view text"


def sample_book() -> ConversationBook:
    book = ConversationBook()
    book.get().record(Turn("hi", "hello", model="m", options={"seed": 1}, stats={"new_tokens": 2}))
    book.get("other").record(Turn("a", "b"))
    return book


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    """The file holds the new text and no temporary files remain beside it."""
    target = tmp_path / "x.json"
    target.write_text("old")
    write_atomic(target, "new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["x.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    """If the final rename fails, the old file is intact and the temporary is removed."""
    target = tmp_path / "x.json"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.json"]


def test_round_trip_keeps_every_conversation_and_turn_record(tmp_path):
    """A saved book reads back equal, with each turn's model, options and stats."""
    path = tmp_path / "h.qwen.json"
    book = sample_book()
    write_atomic(path, book_to_json(book))
    again = read_book(path)
    assert again.conversations == book.conversations
    assert again.get().turns[0].options == {"seed": 1}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not readable JSON"),
        (json.dumps({"cells": []}), "not a qwen_magic conversation file"),
        (json.dumps({"format": codec.FORMAT, "version": 99}), "version 99"),
        (json.dumps({"format": codec.FORMAT, "version": 1, "conversations": 3}), "damaged"),
    ],
)
def test_corrupt_or_foreign_files_are_refused_and_never_overwritten(tmp_path, content, message):
    """Reading a bad file is a UsageError; the store then refuses to write over it."""
    path = tmp_path / "h.qwen.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        read_book(path)
    store = HistoryStore(path)
    store.check_writable()
    assert store.save(sample_book()) is None and store.refused
    assert path.read_text() == content


def test_turns_are_saved_beside_the_notebook_after_each_turn(shell, tiny, notebook):
    """With a notebook path known, each %%qwen turn is written to NAME.qwen.json."""
    shell.run_cell_magic("qwen", FAST, "first")
    saved = notebook.with_name("analysis.qwen.json")
    assert len(read_book(saved).get().turns) == 1
    shell.run_cell_magic("qwen", FAST, "second")
    record = read_book(saved).get().turns[1]
    assert record.user == "second" and record.model == tiny.name
    assert record.options["max_new_tokens"] == 5
    assert record.stats["new_tokens"] >= 1 and record.stats["total_seconds"] > 0
    shell.run_line_magic("qwen_pop", "")
    assert len(read_book(saved).get().turns) == 1


def test_a_new_kernel_restores_the_notebook_conversations(shell, scripted, notebook, capsys):
    """Attaching in a kernel with no conversations restores the saved ones and says so."""
    shell.run_cell_magic("qwen", FAST, "remember this")
    session().conversations = ConversationBook()  # what a new kernel starts with
    session().history = None
    capsys.readouterr()
    message = session().attach_history(shell)
    assert "Restored 1 turn in 1 conversation" in message
    assert [t.user for t in session().conversations.get().turns] == ["remember this"]


def test_a_foreign_history_file_is_reported_and_kept(shell, scripted, notebook):
    """A non-qwen file where the history would go is left alone; chatting still works."""
    foreign = notebook.with_name("analysis.qwen.json")
    foreign.write_text('{"something": "else"}')
    message = session().attach_history(shell)
    assert "Not saving conversations" in message
    shell.run_cell_magic("qwen", FAST, "still works")
    assert foreign.read_text() == '{"something": "else"}'
    assert len(session().conversations.get().turns) == 1


def test_save_restore_and_export_magics(shell, scripted, tmp_path, capsys):
    """%qwen_save writes a file, %qwen_restore reads it back, %qwen_export writes Markdown."""
    shell.run_cell_magic("qwen", FAST, "keep me")
    target = tmp_path / "chat.qwen.json"
    shell.run_line_magic("qwen_save", str(target))
    shell.run_line_magic("qwen_reset", "")
    assert session().conversations.get().turns == []
    shell.run_line_magic("qwen_restore", str(target))
    assert [t.user for t in session().conversations.get().turns] == ["keep me"]
    markdown = tmp_path / "chat.md"
    shell.run_line_magic("qwen_export", str(markdown))
    assert "keep me" in markdown.read_text()
    assert "Restored 1 turn" in capsys.readouterr().out


def test_restore_of_a_bad_file_changes_nothing(shell, scripted, tmp_path):
    """%qwen_restore of a foreign file is a UsageError and the conversations stay."""
    shell.run_cell_magic("qwen", FAST, "stay")
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(UsageError, match="not a qwen_magic conversation file"):
        shell.run_line_magic("qwen_restore", str(bad))
    assert [t.user for t in session().conversations.get().turns] == ["stay"]


def test_save_without_a_known_notebook_asks_for_a_file(shell, fresh_state, monkeypatch):
    """Where no notebook path is known, %qwen_save says to give a file name."""
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    fresh_state.history = None
    with pytest.raises(UsageError, match="give one"):
        shell.run_line_magic("qwen_save", "")
