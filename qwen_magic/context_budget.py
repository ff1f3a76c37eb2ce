"""How much context one ask may read, and a word before a long read.

Reading a prompt (the *prefill*) costs time in proportion to its tokens, and more than that as
it grows: on a 2-core CPU the 0.5B demo model reads about a hundred tokens a second, so a
restored history that fills a 32,768-token context kept the first token waiting 387 s. Two
things bound that wait:

* **a context budget** (:func:`context_for`): a conversation is fitted into
  ``min(budget, the model's context)``. The budget is ``QwenMagics.context_tokens``; its default,
  0, means :data:`CPU_BUDGET` tokens for a model in this kernel on the CPU and the model's whole
  context elsewhere (a GPU, a server);
* **a word before the wait** (:class:`PrefillMeter`): when an ask must read at least
  :data:`LONG_READ_TOKENS` tokens that no cache holds, the user is told how many and about how
  long it takes, from the prefill rate measured on this backend's earlier replies, else from
  :data:`CPU_TOKENS_PER_SECOND` on a CPU (said as an assumption). Stop and Ctrl-C work during
  the read (the kernel backend reads long prompts in chunks and checks between them).

Nothing here prints: the chat layer passes a :class:`~qwen_magic.backends.base.Notice`
(``long_prompt``) to the front end, which words it.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any

from qwen_magic.backends.base import Backend, Notice, ReplyStats
from qwen_magic.errors import QwenMagicError
from qwen_magic.options import GenerationOptions

#: The default budget for a model in this kernel on the CPU (a few tens of seconds of reading).
CPU_BUDGET = 8192
#: Reads shorter than this are not announced (a few seconds even on a CPU).
LONG_READ_TOKENS = 2048
#: What a CPU is assumed to read per second before anything was measured: the demo model's
#: pace on 2 cores (a larger model reads slower: the estimate says it is an assumption).
CPU_TOKENS_PER_SECOND = 100.0
#: A reply's prefill is measured only when it read at least this many new tokens.
MEASURED_FROM_TOKENS = 256


def runs_on_cpu(backend: Backend) -> bool:
    """Whether ``backend`` is a model in this kernel with every part on the CPU."""
    info = backend.info()
    devices = [part for part in info.location.split("+") if part]
    return info.kind == "kernel" and bool(devices) and all(d.startswith("cpu") for d in devices)


def context_for(backend: Backend, options: GenerationOptions, budget: int | None) -> int:
    """The context a conversation is fitted into: the model's, bounded by ``budget`` (None or
    0: :data:`CPU_BUDGET` on a CPU, no bound elsewhere)."""
    if budget is not None and budget < 0:
        raise QwenMagicError(
            f"QwenMagics.context_tokens must be a number of tokens, or 0 for the default "
            f"(got {budget}); e.g. %config QwenMagics.context_tokens = 4096."
        )
    model = backend.context_length(options)
    if not budget:
        budget = CPU_BUDGET if runs_on_cpu(backend) else model
    return min(model, budget)


@dataclass
class _Held:
    """What a backend holds in cache for one conversation after its last reply."""

    backend: Any
    tokens: int
    left_out: int


class PrefillMeter:
    """Measures each backend's prefill rate and tells, before an ask, how long its read is."""

    def __init__(self) -> None:
        self._rates: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._held: dict[int, _Held] = {}

    def rate(self, backend: Backend) -> tuple[float | None, bool]:
        """Tokens read per second on ``backend`` and whether that was measured here (else the
        CPU assumption, or None where nothing is known)."""
        measured = self._rates.get(backend)
        if measured is not None:
            return measured, True
        return (CPU_TOKENS_PER_SECOND, False) if runs_on_cpu(backend) else (None, False)

    def before(
        self,
        backend: Backend,
        conversation: int,
        prompt_tokens: int,
        left_out: int,
        *,
        reuse_cache: bool,
        context: int,
        model_context: int,
    ) -> Notice | None:
        """The ``long_prompt`` notice for an ask that must read ``prompt_tokens`` (less what the
        backend still holds of this conversation), or None when the read is short."""
        held = self._held.get(conversation)
        cached = 0
        if reuse_cache and held is not None and held.backend() is backend:
            cached = held.tokens if held.left_out == left_out else 0
        to_read = max(prompt_tokens - cached, 0)
        if to_read < LONG_READ_TOKENS:
            return None
        rate, measured = self.rate(backend)
        return Notice(
            "long_prompt",
            {
                "tokens": to_read,
                "seconds": to_read / rate if rate else None,
                "rate": rate,
                "measured": measured,
                "context": context,
                "model_context": model_context,
            },
        )

    def after(self, backend: Backend, conversation: int, stats: ReplyStats) -> None:
        """Learn from a finished reply: its prefill rate, and what the backend now holds."""
        read = stats.prompt_tokens - stats.cached_prompt_tokens
        if read >= MEASURED_FROM_TOKENS and stats.first_token_seconds:
            # A backend that cannot be weakly referenced is not remembered.
            with contextlib.suppress(TypeError):
                self._rates[backend] = read / stats.first_token_seconds
        try:
            ref = weakref.ref(backend)
        except TypeError:
            return
        self._held[conversation] = _Held(
            ref, stats.prompt_tokens + stats.new_tokens, stats.dropped_turns
        )
