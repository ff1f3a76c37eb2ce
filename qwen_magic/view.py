"""Where a reply appears while it streams, and how it looks when done.

:class:`WidgetView` (Jupyter) shows the growing reply in an ``ipywidgets.Output`` made once per
cell, with a **Stop** button beside it. It is updated from the cell's own thread (never from the
generation worker, whose output would land in whichever cell runs then) and redrawn at most
``redraw_seconds`` apart, by setting the widget's ``outputs`` to one Markdown bundle: a handful
of small messages a second, however fast the tokens come. When the reply is complete the widgets
are emptied and closed, and the reply is displayed as an ordinary Markdown output with a
one-line footer, so the saved notebook reads well anywhere (GitHub, nbconvert) and not only where
widgets render.

The Stop button needs help to work at all: a click reaches the kernel as a ``comm_msg`` on the
shell channel, and the kernel's main thread, which handles that channel, is busy running this
very cell. :class:`CommPump` lets the cell's thread handle the button's own messages each time
the view is updated, and leaves every other message (the next cell's ``execute_request``
included) queued in order, as if nothing had happened.

:class:`TextView` (terminal IPython, plain Python) writes each chunk to stdout as it arrives.

:func:`make_view` picks one: ``"auto"`` means the widget where a Jupyter kernel with ipywidgets
runs, text elsewhere.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

CURSOR = " ▌"
#: Waiting this long for the first token (a long prompt; --fast compiling) shows a counter.
WAIT_NOTICE_SECONDS = 1.0

log = logging.getLogger(__name__)


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


class CommPump:
    """Handles some widgets' messages from the frontend while the cell's own thread is busy.

    ipykernel 7 reads the shell socket on a thread of its own and passes every message meant for
    the main thread through one in-process socket, read by a ``ZMQStream`` on the main thread's
    event loop; that stream's callback only *queues* each message behind a lock the running cell
    holds. :meth:`poll`, called from the cell's thread, drains that stream with pyzmq's public
    ``ZMQStream.flush`` (which ipykernel's ``_abort_queues`` uses too) through a filter:

    * a ``comm_msg`` addressed to one of our comms is handled at once, by the kernel's own
      ``comm_msg`` handler (so the widget's ``on_click`` runs, on this thread);
    * every other message (another cell's ``execute_request``, other widgets' traffic, ipykernel's
      "stop aborting" marker) goes to the stream's own callback, unchanged and in arrival order,
      which queues it exactly as the event loop would have a moment later.

    The peek deserializes with ``content=False``, which leaves the message's signature
    unrecorded, so the kernel still accepts the message later (it refuses a signature seen
    twice). Nothing is held between polls, so whatever ends the cell
    (an error, Ctrl-C) loses or reorders no message. :meth:`attach` returns ``None`` outside a
    kernel, or where the kernel is not laid out this way (ipykernel 6, other kernels); then
    nothing is pumped and :class:`WidgetView` shows no Stop button.

    The pump runs when the view is updated and whenever the reading loop waits for a token
    (every ``Generation.poll_seconds``), so a click is handled within a fraction of a second,
    during a long prefill too.
    """

    def __init__(self, kernel: Any, stream: Any, comm_ids: Iterable[str]) -> None:
        self.kernel = kernel
        self.stream = stream
        self.comm_ids = set(comm_ids)
        self.handled = 0
        self._deferred: BaseException | None = None

    @classmethod
    def attach(cls, widgets: Iterable[Any]) -> CommPump | None:
        """A pump for ``widgets`` in the running kernel, or ``None`` where there is none."""
        try:
            from IPython import get_ipython
            from tornado.ioloop import IOLoop
        except ImportError:  # pragma: no cover
            return None
        kernel = getattr(get_ipython(), "kernel", None)
        if kernel is None or getattr(kernel, "session", None) is None:
            return None
        try:
            stream = _cell_thread_stream(kernel)
            comm_ids = [widget.comm.comm_id for widget in widgets]
        except Exception:  # a kernel laid out differently: no pump, no harm
            return None
        if (
            stream is None
            or getattr(stream, "_recv_callback", None) is None
            or stream.io_loop is not IOLoop.current(instance=False)  # only the stream we own
            or "comm_msg" not in getattr(kernel, "shell_handlers", {})
        ):
            return None
        return cls(kernel, stream, comm_ids)

    def poll(self) -> int:
        """Handle our widgets' pending messages now; queue the rest in order. Returns the count."""
        import zmq

        stream = self.stream
        queue_message = stream._recv_callback  # pyzmq keeps no public getter for it
        copy = getattr(stream, "_recv_copy", False)
        handled = self.handled
        stream.on_recv(lambda frames: self._route(frames, queue_message), copy=False)
        try:
            stream.flush(zmq.POLLIN)  # receive only: the kernel's own sends are not ours
        except BaseException:
            # Interrupted between two messages: let the event loop fetch the rest once it runs.
            stream.io_loop.add_callback(stream.flush, zmq.POLLIN)
            raise
        finally:
            stream.on_recv(queue_message, copy=copy)
        if self._deferred is not None:  # Ctrl-C during a click handler: raise it now, safely
            error, self._deferred = self._deferred, None
            raise error
        return self.handled - handled

    def _route(self, frames: list[Any], queue_message: Callable[[list[Any]], Any]) -> Any:
        session = self.kernel.session
        try:
            idents, rest = session.feed_identities(frames, copy=False)
            header = session.deserialize(rest, content=False, copy=False)
            ours = (
                header["msg_type"] == "comm_msg"
                and session.unpack(header["content"]).get("comm_id") in self.comm_ids
            )
        except Exception:  # not a message we can read (e.g. the "stop aborting" marker)
            ours = False
        if not ours:
            return queue_message(frames)  # a coroutine; the stream schedules it, as it always does
        try:
            message = session.deserialize(rest, content=True, copy=False)
            self.kernel.shell_handlers["comm_msg"](self.stream, idents, message)
            self.handled += 1
        except Exception:
            log.exception("qwen_magic: could not handle a widget message")
        except BaseException as error:  # never leave the stream half-flushed
            self._deferred = error
        return None


def _cell_thread_stream(kernel: Any) -> Any:
    """The ``ZMQStream`` delivering shell messages to the thread running this cell (ipykernel 7)."""
    channel_thread = getattr(kernel, "shell_channel_thread", None)
    if channel_thread is None:  # not ipykernel 7's layout: leave it alone
        return None
    parent = kernel.get_parent("shell") or {}
    subshell_id = (parent.get("header") or {}).get("subshell_id")  # None: the main shell
    return channel_thread.manager.get_shell_channel_to_subshell_pair(subshell_id).to_stream


class WidgetView:
    """A live Markdown area with a Stop button, throttled, then a plain Markdown output."""

    def __init__(self, redraw_seconds: float = 0.15, *, stop_button: bool = True) -> None:
        import ipywidgets
        from IPython.display import display

        self.redraw_seconds = redraw_seconds
        self.redraws = 0
        self.stopped = False
        self._last_redraw = 0.0
        self._shown = None
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

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (e.g. ``Generation.cancel``) when the Stop button is clicked."""
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
        from IPython.display import Markdown, display

        # Empty the widget before closing it, so the saved widget state does not hold the reply
        # a second time beside the Markdown output below.
        self.output.outputs = ()
        for widget in (self.box, self.output, self.stop_button):
            widget.close()
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
