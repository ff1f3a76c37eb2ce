"""Fault injection for the files qwen_magic reads and writes (issue #12).

Where the machine allows, each fault is the real condition, not a stand-in: an immutable file
(``chattr +i``, which stops even root), a read-only bind mount, a tiny full tmpfs, a truncated
file, a symbolic link, two processes or two kernels on one file. The tests run as root, which
ignores permission bits, so a plain ``chmod`` would prove nothing; where a condition cannot be
made (no ``chattr``, no mount rights) the test says so and patches the failing call instead, or
skips. The replies come from a scripted backend (``scripted``): the files are the subject here,
not the generating; two real kernels on one file run the tiny model.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from IPython.core.error import UsageError

import qwen_magic
from qwen_magic.conversation import Conversation, ConversationBook, Turn
from qwen_magic.session import current as session
from qwen_magic.storage import atomic, codec, export
from qwen_magic.storage import history as history_file
from qwen_magic.storage.codec import read_book
from qwen_magic.storage.history import HistoryStore
from qwen_magic.testing.kernel import kernel

FAST = "-n 3 --greedy --view text"
WARNING = "Could not save conversations"


def history(notebook: Path) -> Path:
    return notebook.with_name("analysis.qwen.json")


def ask(shell, message: str, line: str = FAST) -> None:
    shell.run_cell_magic("qwen", line, message)


def users(book: ConversationBook, name: str = "default") -> list[str]:
    return [turn.user for turn in book.get(name, create=False).turns]


def saved_users(path: Path, name: str = "default") -> list[str]:
    return users(read_book(path), name)


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


@contextmanager
def immutable(path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``chattr +i`` on ``path`` (no write, rename or delete, even for root) while inside.

    Where chattr cannot be used, ``os.replace`` onto that path raises PermissionError instead
    (the error a non-root user gets); the value yielded says which was used.
    """
    made = shutil.which("chattr") is not None and (
        subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    )
    if not made:
        real_replace = os.replace

        def refuse(src, dst, *args, **kwargs):
            if os.path.realpath(dst) == os.path.realpath(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(dst))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(atomic.os, "replace", refuse)
    try:
        yield "chattr" if made else "monkeypatched os.replace"
    finally:
        if made:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            monkeypatch.setattr(atomic.os, "replace", real_replace)


@contextmanager
def mounted(folder: Path, *options: str, tmpfs: bool = False) -> Iterator[None]:
    """``folder`` as a read-only bind mount of itself, or an empty tmpfs (needs mount rights)."""
    if tmpfs:
        command = ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)]
    else:
        command = ["mount", "--bind", str(folder), str(folder)]
    done = subprocess.run(command, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.decode().strip()}")
    try:
        if not tmpfs:
            subprocess.run(
                ["mount", "-o", "remount,ro,bind", str(folder), str(folder)],
                check=True,
                capture_output=True,
            )
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def book_with(*messages: str, name: str = "default") -> ConversationBook:
    book = ConversationBook()
    for message in messages:
        book.get(name).record(Turn(message, "reply"))
    return book


def valid_payload() -> dict:
    book = book_with("one", "two", "three")
    return json.loads(codec.book_to_json(book))


# -- 1. a history file or folder that cannot be written -----------------------------------------


def test_an_unwritable_history_keeps_turns_warns_once_and_resumes(
    shell, scripted, notebook, capsys, monkeypatch
):
    """An immutable history file (chattr +i) costs no cell: turns stay in memory, one warning
    line is shown once, and saving resumes, saying so once, when the file is writable again."""
    ask(shell, "first")
    path = history(notebook)
    before = path.read_bytes()
    capsys.readouterr()
    with immutable(path, monkeypatch):
        for message in ("second", "third", "fourth"):
            result = shell.run_cell(f"%%qwen {FAST}\n{message}")
            assert result.success, result.error_in_exec
        out = capsys.readouterr().out
        assert out.count(WARNING) == 1, out
        assert path.read_bytes() == before
    assert users(session().conversations) == ["first", "second", "third", "fourth"]
    ask(shell, "fifth")
    ask(shell, "sixth")
    out = capsys.readouterr().out
    assert out.count("again") == 1 and WARNING not in out
    assert saved_users(path) == ["first", "second", "third", "fourth", "fifth", "sixth"]


