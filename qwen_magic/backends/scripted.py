"""A backend whose replies are written in advance: :class:`ScriptedBackend`.

Shipped in the package, as httpx ships its ``MockTransport``: for tests of the chat layer and the
magics, for a notebook's dry run, and for your own tests of code that uses qwen_magic, without a
model. Each reply streams one word at a time, through the same
:class:`~qwen_magic.backends.base.ThreadedReply` loop as the real backends (so Stop, Ctrl-C and
waiting behave as they do there)::

    import qwen_magic
    from qwen_magic.backends.scripted import ScriptedBackend

    backend = ScriptedBackend("Paris.", "Berlin.")
    qwen_magic.current_session().use(backend)     # %%qwen now answers from the script
    backend.prompts                               # the messages each reply was asked with

``max_new_tokens`` cuts a reply (a word is a token here) and the reply says it stopped for
"length"; ``seconds_per_word`` slows it down, for tests of what happens mid-reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

from qwen_magic.backends.base import BackendInfo, Messages, Notice, ReplyStats, ThreadedReply
from qwen_magic.errors import QwenMagicError
from qwen_magic.options import GenerationOptions


class ScriptedReply(ThreadedReply):
    """A reply that streams a fixed text, word by word."""

    def __init__(self, text: str, max_new_tokens: int, seconds_per_word: float = 0.0) -> None:
        super().__init__(ReplyStats())
        words = text.split(" ")
        pieces = [word + " " for word in words[:-1]] + words[-1:]
        self.pieces = pieces[:max_new_tokens]
        self._cut = len(pieces) > max_new_tokens
        self.seconds_per_word = seconds_per_word

    def _produce(self, emit: Callable[[str], None]) -> None:
        for piece in self.pieces:
            if self.cancelled:
                return
            if self.seconds_per_word:
                time.sleep(self.seconds_per_word)
            if self.stats.first_token_seconds is None:
                self.stats.first_token_seconds = time.perf_counter() - self._started
            self.stats.new_tokens += 1
            emit(piece)

    def _settle(self) -> None:
        if self.cancelled:
            self.stats.stop_reason = "cancelled"
        else:
            self.stats.stop_reason = "length" if self._cut else "eos"


class ScriptedBackend:
    """A :class:`~qwen_magic.backends.base.Backend` answering from ``replies``, in order."""

    name = "scripted"

    def __init__(
        self,
        *replies: str,
        otherwise: str | None = None,
        context_tokens: int = 8192,
        seconds_per_word: float = 0.0,
    ) -> None:
        self.replies = list(replies)
        #: The reply once ``replies`` are used up (None: no more replies, a one-line error).
        self.otherwise = otherwise
        #: The messages of every reply asked for, in order.
        self.prompts: list[Messages] = []
        self.context_tokens = context_tokens
        self.seconds_per_word = seconds_per_word
        self.closed = False

    def info(self) -> BackendInfo:
        return BackendInfo("scripted", self.name, "this kernel")

    def summary(self) -> str:
        return f"Scripted replies ({len(self.replies)} left)"

    def context_length(self, options: GenerationOptions) -> int:
        return self.context_tokens

    def context_advice(self, options: GenerationOptions) -> list[Notice]:
        return []

    def count_tokens(self, messages: Messages) -> int:
        """About four characters a token, and a few for each message's markers."""
        return sum(len(message["content"]) // 4 + 4 for message in messages)

    def notices(self, options: GenerationOptions) -> list[Notice]:
        return []

    def start(
        self,
        messages: Messages,
        options: GenerationOptions,
        *,
        conversation: Hashable | None = None,
    ) -> ScriptedReply:
        if not self.replies and self.otherwise is None:
            raise QwenMagicError("The script has no replies left; give the backend more.")
        self.prompts.append(list(messages))
        text = self.replies.pop(0) if self.replies else self.otherwise
        assert text is not None
        return ScriptedReply(text, options.max_new_tokens, self.seconds_per_word)

    def forget_conversations(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
