"""The variables summary: what the model is told about the notebook's variables.

``%%qwen --run`` (and ``--vars``) gives the model a short account of the user's variables::

    sales: pandas DataFrame, 1,234 rows × 2 columns
      columns: region (object), amount (float64)
      first rows:
          region  amount
        0  north   12.5
    scores: list, 3 items: [3, 1, 2]
    name: str, 5 characters: 'Alice'

It must never hurt the kernel it describes, so it reads only what is cheap and safe to read:

* Left out: private names (``_x``), modules, functions, classes and other callables, and
  IPython's own names (``In``, ``Out``, ``get_ipython``, ``exit``, …: ``shell.user_ns_hidden``).
* pandas DataFrames and Series, and numpy arrays, are recognised only when pandas or numpy is
  already imported (``sys.modules``): the summary never imports them. Their shapes, dtypes and a
  few rows come from their own cheap methods (``head``), never from the whole data.
* Builtin values (numbers, text, lists, dicts, sets, tuples) get a short preview, cut at every
  level. Any other object gets only its type's name: its ``repr`` or its properties could run
  for long, print megabytes or change state, so they are never called.
* The whole summary is cut after :data:`SUMMARY_LIMIT` characters, and after
  :data:`MAX_VARIABLES` variables, saying how many were left out.
"""

from __future__ import annotations

import reprlib
import sys
import types
from collections.abc import Iterable
from typing import Any

from qwen_magic.errors import QwenMagicError

#: The most characters the summary takes.
SUMMARY_LIMIT = 4000
#: The most variables it describes (the most recently defined ones come last).
MAX_VARIABLES = 40
#: Columns of a data frame named in full; rows shown.
MAX_COLUMNS = 20
HEAD_ROWS = 3
#: IPython's own names, where the shell does not list them as hidden.
IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}
_SAFE_SCALARS = (bool, int, float, complex, type(None))


class _SafeRepr(reprlib.Repr):
    """reprlib's bounded repr of builtin values; other objects only by their type's name."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict = 2, 5, 5, 4
        self.maxset, self.maxfrozenset, self.maxstring, self.maxother = 5, 5, 40, 40
        self.maxlong = 40

    def repr1(self, value: Any, level: int) -> str:
        if type(value).__module__ != "builtins":  # a class named "list" elsewhere is not one
            return self.repr_instance(value, level)
        return super().repr1(value, level)

    def repr_instance(self, value: Any, level: int) -> str:
        if isinstance(value, _SAFE_SCALARS):  # subclasses of these keep builtin reprs
            return reprlib.Repr.repr_instance(self, value, level)
        return f"<{type_name(value)}>"


_REPR = _SafeRepr()


def type_name(value: Any) -> str:
    """``DataFrame``'s type as ``pandas DataFrame``, a builtin's as ``int``, others qualified."""
    kind = type(value)
    module = kind.__module__.split(".")[0]
    return kind.__qualname__ if module == "builtins" else f"{module} {kind.__qualname__}"


def summarize(
    namespace: dict[str, Any],
    names: Iterable[str] | None = None,
    *,
    hidden: Iterable[str] = (),
    limit: int = SUMMARY_LIMIT,
) -> str:
    """The summary of ``namespace``'s user variables (or of ``names`` only); "" when none.

    A name in ``names`` that is not there raises a one-line ``QwenMagicError``.
    """
    if names is not None:
        names = list(names)
        if missing := [name for name in names if name not in namespace]:
            raise QwenMagicError(
                f"--vars: no variable named {missing[0]!r} in the notebook; run the cell that "
                "defines it, or check the spelling (names are separated by commas)."
            )
        chosen = names
    else:
        hidden = set(hidden) | IPYTHON_NAMES
        chosen = [name for name, value in namespace.items() if _is_user(name, value, hidden)]
    left_out = max(0, len(chosen) - MAX_VARIABLES)
    lines = []
    for name in chosen[left_out:]:
        lines.append(describe(name, namespace[name]))
    text = "\n".join(lines)
    if left_out:
        text = f"({left_out} older variables left out)\n{text}"
    if len(text) > limit:
        text = text[:limit].rsplit("\n", 1)[0] + f"\n[… the summary is cut at {limit:,} characters]"
    return text


def _is_user(name: str, value: Any, hidden: set[str]) -> bool:
    """A variable of the user's: not private, not IPython's, not a module or a callable."""
    if name.startswith("_") or name in hidden:
        return False
    return not (isinstance(value, (types.ModuleType, type)) or callable(value))


def describe(name: str, value: Any) -> str:
    """One variable's lines in the summary."""
    try:
        return f"{name}: {_describe(value)}"
    except Exception as error:  # a broken object says so, and the summary goes on
        return f"{name}: {type_name(value)} (could not be described: {type(error).__name__})"


def _describe(value: Any) -> str:
    pandas = sys.modules.get("pandas")
    numpy = sys.modules.get("numpy")
    if pandas is not None and isinstance(value, pandas.DataFrame):
        return _data_frame(value)
    if pandas is not None and isinstance(value, pandas.Series):
        head = _indent(value.head(HEAD_ROWS).to_string(max_colwidth=30))
        return f"pandas Series {value.name!r}, {len(value):,} values of {value.dtype}\n{head}"
    if numpy is not None and isinstance(value, numpy.ndarray):
        shape = " × ".join(f"{n:,}" for n in value.shape) or "a scalar"
        preview = ""
        if value.size <= 10:
            preview = ": " + numpy.array2string(value, threshold=10, max_line_width=100)
        return f"numpy array, shape {shape}, dtype {value.dtype}{preview}"
    if isinstance(value, str):
        return f"str, {len(value):,} characters: {_REPR.repr(value)}"
    if isinstance(value, (bytes, bytearray)):
        return f"{type(value).__name__}, {len(value):,} bytes"
    if type(value) in (list, tuple, set, frozenset, dict):
        count = len(value)
        unit = ("key" if isinstance(value, dict) else "item") + "s" * (count != 1)
        return f"{type(value).__name__}, {count:,} {unit}: {_REPR.repr(value)}"
    if isinstance(value, _SAFE_SCALARS):
        return f"{type(value).__name__}: {_REPR.repr(value)}"
    if numpy is not None and isinstance(value, numpy.generic):
        return f"numpy {type(value).__name__}: {value!s}"
    return type_name(value)


def _data_frame(frame: Any) -> str:
    rows, columns = frame.shape
    named = [f"{column} ({dtype})" for column, dtype in list(frame.dtypes.items())[:MAX_COLUMNS]]
    more = f", … {columns - MAX_COLUMNS} more" if columns > MAX_COLUMNS else ""
    head = frame.iloc[:HEAD_ROWS, :MAX_COLUMNS].to_string(max_colwidth=30)
    return (
        f"pandas DataFrame, {rows:,} rows × {columns:,} columns\n"
        f"  columns: {', '.join(named)}{more}\n"
        f"  first rows:\n{_indent(head, 4)}"
    )


def _indent(text: str, spaces: int = 2) -> str:
    pad = " " * spaces
    return "\n".join(pad + line for line in text.splitlines())


def parse_names(option: str | None) -> list[str] | None:
    """``--vars a,b , c`` as ``["a", "b", "c"]``; None when not given."""
    if option is None:
        return None
    names = [name.strip() for name in option.split(",") if name.strip()]
    if not names:
        raise QwenMagicError(
            "--vars needs variable names separated by commas, e.g. --vars sales,df."
        )
    return names