def test_a_read_only_notebook_folder_pauses_autosave_without_failing_cells(
    shell, scripted, notebook, capsys
):
    """With the notebook's folder mounted read-only, cells succeed, one warning names the
    read-only file system, and the first turn after the remount writes every turn."""
    with mounted(notebook.parent):
        ask(shell, "first")
        ask(shell, "second")
        out = capsys.readouterr().out
        assert out.count(WARNING) == 1 and "read-only" in out
        assert not history(notebook).exists()
    ask(shell, "third")
    assert "again" in capsys.readouterr().out
    assert saved_users(history(notebook)) == ["first", "second", "third"]


def test_a_full_disk_pauses_autosave_with_one_line(tmp_path):
    """On a full file system (a 64 KiB tmpfs, filled) save returns one 'disk is full' line once
    and leaves the old file whole."""
    folder = tmp_path / "small"
    folder.mkdir()
    with mounted(folder, "size=64k", tmpfs=True):
        path = folder / "h.qwen.json"
        store = HistoryStore(path)
        book = book_with("kept")
        assert store.save(book) is None
        before = path.read_bytes()
        with (folder / "filler").open("wb", buffering=0) as filler, pytest.raises(OSError):
            while True:
                filler.write(b"x" * 4096)
        book.get().record(Turn("big " * 20000, "reply"))
        first = store.save(book)
        assert first is not None and "disk is full" in first and "\n" not in first
        assert store.save(book) is None  # said once
        assert path.read_bytes() == before
        assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_a_file_without_write_permission_gives_one_line(tmp_path, monkeypatch):
    """A history file the user may not write (EACCES; monkeypatched, as root ignores modes)
    makes save return one line saying permission is denied, and raise nothing."""
    path = tmp_path / "h.qwen.json"
    store = HistoryStore(path)
    store.save(book_with("a"))

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(atomic.os, "replace", denied)
    message = store.save(book_with("a", "b"))
    assert message is not None and "permission denied" in message and "\n" not in message
    assert store.failing


# -- 4. wrongly typed history --------------------------------------------------------------------


def damage(payload: dict, change) -> dict:
    change(payload["conversations"]["default"])
    return payload


def set_turn(index: int, key: str, value):
    return lambda chat: chat["turns"][index].__setitem__(key, value)


WRONG = [
    (set_turn(2, "user", None), "conversation 'default', turn 3: 'user' must be text, not null"),
    (set_turn(0, "assistant", 5), "turn 1: 'assistant' must be text, not a number"),
    (set_turn(0, "stats", []), "turn 1: 'stats' must be an object, not a list"),
    (set_turn(1, "options", None), "turn 2: 'options' must be an object, not null"),
    (set_turn(0, "cell_id", 12), "turn 1: 'cell_id' must be text or null, not a number"),
    (set_turn(0, "interrupted", 1), "'interrupted' must be true or false, not a number"),
    (set_turn(0, "created", True), "'created' must be a number, not a boolean"),
    (set_turn(0, "created", "today"), "'created' must be a number, not text"),
    (set_turn(0, "model", ["m"]), "'model' must be text or null, not a list"),
    (set_turn(0, "turn_id", 7), "'turn_id' must be text, not a number"),
    (set_turn(0, "surprise", 1), "turn 1: has an unknown field 'surprise'"),
    (lambda chat: chat["turns"][0].pop("user"), "turn 1: 'user' is missing"),
    (lambda chat: chat["turns"].append("hi"), "turn 4: must be an object, not text"),
    (lambda chat: chat.__setitem__("name", 3), "the name 3 must be text, not a number"),
    (lambda chat: chat.__setitem__("name", "other"), "its 'name' is 'other'"),
    (lambda chat: chat.__setitem__("system_prompt", None), "'system_prompt' must be text"),
    (lambda chat: chat.__setitem__("turns", {}), "'turns' must be a list, not an object"),
    (
        lambda chat: chat["turns"][1].__setitem__("turn_id", chat["turns"][0]["turn_id"]),
        "turn 2: 'turn_id' repeats turn 1's",
    ),
]


@pytest.mark.parametrize(("change", "message"), WRONG)
def test_a_wrongly_typed_history_is_refused_in_one_line_naming_the_entry(tmp_path, change, message):
    """Each field of Turn and Conversation is type-checked on reading (bool is not a number, a
    number is not a bool), and the refusal names the conversation, turn and field."""
    path = tmp_path / "h.qwen.json"
    path.write_text(json.dumps(damage(valid_payload(), change)))
    before = path.read_bytes()
    with pytest.raises(UsageError) as error:
        read_book(path)
    assert message in one_line(error)
    assert path.read_bytes() == before


