"""One reply from a model in this kernel: ``model.generate`` on a worker thread, streamed back.

:class:`KernelReply` is the seed recipe made safe for a notebook, on the shared
:class:`~qwen_magic.backends.base.ThreadedReply` loop (worker thread, queue, held interrupts):

* ``generate`` runs on the worker and feeds a streamer (``skip_prompt=True,
  skip_special_tokens=True`` as keyword arguments, so the prompt and ``<|im_end|>`` never show)
  whose text goes to the reading thread, where it may safely update a widget.
* Cancelling sets a ``threading.Event`` that a ``StoppingCriteria`` checks after every token, so
  the model stops within one decoding step; a long prompt is read first by
  :func:`~qwen_magic.backends.kernel.prefill.prefill`, which checks it before every layer.
* An exception in the worker ends the stream (nothing waits forever) and is re-raised on the
  reading thread. Running out of memory empties the CUDA cache and becomes a
  :class:`~qwen_magic.errors.QwenMagicError` saying what to lower.
* Only one generation runs in the kernel at a time.
* The KV cache comes from :mod:`~qwen_magic.backends.kernel.caches` (a conversation's cache, or
  fast mode's static one) through one interface: take a cache for the prompt, generate the rest,
  tell the cache what it now holds. A cache that needs one long-lived thread (fast mode's, for
  its CUDA graphs) gets it.
* Prompt-lookup decoding (:mod:`~qwen_magic.backends.kernel.prompt_lookup`) drafts tokens from
  the prompt and verifies several per pass where ``options.prompt_lookup`` and the model allow;
  the streamer then gets several tokens at once, and the cancel is still checked after every pass.
* The worker's OpenMP thread team is the only one while it runs
  (:mod:`~qwen_magic.backends.kernel.openmp`): a second one, left by the thread that loaded the
  model, made a CPU decode up to 1.5x slower.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from qwen_magic.backends.base import ReplyStats, ThreadedReply
from qwen_magic.backends.kernel.caches import PromptCache, StaticCacheSlot
from qwen_magic.backends.kernel.devices import free_memory, is_out_of_memory
from qwen_magic.backends.kernel.loading import LoadedModel
from qwen_magic.backends.kernel.openmp import release_thread_team
from qwen_magic.backends.kernel.prefill import cache_argument, prefill
from qwen_magic.backends.kernel.prompt_lookup import (
    LookupPolicy,
    drafting,
    lookup_generate_kwargs,
    plan_lookup,
)
from qwen_magic.errors import QwenMagicError
from qwen_magic.options import GenerationOptions

#: Held while a generation runs: two ``generate`` calls never share a model.
_generation_lock = threading.Lock()


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
                job()  # jobs catch their own errors (ThreadedReply._work)
            finally:
                # Drop the job (and any tensors it holds) before saying it ended: once the
                # caller returns, the interpreter may exit, and a daemon thread must not be
                # freeing torch objects then (that aborts the process).
                del job
                done.set()


_long_lived_worker = _LongLivedWorker()


def _make_streamer(tokenizer: Any, emit: Callable[[str], None], on_tokens: Any) -> Any:
    from transformers import TextStreamer

    class ForwardingStreamer(TextStreamer):
        """Hands each finished piece of text to ``emit`` and counts the new tokens."""

        def put(self, value: Any) -> None:
            if not self.next_tokens_are_prompt:
                on_tokens(int(value.numel()))
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                emit(text)

    return ForwardingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class KernelReply(ThreadedReply):
    """A reply being generated in this kernel; iterate it for events, or call :meth:`run`."""

    def __init__(
        self,
        loaded: LoadedModel,
        prompt_ids: list[int],
        options: GenerationOptions | None = None,
        kv_cache: PromptCache | StaticCacheSlot | None = None,
    ) -> None:
        super().__init__(ReplyStats(prompt_tokens=len(prompt_ids)))
        self.loaded = loaded
        self.prompt_ids = prompt_ids
        self.options = options or GenerationOptions()
        #: Where the KV cache comes from and goes back to; None: a new cache, kept nowhere.
        self.kv_cache = kv_cache
        self._sequence: list[int] | None = None
        self._kwargs: dict[str, Any] = {}
        self._cache_source: PromptCache | StaticCacheSlot | None = None
        #: The reply's prompt-lookup drafting and what it achieved; None: plain decoding.
        self.lookup: LookupPolicy | None = None

    def _exclusive(self) -> contextlib.AbstractContextManager[Any]:
        if not _generation_lock.acquire(blocking=False):
            raise QwenMagicError(
                "Another reply is still being generated; wait for it or interrupt it first."
            )
        return _Release(_generation_lock)

    def _prepare(self) -> None:
        import torch

        source = self.kv_cache or PromptCache(self.loaded.model.config)
        cache, reused = source.take(self.prompt_ids)
        self._cache_source = source
        self.stats.cached_prompt_tokens = reused
        if self.options.seed is not None:
            from transformers import set_seed

            set_seed(self.options.seed)
        ids = torch.tensor([self.prompt_ids], device=self.loaded.device)
        self._kwargs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            **generate_kwargs(self.options),
            cache_argument(): cache,
            "stopping_criteria": _stop_on(self._cancel),
        }
        self.lookup = self._plan_lookup()
        if self.lookup is not None:
            self._kwargs.update(lookup_generate_kwargs(self.lookup))
        release_thread_team()  # this thread's, so the worker's is the only one (openmp.py)

    def _submit(self, work: Callable[[], None], done: threading.Event) -> None:
        if self._cache_source is not None and self._cache_source.one_thread:
            _long_lived_worker.submit(work, done)
        else:
            super()._submit(work, done)

    def _produce(self, emit: Callable[[str], None]) -> None:
        import torch

        kwargs = {
            **self._kwargs,
            "streamer": _make_streamer(self.loaded.tokenizer, emit, self._on_tokens),
        }
        try:
            with torch.inference_mode():
                prefill(self.loaded.model, kwargs, self._cancel)
                if self._cancel.is_set():  # stopped while reading the prompt: nothing to say
                    return
                with drafting(self.loaded.model, self.lookup):
                    output = self.loaded.model.generate(**kwargs)
            self._sequence = output[0].tolist()
        finally:
            kwargs.clear()  # the worker lets go of the tensors before it says it ended
            release_thread_team()  # the user's code after the reply runs at full speed too

    def _plan_lookup(self) -> LookupPolicy | None:
        model = self.loaded.model
        sampling = self.options.sampling
        if sampling is None:  # the model's own default
            sampling = bool(getattr(model.generation_config, "do_sample", False))
        return plan_lookup(
            self.options.prompt_lookup,
            quantization=self.loaded.quantization,
            sampling=sampling,
            attention=str(model.config._attn_implementation),
            device_type=model.device.type,
        )

    def _on_tokens(self, count: int) -> None:
        if self.stats.first_token_seconds is None:
            self.stats.first_token_seconds = time.perf_counter() - self._started
        self.stats.new_tokens += count

    def _settle(self) -> None:
        self._kwargs = {}
        self.stats.stop_reason = self._stop_reason()

    def _stop_reason(self) -> str | None:
        """Why the reply ended: cancelled, the model's end-of-turn token, or the length cap."""
        if self.cancelled:
            return "cancelled"
        if self.error is not None or self._sequence is None:
            return None
        eos = self.loaded.model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        generated = len(self._sequence) - len(self.prompt_ids)
        if self._sequence[-1] not in eos_ids and generated >= self.options.max_new_tokens:
            return "length"
        return "eos"

    def _finish(self) -> None:
        if self._sequence is not None and self._cache_source is not None:
            self._cache_source.keep(self._sequence)

    def _explain(self, error: BaseException) -> BaseException:
        """Turn running out of memory into a one-line error that says what to lower."""
        if is_out_of_memory(error):
            free_memory()
            return QwenMagicError(
                "Out of memory while generating; the reply was not recorded. Lower "
                "--max-new-tokens, start a shorter conversation (%qwen_reset), or load a "
                "smaller model or dtype."
            )
        return error


