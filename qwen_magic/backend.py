"""The backend seam: what the chat layer needs from whatever writes the replies.

A *backend* turns a list of chat messages into a streamed reply. The chat layer
(:class:`qwen_magic.chat.Chat`) talks to nothing else, so the same conversations, views, magics
and history files work whether the model runs in this kernel
(:class:`qwen_magic.kernel_backend.KernelBackend`, ``transformers``) or on a server that speaks
the OpenAI chat-completions API (:class:`qwen_magic.backends.server.ServerBackend`: vLLM,
SGLang, ``transformers serve``).

The protocol is small, in the manner of transformers' ``BaseStreamer``:

* :meth:`Backend.start` begins one reply and returns a :class:`Reply`. Iterating the reply
  yields pieces of text as they come; the reading thread is the caller's (a widget may be
  updated from it). Errors are raised from the iteration, on that thread.
* :meth:`Reply.cancel` really stops the work (the model stops after its current token; a server
  stream is closed, so the server stops generating); the iteration then ends normally and the
  partial text stays in :attr:`Reply.text`. Ctrl-C while iterating cancels too, and re-raises.
* :attr:`Reply.stats` holds the figures the footer shows, final once the iteration has ended.
* :meth:`Backend.count_tokens` and :meth:`Backend.context_length` let the chat layer fit a
  conversation into the context before it asks. A backend that learns only when asking that
  the prompt is too long (a server's own limit) raises
  :class:`~qwen_magic.errors.ContextTooLong` from the iteration, before any text; the chat
  layer then fits the conversation again and asks once more.

What a backend keeps between replies (a KV cache, a compiled graph) is its own business: the
chat layer passes ``conversation``, an opaque key saying which conversation a prompt continues,
and may call :meth:`Backend.forget_conversations` when the conversations are replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from .options import GenerationOptions

Messages = list[dict[str, str]]


@dataclass
class ReplyStats:
    """What one reply cost, and how it ended."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_seconds: float | None = None
    total_seconds: float = 0.0
    interrupted: bool = False
    dropped_turns: int = 0
    cached_prompt_tokens: int = 0
    #: How the model's weights are quantized ("int8", "int4"; "" when they are not).
    quantization: str = ""
    #: Why the reply ended: "eos" (the model finished), "length" (it reached max_new_tokens;
    #: a server's ``finish_reason == "length"``), "cancelled" (Stop, Ctrl-C); None: unknown.
    stop_reason: str | None = None

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first, over the time after the first."""
        if self.first_token_seconds is None or self.new_tokens < 2:
            return 0.0
        decode = self.total_seconds - self.first_token_seconds
        return (self.new_tokens - 1) / decode if decode > 0 else 0.0

    def footer(self) -> str:
        """One line for under the reply: tokens, time to first token, speed, what was left out,
        and whether the reply was cut (by the token limit, or by an interrupt)."""
        first = "–" if self.first_token_seconds is None else f"{self.first_token_seconds:.2f} s"
        parts = [
            f"{self.new_tokens} tokens",
            f"first token {first}",
            f"{self.tokens_per_second:.1f} tokens/s",
        ]
        if self.quantization:
            parts.append(f"{self.quantization} weights")
        if self.dropped_turns:
            parts.append(f"{self.dropped_turns} oldest turns left out to fit the context")
        if self.stop_reason == "length" and not self.interrupted:
            parts.append(f"stopped at the {self.new_tokens}-token limit (-n)")
        if self.interrupted:
            parts.append("interrupted")
        return " · ".join(parts)

    def as_record(self) -> dict[str, Any]:
        """The stats as a saved turn keeps them."""
        record = asdict(self)
        if not self.quantization:  # unquantized replies leave no trace in saved turns
            del record["quantization"]
        record["tokens_per_second"] = round(self.tokens_per_second, 2)
        return record


@runtime_checkable
class Reply(Protocol):
    """One reply being written: iterate it for pieces of text."""

    #: The text so far (all of it once the iteration has ended).
    text: str
    stats: ReplyStats
    #: Called on the reading thread while it waits for text (a Stop click, a wait counter).
    on_wait: Callable[[], Any] | None
    #: A line to show under the finished reply, if any (e.g. options a server left out).
    note: str | None

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None:
        """Stop the work after the current token; the iteration ends, the text is kept."""

    @property
    def cancelled(self) -> bool: ...


@runtime_checkable
class Backend(Protocol):
    """Whatever writes the replies: a model in this kernel, or a server."""

    #: A short name for the model, shown in summaries and kept in saved turns.
    name: str

    def summary(self) -> str:
        """One line: what this backend is and where it runs."""

    def context_length(self, options: GenerationOptions) -> int:
        """The most tokens (prompt + reply) one reply with ``options`` may use."""

    def context_advice(self, options: GenerationOptions) -> str:
        """What to add to a "does not fit" message for ``options`` ("" if nothing)."""

    def count_tokens(self, messages: Messages) -> int:
        """How many tokens ``messages`` take as a prompt (an upper estimate is fine)."""

    def notices(self, options: GenerationOptions) -> list[str]:
        """Lines to show before a reply with ``options`` starts (each said once)."""

    def start(
        self,
        messages: Messages,
        options: GenerationOptions,
        *,
        conversation: Hashable | None = None,
    ) -> Reply:
        """Begin a reply to ``messages``; ``conversation`` says which one it continues (None:
        keep nothing for a follow-up). Nothing runs until the reply is iterated."""

    def forget_conversations(self) -> None:
        """Drop whatever is kept per conversation (the conversations were replaced)."""

    def close(self) -> None:
        """Free what the backend holds (GPU memory, connections); it is not used again."""
