"""Shared fixtures: a tiny random Qwen2 for mechanics, the real demo model for words.

The tiny model has Qwen2's architecture at toy size (hidden 64, 2 layers) and the demo model's
real tokenizer, saved as a normal Hugging Face folder, so every test goes through the same
``from_pretrained`` path users hit. Its text is noise: assert on mechanics, not words.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .helpers import install, load_aside

# No test may wait on the (unreachable) model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """The converted offline demo model (built on first use, then cached)."""
    from qwen_magic.backends.kernel.demo_model import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory, demo_path: Path) -> Path:
    """A tiny random Qwen2ForCausalLM with the real Qwen tokenizer, as a model folder."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(demo_path)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        **TINY_CONFIG,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    folder = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def fresh_state():
    """Each test starts with a new kernel session (no model, no conversations, no history
    file) and leaves none behind; yields that session."""
    from qwen_magic import _state, session

    if _state.session is not None:
        _state.session.release()
    _state.session = None
    yield session.current()
    if _state.session is not None:
        _state.session.release()
    _state.session = None


@pytest.fixture
def tiny(fresh_state, tiny_model_path: Path):
    """The tiny model loaded as the kernel's model."""
    loaded, _fresh = fresh_state.load_model(str(tiny_model_path), device="cpu", progress=None)
    return loaded


@pytest.fixture(scope="session")
def demo_loaded_once(demo_path: Path):
    """The real demo model, loaded once for the whole session (outside the kernel cache)."""
    return load_aside("demo")


@pytest.fixture
def demo(fresh_state, demo_loaded_once):
    """The real demo model installed as the kernel's model."""
    return install(fresh_state, demo_loaded_once)


@pytest.fixture
def shell(fresh_state):
    """A real IPython shell with the extension loaded."""
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "qwen_magic")
    yield ip
    for name in list(ip.user_ns):
        if name.startswith("qm_"):
            del ip.user_ns[name]


@pytest.fixture
def notebook(tmp_path, monkeypatch, fresh_state):
    """A notebook announced the way Jupyter Server announces it to a kernel, in its own folder
    (so that folder can be made read-only)."""
    folder = tmp_path / "work"
    folder.mkdir()
    path = folder / "analysis.ipynb"
    path.write_text("{}")
    monkeypatch.setenv("JPY_SESSION_NAME", str(path))
    fresh_state.history = None
    yield path
    fresh_state.history = None
