"""The project's own error type for a user's mistake.

:class:`QwenMagicError` is what every layer raises when the fix is in the user's hands: a wrong
option, a missing file, a model that does not fit. Its message is one line that says the fix.

Where IPython is importable it *is* IPython's ``UsageError`` (a subclass), which IPython shows as
that one line, without a traceback, and the kernel goes on. Where IPython is missing (a GPU
image running ``benchmarks/gpu.py``, a script) it is a plain ``Exception``, so the core modules
import and work without IPython. Real failures (out of memory, a corrupt file, a bug) keep their
own types, or chain them as ``__cause__``.
"""

from __future__ import annotations

try:
    from IPython.core.error import UsageError as _Base
except ImportError:  # pragma: no cover - exercised by the no-IPython test in a subprocess
    _Base = Exception  # type: ignore[assignment,misc]


class QwenMagicError(_Base):
    """A mistake the user can fix; the message says how, in one line."""


class ContextTooLong(QwenMagicError):
    """A backend refused the prompt as longer than its context (a server's own limit, which may
    be smaller than what was known when the prompt was fitted); the chat layer fits the
    conversation again and tries once more.

    ``limit`` is the context length the backend named, when it named one.
    """

    def __init__(self, message: str, limit: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit
