"""Small test doubles and set-ups shared by the test modules (and by the benchmarks)."""

from __future__ import annotations

import weakref
from typing import Any

#: The pytest item running now (set by conftest), so the kernel and server harnesses can check
#: its tier marker; None outside pytest (the benchmarks use the harnesses too).
running_test: Any = None

#: Models loaded once for many tests by :func:`load_aside` (alive while their fixture is).
#: (Weak references: a LoadedModel is an unhashable dataclass, so no WeakSet.)
shared_models: list[weakref.ref] = []


def require_marker(name: str, what: str) -> None:
    """Fail the running test if it starts ``what`` without the ``name`` marker (its tier)."""
    import pytest

    if running_test is not None and running_test.get_closest_marker(name) is None:
        pytest.fail(f"{running_test.nodeid} starts {what} but is not marked {name}", pytrace=False)


def release_session() -> None:
    """End the kernel's session as a test's clean-up. A shared model stays alive for the next
    test, so its backend is dropped without ``release()``'s ``gc.collect()`` (nothing big is
    freed); any other backend is closed as ``%qwen_unload`` would."""
    from qwen_magic import _state

    session = _state.session
    if session is not None:
        loaded = getattr(session.backend, "loaded", None)
        if loaded is not None and any(loaded is ref() for ref in shared_models):
            session.backend = None
        else:
            session.release()
    _state.session = None


def spy_on_generate(loaded: Any, monkeypatch: Any) -> list[dict]:
    """Record the keyword arguments of every ``model.generate`` call, then call through."""
    calls: list[dict] = []
    real = loaded.model.generate

    def spy(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(loaded.model, "generate", spy)
    return calls


def compile_on_any_device() -> Any:
    """transformers' default ``CompileConfig`` (inductor, "reduce-overhead") with its switch "for
    testing purposes" on: ``generate`` then compiles a static cache's decoding step on any device,
    the CPU included, as it otherwise does only on CUDA-like ones."""
    from transformers import CompileConfig

    compile_config = CompileConfig()
    compile_config._compile_all_devices = True
    return compile_config


def load_aside(spec: str, **options: Any) -> Any:
    """Load a model once for many tests, outside the kernel's session: each test installs it
    with :func:`install` (so a test that loads another model cannot release it for the
    others)."""
    from qwen_magic import loading

    loaded = loading.load_model(loading.model_spec(spec, **options), progress=None)
    shared_models.append(weakref.ref(loaded))
    return loaded


def install(session: Any, loaded: Any) -> Any:
    """Make ``loaded`` the session's model, as a fresh ``%qwen_load`` would (new caches)."""
    from qwen_magic.kernel_backend import KernelBackend

    session.backend = KernelBackend(loaded)
    return loaded


def start(messages: list[dict[str, str]], options: Any = None, **kwargs: Any) -> Any:
    """Begin a reply with the kernel session's backend (what ``Chat.ask`` does after fitting)."""
    import qwen_magic
    from qwen_magic.options import GenerationOptions

    backend = qwen_magic.current_session().require_backend()
    return backend.start(messages, options or GenerationOptions(), **kwargs)


class ScriptedReply:
    """A :class:`~qwen_magic.backend.Reply` that streams a fixed text, word by word."""

    def __init__(self, text: str, max_new_tokens: int) -> None:
        from qwen_magic.backend import ReplyStats

        words = text.split(" ")
        self.pieces = [word + " " for word in words[:-1]] + words[-1:]
        self.pieces = self.pieces[:max_new_tokens]
        cut = len(words) > max_new_tokens
        self.text = ""
        self.stats = ReplyStats(stop_reason="length" if cut else "eos")
        self.on_wait = None
        self._cancelled = False

    def __iter__(self):
        for piece in self.pieces:
            if self._cancelled:
                break
            self.text += piece
            self.stats.new_tokens += 1
            yield piece

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled


class ScriptedBackend:
    """A :class:`~qwen_magic.backend.Backend` whose replies are given in advance (one "token"
    a word): for the mechanics that need a reply's words, such as its code blocks, or that need
    only some reply (saving, exporting, the magics' options). Once ``replies`` are used up, every
    reply is ``otherwise`` (None: no more replies, an IndexError)."""

    name = "scripted"

    def __init__(self, *replies: str, otherwise: str | None = None) -> None:
        self.replies = list(replies)
        self.otherwise = otherwise
        self.prompts: list[list[dict[str, str]]] = []

    def summary(self) -> str:
        return "scripted replies"

    def context_length(self, options: Any) -> int:
        return 8192

    def context_advice(self, options: Any) -> str:
        return ""

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        return sum(len(m["content"]) // 4 + 4 for m in messages)

    def notices(self, options: Any) -> list[str]:
        return []

    def start(self, messages: list[dict[str, str]], options: Any, **kwargs: Any) -> ScriptedReply:
        self.prompts.append(messages)
        text = self.replies.pop(0) if self.replies or self.otherwise is None else self.otherwise
        return ScriptedReply(text, options.max_new_tokens)

    def forget_conversations(self) -> None:
        pass

    def close(self) -> None:
        pass
