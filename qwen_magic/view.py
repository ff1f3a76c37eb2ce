"""Where a reply appears while it streams, and how it looks when done.

:class:`WidgetView` (Jupyter) shows the growing reply in an ``ipywidgets.Output`` made once per
cell. It is updated from the cell's own thread (never from the generation worker, whose output
would land in whichever cell runs then) and redrawn at most ``redraw_seconds`` apart, by setting
the widget's ``outputs`` to one Markdown bundle: a handful of small messages a second, however
fast the tokens come. When the reply is complete the widget is emptied and closed, and the
reply is displayed as an ordinary Markdown output with a one-line footer, so the saved notebook
reads well anywhere (GitHub, nbconvert) and not only where widgets render.

:class:`TextView` (terminal IPython, plain Python) writes each chunk to stdout as it arrives.

:func:`make_view` picks one: ``"auto"`` means the widget where a Jupyter kernel with ipywidgets
runs, text elsewhere.
"""

from __future__ import annotations

import sys
import time
from typing import Any

CURSOR = " ▌"


class TextView:
    """Streams chunks to stdout; the footer follows on its own line."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.shown = ""

    def update(self, text: str) -> None:
        new = text[len(self.shown) :]
        if new:
            self.stream.write(new)
            self.stream.flush()
            self.shown = text

    def finish(self, text: str, footer: str) -> None:
        self.update(text)
        self.stream.write(f"\n\n[{footer}]\n")
        self.stream.flush()


class WidgetView:
    """A live Markdown area in an ``ipywidgets.Output``, throttled, then a plain Markdown output."""

    def __init__(self, redraw_seconds: float = 0.15) -> None:
        import ipywidgets
        from IPython.display import display

        self.redraw_seconds = redraw_seconds
        self.output = ipywidgets.Output()
        self.redraws = 0
        self._last_redraw = 0.0
        self._shown = None
        display(self.output)

    def update(self, text: str) -> None:
        now = time.perf_counter()
        if now - self._last_redraw >= self.redraw_seconds:
            self._show(text + CURSOR)
            self._last_redraw = now

    def _show(self, markdown: str) -> None:
        if markdown == self._shown:
            return
        self.output.outputs = (
            {
                "output_type": "display_data",
                "data": {"text/markdown": markdown, "text/plain": markdown},
                "metadata": {},
            },
        )
        self._shown = markdown
        self.redraws += 1

    def finish(self, text: str, footer: str) -> None:
        from IPython.display import Markdown, display

        # Empty the widget before closing it, so the saved widget state does not hold the reply
        # a second time beside the Markdown output below.
        self.output.outputs = ()
        self.output.close()
        display(Markdown(text))
        display(Markdown(f"<sub>{footer}</sub>"))


def in_widget_frontend() -> bool:
    """True inside a Jupyter kernel with ipywidgets importable."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def make_view(mode: str = "auto", redraw_seconds: float = 0.15) -> TextView | WidgetView:
    """``"widget"``, ``"text"``, or ``"auto"`` (widget in a Jupyter kernel, text elsewhere)."""
    if mode == "widget" or (mode == "auto" and in_widget_frontend()):
        return WidgetView(redraw_seconds)
    return TextView()
