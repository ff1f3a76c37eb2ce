"""What writes the replies: the backend protocol, and the registry that opens backends by kind.

* :mod:`~qwen_magic.backends.base` — the seam: typed messages, reply events, the
  :class:`~qwen_magic.backends.base.Backend` and :class:`~qwen_magic.backends.base.Reply`
  protocols and the one threaded reply every backend shares;
* :mod:`~qwen_magic.backends.kernel` — a model in this kernel, with ``transformers``;
* :mod:`~qwen_magic.backends.server` — a model on an OpenAI-compatible server;
* :mod:`~qwen_magic.backends.scripted` — replies written in advance, for tests and dry runs.

The session never imports a concrete backend. It asks this registry for a *request* of a kind
(``request("kernel", "demo", dtype="auto")``, ``request("server", url)``) and opens it: a request
knows whether the backend in use already is what it asks for (the same model again is a no-op),
checks everything it can first, and only then lets the current backend go (so a wrong name
leaves the model in use). A backend of your own joins with :func:`register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from qwen_magic.backends.base import Backend
from qwen_magic.errors import QwenMagicError


class BackendRequest(Protocol):
    """How to get one backend: what the session opens."""

    def is_open_in(self, backend: Backend | None) -> bool:
        """Whether ``backend`` (the one in use) already is what this request asks for."""

    def open(self, current: Backend | None, release_current: Callable[[], Any]) -> Backend:
        """Make the backend. Check everything first; call ``release_current`` only once the
        new backend can come (a model loading in the kernel needs the old one's memory)."""


#: kind -> "module:function" making a BackendRequest; imported only when asked for.
_FACTORIES: dict[str, str] = {
    "kernel": "qwen_magic.backends.kernel.backend:request",
    "server": "qwen_magic.backends.server.connect:request",
}


def register(kind: str, factory: str | Callable[..., BackendRequest]) -> None:
    """Add a kind of backend: ``factory`` (or ``"module:function"``) makes its requests."""
    _FACTORIES[kind] = factory  # type: ignore[assignment]


def request(kind: str, *args: Any, **kwargs: Any) -> BackendRequest:
    """A request for a backend of ``kind``, made by that kind's factory."""
    factory: Any = _FACTORIES.get(kind)
    if factory is None:
        raise QwenMagicError(
            f"No backend of kind {kind!r}; the kinds are {', '.join(sorted(_FACTORIES))}."
        )
    if isinstance(factory, str):
        module, _, name = factory.partition(":")
        factory = getattr(importlib.import_module(module), name)
    return factory(*args, **kwargs)
