"""How the chat layer shows a reply without knowing the notebook: :class:`View` and
:class:`Presentation`.

The chat layer (:class:`~qwen_magic.chat.Chat`) never prints and never formats a line for the
user. It streams a reply into a :class:`View` (started once, updated with the text so far, told
while it waits, finished once with the final text and a footer) and asks a
:class:`Presentation` for the words: the footer under a reply, the text of a notice, and where
to say a notice. The front end supplies both (:mod:`qwen_magic.notebook.views`,
:mod:`qwen_magic.notebook.report`); the package root makes that the default, so
``qwen_magic.Chat().ask(..., view="text")`` works from plain Python too.

Any object with ``update(text)`` and ``finish(text, footer)`` is a view; ``start(reply)`` and
``wait()`` are optional (a user's own view need not subclass :class:`View`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qwen_magic.backends.base import BackendInfo, Notice, Reply, ReplyStats


class View:
    """Where a reply is shown: started once, updated with the text so far, finished once."""

    def start(self, reply: Reply) -> None:
        """The reply begins; hook controls to it here (e.g. a Stop button to ``reply.cancel``)."""

    def update(self, text: str) -> None:
        """Show ``text``, the whole reply so far."""

    def wait(self) -> None:
        """Nothing came for a moment (a long prompt being read): handle clicks, show a wait."""

    def finish(self, text: str, footer: str) -> None:
        """Show the final ``text`` and a one-line ``footer``."""


class NullView(View):
    """Shows nothing."""


@dataclass(frozen=True)
class Presentation:
    """The front end's side of a turn, handed to the chat layer."""

    #: A view for a name: "auto", "widget" or "text".
    make_view: Callable[[str], View]
    #: The one line under a finished reply.
    footer: Callable[[ReplyStats, BackendInfo], str]
    #: A notice's words.
    notice_text: Callable[[Notice], str]
    #: Where a notice is said (before or after the reply).
    say: Callable[[str], None]


def _quiet(_line: str) -> None:
    pass


#: What the chat layer uses when no front end set another: no views, terse words, silence.
PLAIN = Presentation(
    make_view=lambda _name: NullView(),
    footer=lambda stats, _info: f"{stats.new_tokens} tokens",
    notice_text=lambda notice: notice.code,
    say=_quiet,
)

_default = PLAIN


def default_presentation() -> Presentation:
    """The presentation a :class:`~qwen_magic.chat.Chat` made without one uses."""
    return _default


def set_default_presentation(presentation: Presentation) -> None:
    """Make ``presentation`` the default (the package root sets the notebook's)."""
    global _default
    _default = presentation
