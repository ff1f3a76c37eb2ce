"""Code in a reply, offered as a new cell (``--code``).

:func:`python_code` collects a reply's Python code blocks
(```` ```python ````, ```` ```py ```` or bare fences) and :func:`offer_code` hands them to
``shell.set_next_input``: JupyterLab inserts them as a new code cell below (not run), terminal
IPython pre-fills the next prompt, and frontends that ignore it (nbclient, nbval) do nothing.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

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
