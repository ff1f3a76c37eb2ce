"""Which socket a reply's request runs on, so that cancelling can cut it whatever the server does.

A reply's worker thread blocks inside the HTTP library: first waiting for the response's
headers (a server reading a long prompt sends none until its first token, or never, if it
hangs), then reading the stream. A blocked ``recv`` returns only when its socket is shut down;
closing the client from another thread does not wake it. Before the headers there is no
response object to reach the socket from, so the socket is taken where it is made:

* every request gets httpcore's ``trace`` extension (public, through an httpx ``request``
  event hook), whose ``connection.connect_tcp.complete`` event hands over the new network
  stream, on the thread that sends the request;
* that thread is a reply's worker, which says so in :data:`_sending` (thread-local) while it
  sends, so the socket lands on the right reply (:meth:`ServerReply.adopt_socket`);
* the client keeps no idle connections (``max_keepalive_connections=0``), so every request
  opens its own (one TCP handshake per reply: well under a millisecond on a LAN) and no
  reply can be sent on a reused connection whose socket was never seen.

:func:`shut_down` then sends the server a FIN at once and makes the blocked read return; the
worker closes the connection itself as it unwinds.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

_sending = threading.local()


@contextlib.contextmanager
def sending_for(reply: Any) -> Iterator[None]:
    """While this block runs on this thread, new connections belong to ``reply``."""
    _sending.reply = reply
    try:
        yield
    finally:
        _sending.reply = None


def _trace(event: str, info: dict[str, Any]) -> None:
    if event != "connection.connect_tcp.complete":
        return
    reply = getattr(_sending, "reply", None)
    stream = info.get("return_value")
    if reply is None or stream is None:
        return
    with contextlib.suppress(Exception):
        sock = stream.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            reply.adopt_socket(sock)


def _add_trace(request: Any) -> None:
    earlier = request.extensions.get("trace")
    if earlier is None:
        request.extensions["trace"] = _trace
        return

    def both(event: str, info: dict[str, Any]) -> None:
        _trace(event, info)
        earlier(event, info)

    request.extensions["trace"] = both


def tracking_client(**options: Any) -> Any:
    """The ``openai`` SDK's default httpx client, keeping no idle connection, whose new
    connections are handed to the reply sending on them."""
    import httpx
    import openai

    limits: Any = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    return openai.DefaultHttpxClient(
        limits=limits, event_hooks={"request": [_add_trace]}, **options
    )


def track(client: Any) -> Any:
    """Add the connection hook to an httpx client of the caller's own (e.g. in tests)."""
    hooks = dict(client.event_hooks)
    hooks["request"] = [*hooks.get("request", []), _add_trace]
    client.event_hooks = hooks
    return client


def shut_down(sock: socket.socket) -> bool:
    """Shut ``sock`` down both ways (a FIN to the server; a blocked read returns); False if it
    was already closed."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
