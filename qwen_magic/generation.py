"""One reply from a model in this kernel: ``model.generate`` on a worker thread, streamed back.

:class:`Generation` is the seed recipe made safe for a notebook, and the in-kernel
implementation of :class:`qwen_magic.backend.Reply`:

* ``generate`` runs on a worker thread and feeds a ``TextIteratorStreamer`` (``skip_prompt=True,
  skip_special_tokens=True`` as keyword arguments, so the prompt and ``<|im_end|>`` never show);
  the caller iterates text chunks on its own thread, where it may safely update a widget.
* Cancelling (``cancel()``, or Ctrl-C / the kernel's stop button while iterating) sets a
  ``threading.Event`` that a ``StoppingCriteria`` checks after every token, so the model stops
  within one decoding step; the worker is always joined and the partial text kept.
* A long prompt is read in chunks before ``generate`` starts (chunked prefill into the KV
  cache, :func:`prefill`), with the cancel checked between chunks, so an interrupt during a
  long prefill stops the work within about a quarter of a second instead of after the whole
  prompt. ``generate`` then continues from the filled cache, as it does for a follow-up.
* No generation outlives its cell: the reading side waits for the worker to end however many
  interrupts arrive meanwhile (they are held and the first re-raised once it ended), and the
  kernel-wide lock is released only then.
* An exception in the worker ends the stream (nothing waits forever) and is re-raised on the
  caller's thread. Running out of memory empties the CUDA cache and becomes a
  :class:`~qwen_magic.errors.QwenMagicError` saying what to lower.
* Only one generation runs in the kernel at a time.
* The KV cache comes from :mod:`qwen_magic.caches` (a conversation's cache, or fast mode's static
  one) through one interface, so there is one path: take a cache for the prompt, generate the
  rest, tell the cache what it now holds. A cache that needs one long-lived thread (fast mode's,
  for its CUDA graphs) gets it.
* Prompt-lookup decoding (:mod:`qwen_magic.prompt_lookup`) drafts tokens from the prompt and
  verifies several per pass where ``options.prompt_lookup`` and the model allow; the streamer
  then gets several tokens at once, and the cancel is still checked after every pass.
* The worker's OpenMP thread team is the only one while it runs (:mod:`qwen_magic.openmp`): a
  second one, left by the thread that loaded the model, made a CPU decode up to 1.5x slower.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .backend import ReplyStats
from .caches import PromptCache, StaticCacheSlot
from .errors import QwenMagicError
from .loading import LoadedModel, free_memory, is_out_of_memory
from .openmp import release_thread_team
from .options import GenerationOptions
from .prompt_lookup import LookupPolicy, drafting, lookup_generate_kwargs, plan_lookup

#: Held while a generation runs: two ``generate`` calls never share a model.
_generation_lock = threading.Lock()

#: Chunked prefill: aim for chunks this long. Small chunks read a prompt slowly on a CPU (32
#: tokens at a time ran at 40% of one pass's speed, 256 at 50%), and the cancel is checked
#: before every decoder layer anyway, so a chunk of a few seconds still stops within a small
#: fraction of that (24 layers in the demo model).
PREFILL_CHUNK_SECONDS = 6.0
#: The first chunk's size, and the bounds chunks are adapted within.
PREFILL_FIRST_CHUNK, PREFILL_MIN_CHUNK, PREFILL_MAX_CHUNK = 1024, 256, 8192


class _PrefillCancelled(Exception):
    """Raised from a decoder layer's pre-hook to abandon a prefill that was cancelled."""


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


