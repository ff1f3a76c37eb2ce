"""KV caches kept between replies, so a follow-up only reads its new tokens.

Both kinds lend a cache to one ``generate`` call and are told afterwards what it holds, through
one interface: :meth:`take` (the prompt's ids in; a cache and how many of those ids it already
covers out) and :meth:`keep` (the ids of the finished sequence in). The generation loop has a
single path for both.

* :class:`PromptCache`: one conversation's ``DynamicCache`` after its last reply, with the token
  ids it covers. The next prompt is compared token by token; the cache is cropped to the longest
  common prefix and only the rest is prefilled. A replaced, popped or trimmed turn simply
  shortens the common prefix, so nothing stale is used. An empty ``PromptCache`` lends a new
  cache: a fresh one each time is the "no reuse" case.
* :class:`StaticCacheSlot`: fast mode's one ``StaticCache`` per loaded model, allocated once at a
  fixed size (at most the model's context) and cropped in place between replies, never
  reallocated. A static cache is what makes ``generate`` compile the decoding step with
  ``torch.compile`` on CUDA (CUDA graphs included), and a cache of one size and one address
  means the compiled step is built on the first reply and reused by every later one. Its
  ``generate`` calls must all run on one long-lived thread (:attr:`one_thread`), because torch
  keeps the CUDA graphs it records per thread.

Both forget what they hold while a reply is generated, so a failed reply never leaves a
half-updated cache to be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def shared_prefix_length(first: list[int], second: list[int]) -> int:
    """How many leading token ids ``first`` and ``second`` have in common."""
    shared = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        shared += 1
    return shared


def new_dynamic_cache(config: Any) -> Any:
    """An empty ``DynamicCache`` for a model with ``config``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # older transformers
        return DynamicCache()


@dataclass
class PromptCache:
    """A conversation's KV cache after its last reply, and the token ids that cache covers."""

    config: Any
    cache: Any = None
    token_ids: list[int] = field(default_factory=list)
    _lent: Any = field(default=None, repr=False)
    #: Whether every generate call with this cache must run on the same thread.
    one_thread = False

    def take(self, prompt_ids: list[int]) -> tuple[Any, int]:
        """A cache for ``prompt_ids``: the kept one cropped to their shared prefix (at least one
        prompt token is left to prefill), else a new one; and how many ids it covers."""
        cache, covered = self.cache, self.token_ids
        self.cache, self.token_ids = None, []
        self._lent = new_dynamic_cache(self.config)
        if cache is None or cache.get_seq_length() != len(covered):
            return self._lent, 0
        keep = min(shared_prefix_length(covered, prompt_ids), len(prompt_ids) - 1)
        if keep <= 0:
            return self._lent, 0
        if (remove := len(covered) - keep) > 0:
            cache.crop(-remove)  # a negative count removes that many tokens from the end
        self._lent = cache
        return cache, keep

    def keep(self, sequence: list[int]) -> None:
        """Note that the lent cache now holds ``sequence`` (prompt + reply) but its last token."""
        covered = sequence[:-1]  # the last token's keys and values are never computed
        lent, self._lent = self._lent, None
        if lent is not None and lent.get_seq_length() == len(covered):
            self.cache, self.token_ids = lent, covered

    def clear(self) -> None:
        self.cache, self.token_ids = None, []


@dataclass
class StaticCacheSlot:
    """Fast mode's one ``StaticCache`` for a model, and the token ids whose keys it holds.

    The cache is allocated once and only ever cropped in place (its tensors keep their addresses,
    which compiled CUDA graphs depend on). :meth:`take` keeps the prefix the next prompt shares
    with what the cache holds, whichever conversation put it there: equal tokens before a
    position mean equal keys and values there.
    """

    cache: Any
    max_tokens: int
    token_ids: list[int] = field(default_factory=list)
    #: Replies started in this cache; on CUDA the first one compiles the decoding step.
    replies: int = 0
    _reuse_next: bool = field(default=True, repr=False)
    one_thread = True

    @classmethod
    def allocate(cls, config: Any, max_tokens: int) -> StaticCacheSlot:
        from transformers import StaticCache

        return cls(StaticCache(config=config, max_cache_len=max_tokens), max_tokens)

    def take(self, prompt_ids: list[int]) -> tuple[Any, int]:
        """The cache cropped to what it shares with ``prompt_ids`` (at least one prompt token is
        left to prefill), and how many prompt tokens it still covers."""
        import torch

        held, self.token_ids = self.token_ids, []
        reuse, self._reuse_next = self._reuse_next, True
        length = int(self.cache.get_seq_length())
        keep = 0
        if reuse and length == len(held):
            keep = min(shared_prefix_length(held, prompt_ids), len(prompt_ids) - 1)
        with torch.inference_mode():  # the cache's tensors were made in inference mode
            if length != len(held):
                self.cache.reset()  # unknown contents (a failed reply): start clean
            elif length > keep:
                self.cache.crop(keep - length)  # a negative count removes that many tokens
        self.replies += 1
        return self.cache, keep

    def keep(self, sequence: list[int]) -> None:
        """Note what the cache holds after a generation that produced ``sequence``."""
        covered = sequence[:-1]  # the last token's keys and values are never computed
        if int(self.cache.get_seq_length()) == len(covered):
            self.token_ids = covered

    def forget(self) -> None:
        """Reuse nothing the cache holds in the next :meth:`take`."""
        self._reuse_next = False
