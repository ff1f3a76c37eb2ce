"""Small test doubles and set-ups shared by the test modules (and by the benchmarks)."""

from __future__ import annotations

from typing import Any


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

    return loading.load_model(loading.model_spec(spec, **options), progress=None)


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
