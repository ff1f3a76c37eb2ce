"""The model runs in this kernel: :class:`KernelBackend`, the in-kernel ``Backend``.

It wraps a :class:`~qwen_magic.backends.kernel.loading.LoadedModel` (weights and tokenizer, loaded
by
:mod:`qwen_magic.backends.kernel.loading`) and owns everything kept between its replies:

* each conversation's KV cache (:class:`~qwen_magic.backends.kernel.caches.PromptCache`), so a
follow-up only
  prefills its new tokens; the last few conversations keep theirs;
* fast mode's one static cache (:class:`~qwen_magic.backends.kernel.caches.StaticCacheSlot`), whose
size is then
  the context a conversation is fitted into;
* the prompt encoder, which renders a turn's prompt once for fitting and generating.

Replies are :class:`~qwen_magic.backends.kernel.reply.KernelReply` objects. Closing the backend
drops the
model and its caches and frees their memory.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from qwen_magic.backends.base import BackendInfo, Notice
from qwen_magic.backends.kernel import loading
from qwen_magic.backends.kernel.caches import PromptCache, StaticCacheSlot
from qwen_magic.backends.kernel.devices import free_memory
from qwen_magic.backends.kernel.encoding import Messages, PromptEncoder
from qwen_magic.backends.kernel.loading import LoadedModel
from qwen_magic.backends.kernel.reply import KernelReply
from qwen_magic.errors import QwenMagicError
from qwen_magic.options import GenerationOptions

#: How many conversations keep their KV cache at once (the oldest one's is dropped first).
MAX_CACHED_CONVERSATIONS = 4


class KernelBackend:
    """Replies from a model loaded in this kernel with ``transformers``."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded: LoadedModel | None = loaded
        self.name = loaded.name
        self.encoder = PromptEncoder(loaded.tokenizer)
        self.prompt_caches: dict[Hashable, PromptCache] = {}
        self.static_slot: StaticCacheSlot | None = None
        self._warned_no_template = False

    @property
    def model(self) -> LoadedModel:
        if self.loaded is None:
            raise QwenMagicError("This model was released; run %qwen_load again.")
        return self.loaded

    def summary(self) -> str:
        return self.model.summary()

    def context_length(self, options: GenerationOptions) -> int:
        # Fast mode's static cache is the context: the prompt and the reply must fit in it.
        if options.fast:
            return min(self.model.context_length, options.fast_cache_tokens)
        return self.model.context_length

    def info(self) -> BackendInfo:
        model = self.model
        weights = model.quantization if model.quantization != "none" else ""
        return BackendInfo("kernel", self.name, "+".join(model.devices), weights)

    def context_advice(self, options: GenerationOptions) -> list[Notice]:
        size = self.context_length(options)
        if not options.fast or size == self.model.context_length:
            return []
        return [Notice("fast_cache_size", {"tokens": size})]

    def count_tokens(self, messages: Messages) -> int:
        return self.encoder.count(messages)

    def notices(self, options: GenerationOptions) -> list[Notice]:
        notices = []
        model = self.model
        if not getattr(model.tokenizer, "chat_template", None) and not self._warned_no_template:
            self._warned_no_template = True
            notices.append(Notice("no_chat_template", {"model": model.name}))
        if options.fast and not self._fast_slot(options).replies:  # once per static cache
            notices.append(fast_mode_notice(model))
        return notices

    def start(
        self,
        messages: Messages,
        options: GenerationOptions,
        *,
        conversation: Hashable | None = None,
    ) -> KernelReply:
        prompt_ids = self.encoder.token_ids(messages)
        kv_cache: PromptCache | StaticCacheSlot | None
        if options.fast:
            kv_cache = self._fast_slot(options)
            if len(prompt_ids) + options.max_new_tokens > kv_cache.max_tokens:
                raise QwenMagicError(
                    f"--fast: the prompt ({len(prompt_ids)} tokens) and --max-new-tokens "
                    f"({options.max_new_tokens}) do not fit the {kv_cache.max_tokens}-token "
                    "static cache. Lower --max-new-tokens, start a shorter conversation, raise "
                    "QwenMagics.fast_cache_tokens, or leave out --fast."
                )
            if conversation is None:
                kv_cache.forget()
        else:
            kv_cache = None if conversation is None else self._prompt_cache(conversation)
        return KernelReply(self.model, prompt_ids, options, kv_cache)

    def forget_conversations(self) -> None:
        self.prompt_caches.clear()
        if self.static_slot is not None:
            self.static_slot.forget()

    def close(self) -> None:
        self.prompt_caches.clear()
        self.static_slot = None
        self.loaded = None
        free_memory()

    def _prompt_cache(self, conversation: Hashable) -> PromptCache:
        caches = self.prompt_caches
        if conversation not in caches and len(caches) >= MAX_CACHED_CONVERSATIONS:
            caches.pop(next(iter(caches)))  # forget the oldest conversation's cache
        return caches.setdefault(conversation, PromptCache(self.model.model.config))

    def _fast_slot(self, options: GenerationOptions) -> StaticCacheSlot:
        """The model's static cache, made on first use; a new size replaces it (recompiles)."""
        size = self.context_length(options)
        if self.static_slot is None or self.static_slot.max_tokens != size:
            self.static_slot = None  # free the old cache before making the new one
            self.static_slot = StaticCacheSlot.allocate(self.model.model.config, size)
        return self.static_slot


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


def fast_mode_notice(loaded: LoadedModel) -> Notice:
    """What to say before the first reply in a model's static cache."""
    if (why_not := why_decoding_is_not_compiled(loaded)) is not None:
        return Notice("fast_not_compiled", {"why": why_not})
    return Notice("fast_compiles")


@dataclass
class KernelRequest:
    """A model to load in this kernel (what ``%qwen_load MODEL`` asks the session for)."""

    spec: loading.ModelSpec
    progress: loading.Progress | None = print

    def is_open_in(self, backend: Any) -> bool:
        """The same spec loaded already: nothing to do."""
        loaded = backend.loaded if isinstance(backend, KernelBackend) else None
        return loaded is not None and loaded.spec == self.spec

    def open(self, current: Any, release_current: Callable[[], Any]) -> KernelBackend:
        """Check the spec, free the current model (its memory counts as free), then load."""
        loaded_now = current.loaded if isinstance(current, KernelBackend) else None
        freed = loaded_now.memory_bytes if loaded_now is not None else 0
        del loaded_now  # no reference of ours may keep the old model alive once released
        loaded = loading.load_model(
            self.spec, progress=self.progress, make_room=release_current, freed_bytes=freed
        )
        return KernelBackend(loaded)


def request(
    model: str | None = None, *, progress: loading.Progress | None = print, **how: Any
) -> KernelRequest:
    """The registry's factory: ``how`` holds ``loading.model_spec``'s options (dtype, …)."""
    from qwen_magic.backends.kernel.heavy_imports import import_heavy_modules

    import_heavy_modules()  # before anything imports torch: a Ctrl-C then waits for it
    return KernelRequest(loading.model_spec(model, **how), progress)
