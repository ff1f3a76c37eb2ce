"""Prompt-lookup decoding: draft the next tokens from the prompt, verify several per pass.

The commonest follow-up in a notebook is an edit ("rename X in that code"): most of the reply
copies text the prompt already holds. transformers' assisted decoding
(``generate(prompt_lookup_num_tokens=N)``) takes a *draft* of up to N tokens from the prompt,
where the last few tokens written appear earlier, runs the model once over the draft, and keeps
the drafted tokens up to the first one the model would not have chosen, plus the model's own
token after them. Greedy, that is the same choice rule as one token per pass, only several
tokens per forward pass where the draft is right; a wrong draft costs one slightly wider pass.

What this module adds to transformers' ``PromptLookupCandidateGenerator``:

* **The latest match.** transformers drafts from the *first* place the last n-gram occurs; in
  a conversation that is the oldest version of the code. :class:`LatestMatchLookup` drafts from
  the latest place that still has a full draft after it (the reply so far included).
* **No draft in the first pass**, which reads the prompt: that pass then has exactly the rows
  it has without lookup, so the KV cache (and a quantized model's prefill path) is the same.
* **Giving up** (:class:`LookupPolicy`): under ``auto``, a reply whose drafts keep failing
  (fewer than one token accepted per four drafts over the last eight) stops drafting for the
  rest of the reply, so open-ended prose does not pay for verifying wrong drafts.
* **The same bits as one token per pass.** A verification pass is not bit-identical to
  one-token steps as transformers runs it (transformers #30413): measured on the demo model,
  bf16, int8 and int4 alike, logits differed by up to 0.25 (the argmax the same there, but a
  near-tie could flip a token). Two causes. The attention: one query row runs sdpa without a
  mask (and with grouped heads), several run it with a causal mask; :func:`row_by_row_attention`
  therefore runs a short verification pass's attention one query row at a time, each exactly
  as its one-token step would (keys up to its own position, no mask). The linears: PyTorch's
  CPU int4 and int8 kernels compute each row on its own (a quantized model's verification
  logits then equal the one-token steps' bit for bit, measured and tested), but its bfloat16
  matmul does not: a 5-row ``down_proj`` differed from five 1-row ones in the last bits of
  some rows.
* **When it is on** (:func:`plan_lookup`), for ``QwenMagics.prompt_lookup`` / ``--lookup``:
  ``off`` never; ``on`` always; ``auto`` for greedy replies of a model quantized to int8 or
  int4 on the CPU with sdpa attention (the defaults), where greedy ids provably cannot
  change. A bf16 reply gets lookup only when asked for (``--lookup``): its ids may then
  differ from plain decoding's where two tokens nearly tie. Sampling under ``auto`` stays
  plain, so seeded replies repeat exactly; asked for (``on``), assisted sampling samples every
  position from the model's own distribution and keeps drafted tokens only where they equal
  the sample, so the distribution is unchanged (but a seed gives another text than without
  lookup, as the random numbers are drawn in another order).

Drafts are 3 tokens on a quantized model (PyTorch's CPU int4/int8 kernels work in tiles of 4
rows: a fourth drafted token starts a second tile) and 6 on others, n-grams of at most 3.
The hook into ``generate`` is :func:`drafting`, which hands transformers this generator for
one call (``generate`` builds its own otherwise, and offers no argument to pass one), and
makes its first pass read only the prompt tokens the cache lacks (transformers' assisted loop
reads the whole prompt again when the cache holds part of it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

#: ``QwenMagics.prompt_lookup`` / ``GenerationOptions.prompt_lookup`` values.
SETTINGS = ("auto", "on", "off")
#: Draft lengths: a quantized model's kernels tile rows by 4 (3 drafted + 1 last token).
QUANTIZED_DRAFT_TOKENS, DRAFT_TOKENS = 3, 6
#: Longest n-gram matched at the end of the text (shorter ones are tried after it).
MAX_NGRAM = 3
#: auto gives up when the last GIVE_UP_WINDOW drafts accepted fewer than GIVE_UP_BELOW tokens.
GIVE_UP_WINDOW, GIVE_UP_BELOW = 8, 2


@dataclass
class LookupPolicy:
    """One reply's drafting: how long a draft is, whether to give up, and what it achieved."""

    draft_tokens: int
    #: Stop drafting once drafts keep failing (``auto``); ``on`` keeps drafting.
    may_give_up: bool = True
    #: Forward passes after the first one (each verifies a draft or makes one plain step).
    steps: int = 0
    drafts: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    gave_up: bool = False
    _recent: list[int] = field(default_factory=list, repr=False)

    @property
    def accepted_per_step(self) -> float:
        """Drafted tokens the model accepted, per forward pass after the prompt's."""
        return self.accepted_tokens / self.steps if self.steps else 0.0

    def record(self, drafted: int, accepted: int) -> None:
        """Note one verification pass: ``drafted`` tokens proposed, ``accepted`` kept."""
        self.steps += 1
        if not drafted:
            return
        self.drafts += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self._recent = [*self._recent, accepted][-GIVE_UP_WINDOW:]
        if (
            self.may_give_up
            and len(self._recent) == GIVE_UP_WINDOW
            and sum(self._recent) < GIVE_UP_BELOW
        ):
            self.gave_up = True

    def summary(self) -> str:
        """One line for benchmarks and logs."""
        return (
            f"{self.accepted_tokens}/{self.drafted_tokens} drafted tokens accepted in "
            f"{self.drafts} drafts, {self.accepted_per_step:.2f} per step"
            + (", gave up" if self.gave_up else "")
        )