_long_lived_worker = _LongLivedWorker()


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
    prompt_ids: list[int]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    #: Where the KV cache comes from and goes back to; None: a new cache, kept nowhere.
    kv_cache: PromptCache | StaticCacheSlot | None = None
    poll_seconds: float = 0.05
    #: Called on the reading thread while it waits for tokens (e.g. to handle a Stop click).
    on_wait: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        self.text = ""
        self.note: str | None = None
        quantized = self.loaded.quantization != "none"
        self.stats = ReplyStats(
            prompt_tokens=len(self.prompt_ids),
            quantization=self.loaded.quantization if quantized else "",
        )
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._sequence: list[int] | None = None
        self._started = 0.0
        #: The reply's prompt-lookup drafting and what it achieved; None: plain decoding.
        self.lookup: LookupPolicy | None = None

    def cancel(self) -> None:
        """Ask the model to stop after the current token."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[str]:
        if not _generation_lock.acquire(blocking=False):
            raise QwenMagicError(
                "Another reply is still being generated; wait for it or interrupt it first."
            )
        try:
            yield from self._run()
        finally:
            _generation_lock.release()

    def _run(self) -> Iterator[str]:
        import torch

        kv_cache = self.kv_cache or PromptCache(self.loaded.model.config)
        cache, reused = kv_cache.take(self.prompt_ids)
        self.stats.cached_prompt_tokens = reused
        if self.options.seed is not None:
            from transformers import set_seed

            set_seed(self.options.seed)
        ids = torch.tensor([self.prompt_ids], device=self.loaded.device)
        streamer = _make_streamer(self.loaded.tokenizer, self._on_tokens)
        kwargs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            **self.options.generate_kwargs(),
            _cache_argument(): cache,
            "streamer": streamer,
            "stopping_criteria": _stop_on(self._cancel),
        }
        self.lookup = self._plan_lookup()
        if self.lookup is not None:
            kwargs.update(lookup_generate_kwargs(self.lookup))
        self._started = time.perf_counter()
        release_thread_team()  # this thread's, so the worker's is the only one (openmp.py)
        try:
            if kv_cache.one_thread:
                _long_lived_worker.submit(lambda: self._work(kwargs, streamer), self._done)
            else:
                self._thread = threading.Thread(
                    target=self._work_then_done,
                    args=(kwargs, streamer),
                    name="qwen_magic-generate",
                    daemon=True,
                )
                self._thread.start()
            yield from self._read(streamer)
        except BaseException:  # Ctrl-C, or the consumer stopped early: stop the model too
            self.cancel()
            raise
        finally:
            held = self._wait_for_worker()
            self.stats.total_seconds = time.perf_counter() - self._started
            self.stats.interrupted = self.cancelled
            self.stats.stop_reason = self._stop_reason()
            if held is not None:
                raise held
        if self.error is not None:
            raise _explain(self.error) from self.error
        if self._sequence is not None:
            kv_cache.keep(self._sequence)

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

    def _wait_for_worker(self) -> BaseException | None:
        """Wait until the worker has ended (it was cancelled if the cell is being left early).
        Interrupts arriving meanwhile cancel again and are held; the first is returned."""
        held: BaseException | None = None
        while not self._done.is_set():
            try:
                self._done.wait()
            except KeyboardInterrupt as interrupt:
                self.cancel()
                held = held or interrupt
        if self._thread is not None:
            self._thread.join()
        return held

    def _read(self, streamer: Any) -> Iterator[str]:
        while True:
            try:
                chunk = streamer.text_queue.get(timeout=self.poll_seconds)
            except queue.Empty:
                if self._done.is_set() and streamer.text_queue.empty():
                    return  # the worker ended without ending the stream
                if self.on_wait is not None:
                    self.on_wait()
                continue
            if chunk is streamer.stop_signal:
                return
            self.text += chunk
            yield chunk

    def _on_tokens(self, count: int) -> None:
        if self.stats.first_token_seconds is None:
            self.stats.first_token_seconds = time.perf_counter() - self._started
        self.stats.new_tokens += count

    def _work(self, kwargs: dict[str, Any], streamer: Any) -> None:
        import torch

        try:
            with torch.inference_mode():
                prefill(self.loaded.model, kwargs, self._cancel)
                if self._cancel.is_set():  # stopped while reading the prompt: nothing to say
                    streamer.text_queue.put(streamer.stop_signal)
                    return
                with drafting(self.loaded.model, self.lookup):
                    output = self.loaded.model.generate(**kwargs)
            self._sequence = output[0].tolist()
        except BaseException as error:  # re-raised on the caller's thread
            self.error = error
            streamer.text_queue.put(streamer.stop_signal)
        finally:
            release_thread_team()  # the user's code after the reply runs at full speed too

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


def prefill(model: Any, kwargs: dict[str, Any], cancel: threading.Event) -> int:
    """Read a long prompt into ``kwargs``' KV cache, all but its last token, in chunks of about
    ``PREFILL_CHUNK_SECONDS`` (an unread part of one chunk or less is left to ``generate``'s
    single pass, which keeps greedy replies identical with and without a reused cache);
    ``generate`` then continues from the cache. ``cancel`` is checked
    between chunks and before each decoder layer, so a cancelled prefill stops within one
    layer's work. Returns how many prompt tokens the cache covers (a cancelled prefill leaves a
    cache no one may reuse; the caches module never keeps one from a failed reply)."""
    import torch

    cache = kwargs[_cache_argument()]
    ids = kwargs["input_ids"]
    covered = int(cache.get_seq_length())
    end = ids.shape[1] - 1  # generate reads the last prompt token itself
    if end - covered <= PREFILL_FIRST_CHUNK:
        return covered  # one chunk's worth: generate reads it in one pass, as it always did
    chunk = PREFILL_FIRST_CHUNK
    with _cancel_before_each_layer(model, cancel):
        while covered < end and not cancel.is_set():
            stop = min(covered + chunk, end)
            started = time.perf_counter()
            positions = torch.arange(covered, stop, device=ids.device).unsqueeze(0)
            try:
                model(
                    input_ids=ids[:, covered:stop],
                    attention_mask=kwargs["attention_mask"][:, :stop],
                    position_ids=positions,
                    cache_position=positions[0],
                    use_cache=True,
                    logits_to_keep=1,
                    **{_cache_argument(): cache},
                )
            except _PrefillCancelled:
                break
            seconds = time.perf_counter() - started
            covered = stop
            scale = min(PREFILL_CHUNK_SECONDS / max(seconds, 1e-3), 4.0)
            chunk = int(min(PREFILL_MAX_CHUNK, max(PREFILL_MIN_CHUNK, chunk * scale)))
    return covered


@contextlib.contextmanager
def _cancel_before_each_layer(model: Any, cancel: threading.Event) -> Iterator[None]:
    """While inside, each decoder layer first checks ``cancel`` (a forward pre-hook)."""

    def check(_module: Any, _inputs: Any) -> None:
        if cancel.is_set():
            raise _PrefillCancelled

    layers = getattr(getattr(model, "model", None), "layers", None) or []
    handles = [layer.register_forward_pre_hook(check) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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


def _cache_argument() -> str:
    """``generate``'s name for the KV cache: ``cache`` in recent transformers."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES

        return "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"
    except ImportError:
        return "past_key_values"


def _explain(error: BaseException) -> BaseException:
    """Turn running out of memory into a one-line error that says what to lower."""
    if is_out_of_memory(error):
        free_memory()
        return QwenMagicError(
            "Out of memory while generating; the reply was not recorded. Lower "
            "--max-new-tokens, start a shorter conversation (%qwen_reset), or load a smaller "
            "model or dtype."
        )
    return error
