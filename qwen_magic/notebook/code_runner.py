"""Running a step's approved code in the user's namespace, as a cell would, and capturing it.

:class:`NotebookRunner` is the :class:`~qwen_magic.agent.CodeRunner` of ``%%qwen --run``:

* The code goes through IPython's input transformers (``shell.transform_cell``: ``%magics`` and
  ``!commands`` work as in a cell), is compiled under a name IPython's ``linecache`` knows
  (``shell.compile.cache``: tracebacks show the lines), and runs in ``shell.user_ns``, so it sees
  and changes the user's variables. The last line, if it is an expression, is evaluated for its
  value, as a cell's is: the model must see ``599``, not "(no output)".
* Everything it prints and displays is captured (``IPython.utils.capture.capture_output``),
  then shown to the user under the step. The model gets the printed text, the value's
  ``text/plain``, and a placeholder such as ``[figure]`` for an image (new matplotlib figures
  included), all cut to the loop's budget.
* An error is shown to the user and given to the model as its traceback, trimmed as
  ``%qwen_error`` trims one (:func:`qwen_magic.notebook.trim_traceback`).
* Ctrl-C while it runs interrupts it like any cell: what it printed is kept, the result says
  ``interrupted`` and the loop ends. ``input()`` in the code asks through the kernel's stdin
  where the frontend has one; where it has none, the model sees IPython's error.
"""

from __future__ import annotations

import ast
import sys
from typing import Any

from qwen_magic.notebook.interpolation import render
from qwen_magic.notebook.last_error import strip_ansi, trim_traceback
from qwen_magic.steps import RunResult

#: Characters of a traceback the model is shown.
TRACEBACK_LIMIT = 1500
#: Characters of one displayed output's text the model is shown.
DISPLAY_LIMIT = 500


class NotebookRunner:
    """Runs code in an IPython shell's user namespace; shows the user what it printed."""

    def __init__(self, shell: Any, *, show: bool = True) -> None:
        self.shell = shell
        self.show = show

    def run(self, code: str) -> RunResult:
        from IPython.utils.capture import capture_output

        result = RunResult()
        figures = _figure_numbers()
        value: Any = None
        with capture_output(stdout=True, stderr=True, display=True) as captured:
            try:
                value = self._execute(code)
            except KeyboardInterrupt:
                result.interrupted = True
            except Exception as error:  # the code's own failure: the model is shown it
                result.error = self._traceback(error)
        result.stdout, result.stderr = captured.stdout, captured.stderr
        result.displays = [_placeholder(output.data) for output in captured.outputs]
        result.displays += ["[figure]"] * len(_figure_numbers() - figures)
        if self.show:
            captured.show()
        if value is not None:
            result.value = self._show_value(value)
        if result.error and self.show:
            print(result.error, file=sys.stderr)
        return result

    def _execute(self, code: str) -> Any:
        shell = self.shell
        source = shell.transform_cell(code) if hasattr(shell, "transform_cell") else code
        filename = _code_name(shell, source, code)
        tree = ast.parse(source, filename)
        last: ast.Expr | None = (
            tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None  # type: ignore[assignment]
        )
        namespace = shell.user_ns
        globals_ = getattr(shell, "user_global_ns", namespace)
        if tree.body:
            exec(compile(tree, filename, "exec"), globals_, namespace)
        if last is not None:
            return eval(compile(ast.Expression(last.value), filename, "eval"), globals_, namespace)
        return None

    def _show_value(self, value: Any) -> str:
        """Display the last expression's value to the user; return its text for the model."""
        formatter = getattr(self.shell, "display_formatter", None)
        if formatter is None:
            return render(value, "the value", DISPLAY_LIMIT * 4)
        data, metadata = formatter.format(value)
        if self.show:
            from IPython.display import display

            display(data, raw=True, metadata=metadata)
        return _placeholder(data, DISPLAY_LIMIT * 4)

    def _traceback(self, error: BaseException) -> str:
        """The error's traceback from the step's own code on, trimmed for the model."""
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # this module's frames are no part of the user's code
        try:
            pieces = self.shell.InteractiveTB.structured_traceback(
                type(error), error, tb, tb_offset=0
            )
        except Exception:
            import traceback

            pieces = traceback.format_exception(type(error), error, tb)
        text, _left_out = trim_traceback([strip_ansi(str(p)) for p in pieces], TRACEBACK_LIMIT)
        return text


def _code_name(shell: Any, source: str, raw: str) -> str:
    """A file name for the code that IPython's tracebacks can show lines from."""
    try:
        return shell.compile.cache(source, shell.execution_count, raw_code=raw)
    except Exception:
        return "<qwen step>"


def _placeholder(data: dict[str, Any], limit: int = DISPLAY_LIMIT) -> str:
    """What the model is told about one displayed output."""
    if any(kind.startswith("image/") for kind in data):
        return "[figure]"
    if "text/plain" in data:
        text = str(data["text/plain"])
        if len(text) > limit:
            text = f"{text[:limit]}[… cut: {len(text):,} characters]"
        return text
    kinds = ", ".join(sorted(data)) or "empty"
    return f"[{kinds} output]"


def _figure_numbers() -> set[int]:
    """The open matplotlib figures, where pyplot is imported already (never imported here)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return set()
    try:
        return set(pyplot.get_fignums())
    except Exception:
        return set()