def test_restore_of_a_wrongly_typed_file_changes_nothing(shell, scripted, tmp_path):
    """%qwen_restore of a file with "user": null is refused in one line; the kernel keeps its
    conversations and the file its bytes."""
    ask(shell, "mine")
    path = tmp_path / "bad.qwen.json"
    path.write_text(json.dumps(damage(valid_payload(), set_turn(2, "user", None))))
    before = path.read_bytes()
    with pytest.raises(UsageError) as error:
        shell.run_line_magic("qwen_restore", str(path))
    assert "turn 3: 'user' must be text, not null" in one_line(error)
    assert users(session().conversations) == ["mine"]
    assert path.read_bytes() == before


def test_load_ext_refuses_a_wrongly_typed_history_and_never_overwrites_it(
    shell, scripted, notebook, capsys
):
    """The restore at %load_ext refuses a history whose stats are not an object: nothing is
    restored, one line says which entry, and later turns leave the file as it was."""
    path = history(notebook)
    path.write_text(json.dumps(damage(valid_payload(), set_turn(1, "stats", "fast"))))
    before = path.read_bytes()
    message = session().attach_history(shell)
    assert "turn 2: 'stats' must be an object, not text" in message and "\n" not in message
    assert not any(session().conversations.conversations.values())
    ask(shell, "new")
    ask(shell, "newer")
    assert path.read_bytes() == before
    assert users(session().conversations) == ["new", "newer"]


def test_a_history_from_before_turn_ids_still_loads(tmp_path):
    """Turns saved without a turn_id load, each getting its own new id."""
    payload = valid_payload()
    for turn in payload["conversations"]["default"]["turns"]:
        del turn["turn_id"]
    path = tmp_path / "old.qwen.json"
    path.write_text(json.dumps(payload))
    turns = read_book(path).get().turns
    assert [t.user for t in turns] == ["one", "two", "three"]
    assert len({t.turn_id for t in turns}) == 3


def write_id_less_history(path: Path) -> None:
    """A history as written before turns had ids, or by hand: user and assistant only."""
    turns = [{"user": "old q1", "assistant": "old a1"}, {"user": "old q2", "assistant": "old a2"}]
    chat = {"name": "default", "system_prompt": "You are a helpful assistant.", "turns": turns}
    payload = {"format": codec.FORMAT, "version": codec.VERSION, "conversations": {"default": chat}}
    path.write_text(json.dumps(payload))


def test_an_id_less_history_is_not_duplicated_by_the_first_autosave(shell, tiny, notebook, capsys):
    """A restored history whose turns have no ids is saved once, with the new turn after it and
    no note about another kernel, and the next kernel restores exactly those turns."""
    path = history(notebook)
    write_id_less_history(path)
    assert "Restored 2 turns" in session().attach_history(shell)
    capsys.readouterr()
    ask(shell, "New 0.")
    assert "another kernel" not in capsys.readouterr().out
    assert saved_users(path) == ["old q1", "old q2", "New 0."]
    ask(shell, "New 1.")
    assert saved_users(path) == ["old q1", "old q2", "New 0.", "New 1."]
    again = HistoryStore(path).load()  # the next kernel
    assert users(again) == ["old q1", "old q2", "New 0.", "New 1."]


def test_two_kernels_restoring_one_id_less_history_never_duplicate_it(tmp_path):
    """Two kernels that both restored an id-less history and each add a turn end with the old
    turns once and both new turns, each noting only the other's one turn."""
    path = tmp_path / "h.qwen.json"
    write_id_less_history(path)
    a, b = HistoryStore(path), HistoryStore(path)
    a_book, b_book = a.load(), b.load()
    a_book.get().record(Turn("from a", "x"))
    assert a.save(a_book) is None
    b_book.get().record(Turn("from b", "x"))
    assert b.save(b_book).startswith("Kept 1 turn that another kernel wrote")
    a_book.get().record(Turn("a again", "x"))
    assert a.save(a_book).startswith("Kept 1 turn that another kernel wrote")
    assert saved_users(path) == ["old q1", "old q2", "from a", "from b", "a again"]


