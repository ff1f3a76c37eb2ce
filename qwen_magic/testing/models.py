"""Models for tests and benchmarks: one load shared by many tests, and compiling on any device."""

from __future__ import annotations

from typing import Any


def compile_on_any_device() -> Any:
    """transformers' default ``CompileConfig`` (inductor, "reduce-overhead") with its switch "for
    testing purposes" on: ``generate`` then compiles a static cache's decoding step on any device,
    the CPU included, as it otherwise does only on CUDA-like ones."""
    from transformers import CompileConfig

    compile_config: Any = CompileConfig()
    compile_config._compile_all_devices = True
    return compile_config


def load_aside(spec: str, **options: Any) -> Any:
    """Load a model once for many tests, outside the kernel's session: each test installs it
    with :func:`install` (so a test that loads another model cannot release it for the
    others)."""
    from qwen_magic.backends.kernel import loading

    return loading.load_model(loading.model_spec(spec, **options), progress=None)


def install(session: Any, loaded: Any) -> Any:
    """Make ``loaded`` the session's model, as a fresh ``%qwen_load`` would (new caches)."""
    from qwen_magic.backends.kernel.backend import KernelBackend

    session.backend = KernelBackend(loaded)
    return loaded
