"""What the notebook holds, put into prompts: the last error, cells and values, code in replies.

The magics call these plain functions; none of them touches a model.

**The last error** (``%qwen_error``): :func:`last_error` finds the most recent cell that raised,
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

**Cells and values** (``%%qwen -i``): :func:`interpolate` replaces ``$name``, ``${name}`` and
``${expression}`` with values from the user's namespace. An expression is a name followed by
attributes and literal indexes only: ``${In[3]}``, ``${Out[3]}``, ``${_}``, ``${df.columns}``,
``${data['key'][-1]}``. It is parsed with :mod:`ast` and walked by hand, never ``eval``-ed, so
no call or operator can run. Strings go in as they are, other values as IPython pretty-prints
them; a value longer than :data:`VALUE_LIMIT` characters is cut, with a note in the prompt.
``$$`` is a literal ``$``, a ``$`` not followed by a name or ``{`` stays as written, and braces
elsewhere are never special.

**Code in a reply** (``--code``): :func:`python_code` collects a reply's Python code blocks
(```` ```python ````, ```` ```py ```` or bare fences) and :func:`offer_code` hands them to
``shell.set_next_input``: JupyterLab inserts them as a new code cell below (not run), terminal
IPython pre-fills the next prompt, and frontends that ignore it (nbclient, nbval) do nothing.
"""

from __future__ import annotations

import ast
import re
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

from qwen_magic.errors import QwenMagicError

#: A value put into a prompt with -i is cut after this many characters.
VALUE_LIMIT = 4000
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
        """Watch ``shell``'s cells; a watcher installed before (``%reload_ext``) is replaced."""
        events = getattr(shell, "events", None)
        if events is None:
            return
        for callback in list(events.callbacks.get("post_run_cell", [])):
            if type(getattr(callback, "__self__", None)).__name__ == cls.__name__:
                events.unregister("post_run_cell", callback)
        events.register("post_run_cell", cls(shell).post_run_cell)

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

_PLACEHOLDER = re.compile(
    r"\$(?:(?P<dollar>\$)|\{(?P<braced>[^{}]*)\}|(?P<name>[^\W\d]\w*)|(?P<unclosed>\{))"
)
_ALLOWED = (
    "only names, .attributes and [literal] indexes, e.g. ${In[3]} or ${data['key'][0]}; "
    "compute anything else into a variable first"
)


def interpolate(message: str, namespace: dict[str, Any], *, limit: int = VALUE_LIMIT) -> str:
    """Replace ``$name``, ``${name}`` and ``${expression}`` in ``message`` with values from
    ``namespace``; ``$$`` is a ``$``; anything else stays as written."""

    def replace(match: re.Match[str]) -> str:
        if match["dollar"]:
            return "$"
        if match["unclosed"]:
            line = message.count("\n", 0, match.start()) + 1
            raise QwenMagicError(
                f"--interpolate: the '${{' on line {line} is not closed by '}}'; close it, or "
                "write $$ for a literal $."
            )
        expression = (match["braced"] if match["braced"] is not None else match["name"]).strip()
        shown = f"${{{expression}}}" if match["braced"] is not None else f"${expression}"
        return render(evaluate(expression, namespace, shown), shown, limit)

    return _PLACEHOLDER.sub(replace, message)


def evaluate(expression: str, namespace: dict[str, Any], shown: str | None = None) -> Any:
    """The value of ``expression`` (a name, then attributes and literal indexes) in
    ``namespace``, found without ``eval``; one-line errors name what is wrong."""
    shown = shown or f"${{{expression}}}"
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        raise QwenMagicError(f"--interpolate: {shown} is not allowed: {_ALLOWED}.") from None
    return _walk(tree, namespace, shown)


