"""Reading a long prompt before ``generate`` starts, so Stop and Ctrl-C work during it.

``generate`` reads the whole prompt in one forward pass that no stopping criterion can interrupt:
a 5,000-token prompt on a CPU is a minute the user cannot stop. :func:`prefill` reads such a
prompt into the KV cache first, in chunks of a few seconds, with the cancel checked before every
decoder layer (a forward pre-hook, there only while it runs), so a cancelled prefill stops
within one layer's work. ``generate`` then continues from the filled cache, as it does for a
follow-up. A prompt whose unread part fits one chunk is left to ``generate``'s single pass, which
keeps greedy replies identical with and without a reused cache.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

#: Chunked prefill: aim for chunks this long. Small chunks read a prompt slowly on a CPU (32
#: tokens at a time ran at 40% of one pass's speed, 256 at 50%), and the cancel is checked
#: before every decoder layer anyway, so a chunk of a few seconds still stops within a small
#: fraction of that (24 layers in the demo model).
PREFILL_CHUNK_SECONDS = 6.0


#: The first chunk's size, and the bounds chunks are adapted within. A chunk never leaves a
#: rest shorter than the lower bound: it takes that rest along instead, because a quantized
#: model reads a pass under ``quantize.prefill.MANY_ROWS`` rows with its slow one-row kernel
#: (first 1,024 tokens in 2.1 s: a 4,041-token prompt would go 1,024 + 2,929 + 87).
PREFILL_FIRST_CHUNK, PREFILL_MIN_CHUNK, PREFILL_MAX_CHUNK = 1024, 256, 8192


class _PrefillCancelled(Exception):
    """Raised from a decoder layer's pre-hook to abandon a prefill that was cancelled."""


def prefill(model: Any, kwargs: dict[str, Any], cancel: threading.Event) -> int:
    """Read a long prompt into ``kwargs``' KV cache, all but its last token, in chunks of about
    ``PREFILL_CHUNK_SECONDS`` (an unread part of one chunk or less is left to ``generate``'s
    single pass, which keeps greedy replies identical with and without a reused cache);
    ``generate`` then continues from the cache. ``cancel`` is checked
    between chunks and before each decoder layer, so a cancelled prefill stops within one
    layer's work. Returns how many prompt tokens the cache covers (a cancelled prefill leaves a
    cache no one may reuse; the caches module never keeps one from a failed reply)."""
    import torch

    cache = kwargs[cache_argument()]
    ids = kwargs["input_ids"]
    covered = int(cache.get_seq_length())
    end = ids.shape[1] - 1  # generate reads the last prompt token itself
    if end - covered <= PREFILL_FIRST_CHUNK:
        return covered  # one chunk's worth: generate reads it in one pass, as it always did
    chunk = PREFILL_FIRST_CHUNK
    with _cancel_before_each_layer(model, cancel):
        while covered < end and not cancel.is_set():
            stop = min(covered + chunk, end)
            if end - stop < min(PREFILL_MIN_CHUNK, PREFILL_MAX_CHUNK):
                stop = end  # no short last chunk: a quantized model reads one with its kernel
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
                    **{cache_argument(): cache},
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


def cache_argument() -> str:
    """``generate``'s name for the KV cache: ``cache`` in recent transformers."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES

        return "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"
    except ImportError:
        return "past_key_values"
