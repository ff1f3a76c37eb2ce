"""Where a reply appears while it streams, and how it looks when done.

:class:`WidgetView` (Jupyter) shows the growing reply in an ``ipywidgets.Output`` made once per
cell, with a **Stop** button beside it. It is updated from the cell's own thread (never from the
generation worker, whose output would land in whichever cell runs then) and redrawn at most
``redraw_seconds`` apart, by setting the widget's ``outputs`` to one Markdown bundle: a handful
of small messages a second, however fast the tokens come. When the reply is complete the widgets
are emptied and closed, and the reply is displayed as an ordinary Markdown output with a
one-line footer, each with the same words as ``text/plain`` (:func:`final_bundles`), so the saved
notebook reads well anywhere (GitHub, nbconvert, a terminal) and not only where widgets render.

The Stop button needs help to work at all, since the kernel's main thread is busy running this
very cell: :class:`~qwen_magic.notebook.comm_pump.CommPump` handles the button's clicks from the
cell's
thread whenever the view is updated or waits.

:class:`TextView` (terminal IPython, plain Python) writes each chunk to stdout as it arrives;
:class:`NullView` shows nothing (scripts, benchmarks, tests about turns rather than display).

Every view is a :class:`~qwen_magic.presentation.View`, the protocol the chat layer uses, in the
manner of transformers' ``BaseStreamer``: ``start`` once the reply begins (the widget hooks its
Stop button to ``reply.cancel``), ``update`` with the text so far, ``wait`` while nothing comes
(the widget handles clicks then), ``finish`` with the final text and the footer.

:func:`make_view` picks one: ``"auto"`` means the widget where a Jupyter kernel with ipywidgets
runs, text elsewhere.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from qwen_magic.backends.base import Reply
from qwen_magic.notebook.comm_pump import CommPump
from qwen_magic.presentation import View

CURSOR = " ▌"
#: Waiting this long for the first token (a long prompt; --fast compiling) shows a counter.
WAIT_NOTICE_SECONDS = 1.0


class TextView(View):
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


class WidgetView(View):
    """A live Markdown area with a Stop button, throttled, then a plain Markdown output."""

    def __init__(self, redraw_seconds: float = 0.15, *, stop_button: bool = True) -> None:
        import ipywidgets
        from IPython.display import display

        self.redraw_seconds = redraw_seconds
        self.redraws = 0
        self.stopped = False
        self._last_redraw = 0.0
        self._shown: str | None = None
        self._has_text = False
        self._started = time.perf_counter()
        self._on_stop: Callable[[], None] | None = None
        self.output = ipywidgets.Output(layout=ipywidgets.Layout(flex="1 1 auto", min_width="0"))
        self.stop_button = ipywidgets.Button(
            description="Stop",
            icon="stop",
            tooltip="Stop generating; the reply so far is kept",
            layout=ipywidgets.Layout(flex="0 0 auto", width="auto"),
        )
        self.stop_button.on_click(self._stop_clicked)
        self._pump = CommPump.attach([self.stop_button])
        # In a kernel where the click cannot be handled until the cell ends, a button would only
        # mislead: show it where the pump works, or outside a kernel (button.click() from code).
        children = [self.output]
        if stop_button and (self._pump is not None or not in_widget_frontend()):
            children.append(self.stop_button)
        self.box = ipywidgets.HBox(children, layout=ipywidgets.Layout(align_items="flex-start"))
        # Where widgets do not render (GitHub, nbconvert), the saved output falls back to
        # text/plain: keep it empty rather than the widgets' long repr; the reply follows anyway.
        bundle = self.box._repr_mimebundle_()
        bundle["text/plain"] = ""
        display(bundle, raw=True)

    def start(self, reply: Reply) -> None:
        """The Stop button cancels ``reply``."""
        self.on_stop(reply.cancel)

    def wait(self) -> None:
        """While tokens are awaited: handle clicks and count the seconds."""
        self.poll()

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (e.g. ``Reply.cancel``) when the Stop button is clicked."""
        self._on_stop = callback

    def _stop_clicked(self, _button: Any) -> None:
        self.stopped = True
        self.stop_button.disabled = True
        self.stop_button.description = "Stopping…"
        if self._on_stop is not None:
            self._on_stop()

    def poll(self) -> None:
        """Called while tokens are awaited: handle a Stop click waiting in the kernel's queue and,
        while the first token is slow to come, show for how long it has been awaited."""
        if self._pump is not None:
            self._pump.poll()
        if not self._has_text:
            waited = time.perf_counter() - self._started
            if waited >= WAIT_NOTICE_SECONDS:  # redrawn only when the whole seconds change
                self._show(f"*waiting for the first token… {waited:.0f} s*")

    def update(self, text: str) -> None:
        self._has_text = self._has_text or bool(text)
        self.poll()
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
        from IPython.display import display

        # Empty the widget before closing it, so the saved widget state does not hold the reply
        # a second time beside the Markdown output below.
        self.output.outputs = ()
        for widget in (self.box, self.output, self.stop_button):
            widget.close()
        for bundle in final_bundles(text, footer):
            display(bundle, raw=True)


def final_bundles(text: str, footer: str) -> tuple[dict[str, str], dict[str, str]]:
    """The finished reply and its footer as two display bundles: Markdown for the notebook, and
    the same words as ``text/plain`` (not ``<IPython.core.display.Markdown object>``), so
    terminals, ``nbconvert --to markdown``, GitHub and nbval read the reply itself."""
    return (
        {"text/markdown": text, "text/plain": text},
        {"text/markdown": f"<sub>{footer}</sub>", "text/plain": footer},
    )


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


def make_view(mode: str = "auto", redraw_seconds: float = 0.15) -> View:
    """``"widget"``, ``"text"``, or ``"auto"`` (widget in a Jupyter kernel, text elsewhere)."""
    if mode == "widget" or (mode == "auto" and in_widget_frontend()):
        return WidgetView(redraw_seconds)
    return TextView()
