"""Small test doubles and set-ups shared by the test modules (and by the benchmarks)."""

from __future__ import annotations

from typing import Any


class QuietView:
    """A view that shows nothing: for tests about turns and caches, not about display."""

    def update(self, text: str) -> None:
        pass

    def finish(self, text: str, footer: str) -> None:
        pass


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
    """Load a model once for many tests, then take it out of the kernel's one-model cache:
    each test installs it with :func:`install` (so a test that loads another model cannot
    release it for the others)."""
    from qwen_magic import _state, loading

    loading.release()
    loaded = loading.load(spec, progress=None, **options)
    _state.loaded_model = None
    return loaded


def install(state: Any, loaded: Any) -> Any:
    """Make ``loaded`` the kernel's current model, as a fresh ``%qwen_load`` would."""
    state.loaded_model = loaded
    loaded.already_loaded = False
    return loaded