def test_the_checked_fields_are_exactly_the_turns_fields():
    """The validator checks every field a Turn has, no more, no fewer."""
    from dataclasses import fields

    from qwen_magic.checks import _TURN_FIELDS

    assert set(_TURN_FIELDS) == {f.name for f in fields(Turn)}


# -- 5. %qwen_export overwriting files and their modes ------------------------------------------


@pytest.mark.parametrize("victim", ["analysis.ipynb", "analysis.qwen.json", "notes.md"])
def test_export_refuses_to_overwrite_a_file_that_is_not_an_export(
    shell, scripted, tmp_path, victim
):
    """%qwen_export onto a notebook, a history or a hand-written note is refused in one line
    that mentions --force, and the file keeps its bytes."""
    ask(shell, "hi")
    path = tmp_path / victim
    path.write_text('{"cells": []}')
    with pytest.raises(UsageError) as error:
        shell.run_line_magic("qwen_export", str(path))
    assert "--force" in one_line(error)
    assert path.read_text() == '{"cells": []}'


def test_export_overwrites_its_own_exports_and_anything_with_force(shell, scripted, tmp_path):
    """An earlier export or an empty file is replaced without asking; another file only with
    --force."""
    ask(shell, "hi")
    path = tmp_path / "chat.md"
    shell.run_line_magic("qwen_export", str(path))
    assert path.read_text().splitlines()[0] == export.EXPORT_MARK
    ask(shell, "again")
    shell.run_line_magic("qwen_export", str(path))
    assert "again" in path.read_text()
    other = tmp_path / "notes.md"
    other.write_text("mine")
    shell.run_line_magic("qwen_export", f"--force {other}")
    assert "again" in other.read_text()
    empty = tmp_path / "empty.md"
    empty.touch()
    shell.run_line_magic("qwen_export", str(empty))
    assert "again" in empty.read_text()


def test_writes_keep_an_existing_mode_and_new_files_follow_the_umask(shell, scripted, tmp_path):
    """%qwen_export and %qwen_save keep an existing file's mode (0664 stays 0664), and a new
    file gets 0666 less the umask (0640 under umask 027), not mkstemp's 0600."""
    ask(shell, "hi")
    old_mask = os.umask(0o027)
    try:
        shell.run_line_magic("qwen_export", str(tmp_path / "new.md"))
        shell.run_line_magic("qwen_save", str(tmp_path / "new.qwen.json"))
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE((tmp_path / "new.md").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "new.qwen.json").stat().st_mode) == 0o640
    for name in ("new.md", "new.qwen.json"):
        os.chmod(tmp_path / name, 0o664)
    shell.run_line_magic("qwen_export", str(tmp_path / "new.md"))
    shell.run_line_magic("qwen_save", str(tmp_path / "new.qwen.json"))
    assert stat.S_IMODE((tmp_path / "new.md").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "new.qwen.json").stat().st_mode) == 0o664


def test_the_autosaved_history_gets_the_umask_mode(shell, scripted, notebook):
    """The history file autosave creates beside the notebook is 0644 under umask 022."""
    old_mask = os.umask(0o022)
    try:
        ask(shell, "hi")
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(history(notebook).stat().st_mode) == 0o644


def test_writing_to_a_symlink_writes_through_to_its_target(shell, scripted, notebook, tmp_path):
    """A history file or export that is a symbolic link stays a link; the file it names gets
    the new content (and its own mode)."""
    synced = tmp_path / "synced"
    synced.mkdir()
    real_history = synced / "analysis.qwen.json"
    history(notebook).symlink_to(real_history)
    ask(shell, "through the link")
    assert history(notebook).is_symlink()
    assert saved_users(real_history) == ["through the link"]
    ask(shell, "again")
    assert history(notebook).is_symlink()
    assert saved_users(real_history) == ["through the link", "again"]

    real_export = synced / "chat.md"
    real_export.write_text(export.EXPORT_MARK + "\nold\n")
    os.chmod(real_export, 0o604)
    link = tmp_path / "chat.md"
    link.symlink_to(real_export)
    shell.run_line_magic("qwen_export", str(link))
    assert link.is_symlink() and "again" in real_export.read_text()
    assert stat.S_IMODE(real_export.stat().st_mode) == 0o604


# -- 6. autosave resumes after a refused file is moved aside -------------------------------------


