"""How the magics read their lines: shared option declarations, parsing, one-line errors.

Every option is declared with IPython's ``magic_arguments``, so ``%%qwen?`` prints the manual and
a bad flag is a one-line ``UsageError``. Options that ``%%qwen`` and ``%qwen_error`` share are
declared once here (:data:`MAX_NEW_TOKENS` …) and stacked on both. Lines are split like a
shell's (quotes group words), never with ``str.split``; :func:`split_instruction` leaves the
free text after the options as written.
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument

from qwen_magic.conversation import DEFAULT_NAME
from qwen_magic.errors import QwenMagicError
from qwen_magic.notebook import last_error


def one_line_errors(magic: Callable[..., Any]) -> Callable[..., Any]:
    """Show the project's mistakes as IPython shows its own: one ``UsageError`` line.

    IPython hides the traceback only for ``UsageError`` itself, not for subclasses such as
    :class:`~qwen_magic.errors.QwenMagicError`, so each magic re-raises them as the base class.
    Such a mistake, or an interrupted reply, is noted so ``%qwen_error`` passes over it.
    """

    @functools.wraps(magic)
    def reporting(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return magic(self, *args, **kwargs)
        except QwenMagicError as error:
            shown = last_error.mark_own_error(UsageError(str(error)))
            last_error.note_magic_error(self.shell, shown, self.session.magic_errors)
            raise shown from error
        except (UsageError, KeyboardInterrupt) as error:  # a bad option; an interrupted reply
            last_error.mark_own_error(error)
            last_error.note_magic_error(self.shell, error, self.session.magic_errors)
            raise

    return reporting


def current_cell_id(shell: Any) -> str | None:
    """The id JupyterLab sends with the running cell; None where the frontend sends none."""
    kernel = getattr(shell, "kernel", None)
    try:
        parent = kernel.get_parent() if kernel is not None else None
    except Exception:  # older ipykernel, or no request in flight
        return None
    metadata = (parent or {}).get("metadata") or {}
    cell_id = metadata.get("cellId")
    return str(cell_id) if cell_id else None


def parse_argstring(magic: Any, line: str) -> Any:
    """Parse a magic's line like a shell would: quotes group words and are removed."""
    try:
        argv = shlex.split(line)
    except ValueError as error:
        raise QwenMagicError(f"Could not read the options ({error}); check the quotes.") from error
    return magic.parser.parse_args(argv)


def split_instruction(magic: Any, line: str) -> tuple[Any, str]:
    """Parse the options at the start of ``line``; the words after them are a free-text
    instruction, taken as written (an apostrophe in "don't" is no unclosed quote)."""
    takes_value = {
        option
        for action in magic.parser._actions
        if action.option_strings and action.nargs != 0
        for option in action.option_strings
    }
    position, expect_value = 0, False
    for match in re.finditer(r"""\s*("[^"]*"|'[^']*'|\S+)""", line):
        token = match.group(1)
        if expect_value:
            expect_value = False
        elif token == "--":
            return parse_argstring(magic, line[: match.start()]), line[match.end() :].strip()
        elif token.startswith("-"):
            expect_value = token in takes_value
        else:
            break
        position = match.end()
    return parse_argstring(magic, line[:position]), line[position:].strip()


# Options %%qwen and %qwen_error share (an argument decorator only records its arguments).
MAX_NEW_TOKENS = argument(
    "-n", "--max-new-tokens", type=int, default=None, help="Reply length cap (512)."
)


GREEDY = argument("--greedy", action="store_true", help="Always take the likeliest token.")


SAMPLE = argument("--sample", action="store_true", help="Sample (with the model's settings).")


TEMPERATURE = argument(
    "-t", "--temperature", type=float, default=None, help="Sampling temperature."
)


SEED = argument("--seed", type=int, default=None, help="Random seed, for a repeatable sample.")


CONVERSATION = argument(
    "-c", "--conversation", default=DEFAULT_NAME, help="Conversation name (default)."
)


NEW = argument("--new", action="store_true", help="Start the conversation afresh.")


OUT = argument("-o", "--out", default=None, help="Store the reply text in this variable.")


CODE = argument(
    "-x",
    "--code",
    action="store_true",
    help="Put the reply's Python code blocks into a new cell below (not run).",
)


VIEW = argument("--view", choices=("auto", "widget", "text"), default=None, help="Where to stream.")


#: IPython's own names in a kernel's namespace besides ``user_ns_hidden`` (output history
#: ``_3``, input history ``_i3``); -o must not overwrite them.
_IPYTHON_NAME = re.compile(r"_+|_i+|_i?\d+|_[a-z]h|In|Out|get_ipython|exit|quit")


def check_output_name(name: str, shell: Any = None) -> None:
    """Refuse an ``-o`` name that is not a variable name, or would shadow a builtin (``print``)
    or one of IPython's own names (``Out``, ``_``, ``_i3``), for the rest of the kernel."""
    import builtins
    from keyword import iskeyword

    advice = "choose another name, e.g. -o reply."
    if not name.isidentifier() or iskeyword(name):
        raise QwenMagicError(
            f"-o {name!r} is not a Python variable name; use letters, digits and _, e.g. -o reply."
        )
    hidden = getattr(shell, "user_ns_hidden", {}) if shell is not None else {}
    if _IPYTHON_NAME.fullmatch(name) or name in hidden or name.startswith("__"):
        raise QwenMagicError(f"-o {name} is one of IPython's own names in this kernel; {advice}")
    if hasattr(builtins, name):
        raise QwenMagicError(
            f"-o {name} would hide Python's built-in {name} for the rest of this kernel; {advice}"
        )
