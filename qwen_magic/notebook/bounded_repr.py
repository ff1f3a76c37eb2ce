"""A value as prompt text in bounded work: ``%%qwen -i`` shows at most a few thousand characters.

Cutting a value's text after it is built costs as much as building all of it: IPython's pretty
printer took 46 s over a 100 MB, ten-million-line ``__repr__`` that was then cut to 4,000
characters. :func:`bounded_text` stops early instead:

* a string is sliced before anything else is done with it;
* anything else goes through IPython's pretty printer (lists, dicts and data frames look as in
  ``Out``) writing into a buffer that stops the printer, by raising, once it holds the limit;
  containers are walked only as far as the printed text reaches;
* a ``__repr__`` that fails (a recursive one raises ``RecursionError``) becomes one line;
* a ``__repr__`` that is slow in Python code is stopped after :data:`REPR_SECONDS` by a
  ``SIGALRM`` timer, where one can be set (the main thread, no timer of the user's running).
  Python cannot stop C code part-way, nor a thread, so a single slow C call (one huge
  ``str.join``) still runs to its end; then the text is cut as above.
"""

from __future__ import annotations

import contextlib
import io
import signal
import threading
from collections.abc import Iterator
from typing import Any

from qwen_magic.errors import QwenMagicError

#: A value's text taking longer than this to build is given up (where a timer can be set).
REPR_SECONDS = 5.0


class _Full(BaseException):
    """The buffer holds the limit: stop the printer (BaseException, so that a user's
    ``_repr_pretty_`` catching ``Exception`` does not swallow it)."""


class _TooSlow(BaseException):
    """The timer ran out while the value's text was built."""


class _LimitedBuffer(io.StringIO):
    """A text buffer that raises :class:`_Full` once it holds more than ``limit`` characters."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.size = 0

    def write(self, text: str) -> int:
        room = self.limit + 1 - self.size
        written = super().write(text[:room])
        self.size += written
        if self.size > self.limit:
            raise _Full
        return written


def bounded_text(value: Any, limit: int, shown: str = "the value") -> tuple[str, bool]:
    """``value`` as text, at most ``limit`` characters, and whether it was cut.

    A string is itself; anything else is IPython's pretty form (or ``repr``, where IPython is
    missing). A repr that raises, or runs past :data:`REPR_SECONDS`, is a one-line
    ``QwenMagicError`` naming ``shown``.
    """
    if isinstance(value, str):
        return value[:limit], len(value) > limit
    buffer = _LimitedBuffer(limit)
    try:
        with _time_limit(REPR_SECONDS):
            _print(value, buffer, limit)
    except _Full:
        return buffer.getvalue()[:limit], True
    except _TooSlow:
        raise QwenMagicError(
            f"--interpolate: {shown} took more than {REPR_SECONDS:g} s to show as text and was "
            "given up; put a shorter text of it in a variable first (e.g. str(x)[:2000])."
        ) from None
    except RecursionError:
        raise QwenMagicError(
            f"--interpolate: {shown} cannot be shown as text: its repr calls itself without end "
            "(RecursionError); put a text of it in a variable first."
        ) from None
    except Exception as error:
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise QwenMagicError(
            f"--interpolate: {shown} cannot be shown as text: its repr raised "
            f"{type(error).__name__}: {first_line}; put a text of it in a variable first."
        ) from None
    return buffer.getvalue(), False


def _print(value: Any, buffer: _LimitedBuffer, limit: int) -> None:
    try:
        from IPython.lib import pretty
    except ImportError:  # plain Python: repr, then cut
        buffer.write(repr(value))
        return
    printers = dict(pretty._type_pprinters)
    kind = type(value)
    if not hasattr(kind, "_repr_pretty_") and not any(
        base in printers for base in kind.__mro__[:-1]
    ):
        # IPython would take this repr apart line by line (46 s for ten million lines) only to
        # print it as it is; take it whole and cut it.
        buffer.write(repr(value))
        return
    for text_type in (str, bytes):  # an item's huge text is cut before its repr is made
        printers[text_type] = _cut_item(limit)
    printer = pretty.RepresentationPrinter(
        buffer, max_width=79, max_seq_length=max(limit // 2, 1), type_pprinters=printers
    )
    printer.pretty(value)
    printer.flush()


def _cut_item(limit: int) -> Any:
    def print_cut(item: str | bytes, printer: Any, cycle: bool) -> None:
        printer.text(repr(item[: limit + 1]))

    return print_cut


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`_TooSlow` in this thread after ``seconds``, where a timer can be set."""
    usable = (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None)
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )
    if not usable:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _TooSlow

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