def test_autosave_resumes_once_a_corrupt_history_is_moved_aside(shell, scripted, notebook, capsys):
    """After the refused file is moved aside, as the message advises, the next turn saves every
    turn again and says so once."""
    path = history(notebook)
    path.write_text("{half a file")
    assert "Not saving conversations" in session().attach_history(shell)
    ask(shell, "one")
    assert path.read_text() == "{half a file"
    path.rename(path.with_name("aside.json"))
    capsys.readouterr()
    ask(shell, "two")
    ask(shell, "three")
    assert capsys.readouterr().out.count("again") == 1
    assert saved_users(path) == ["one", "two", "three"]


def test_autosave_resumes_when_the_file_is_a_history_again(shell, scripted, notebook):
    """A refused file replaced by a valid history is merged with, not overwritten: its turns
    stay and autosave goes on."""
    path = history(notebook)
    path.write_text("[]")
    session().attach_history(shell)
    ask(shell, "mine")
    path.write_text(codec.book_to_json(book_with("restored by hand")))
    ask(shell, "mine again")
    assert set(saved_users(path)) == {"restored by hand", "mine", "mine again"}


def test_qwen_save_to_the_notebook_file_clears_the_refusal(shell, scripted, notebook, capsys):
    """%qwen_save with no file, once the bad file is gone, writes the notebook's history and
    ends the refusal; while it is there, it is refused in one line and kept."""
    path = history(notebook)
    path.write_text("not json")
    session().attach_history(shell)
    ask(shell, "one")
    with pytest.raises(UsageError) as error:
        shell.run_line_magic("qwen_save", "")
    assert "left untouched" in one_line(error) and path.read_text() == "not json"
    path.unlink()
    shell.run_line_magic("qwen_save", "")
    assert "Saved 1 turn" in capsys.readouterr().out
    assert session().history.refused is None
    assert saved_users(path) == ["one"]