def _walk(node: ast.AST, namespace: dict[str, Any], shown: str) -> Any:
    if isinstance(node, ast.Name):
        if node.id not in namespace:
            raise QwenMagicError(
                f"--interpolate: no variable {node.id!r} (in {shown}); define it, or write $$ "
                "for a literal $."
            )
        return namespace[node.id]
    if isinstance(node, ast.Attribute):
        if node.attr.startswith("__"):
            raise QwenMagicError(
                f"--interpolate: {shown} is not allowed: no .__dunder__ attributes; {_ALLOWED}."
            )
        value = _walk(node.value, namespace, shown)
        try:
            return getattr(value, node.attr)
        except AttributeError:
            raise QwenMagicError(
                f"--interpolate: {shown}: {type(value).__name__} object has no attribute "
                f"{node.attr!r}."
            ) from None
        except Exception as error:
            raise _raised(shown, error) from error
    if isinstance(node, ast.Subscript):
        key = _literal_index(node.slice, shown)
        value = _walk(node.value, namespace, shown)
        try:
            return value[key]
        except (KeyError, IndexError):
            raise QwenMagicError(f"--interpolate: {shown}: {_missing(node, value, key)}.") from None
        except Exception as error:
            raise _raised(shown, error) from error
    raise QwenMagicError(f"--interpolate: {shown} is not allowed: {_ALLOWED}.")


def _literal_index(node: ast.AST, shown: str) -> int | str:
    if isinstance(node, ast.Constant) and type(node.value) in (int, str):
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) is int
    ):
        return -node.operand.value
    raise QwenMagicError(
        f"--interpolate: {shown} is not allowed: an index must be a literal number or string; "
        f"{_ALLOWED}."
    )


def _missing(node: ast.Subscript, value: Any, key: int | str) -> str:
    base = ast.unparse(node.value)
    if base == "Out" and isinstance(key, int):
        return f"Out has no entry {key} (cell {key} did not end with a value)"
    if base == "In" and isinstance(key, int):
        return f"In has no cell {key} (cells run so far: {max(len(value) - 1, 0)})"
    size = f" of {len(value)}" if hasattr(value, "__len__") else ""
    kind = "index" if isinstance(key, int) else "key"
    return f"{base} has no {kind} {key!r} ({type(value).__name__}{size})"


def _raised(shown: str, error: Exception) -> QwenMagicError:
    return QwenMagicError(f"--interpolate: {shown} raised {type(error).__name__}: {error}")


def render(value: Any, shown: str = "the value", limit: int = VALUE_LIMIT) -> str:
    """``value`` as prompt text: a string as it is, anything else as IPython pretty-prints it
    (lists, dicts and data frames as you see them in Out); cut after ``limit`` characters with
    a note saying so."""
    if isinstance(value, str):
        text = value
    else:
        try:
            from IPython.lib.pretty import pretty

            text = pretty(value)
        except Exception:
            text = repr(value)
    if len(text) <= limit:
        return text
    return (
        f"{text[:limit]}\n[… cut: {shown} is {len(text):,} characters long; "
        f"only the first {limit:,} are shown]"
    )


# -- code in a reply ---------------------------------------------------------------------------

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^\s`{]*)[^\n]*\n"
    r"(?P<body>.*?)(?:^[ \t]*(?P=fence)[`~]*[ \t]*$|\Z)",
    re.M | re.S,
)
PYTHON_FENCES = {"", "python", "py", "python3", "py3", "ipython", "ipython3"}


def code_blocks(text: str) -> list[str]:
    """The Python code blocks of a Markdown ``text``: fenced as ``python``, ``py`` or with no
    language (other languages are left out); a block left open at the end (a reply cut short)
    counts too."""
    blocks = []
    for match in _FENCE.finditer(text):
        if match["lang"].lower() not in PYTHON_FENCES:
            continue
        body = textwrap.dedent(match["body"]).strip("\n")
        if body.strip():
            blocks.append(body)
    return blocks


def python_code(text: str) -> str | None:
    """The reply's Python code blocks joined into one cell's source, or None if it has none."""
    blocks = code_blocks(text)
    return "\n\n".join(blocks) if blocks else None


def offer_code(shell: Any, reply: str) -> str:
    """Put ``reply``'s Python code into a new cell below (not run) with ``set_next_input``;
    returns the one line to show."""
    code = python_code(reply)
    if code is None:
        return "--code: the reply has no Python code block; no cell was added."
    shell.set_next_input(code, replace=False)
    lines = code.count("\n") + 1
    where = "a new cell below" if hasattr(shell, "kernel") else "the next prompt"
    return f"--code: the reply's code ({lines} line{'s' * (lines != 1)}) is in {where}, not run."
