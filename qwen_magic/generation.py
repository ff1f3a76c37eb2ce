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
* Fast mode (``GenerationOptions(fast=True)``, ``%%qwen --fast``) decodes into a
  :class:`StaticCacheSlot`: one ``StaticCache`` per loaded model, allocated once at a fixed size
  (``fast_cache_tokens``, at most the model's context) and cropped in place between replies,
  never reallocated. A static cache is what makes ``generate`` compile the decoding step with
  ``torch.compile`` on CUDA (transformers' auto-compile; CUDA graphs included), and a cache of
  one size and one address means the compiled step is built on the first reply and reused by
  every later one. The slot reuses its prompt prefix across turns like :class:`PromptCache`
  (cropping a static cache is as cheap), and its generate calls all run on one long-lived
  thread, because torch keeps the CUDA graphs it records per thread (torch 2.13's
  ``cudagraph_trees``). On CPU nothing is compiled and the replies are the same as without it.

:class:`GenerationOptions` holds the sampling knobs; ``None`` means "the model's own
``generation_config``", so Qwen's recommended sampling applies unless you override it.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from IPython.core.error import UsageError

from .loading import LoadedModel, free_memory, is_out_of_memory

#: Held while a generation runs: two ``generate`` calls never share a model.
_generation_lock = threading.Lock()

#: Fast mode's static cache size unless set otherwise (and never above the model's context).
DEFAULT_FAST_CACHE_TOKENS = 4096


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
    #: Decode into the model's static KV cache, compiled with ``torch.compile`` on CUDA.
    fast: bool = False
    #: Fast mode's static cache size in tokens (prompt + reply), capped at the model's context.
    fast_cache_tokens: int = DEFAULT_FAST_CACHE_TOKENS

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
        if self.fast_cache_tokens < 2:
            raise UsageError(
                f"QwenMagics.fast_cache_tokens must be at least 2 (got {self.fast_cache_tokens})."
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
        record = {key: value for key, value in asdict(self).items() if value is not None}
        if not self.fast:  # the usual mode leaves no trace in saved turns
            del record["fast"], record["fast_cache_tokens"]
        return record


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
        keep = min(shared_prefix_length(covered, prompt_ids), len(prompt_ids) - 1)
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


def fast_cache_tokens(loaded: LoadedModel, options: GenerationOptions) -> int:
    """How many tokens (prompt + reply) fast mode's static cache holds for ``loaded``."""
    return min(loaded.context_length, options.fast_cache_tokens)


@dataclass
class StaticCacheSlot:
    """Fast mode's one ``StaticCache`` for a model, and the token ids whose keys it holds.

    The cache is allocated once and only ever cropped in place (its tensors keep their addresses,
    which compiled CUDA graphs depend on). :meth:`take` keeps the prefix the next prompt shares
    with what the cache holds, whichever conversation put it there: equal tokens before a
    position mean equal keys and values there. ``token_ids`` is emptied while a reply is being
    generated, so after a failure the next :meth:`take` resets the cache instead of trusting it.
    """

    cache: Any
    max_tokens: int
    token_ids: list[int] = field(default_factory=list)
    #: Replies started in this cache; on CUDA the first one compiles the decoding step.
    replies: int = 0

    def take(self, prompt_ids: list[int], *, reuse: bool = True) -> int:
        """Crop the cache to what it shares with ``prompt_ids`` (none unless ``reuse``); return
        how many prompt tokens it still covers. At least one prompt token is left to prefill."""
        import torch

        held, self.token_ids = self.token_ids, []
        length = int(self.cache.get_seq_length())
        keep = 0
        if reuse and length == len(held):
            keep = min(shared_prefix_length(held, prompt_ids), len(prompt_ids) - 1)
        with torch.inference_mode():  # the cache's tensors were made in inference mode
            if length != len(held):
                self.cache.reset()  # unknown contents (a failed reply): start clean
            elif length > keep:
                self.cache.crop(keep - length)  # a negative count removes that many tokens
        return keep

    def keep(self, sequence: list[int]) -> None:
        """Note what the cache holds after a generation that produced ``sequence``."""
        covered = sequence[:-1]  # the last token's keys and values are never computed
        if int(self.cache.get_seq_length()) == len(covered):
            self.token_ids = covered


#: Each model's fast-mode slot, keyed by the torch model: freed together with the model.
_static_slots: weakref.WeakKeyDictionary[Any, StaticCacheSlot] = weakref.WeakKeyDictionary()


def static_cache_slot(loaded: LoadedModel, options: GenerationOptions) -> StaticCacheSlot:
    """The model's fast-mode slot, made on first use; a new size replaces it (and recompiles)."""
    from transformers import StaticCache

    size = fast_cache_tokens(loaded, options)
    slot = _static_slots.get(loaded.model)
    if slot is None or slot.max_tokens != size:
        _static_slots.pop(loaded.model, None)  # free the old cache before making the new one
        cache = StaticCache(config=loaded.model.config, max_cache_len=size)
        slot = _static_slots[loaded.model] = StaticCacheSlot(cache, size)
    return slot


def why_decoding_is_not_compiled(loaded: LoadedModel) -> str | None:
    """``None`` where transformers compiles fast mode's decoding step for this model, else why
    not. Mirrors ``generate``'s own rule: a CUDA-like device (or a ``compile_config`` that forces
    compiling everywhere), and no layers offloaded to the CPU or disk."""
    model = loaded.model
    placed = {str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()}
    if "disk" in placed or ("cpu" in placed and len(placed) > 1):
        return "does not compile a model with layers offloaded to the CPU or disk"
    compile_config = getattr(model.generation_config, "compile_config", None)
    if getattr(compile_config, "_compile_all_devices", False):
        return None
    if model.device.type in ("cuda", "xpu"):
        return None
    return f"compiles only on a GPU (this model is on {model.device.type})"


def fast_mode_note(loaded: LoadedModel, options: GenerationOptions) -> str | None:
    """A line to show before the first reply in a model's static cache, else ``None``."""
    if not options.fast or static_cache_slot(loaded, options).replies:
        return None
    if (why_not := why_decoding_is_not_compiled(loaded)) is not None:
        return f"Note: --fast {why_not}; its replies are the same as without it, not faster."
    return (
        "Note: this first --fast reply compiles the decoding step with torch.compile "
        "(a minute or more for a 7B model); later replies reuse it."
    )


def shared_prefix_length(first: list[int], second: list[int]) -> int:
    """How many leading token ids ``first`` and ``second`` have in common."""
    shared = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        shared += 1
    return shared


class _LongLivedWorker:
    """One daemon thread that runs fast mode's ``generate`` calls, one after another.

    CUDA graphs recorded by ``torch.compile(mode="reduce-overhead")`` live in a per-thread tree
    manager: a new thread per reply would record them again on every turn.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None], done: threading.Event) -> None:
        """Run ``job`` on the worker thread; ``done`` is set once it ended."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="qwen_magic-fast", daemon=True
                )
                self._thread.start()
        self._jobs.put((job, done))

    def _loop(self) -> None:
        while True:
            job, done = self._jobs.get()
            try:
                job()  # jobs catch their own errors (Generation._work)
            finally:
                # Drop the job (and any tensors it holds) before saying it ended: once the
                # caller returns, the interpreter may exit, and a daemon thread must not be
                # freeing torch objects then (that aborts the process).
                del job
                done.set()


_fast_worker = _LongLivedWorker()


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
    #: The conversation's cache to reuse and refill. In fast mode the model's static cache is
    #: used instead, and a prompt cache given here only means "reuse the shared prefix".
    prompt_cache: PromptCache | None = None
    poll_seconds: float = 0.05
    #: Called on the reading thread while it waits for tokens (e.g. to handle a Stop click).
    on_wait: Callable[[], Any] | None = None
    #: The encoder that already rendered these messages (to fit them), if any.
    encoder: PromptEncoder | None = None

    def __post_init__(self) -> None:
        self.text = ""
        self.stats = GenerationStats()
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
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

        encoder = self.encoder or PromptEncoder(self.loaded)
        prompt_ids = encoder.token_ids(self.messages)
        inputs = encoder.inputs(self.messages)
        self.stats.prompt_tokens = len(prompt_ids)
        cache_kwargs: dict[str, Any] = {}
        slot: StaticCacheSlot | None = None
        if self.options.fast:
            slot = static_cache_slot(self.loaded, self.options)
            if len(prompt_ids) + self.options.max_new_tokens > slot.max_tokens:
                raise UsageError(
                    f"--fast: the prompt ({len(prompt_ids)} tokens) and --max-new-tokens "
                    f"({self.options.max_new_tokens}) do not fit the {slot.max_tokens}-token "
                    "static cache. Lower --max-new-tokens, start a shorter conversation, raise "
                    "QwenMagics.fast_cache_tokens, or leave out --fast."
                )
            # Reuse the cached prefix where the caller keeps caches (Chat's reuse_cache).
            reused = slot.take(prompt_ids, reuse=self.prompt_cache is not None)
            slot.replies += 1
            cache_kwargs[_cache_argument()] = slot.cache
            self.stats.cached_prompt_tokens = reused
        elif self.prompt_cache is not None:
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
        if slot is not None:
            _fast_worker.submit(functools.partial(self._work, kwargs, streamer), self._done)
        else:
            self._thread = threading.Thread(
                target=self._work_then_done,
                args=(kwargs, streamer),
                name="qwen_magic-generate",
                daemon=True,
            )
            self._thread.start()
        try:
            while True:
                try:
                    chunk = streamer.text_queue.get(timeout=self.poll_seconds)
                except queue.Empty:
                    if self._done.is_set() and streamer.text_queue.empty():
                        break  # the worker ended without ending the stream
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
            self._done.wait()
            if self._thread is not None:
                self._thread.join()
            self.stats.total_seconds = time.perf_counter() - self._started
            self.stats.interrupted = self.cancelled
        if self.error is not None:
            raise _explain(self.error) from self.error
        if self._sequence is None:
            return
        if slot is not None:
            slot.keep(self._sequence)
        elif self.prompt_cache is not None:
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

    def _work_then_done(self, kwargs: dict[str, Any], streamer: Any) -> None:
        try:
            self._work(kwargs, streamer)
        finally:
            self._done.set()

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


def _encode(tokenizer: Any, messages: list[dict[str, str]], return_tensors: str | None) -> Any:
    """``messages`` rendered for the model (its chat template, else a plain transcript)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors=return_tensors, return_dict=True
        )
    return tokenizer(plain_prompt(messages), return_tensors=return_tensors)


class PromptEncoder:
    """Renders and tokenizes prompts for one model, remembering the last prompt it encoded.

    A turn's prompt is encoded first to check that it fits the context (``Conversation.fit``),
    then to generate from: with one encoder for both, the second time costs nothing (a long
    history takes milliseconds to render, a noticeable share of a GPU's time to first token).
    The memo is compared by content, so a changed message is never given stale ids.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._last: tuple[list[dict[str, str]], list[int]] | None = None

    def token_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self._last is not None and self._last[0] == messages:
            return self._last[1]
        ids = list(_encode(self.loaded.tokenizer, messages, return_tensors=None)["input_ids"])
        self._last = ([dict(message) for message in messages], ids)
        return ids

    def count(self, messages: list[dict[str, str]]) -> int:
        """How many tokens ``messages`` take once rendered for the model."""
        return len(self.token_ids(messages))

    def inputs(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """``generate``'s ``input_ids`` and ``attention_mask`` for ``messages``."""
        import torch

        ids = torch.tensor([self.token_ids(messages)], device=self.loaded.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def prompt_inputs(loaded: LoadedModel, messages: list[dict[str, str]]) -> dict[str, Any]:
    """Tokenize ``messages`` with the model's chat template, ready for ``generate``."""
    return PromptEncoder(loaded).inputs(messages)


def count_prompt_tokens(loaded: LoadedModel, messages: list[dict[str, str]]) -> int:
    """How many tokens ``messages`` take once rendered for the model."""
    return PromptEncoder(loaded).count(messages)


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """A simple transcript for models without a chat template."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*lines, "Assistant:"])


def _explain(error: BaseException) -> BaseException:
    """Turn running out of memory into a ``UsageError`` that says what to lower."""
    if is_out_of_memory(error):
        free_memory()
        return UsageError(
            "Out of memory while generating; the reply was not recorded. Lower "
            "--max-new-tokens, start a shorter conversation (%qwen_reset), or load a smaller "
            "model or dtype."
        )
    return error
