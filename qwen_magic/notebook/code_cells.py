"""Code in a reply, offered as a new cell (``--code``).

:func:`fenced_blocks` reads a reply's fenced code blocks with a real Markdown parser
(``markdown-it-py``, CommonMark's rules: indented fences in lists, ```` ``` ```` and ``~~~``,
longer fences); :func:`python_code` keeps the Python ones (```` ```python ````, ```` ```py ```` or
bare fences) and :func:`offer_code` hands them to ``shell.set_next_input``: JupyterLab inserts
them as a new code cell below (not run), terminal IPython pre-fills the next prompt, and frontends
that ignore it (nbclient, nbval) do nothing.

Markdown knows nothing of Python: a line that is only ```` ``` ```` closes the block even when it
stands inside a triple-quoted string of the code (``s = \"\"\"`` … ```` ``` ```` … ``\"\"\"``).
Where a Python block would end inside an open string literal and a later fence line can close it,
that line is taken as code. A block still open at the end of the reply (one cut short by ``-n``)
counts, and :func:`offer_code` says that it looks cut.
"""

from __future__ import annotations

import io
import re
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Any

PYTHON_FENCES = {"", "python", "py", "python3", "py3", "ipython", "ipython3"}

_LANGUAGE = re.compile(r"[^\s`{]*")
#: Stands in for a fence line inside a string literal while the reply is parsed again
#: (a private-use character, which no fence line starts with).
_HELD = "\ue000qwen-fence-{}\ue000"


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block of a reply: its language (lower case, "" for none), code, and whether
    its closing fence came (False: the reply ended inside it)."""

    language: str
    code: str
    closed: bool

    @property
    def is_python(self) -> bool:
        return self.language in PYTHON_FENCES


def fenced_blocks(text: str) -> list[CodeBlock]:
    """Every fenced code block of the Markdown ``text``, in order."""
    held: dict[str, str] = {}
    while True:
        blocks, inside_string = _parse(text, held)
        if inside_string is None:
            break
        lines = text.splitlines(keepends=True)
        marker = _HELD.format(len(held))
        line = lines[inside_string]
        held[marker] = line.strip()
        indent = line[: len(line) - len(line.lstrip())]
        retry = "".join(
            [*lines[:inside_string], indent + marker + "\n", *lines[inside_string + 1 :]]
        )
        retried, _ = _parse(retry, held)
        if not all(block.closed for block in retried if block.is_python):
            del held[marker]  # no later fence closes it: the Markdown reading stands
            break
        text = retry
    return blocks


def _parse(text: str, held: dict[str, str]) -> tuple[list[CodeBlock], int | None]:
    """The blocks of ``text``, and the line of the first closing fence that stands inside a
    Python block's open string literal (None when there is none)."""
    from markdown_it import MarkdownIt

    blocks = []
    lines = text.splitlines()
    for token in MarkdownIt("commonmark").parse(text):
        if token.type != "fence" or token.map is None:
            continue
        start, end = token.map
        code = token.content
        for marker, fence_line in held.items():
            code = code.replace(marker, fence_line)
        close_line = end - 1
        closing = lines[close_line].lstrip(" \t>") if close_line > start else ""
        closed = _closes(closing, token.markup)
        language = _LANGUAGE.match(token.info.strip())
        block = CodeBlock(language[0].lower() if language else "", code, closed)
        blocks.append(block)
        if block.is_python and closed and _ends_inside_a_string(code):
            return blocks, close_line
    return blocks, None


def _closes(line: str, markup: str) -> bool:
    """Whether ``line`` (its indent and blockquote marks removed) closes a ``markup`` fence."""
    stripped = line.strip()
    return len(stripped) >= len(markup) and set(stripped) == {markup[0]}


def _ends_inside_a_string(code: str) -> bool:
    """Whether ``code`` ends inside a string literal that is still open (a triple-quoted one)."""
    try:
        for _ in tokenize.generate_tokens(io.StringIO(code).readline):
            pass
    except tokenize.TokenError as error:
        return "string" in str(error)
    except SyntaxError:
        return False
    return False


def code_blocks(text: str) -> list[str]:
    """The Python code blocks of a Markdown ``text``: fenced as ``python``, ``py`` or with no
    language (other languages are left out); a block left open at the end (a reply cut short)
    counts too."""
    blocks = []
    for block in fenced_blocks(text):
        body = textwrap.dedent(block.code).strip("\n")
        if block.is_python and body.strip():
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
    said = f"--code: the reply's code ({lines} line{'s' * (lines != 1)}) is in {where}, not run"
    if any(block.is_python and not block.closed for block in fenced_blocks(reply)):
        return (
            f"{said}; its last block looks cut short (the reply ended before the block's "
            "closing fence): check its end, or ask again with a larger -n."
        )
    return said + "."
