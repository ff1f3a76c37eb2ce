"""Handling a widget's clicks while the cell that shows it is still running (ipykernel 7).

A click on the Stop button reaches the kernel as a ``comm_msg`` on the shell channel, and the
kernel's main thread, which handles that channel, is busy running this very cell.
:class:`CommPump` lets the cell's thread handle the button's own messages each time the view is
updated, and leaves every other message (the next cell's ``execute_request`` included) queued in
order, as if nothing had happened.

This relies on ipykernel 7's internals (its shell-channel thread and per-subshell streams), so
it is kept here, alone, behind a version guard: :meth:`CommPump.attach` returns ``None`` for any
other ipykernel major version or layout, and the view then shows no Stop button (Ctrl-C still
works). ``jupyter-ui-poll`` is the library for this job, but its ipykernel 7 support was reported
broken; this pump is tested in a real browser instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

#: The ipykernel major version whose internals the pump knows.
SUPPORTED_IPYKERNEL_MAJOR = 7

log = logging.getLogger(__name__)


def ipykernel_supported() -> bool:
    """True where the running ipykernel is the major version the pump was written for."""
    try:
        import ipykernel
    except ImportError:
        return False
    major = str(getattr(ipykernel, "__version__", "0")).split(".")[0]
    return major == str(SUPPORTED_IPYKERNEL_MAJOR)


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
        if not ipykernel_supported():
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