def plan_lookup(
    setting: str, *, quantization: str, sampling: bool, attention: str, device_type: str
) -> LookupPolicy | None:
    """The drafting policy for one reply, or None for plain decoding (see the module doc)."""
    quantized = quantization in ("int8", "int4")
    draft = QUANTIZED_DRAFT_TOKENS if quantized else DRAFT_TOKENS
    if setting == "on":
        return LookupPolicy(draft, may_give_up=False)
    # Proven on PyTorch's CPU kernels only (CUDA runs torchao's, never measured here).
    proven = quantized and attention == "sdpa" and device_type == "cpu"
    if setting == "auto" and not sampling and proven:
        return LookupPolicy(draft)
    return None


def latest_match(ids: list[int], draft_tokens: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to ``draft_tokens`` ids that followed the latest earlier occurrence of the longest
    n-gram (at most ``max_ngram``) that ``ids`` end with; [] when none occurs earlier. The
    latest occurrence with a full draft after it wins over a later one with a shorter draft."""
    length = len(ids)
    for size in range(min(max_ngram, length - 1), 0, -1):
        tail = ids[length - size :]
        shorter: list[int] = []
        # Scan from the latest start back; the tail itself (start length - size) is not a match.
        for start in range(length - size - 1, -1, -1):
            if ids[start : start + size] != tail:
                continue
            following = ids[start + size : start + size + draft_tokens]
            if len(following) == draft_tokens:
                return following
            shorter = shorter or following
        if shorter:
            return shorter
    return []


def _candidate_generator_class() -> type:
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    class LatestMatchLookup(PromptLookupCandidateGenerator):
        """transformers' prompt lookup drafting from the latest match, under a policy."""

        def __init__(
            self, policy: LookupPolicy, eos_token_id: Any, max_length: int, config: Any
        ) -> None:
            super().__init__(
                eos_token_id=eos_token_id,
                num_output_tokens=policy.draft_tokens,
                max_matching_ngram_size=MAX_NGRAM,
                max_length=max_length,
            )
            self.policy = policy
            self._passes = 0
            self._drafted = 0
            self._config = config
            self._attention = config._attn_implementation

        def get_candidates(self, input_ids: Any, **kwargs: Any) -> tuple[Any, Any]:
            import torch

            self._drafted = 0
            self._passes += 1
            # The prompt's pass runs as without lookup (sdpa over all its rows, no draft);
            # the passes after it verify drafts row by row, as one-token steps would.
            prompt_pass = self._passes == 1
            if self._attention == "sdpa":
                self._config._attn_implementation = "sdpa" if prompt_pass else ROW_BY_ROW
            if prompt_pass or self.policy.gave_up:
                return input_ids, None
            room = self.max_length - input_ids.shape[1] - 1  # generate adds one token itself
            draft = latest_match(input_ids[0].tolist(), min(self.num_output_tokens, room))
            if self.eos_token_id is not None and draft:
                eos = set(torch.atleast_1d(self.eos_token_id).tolist())
                draft = draft[: next((i for i, t in enumerate(draft) if t in eos), len(draft))]
            if not draft:
                return input_ids, None
            self._drafted = len(draft)
            extra = torch.tensor([draft], dtype=input_ids.dtype, device=input_ids.device)
            return torch.cat((input_ids, extra), dim=1), None

        def update_candidate_strategy(self, input_ids: Any, scores: Any, num_matches: int) -> None:
            if self._passes > 1:  # not the prompt's pass
                self.policy.record(self._drafted, min(int(num_matches), self._drafted))

    return LatestMatchLookup


def lookup_generate_kwargs(policy: LookupPolicy) -> dict[str, Any]:
    """What ``generate`` needs to take the assisted (prompt lookup) path."""
    return {"prompt_lookup_num_tokens": policy.draft_tokens, "max_matching_ngram_size": MAX_NGRAM}


#: The attention implementation name :func:`row_by_row_attention` is registered under.
ROW_BY_ROW = "qwen_magic_row_by_row_sdpa"
#: Passes with more query rows than this (a prompt's) run sdpa as usual.
ROW_BY_ROW_MAX_ROWS = 16


def row_by_row_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
) -> tuple[Any, None]:
    """transformers' sdpa attention, but a short pass over a cache runs one query row at a
    time, each as the one-token step at its position runs it, so its output has the same bits."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, keys = query.shape[2], key.shape[2]
    if rows == 1 or rows > ROW_BY_ROW_MAX_ROWS or keys == rows:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    past = keys - rows
    # A dynamic cache holds exactly the keys so far (the last row sees them all): a one-token
    # step there has no mask. A static cache is longer than that, and its steps use a mask.
    dynamic = attention_mask is None or bool(attention_mask[0, 0, -1].all())
    outputs = []
    for row in range(rows):
        if dynamic:
            seen = past + row + 1
            args = (key[:, :, :seen], value[:, :, :seen], None)
        else:
            args = (key, value, attention_mask[:, :, row : row + 1])
        out, _ = sdpa_attention_forward(module, query[:, :, row : row + 1], *args, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def _register_row_by_row() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    if ROW_BY_ROW not in AttentionInterface._global_mapping:
        AttentionInterface.register(ROW_BY_ROW, row_by_row_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ROW_BY_ROW, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextlib.contextmanager
def drafting(model: Any, policy: LookupPolicy | None) -> Iterator[None]:
    """While inside, ``model.generate``'s prompt lookup drafts with :class:`LatestMatchLookup`
    under ``policy``, and an sdpa model's attention runs the passes after the prompt's row by
    row (nothing changes when ``policy`` is None); the model's attention is restored after.
    Only one generation runs at a time (generation.py's lock), so the attributes changed here
    are never shared."""
    if policy is None:
        yield
        return
    generator_class = _candidate_generator_class()

    config = model.config
    attention = config._attn_implementation
    if attention == "sdpa":
        _register_row_by_row()

    def candidate_generator(generation_config: Any, **_kwargs: Any) -> Any:
        return generator_class(
            policy, generation_config._eos_token_tensor, generation_config.max_length, config
        )

    real_prepare = model.prepare_inputs_for_generation

    def prepare_inputs(input_ids: Any, next_sequence_length: Any = None, **kwargs: Any) -> Any:
        # transformers' assisted loop feeds its first pass the whole prompt even when the cache
        # already holds part of it (a reused conversation cache, a chunked prefill); slice it as
        # the plain loop's prefill does.
        cache = kwargs.get("cache")
        if next_sequence_length is None and cache is not None:
            past = int(cache.get_seq_length())
            if 0 < past < input_ids.shape[1]:
                next_sequence_length = input_ids.shape[1] - past
        return real_prepare(input_ids, next_sequence_length=next_sequence_length, **kwargs)

    model._get_candidate_generator = candidate_generator
    model.prepare_inputs_for_generation = prepare_inputs
    try:
        yield
    finally:
        del model._get_candidate_generator, model.prepare_inputs_for_generation
        config._attn_implementation = attention
