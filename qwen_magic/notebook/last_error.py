"""The last error, put into a prompt (``%qwen_error``).

:func:`last_error` finds the most recent cell that raised,
its number and source (``In[n]``) and its traceback as IPython showed it, without the ANSI
colour codes. Three sources, the first that knows one:

1. :class:`ErrorWatcher`, a ``post_run_cell`` hook installed with the magics, keeps every
   failed cell's source and exception from ``%load_ext`` on, whichever frontend runs the cells
   (nbval runs them with ``store_history=False``, so they are numbered nowhere; then the cell
   has no number);
2. IPython 9 keeps every failed cell's formatted traceback in
   ``shell.history_manager.exceptions`` (keyed by execution count, as ``In`` is), which covers
   errors from before ``%load_ext``;
3. older IPython only keeps the last exception in ``sys.last_value``, whose cell is found from
   the traceback's frames (each cell is compiled under a file name IPython maps back to its
   number).

Errors that qwen_magic's own magics raised (a one-line mistake such as a bad option, or an
interrupted reply) never count: asking about the last error should not answer "you typed -n
ten". They are marked (:func:`mark_own_error`) and their cells noted (:func:`note_magic_error`).
IPython's own one-line errors (an unknown ``%magic``) do count. :func:`error_prompt` turns the
error into a message, trimming a long traceback to its head and its last frames (and saying so).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

from qwen_magic.errors import QwenMagicError

#: The traceback and cell of %qwen_error take at most this many characters together.
ERROR_LIMIT = 10_000
#: The default question of %qwen_error.
EXPLAIN_AND_FIX = (
    "Explain in a few sentences what caused this error, then show the corrected code of the cell."
)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour and cursor codes."""
    return _ANSI.sub("", text)


# -- the last error -------------------------------------------------------------------------


@dataclass
class CellError:
    """An error a cell raised: the cell's number and source, and the traceback as plain text
    pieces (IPython's structured traceback: a header, one piece per frame, the error line)."""

    number: int | None
    source: str
    ename: str
    evalue: str
    traceback: list[str]

    @property
    def where(self) -> str:
        """``cell In[3]``, or ``a cell`` where the frontend did not number it (nbval)."""
        return f"cell In[{self.number}]" if self.number is not None else "a cell"


#: The attribute marking an exception raised by one of qwen_magic's magics.
OWN_ERROR = "_qwen_magic_own_error"


def mark_own_error(error: BaseException) -> BaseException:
    """Mark ``error`` as raised by one of qwen_magic's magics; returns it."""
    setattr(error, OWN_ERROR, True)
    return error


class ErrorWatcher:
    """A ``post_run_cell`` hook keeping the last failed cell in the kernel's session."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell

    @classmethod
    def install(cls, shell: Any) -> None:
        """Register the hook on ``shell``, replacing one left by an earlier ``%load_ext``."""
        events = getattr(shell, "events", None)
        if events is None:
            return
        cls.uninstall(shell)
        events.register("post_run_cell", cls(shell).post_run_cell)

    @staticmethod
    def uninstall(shell: Any) -> None:
        """Remove the hook from ``shell`` (``%unload_ext``)."""
        events = getattr(shell, "events", None)
        if events is None:
            return
        for callback in list(events.callbacks.get("post_run_cell", [])):
            # By name: after %reload_ext the old hook's class is an older copy of this one.
            if type(getattr(callback, "__self__", None)).__name__ == "ErrorWatcher":
                events.unregister("post_run_cell", callback)

    def post_run_cell(self, result: Any) -> None:
        error = None if result is None else result.error_before_exec or result.error_in_exec
        if error is None or getattr(error, OWN_ERROR, False):
            return
        from qwen_magic import session

        info = result.info
        stored = bool(getattr(info, "store_history", False))
        session.current().last_cell_error = CellError(
            number=result.execution_count if stored else None,
            source=getattr(info, "raw_cell", "") or "",
            ename=type(error).__name__,
            evalue=str(error),
            traceback=format_traceback(self.shell, error),
        )


def magic_error_key(number: int, error: BaseException) -> tuple[int, str, str]:
    """How a failed cell is recognised in IPython's record of errors."""
    return (number, type(error).__name__, str(error))


def note_magic_error(shell: Any, error: BaseException, noted: set[tuple[int, str, str]]) -> None:
    """Remember that the running cell failed with ``error`` raised by one of qwen_magic's magics
    (as IPython will record it), so that :func:`last_error` passes over it."""
    count = getattr(shell, "execution_count", None)
    if isinstance(count, int):  # the running cell's number: the count was raised as it began
        noted.add(magic_error_key(count - 1, error))


def last_error(
    shell: Any,
    ignore: set[tuple[int, str, str]] | None = None,
    watched: CellError | None = None,
) -> CellError | None:
    """The most recent error a cell raised: ``watched`` (what :class:`ErrorWatcher` saw since
    ``%load_ext``), else IPython's own record, leaving out those in ``ignore`` (qwen_magic's
    own); None if there is none."""
    if watched is not None:
        return watched
    ignore = ignore or set()
    stored = getattr(getattr(shell, "history_manager", None), "exceptions", None)
    if isinstance(stored, dict):
        return _from_history(shell, stored, ignore)
    return _from_sys(shell, ignore)


