"""Small test doubles and set-ups shared by the test modules (and by the benchmarks)."""

from __future__ import annotations

import weakref
from typing import Any

# The scripted backend ships in the package (tests, notebooks' dry runs, users' own tests), and so
# does the harness the benchmarks share.
from qwen_magic.backends.scripted import ScriptedBackend, ScriptedReply  # noqa: F401
from qwen_magic.testing.models import compile_on_any_device, install  # noqa: F401
from qwen_magic.testing.models import load_aside as _load_aside

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


def load_aside(spec: str, **options: Any) -> Any:
    """Load a model once for many tests, outside the kernel's session (each test installs it
    with :func:`install`), remembered as shared so clean-ups do not free it."""
    loaded = _load_aside(spec, **options)
    shared_models.append(weakref.ref(loaded))
    return loaded


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


#: A real kernel's first cell for tests of the magics with scripted replies:
#: ``qm_script("reply 1", "reply 2")`` makes the next ``%%qwen`` answer with them.
SCRIPTED_KERNEL_SETUP = (
    "%load_ext qwen_magic\n"
    "from qwen_magic.backends.scripted import ScriptedBackend\n"
    "import qwen_magic\n"
    "def qm_script(*replies):\n"
    "    qwen_magic.current_session().use(ScriptedBackend(*replies))\n"
)
