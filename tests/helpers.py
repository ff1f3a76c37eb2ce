"""Small test doubles for the test modules; what benchmarks share lives in qwen_magic.testing."""

from __future__ import annotations

from typing import Any

# The scripted backend ships in the package (tests, notebooks' dry runs, users' own tests).
from qwen_magic.backends.scripted import ScriptedBackend, ScriptedReply  # noqa: F401
from qwen_magic.testing.models import compile_on_any_device, install, load_aside  # noqa: F401


def spy_on_generate(loaded: Any, monkeypatch: Any) -> list[dict]:
    """Record the keyword arguments of every ``model.generate`` call, then call through."""
    calls: list[dict] = []
    real = loaded.model.generate

    def spy(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(loaded.model, "generate", spy)
    return calls


def start(messages: list[dict[str, str]], options: Any = None, **kwargs: Any) -> Any:
    """Begin a reply with the kernel session's backend (what ``Chat.ask`` does after fitting)."""
    import qwen_magic
    from qwen_magic.options import GenerationOptions

    backend = qwen_magic.current_session().require_backend()
    return backend.start(messages, options or GenerationOptions(), **kwargs)


def texts(reply: Any, on_wait: Any = None) -> Any:
    """Iterate ``reply``'s text pieces (its ``TextDelta`` events), calling ``on_wait`` at each
    ``Waiting`` event, as a view's ``wait`` would be."""
    from qwen_magic.backends.base import TextDelta, Waiting

    for event in reply:
        if isinstance(event, TextDelta):
            yield event.text
        elif isinstance(event, Waiting) and on_wait is not None:
            on_wait()