def _from_history(shell: Any, stored: dict, ignore: set[tuple[int, str, str]]) -> CellError | None:
    """IPython 9: every failed cell's formatted traceback, keyed by its execution count."""
    for number in sorted(stored, reverse=True):
        entry = stored[number]
        ename, evalue = str(entry.get("ename", "")), str(entry.get("evalue", ""))
        if (number, ename, evalue) in ignore:
            continue
        return CellError(
            number=number,
            source=_cell_source(shell, number),
            ename=ename,
            evalue=evalue,
            traceback=[strip_ansi(str(piece)) for piece in entry.get("traceback") or []],
        )
    return None


def _from_sys(shell: Any, ignore: set[tuple[int, str, str]]) -> CellError | None:
    """Older IPython: the last exception shown, ``sys.last_value``; its cell from its frames."""
    value = getattr(sys, "last_value", None)
    if value is None:
        return None
    number = _cell_number(shell, value)
    if number is not None and magic_error_key(number, value) in ignore:
        return None
    if getattr(value, OWN_ERROR, False) or _raised_by_qwen_magic(value):
        return None
    return CellError(
        number=number,
        source=_cell_source(shell, number) if number is not None else "",
        ename=type(value).__name__,
        evalue=str(value),
        traceback=format_traceback(shell, value),
    )


def _raised_by_qwen_magic(value: BaseException) -> bool:
    return isinstance(value, QwenMagicError) or isinstance(value.__cause__, QwenMagicError)


def _cell_number(shell: Any, value: BaseException) -> int | None:
    """The number of the cell a traceback starts in (for a syntax error: the cell it is in)."""
    numbers = getattr(getattr(shell, "compile", None), "_filename_map", None) or {}
    if isinstance(value, SyntaxError) and value.filename in numbers:
        return numbers[value.filename]
    tb = value.__traceback__
    while tb is not None:
        if (number := numbers.get(tb.tb_frame.f_code.co_filename)) is not None:
            return number
        tb = tb.tb_next
    return None


def _cell_source(shell: Any, number: int) -> str:
    cells = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None)
    if cells is None:
        cells = (getattr(shell, "user_ns", None) or {}).get("In") or []
    return cells[number] if 0 <= number < len(cells) else ""


def format_traceback(shell: Any, value: BaseException) -> list[str]:
    """``value``'s traceback as IPython shows it, in pieces, without colour codes."""
    etype, tb = type(value), value.__traceback__
    try:
        if etype.__name__ == "UsageError":  # IPython shows these as one line
            pieces = [f"UsageError: {value}"]
        elif hasattr(value, "_render_traceback_"):
            pieces = value._render_traceback_()
        elif isinstance(value, SyntaxError):
            pieces = shell.SyntaxTB.structured_traceback(etype, value, [])
        else:
            pieces = shell.InteractiveTB.structured_traceback(etype, value, tb, tb_offset=1)
    except Exception:  # formatting failed: Python's own format
        import traceback

        pieces = traceback.format_exception(etype, value, tb)
    return [strip_ansi(str(piece)) for piece in pieces]


def trim_traceback(pieces: list[str], limit: int) -> tuple[str, int]:
    """The traceback as text of at most about ``limit`` characters, and how many frames were
    left out. The head (the failing cell's frame) and the last frames with the error line are
    kept; the frames between go first, then the text itself is cut in the middle."""
    pieces = [p.rstrip() for p in pieces if p.strip() and set(p.strip()) != {"-"}]
    pieces = [re.sub(r"^(\w[\w.]*) {3,}(Traceback)", r"\1  \2", p) for p in pieces]
    text = "\n".join(pieces)
    left_out = 0
    head, tail = 2, 3  # header and first frame; the last two frames and the error line
    while len(text) > limit and len(pieces) > head + tail and tail >= 1:
        left_out = len(pieces) - head - tail
        text = "\n".join(
            [*pieces[:head], f"… {left_out} frames left out …", *pieces[len(pieces) - tail :]]
        )
        if head > 1:
            head -= 1
        else:
            tail -= 1
    if len(text) > limit:  # a few enormous frames (a long line, a verbose mode's locals)
        keep = max(limit - 60, 40)
        first, last = text[: keep // 3], text[len(text) - (keep - keep // 3) :]
        text = f"{first}\n… {len(text) - keep:,} characters left out …\n{last}"
        left_out = max(left_out, 1)
    return text, left_out


def error_prompt(error: CellError, instruction: str = "", limit: int = ERROR_LIMIT) -> str:
    """The message ``%qwen_error`` sends: the failing cell, its traceback (trimmed to fit
    ``limit`` characters together, saying so), and what to do (default: explain and fix)."""
    source = error.source.strip("\n")
    source_limit = max(limit * 2 // 5, 200)
    cut_source = ""
    if len(source) > source_limit:
        cut_source = f" (cut: the first {source_limit:,} of its {len(source):,} characters)"
        source = source[:source_limit]
    traceback, left_out = trim_traceback(error.traceback, max(limit - len(source), 400))
    trimmed = " (trimmed to fit: the middle is left out)" if left_out else ""
    title = f"Cell In[{error.number}]" if error.number is not None else "The cell"
    cell = f"{title}{cut_source}:\n```python\n{source}\n```\n\n" if source else ""
    return (
        f"Running {error.where} of my notebook raised {error.ename}.\n\n"
        f"{cell}"
        f"Traceback{trimmed}:\n```\n{traceback}\n```\n\n"
        f"{instruction.strip() or EXPLAIN_AND_FIX}"
    )


# -- cells and values in a prompt ------------------------------------------------------------


# -- code in a reply ---------------------------------------------------------------------------