class _Release(contextlib.AbstractContextManager):
    """Releases an already acquired lock on leaving."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


def generate_kwargs(options: GenerationOptions) -> dict[str, Any]:
    """Keyword arguments for ``model.generate``: only what was set."""
    kwargs: dict[str, Any] = {"max_new_tokens": options.max_new_tokens}
    do_sample = options.sampling
    if do_sample is not None:
        kwargs["do_sample"] = do_sample
    if do_sample is not False:
        for name in ("temperature", "top_p", "top_k"):
            if (value := getattr(options, name)) is not None:
                kwargs[name] = value
    else:
        # Greedy: neutralise sampling defaults so transformers does not warn about them.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if options.repetition_penalty is not None:
        kwargs["repetition_penalty"] = options.repetition_penalty
    return kwargs


def _stop_on(cancel: threading.Event) -> Any:
    """A ``StoppingCriteriaList`` that stops every sequence once ``cancel`` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnCancel(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            stop = cancel.is_set()
            return torch.full(
                (input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device
            )

    return StoppingCriteriaList([StopOnCancel()])


def iterate_text(reply: KernelReply) -> Iterator[str]:
    """The reply's text pieces only (for code that wants the seed recipe's plain stream)."""
    from qwen_magic.backends.base import TextDelta

    for event in reply:
        if isinstance(event, TextDelta):
            yield event.text
