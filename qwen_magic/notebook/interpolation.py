"""Cells and values put into a message (``%%qwen -i``); a plain function, touching no model.

:func:`interpolate` replaces ``$name``, ``${name}`` and
``${expression}`` with values from the user's namespace. An expression is a name followed by
attributes and literal indexes only: ``${In[3]}``, ``${Out[3]}``, ``${_}``, ``${df.columns}``,
``${data['key'][-1]}``. It is parsed with :mod:`ast` and walked by hand, never ``eval``-ed, so
no call or operator can run. Strings go in as they are, other values as IPython pretty-prints
them; a value longer than :data:`VALUE_LIMIT` characters is cut, with a note in the prompt.
``$$`` is a literal ``$``, a ``$`` not followed by a name or ``{`` stays as written, and braces
elsewhere are never special.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from qwen_magic.errors import QwenMagicError
from qwen_magic.notebook.bounded_repr import bounded_text

#: A value put into a prompt with -i is cut after this many characters.
VALUE_LIMIT = 4000


_PLACEHOLDER = re.compile(r"\$(?:(?P<dollar>\$)|(?P<braced>\{)|(?P<name>[^\W\d]\w*))")


_ALLOWED = (
    "only names, .attributes and [literal] indexes, e.g. ${In[3]} or ${data['key'][0]}; "
    "compute anything else into a variable first"
)


def interpolate(message: str, namespace: dict[str, Any], *, limit: int = VALUE_LIMIT) -> str:
    """Replace ``$name``, ``${name}`` and ``${expression}`` in ``message`` with values from
    ``namespace``; ``$$`` is a ``$``; anything else stays as written."""
    parts: list[str] = []
    position = 0
    while (match := _PLACEHOLDER.search(message, position)) is not None:
        parts.append(message[position : match.start()])
        position = match.end()
        if match["dollar"]:
            parts.append("$")
            continue
        if match["name"]:
            expression, shown = match["name"], f"${match['name']}"
        else:
            end = closing_brace(message, match.end())
            if end is None:
                line = message.count("\n", 0, match.start()) + 1
                raise QwenMagicError(
                    f"--interpolate: the '${{' on line {line} is not closed by '}}'; close it, "
                    "or write $$ for a literal $."
                )
            expression = message[match.end() : end].strip()
            shown, position = f"${{{expression}}}", end + 1
        parts.append(render(evaluate(expression, namespace, shown), shown, limit))
    parts.append(message[position:])
    return "".join(parts)


def closing_brace(text: str, start: int) -> int | None:
    """Where the ``}`` that closes a placeholder opened just before ``start`` stands, skipping
    string literals (``${x['}']}``); None when a ``{`` comes first or there is none."""
    quote: str | None = None
    index = start
    while index < len(text):
        char = text[index]
        if quote is not None:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "}":
            return index
        elif char == "{":
            return None
        index += 1
    return None


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
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, str)):
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
    if base == "Out" and isinstance(key, int) and key < 0:
        return (
            f"Out has no entry {key} (Out is keyed by cell number, not position); "
            "use ${_} for the last output, ${__} for the one before"
        )
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
    a note saying so. The work is bounded too: see :mod:`qwen_magic.notebook.bounded_repr`."""
    text, cut = bounded_text(value, limit, shown)
    if not cut:
        return text
    length = (
        f"is {len(value):,} characters long"
        if isinstance(value, str)
        else f"is longer than {limit:,} characters as text"
    )
    return f"{text}\n[… cut: {shown} {length}; only the first {limit:,} are shown]"
