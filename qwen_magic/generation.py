"""One generation: ``model.generate`` on a worker thread, its text streamed back.

:class:`Generation` is the seed recipe made safe for a notebook:

* ``generate`` runs on a worker thread and feeds a ``TextIteratorStreamer`` (``skip_prompt=True,
  skip_special_tokens=True`` as keyword arguments, so the prompt and ``<|im_end|>`` never show);
  the caller iterates text chunks on its own thread, where it may safely update a widget.
* Cancelling (``cancel()``, or Ctrl-C / the kernel's stop button while iterating) sets a
  ``threading.Event`` that a ``StoppingCriteria`` checks after every token, so the model stops
  within one decoding step; the worker is always joined and the partial text kept.
* An exception in the worker ends the stream (nothing waits forever) and is re-raised on the
  caller's thread. A CUDA out-of-memory empties the cache and becomes a ``UsageError`` saying
  what to lower.
* Only one generation runs on a model at a time.
* Multi-turn chat reuses the KV cache: a :class:`PromptCache` keeps the cache a conversation's
  last reply left behind, with the token ids it covers. The next prompt is compared token by
  token; the cache is cropped to the longest common prefix and only the rest is prefilled. A
  replaced, popped or trimmed turn simply shortens the common prefix, so nothing stale is used.

:class:`GenerationOptions` holds the sampling knobs; ``None`` means "the model's own
``generation_config``", so Qwen's recommended sampling applies unless you override it.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from IPython.core.error import UsageError

from .loading import LoadedModel

#: Held while a generation runs: two ``generate`` calls never share a model.
_generation_lock = threading.Lock()


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling knobs for one reply; ``None`` leaves the model's default in place."""

    max_new_tokens: int = 512
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise UsageError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens}).")
        if self.temperature is not None and self.temperature < 0:
            raise UsageError(f"--temperature must be 0 or more (got {self.temperature}).")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1] (got {self.top_p}).")
        if self.top_k is not None and self.top_k < 0:
            raise UsageError(f"--top-k must be 0 or more (got {self.top_k}).")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise UsageError(
                f"--repetition-penalty must be above 0 (got {self.repetition_penalty})."
            )

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``: only what was set."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        do_sample = self.do_sample
        if self.temperature == 0:
            do_sample = False  # temperature 0 means greedy, as in most chat APIs
        elif do_sample is None and any(
            value is not None for value in (self.temperature, self.top_p, self.top_k)
        ):
            do_sample = True  # asking for a temperature or top-p/top-k means sampling
        if do_sample is not None:
            kwargs["do_sample"] = do_sample
        if do_sample is not False:
            for name in ("temperature", "top_p", "top_k"):
                if (value := getattr(self, name)) is not None:
                    kwargs[name] = value
        else:
            # Greedy: neutralise sampling defaults so transformers does not warn about them.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs

    def as_record(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class PromptCache:
    """A conversation's KV cache after its last reply, and the token ids that cache covers."""

    cache: Any = None
    token_ids: list[int] = field(default_factory=list)

    def take(self, prompt_ids: list[int]) -> tuple[Any, int]:
        """Hand over the cache cropped to what ``prompt_ids`` shares with it, and that length.

        At least one prompt token is left to prefill. The slot is emptied: a failed generation
        must not leave a half-updated cache behind; :meth:`keep` stores the new one.
        """
        cache, covered = self.cache, self.token_ids
        self.cache, self.token_ids = None, []
        if cache is None or cache.get_seq_length() != len(covered):
            return None, 0
        shared = 0
        for cached, new in zip(covered, prompt_ids, strict=False):
            if cached != new:
                break
            shared += 1
        keep = min(shared, len(prompt_ids) - 1)
        if keep <= 0:
            return None, 0
        if (remove := len(covered) - keep) > 0:
            cache.crop(-remove)  # a negative count removes that many tokens from the end
        return cache, keep

    def keep(self, cache: Any, sequence: list[int]) -> None:
        """Store ``cache`` after a generation that produced ``sequence`` (prompt + reply)."""
        covered = sequence[:-1]  # the last token's keys and values are never computed
        if cache is not None and cache.get_seq_length() == len(covered):
            self.cache, self.token_ids = cache, covered

    def clear(self) -> None:
        self.cache, self.token_ids = None, []


@dataclass
class GenerationStats:
    """What one reply cost."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_seconds: float | None = None
    total_seconds: float = 0.0
    interrupted: bool = False
    dropped_turns: int = 0
    cached_prompt_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first, over the time after the first."""
        if self.first_token_seconds is None or self.new_tokens < 2:
            return 0.0
        decode = self.total_seconds - self.first_token_seconds
        return (self.new_tokens - 1) / decode if decode > 0 else 0.0

    def footer(self) -> str:
        first = "–" if self.first_token_seconds is None else f"{self.first_token_seconds:.2f} s"
        parts = [
            f"{self.new_tokens} tokens",
            f"first token {first}",
            f"{self.tokens_per_second:.1f} tokens/s",
        ]
        if self.dropped_turns:
            parts.append(f"{self.dropped_turns} oldest turns left out to fit the context")
        if self.interrupted:
            parts.append("interrupted")
        return " · ".join(parts)

    def as_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["tokens_per_second"] = round(self.tokens_per_second, 2)
        return record


def _make_streamer(tokenizer: Any, on_first_token: Any) -> Any:
    from transformers import TextIteratorStreamer

    class TimedStreamer(TextIteratorStreamer):
        """Notes when the first generated token arrives and counts tokens."""

        def put(self, value: Any) -> None:
            if not self.next_tokens_are_prompt:
                on_first_token(int(value.numel()))
            super().put(value)

    return TimedStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@dataclass
class Generation:
    """A reply being generated; iterate it for text chunks, then read ``text`` and ``stats``."""

    loaded: LoadedModel
    messages: list[dict[str, str]]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    prompt_cache: PromptCache | None = None
    poll_seconds: float = 0.05
    #: Called on the reading thread while it waits for tokens (e.g. to handle a Stop click).
    on_wait: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        self.text = ""
        self.stats = GenerationStats()
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._sequence: list[int] | None = None
        self._started = 0.0

    def cancel(self) -> None:
        """Ask the model to stop after the current token."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[str]:
        if not _generation_lock.acquire(blocking=False):
            raise UsageError(
                "Another reply is still being generated; wait for it or interrupt it first."
            )
        try:
            yield from self._run()
        finally:
            _generation_lock.release()

    def _run(self) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        cancel = self._cancel

        class StopOnCancel(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                stop = cancel.is_set()
                return torch.full(
                    (input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device
                )

        inputs = prompt_inputs(self.loaded, self.messages)
        prompt_ids = inputs["input_ids"][0].tolist()
        self.stats.prompt_tokens = len(prompt_ids)
        cache_kwargs: dict[str, Any] = {}
        if self.prompt_cache is not None:
            cache, reused = self.prompt_cache.take(prompt_ids)
            cache_kwargs[_cache_argument()] = (
                cache if cache is not None else _new_cache(self.loaded)
            )
            self.stats.cached_prompt_tokens = reused
        if self.options.seed is not None:
            from transformers import set_seed

            set_seed(self.options.seed)
        self._started = time.perf_counter()
        streamer = _make_streamer(self.loaded.tokenizer, self._on_tokens)
        kwargs = {
            **inputs,
            **self.options.generate_kwargs(),
            **cache_kwargs,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([StopOnCancel()]),
        }
        self._thread = threading.Thread(
            target=self._work, args=(kwargs, streamer), name="qwen_magic-generate", daemon=True
        )
        self._thread.start()
        try:
            while True:
                try:
                    chunk = streamer.text_queue.get(timeout=self.poll_seconds)
                except queue.Empty:
                    if not self._thread.is_alive() and streamer.text_queue.empty():
                        break  # the worker died without ending the stream
                    if self.on_wait is not None:
                        self.on_wait()
                    continue
                if chunk is streamer.stop_signal:
                    break
                self.text += chunk
                yield chunk
        except BaseException:  # Ctrl-C, or the consumer stopped early: stop the model too
            self.cancel()
            raise
        finally:
            self._thread.join()
            self.stats.total_seconds = time.perf_counter() - self._started
            self.stats.interrupted = self.cancelled
        if self.error is not None:
            raise _explain(self.error) from self.error
        if self.prompt_cache is not None and self._sequence is not None:
            self.prompt_cache.keep(cache_kwargs[_cache_argument()], self._sequence)

    def _on_tokens(self, count: int) -> None:
        if self.stats.first_token_seconds is None:
            self.stats.first_token_seconds = time.perf_counter() - self._started
        self.stats.new_tokens += count

    def _work(self, kwargs: dict[str, Any], streamer: Any) -> None:
        import torch

        try:
            with torch.inference_mode():
                output = self.loaded.model.generate(**kwargs)
            self._sequence = output[0].tolist()
        except BaseException as error:  # re-raised on the caller's thread
            self.error = error
            streamer.text_queue.put(streamer.stop_signal)

    def run(self) -> str:
        """Generate without streaming; return the full reply."""
        for _chunk in self:
            pass
        return self.text


@functools.cache
def _cache_argument() -> str:
    """``generate``'s name for the KV cache: ``cache`` in recent transformers."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES

        return "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"
    except ImportError:
        return "past_key_values"


def _new_cache(loaded: LoadedModel) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=loaded.model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def prompt_inputs(loaded: LoadedModel, messages: list[dict[str, str]]) -> dict[str, Any]:
    """Tokenize ``messages`` with the model's chat template, ready for ``generate``."""
    tokenizer = loaded.tokenizer
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        encoded = tokenizer(plain_prompt(messages), return_tensors="pt")
    device = loaded.device
    return {key: value.to(device) for key, value in encoded.items()}


def count_prompt_tokens(loaded: LoadedModel, messages: list[dict[str, str]]) -> int:
    """How many tokens ``messages`` take once rendered for the model."""
    tokenizer = loaded.tokenizer
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)
    return len(tokenizer(plain_prompt(messages))["input_ids"])


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """A simple transcript for models without a chat template."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*lines, "Assistant:"])


def _explain(error: BaseException) -> BaseException:
    """Turn a CUDA out-of-memory into a ``UsageError`` that says what to lower."""
    import torch

    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return UsageError(
            "Out of GPU memory while generating; the reply was not recorded. Lower "
            "--max-new-tokens, start a shorter conversation (%qwen_reset), or load a smaller "
            "model or dtype."
        )
    return error
