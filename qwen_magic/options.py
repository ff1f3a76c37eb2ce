"""The knobs of one reply: :class:`GenerationOptions`.

``None`` means "the backend's own default": for a model in the kernel, its
``generation_config`` (Qwen2-7B-Instruct samples at temperature 0.7, top-p 0.8; the demo model
is greedy); for a server, whatever it applies when a field is left out. Values are checked here,
once, so a bad one is a one-line :class:`~qwen_magic.errors.QwenMagicError` before any work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from qwen_magic.errors import QwenMagicError

#: Fast mode's static cache size unless set otherwise (and never above the model's context).
DEFAULT_FAST_CACHE_TOKENS = 4096
#: The largest seed torch's and numpy's generators take.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling knobs for one reply; ``None`` leaves the backend's default in place."""

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
    #: Prompt-lookup decoding in this kernel: "auto", "on" or "off" (see
    #: ``qwen_magic.backends.kernel.prompt_lookup``).
    prompt_lookup: str = "auto"

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                flag = "--" + name.replace("_", "-")
                raise QwenMagicError(f"{flag} must be a finite number (got {value}).")
        if self.max_new_tokens <= 0:
            raise QwenMagicError(
                f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})."
            )
        if self.temperature is not None and self.temperature < 0:
            raise QwenMagicError(f"--temperature must be 0 or more (got {self.temperature}).")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise QwenMagicError(f"--top-p must be in (0, 1] (got {self.top_p}).")
        if self.top_k is not None and self.top_k < 0:
            raise QwenMagicError(f"--top-k must be 0 or more (got {self.top_k}).")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise QwenMagicError(
                f"--repetition-penalty must be above 0 (got {self.repetition_penalty})."
            )
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise QwenMagicError(f"--seed must be between 0 and {MAX_SEED} (got {self.seed}).")
        if self.prompt_lookup not in ("auto", "on", "off"):
            raise QwenMagicError(
                "QwenMagics.prompt_lookup must be 'auto', 'on' or 'off' "
                f"(got {self.prompt_lookup!r})."
            )
        if self.fast_cache_tokens < 2:
            raise QwenMagicError(
                f"QwenMagics.fast_cache_tokens must be at least 2 (got {self.fast_cache_tokens})."
            )

    @property
    def sampling(self) -> bool | None:
        """True to sample, False for greedy, None for the backend's default.

        Temperature 0 means greedy, as in most chat APIs; asking for a temperature, top-p or
        top-k (without ``do_sample=False``) means sampling.
        """
        if self.temperature == 0:
            return False
        if self.do_sample is None and any(
            value is not None for value in (self.temperature, self.top_p, self.top_k)
        ):
            return True
        return self.do_sample

    def as_record(self) -> dict[str, Any]:
        """What a saved turn keeps of these options: the ones that were set."""
        record = {key: value for key, value in asdict(self).items() if value is not None}
        if not self.fast:  # the usual mode leaves no trace in saved turns
            del record["fast"], record["fast_cache_tokens"]
        if self.prompt_lookup == "auto":  # the usual mode leaves no trace either
            del record["prompt_lookup"]
        return record