def test_a_truncated_history_is_refused_and_never_overwritten(shell, scripted, notebook):
    """A history cut short (a killed process) is refused with one line at %load_ext, and turns
    after it leave it byte for byte as it was."""
    path = history(notebook)
    whole = codec.book_to_json(book_with("a", "b", "c"))
    path.write_text(whole[: len(whole) // 2])
    before = path.read_bytes()
    message = session().attach_history(shell)
    assert "not readable JSON" in message and "\n" not in message
    ask(shell, "new")
    ask(shell, "newer")
    assert path.read_bytes() == before


# -- 7. two kernels on one notebook --------------------------------------------------------------


def test_two_stores_on_one_file_keep_each_others_turns(tmp_path):
    """Two kernels' stores on one file merge by turn: each keeps the other's turns, deletes only
    its own, and says once when it kept the other's."""
    path = tmp_path / "h.qwen.json"
    a_book, a = ConversationBook(), HistoryStore(path)
    b_book, b = ConversationBook(), HistoryStore(path)
    a_book.get().record(Turn("a1", "x"))
    assert a.save(a_book) is None
    b_book.get().record(Turn("b1", "x"))
    assert "Kept 1 turn that another kernel wrote" in b.save(b_book)
    assert saved_users(path) == ["a1", "b1"]
    a_book.get().record(Turn("a2", "x"))
    assert "Kept 1 turn" in a.save(a_book)
    assert saved_users(path) == ["a1", "b1", "a2"]
    b_book.get().record(Turn("b2", "x"))
    assert "Kept 1 turn " in b.save(b_book)  # only a2 is new to b
    assert saved_users(path) == ["a1", "b1", "a2", "b2"]
    a_book.get().pop()  # a deletes its own a2
    assert "Kept 1 turn " in a.save(a_book)  # b2 is new to a
    assert saved_users(path) == ["a1", "b1", "b2"]
    a_book.get().record(Turn("a3", "x"))
    assert a.save(a_book) is None  # nothing new from b: no note
    assert saved_users(path) == ["a1", "b1", "b2", "a3"]
    b_book.get("other").record(Turn("b-other", "x"))
    b_book.get().reset()  # b forgets b1 and b2
    b.save(b_book)
    assert saved_users(path) == ["a1", "a3"]
    assert saved_users(path, "other") == ["b-other"]
    assert users(a_book) == ["a1", "a3"]  # nothing was pushed into a's memory


def test_a_restored_turn_removed_before_any_save_is_deleted_from_the_file(tmp_path):
    """A kernel that restored the file and pops or resets before its first save deletes those
    turns from the file: they were its own, not another kernel's."""
    path = tmp_path / "h.qwen.json"
    atomic.write_atomic(path, codec.book_to_json(book_with("one", "two", "three")))
    store = HistoryStore(path)
    book = store.load()
    book.get().pop()
    assert store.save(book) is None
    assert saved_users(path) == ["one", "two"]
    book.get().reset()
    assert store.save(book) is None
    assert saved_users(path) == []


def test_concurrent_saves_from_two_processes_lose_no_turn(tmp_path):
    """Two processes saving 40 turns each into one file at the same moment end with all 80."""
    path = tmp_path / "h.qwen.json"
    script = (
        "import sys, time\n"
        "from qwen_magic.conversation import Conversation, ConversationBook, Turn\n"
        "from qwen_magic.storage.history import HistoryStore\n"
        "path, tag, start = sys.argv[1], sys.argv[2], float(sys.argv[3])\n"
        "book, store = ConversationBook(), HistoryStore(path)\n"
        "while time.time() < start: time.sleep(0.001)\n"
        "for i in range(40):\n"
        "    book.get().record(Turn(f'{tag}{i}', 'x'))\n"
        "    store.save(book)\n"
    )
    package_root = str(Path(qwen_magic.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": package_root}
    start = time.time() + 2
    workers = [
        subprocess.Popen([sys.executable, "-c", script, str(path), tag, str(start)], env=env)
        for tag in ("a", "b")
    ]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    saved = saved_users(path)
    assert sorted(saved) == sorted([f"a{i}" for i in range(40)] + [f"b{i}" for i in range(40)])
    assert [u for u in saved if u.startswith("a")] == [f"a{i}" for i in range(40)]


@pytest.mark.kernel
def test_two_real_kernels_on_one_notebook_keep_each_others_turns(tiny_model_path, tmp_path):
    """Two kernels on one notebook (two browser tabs) each chat; the history file ends with
    every turn of both, and the second kernel's output says it kept the first's."""
    notebook = tmp_path / "shared.ipynb"
    notebook.write_text("{}")
    setup = f"%load_ext qwen_magic\n%qwen_load {tiny_model_path} --device cpu --quiet"
    env = {"JPY_SESSION_NAME": str(notebook)}
    with kernel(env) as first, kernel(env) as second:
        first.run_ok(setup)
        second.run_ok(setup)
        first.run_ok(f"%%qwen {FAST}\nfrom the first tab")
        out = second.run_ok(f"%%qwen {FAST}\nfrom the second tab")
        assert "Kept 1 turn that another kernel wrote" in out
        first.run_ok(f"%%qwen {FAST}\nfirst tab again")
    assert saved_users(notebook.with_name("shared.qwen.json")) == [
        "from the first tab",
        "from the second tab",
        "first tab again",
    ]


# -- 11. a path that an ASCII-locale kernel cannot encode ---------------------------------------


def test_a_non_ascii_path_in_an_ascii_locale_kernel_is_one_line(tmp_path):
    """In a kernel whose file names are ASCII only (LC_ALL=C, PYTHONUTF8=0), %qwen_save,
    %qwen_export and %qwen_restore to a path with an é each fail with one line saying why and
    what to do, instead of a raw UnicodeEncodeError; nothing is written."""
    script = (
        "import sys\n"
        "from IPython.core.error import UsageError\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "ip.run_line_magic('load_ext', 'qwen_magic')\n"
        "import qwen_magic\n"
        "from qwen_magic.conversation import Turn\n"
        "qwen_magic.current_session().conversations.get().record(Turn('q', 'a'))\n"
        "print(sys.getfilesystemencoding())\n"
        "for magic, name in [('qwen_save', 'caf\\u00e9.qwen.json'),\n"
        "                    ('qwen_export', 'caf\\u00e9.md'),\n"
        "                    ('qwen_restore', 'caf\\u00e9.qwen.json')]:\n"
        "    try:\n"
        "        ip.run_line_magic(magic, sys.argv[1] + '/' + name)\n"
        "    except UsageError as error:\n"
        "        print(ascii(str(error)))\n"
    )
    package_root = str(Path(qwen_magic.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": package_root, "LC_ALL": "C", "PYTHONUTF8": "0"}
    env.pop("PYTHONIOENCODING", None)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    encoding, *errors = done.stdout.splitlines()
    assert encoding == "ascii"
    assert len(errors) == 3, done.stdout
    for error in errors:
        assert "cannot be used on this system" in error and "LANG=C.UTF-8" in error, error
    assert "UnicodeEncodeError" not in done.stderr
    assert list(tmp_path.iterdir()) == []


# -- 12. saving and exporting into folders and read-only places ----------------------------------


@pytest.mark.parametrize("magic", ["qwen_save", "qwen_export", "qwen_restore"])
def test_a_folder_as_the_file_is_one_line_saying_what_to_give(shell, scripted, tmp_path, magic):
    """%qwen_save, %qwen_export and %qwen_restore given a folder say, in one line, to give a
    file name in it; nothing is written."""
    ask(shell, "hi")
    folder = tmp_path / "chats"
    folder.mkdir()
    with pytest.raises(UsageError) as error:
        shell.run_line_magic(magic, str(folder))
    assert "is a folder" in one_line(error) and str(folder / "chat") in one_line(error)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("magic", ["qwen_save", "qwen_export"])
def test_a_missing_folder_is_created_one_level_deep_and_said(
    shell, scripted, tmp_path, magic, capsys
):
    """A missing parent folder is created (and the message names it); two missing levels are
    refused in one line naming the first missing folder, creating nothing."""
    ask(shell, "hi")
    capsys.readouterr()
    shell.run_line_magic(magic, str(tmp_path / "new" / "chat.out"))
    assert f"created the folder {tmp_path / 'new'}" in capsys.readouterr().out
    assert (tmp_path / "new" / "chat.out").exists()
    with pytest.raises(UsageError) as error:
        shell.run_line_magic(magic, str(tmp_path / "typo" / "deeper" / "chat.out"))
    assert f"The folder {tmp_path / 'typo'} does not exist" in one_line(error)
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("magic", ["qwen_save", "qwen_export"])
def test_saving_into_a_read_only_folder_is_one_line(shell, scripted, tmp_path, magic):
    """Into a read-only mount, %qwen_save and %qwen_export fail in one line naming the cause,
    with no traceback-worthy OSError and nothing left behind."""
    ask(shell, "hi")
    folder = tmp_path / "ro"
    folder.mkdir()
    with mounted(folder), pytest.raises(UsageError) as error:
        shell.run_line_magic(magic, str(folder / "chat.out"))
    assert "read-only" in one_line(error) and "Choose another place" in one_line(error)
    assert list(folder.iterdir()) == []


def test_saving_onto_an_immutable_file_is_one_line(shell, scripted, tmp_path, monkeypatch):
    """%qwen_save over an immutable history (chattr +i) fails in one line; the file is kept."""
    ask(shell, "hi")
    path = tmp_path / "h.qwen.json"
    shell.run_line_magic("qwen_save", str(path))
    before = path.read_bytes()
    ask(shell, "more")
    with immutable(path, monkeypatch), pytest.raises(UsageError) as error:
        shell.run_line_magic("qwen_save", str(path))
    assert "Could not write" in one_line(error)
    assert path.read_bytes() == before


# -- odd files and names -------------------------------------------------------------------------


def test_a_huge_history_file_is_refused_without_reading_it(tmp_path):
    """A history larger than MAX_BYTES (a sparse 300 MB file) is refused in one line at once."""
    path = tmp_path / "h.qwen.json"
    with path.open("wb") as handle:
        handle.truncate(300 * 2**20)
    started = time.perf_counter()
    with pytest.raises(UsageError) as error:
        read_book(path)
    assert "more than the 256 MB" in one_line(error)
    assert time.perf_counter() - started < 1
    store = HistoryStore(path)
    store.check_writable()
    assert store.save(book_with("x")) is None and path.stat().st_size == 300 * 2**20


def test_a_large_history_autosaves_without_rereading_its_own_file(tmp_path, monkeypatch):
    """A 10 MB history (2,000 long turns) restores and autosaves in seconds, and a save after
    our own save does not parse the file again."""
    path = tmp_path / "h.qwen.json"
    book = ConversationBook()
    for number in range(2000):
        book.get().record(Turn(f"question {number} " + "x" * 2500, "answer " + "y" * 2500))
    atomic.write_atomic(path, codec.book_to_json(book))
    assert path.stat().st_size > 10 * 10**6
    started = time.perf_counter()
    store = HistoryStore(path)
    restored = store.load()
    restored.get().record(Turn("one more", "reply"))
    assert store.save(restored) is None
    reads = []
    real_read_book = codec.read_book
    monkeypatch.setattr(history_file, "read_book", lambda p: reads.append(p) or real_read_book(p))
    restored.get().record(Turn("and another", "reply"))
    assert store.save(restored) is None
    assert reads == []
    assert time.perf_counter() - started < 20
    assert len(read_book(path).get().turns) == 2002


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "is empty"),
        (" padded", "starts or ends with a space"),
        ("two\nlines", "line break"),
        ("x" * 201, "longer than 200"),
    ],
)
def test_odd_conversation_names_are_refused_in_one_line(shell, scripted, name, problem):
    """-c with an empty, padded, multi-line or overlong name is one line saying so; nothing is
    added to the book."""
    with pytest.raises(UsageError) as error:
        ConversationBook().get(name)
    assert problem in one_line(error)
    if "\n" not in name:
        with pytest.raises(UsageError, match="choose a one-line name"):
            shell.run_cell_magic("qwen", f"{FAST} -c '{name}'", "hi")
    assert name not in session().conversations.conversations


def test_names_with_slashes_and_unicode_save_restore_and_export(shell, scripted, tmp_path):
    """A conversation named 'notes/2024 · été' is a name, never a path: it saves, restores and
    exports like any other."""
    ask(shell, "hi", f"{FAST} -c 'notes/2024 · été'")
    path = tmp_path / "h.qwen.json"
    shell.run_line_magic("qwen_save", str(path))
    shell.run_line_magic("qwen_restore", str(path))
    assert users(session().conversations, "notes/2024 · été") == ["hi"]
    shell.run_line_magic("qwen_export", f"-c 'notes/2024 · été' {tmp_path / 'n.md'}")
    assert "# Conversation: notes/2024 · été" in (tmp_path / "n.md").read_text()


def test_a_history_with_a_name_saved_before_names_were_checked_still_loads(tmp_path):
    """A saved conversation named '' (allowed before names were checked) still loads."""
    book = ConversationBook()
    book.conversations[""] = Conversation("", "s", [Turn("q", "a")])
    path = tmp_path / "h.qwen.json"
    path.write_text(codec.book_to_json(book))
    assert users(read_book(path), "") == ["q"]


def test_a_history_with_a_multi_line_conversation_name_is_refused(tmp_path):
    """A saved conversation whose name holds a line break is refused, naming it escaped."""
    payload = valid_payload()
    chat = payload["conversations"].pop("default")
    chat["name"] = "a\nb"
    payload["conversations"]["a\nb"] = chat
    path = tmp_path / "h.qwen.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(UsageError) as error:
        read_book(path)
    assert "'a\\nb'" in one_line(error) and "line break" in one_line(error)


# -- what a cell can hold --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "cell", "says"),
    [
        (FAST, "caf\udce9 au lait", "lone surrogate"),
        (f"{FAST} -s 'x\udcff'", "hello", "lone surrogate"),
        (f"{FAST} -i", "value: $qm_binary", "lone surrogate"),
        ("-n 100000", "hello", "leaves no room for the message"),
        (f"{FAST} -o 1st", "hello", "is not a Python variable name"),
        (f"{FAST} -o class", "hello", "is not a Python variable name"),
        (f"{FAST} -t nan", "hello", "--temperature must be a finite number"),
        (f"{FAST} --repetition-penalty nan", "hello", "--repetition-penalty must be a finite"),
        (f"{FAST} --seed -3", "hello", "--seed must be between 0"),
    ],
)
def test_bad_cell_input_is_one_line_and_changes_nothing(shell, scripted, line, cell, says):
    """Text with lone surrogates (typed, or pulled in with -i from bytes decoded with
    'surrogateescape'), a reply longer than the context, a variable name that is not one, and
    non-finite or out-of-range numbers: one line each, before any work, nothing recorded."""
    ask(shell, "first")
    shell.user_ns["qm_binary"] = b"\xff\xfe".decode("utf-8", "surrogateescape")
    with pytest.raises(UsageError) as error:
        shell.run_cell_magic("qwen", line, cell)
    assert says in one_line(error)
    assert users(session().conversations) == ["first"]
    assert "1st" not in shell.user_ns
