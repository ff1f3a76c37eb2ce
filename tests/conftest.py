"""Shared fixtures: a tiny random Qwen2 for mechanics, the real demo model for words.

The tiny model has Qwen2's architecture at toy size (hidden 64, 2 layers) and a small real
byte-level BPE tokenizer in Qwen2's shape (see ``tiny_model.py``), saved as a normal Hugging Face
folder, so every test goes through the same ``from_pretrained`` path users hit. It is built and
loaded once per test session (``tiny_loaded_once``) and installed as each test's kernel model by
``tiny``, as a fresh ``%qwen_load`` would; a test that changes it does so with ``monkeypatch``.
Its text is noise: assert on mechanics, not words.

Tiers (markers declared in pyproject.toml): ``demo`` (the real demo model), ``kernel`` (a real
ipykernel), ``server`` (a real ``transformers serve``), ``browser`` and ``slow``. A test that
uses the demo model, starts a kernel or a server without its marker fails, so the unit tier
(``make test-fast``) never pays for them by accident.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qwen_magic import testing

from . import helpers
from .helpers import install, load_aside
from .tiny_model import save_tiny_model

# The harness (qwen_magic.testing) announces each kernel and server it starts: check the tier.
testing.start_hooks.append(helpers.require_marker)

# No test may wait on the (unreachable) model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

#: Fixtures that need a tier, by marker: the converted demo model, a ``transformers serve``.
TIER_FIXTURES = {
    "demo": ("demo_path", "demo_loaded_once", "demo"),
    "server": ("served", "own_server"),
}


@pytest.fixture(autouse=True)
def _tiers_are_marked(request: pytest.FixtureRequest):
    """Fail a test that uses a tier's fixture without the tier's marker; let the kernel and
    server harnesses check the running test's markers when they start."""
    for marker, fixtures in TIER_FIXTURES.items():
        used = [name for name in fixtures if name in request.fixturenames]
        if used and request.node.get_closest_marker(marker) is None:
            pytest.fail(f"uses the fixture {used[0]} but is not marked {marker}", pytrace=False)
    helpers.running_test = request.node
    yield
    helpers.running_test = None


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """The converted offline demo model (built on first use, then cached)."""
    from qwen_magic.backends.kernel.demo_model import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2ForCausalLM with a small Qwen2-style tokenizer, as a model folder."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def tiny_loaded_once(tiny_model_path: Path):
    """The tiny model loaded once for the whole session (outside the kernel's session)."""
    return load_aside(str(tiny_model_path), device="cpu")


def tiny_fingerprint(loaded) -> tuple:
    """What a test could change on the shared tiny model and forget to put back."""
    model = loaded.model
    return (
        model.generation_config.to_dict(),
        loaded.tokenizer.chat_template,
        sorted(name for name in vars(model) if not name.startswith("_")),  # patched methods
        model.training,
    )


@pytest.fixture(scope="session")
def tiny_as_loaded(tiny_loaded_once) -> tuple:
    return tiny_fingerprint(tiny_loaded_once)


@pytest.fixture
def fresh_state():
    """Each test starts with a new kernel session (no model, no conversations, no history
    file) and leaves none behind; yields that session."""
    from qwen_magic import _state, session

    helpers.release_session()
    yield session.current()
    helpers.release_session()
    _state.session = None


@pytest.fixture
def tiny(fresh_state, tiny_loaded_once, tiny_as_loaded):
    """The tiny model installed as the kernel's model, with new caches, as if just loaded.
    Shared by the session: a test changes it only with ``monkeypatch`` (checked here)."""
    if tiny_fingerprint(tiny_loaded_once) != tiny_as_loaded:
        pytest.fail("an earlier test changed the shared tiny model without monkeypatch")
    return install(fresh_state, tiny_loaded_once)


@pytest.fixture
def scripted(fresh_state):
    """A :class:`~tests.helpers.ScriptedBackend` as the kernel's backend, every reply "A scripted
    reply.": for what happens around a reply (files, history, the magics' mechanics), where the
    words and the generating are not the subject."""
    return fresh_state.use(helpers.ScriptedBackend(otherwise="A scripted reply."))


@pytest.fixture(scope="session")
def tiny_with_qwen_tokenizer_path(
    tmp_path_factory: pytest.TempPathFactory, demo_path: Path
) -> Path:
    """The tiny model with Qwen's real tokenizer (the demo model's, so the demo tier), for a test
    that depends on how much text a real token holds."""
    folder = tmp_path_factory.mktemp("models") / "tiny-qwen2-qwen-tokenizer"
    return save_tiny_model(folder, tokenizer_from=demo_path)


@pytest.fixture
def tiny_with_qwen_tokenizer(fresh_state, tiny_with_qwen_tokenizer_path: Path):
    """That model loaded as the kernel's model."""
    path = str(tiny_with_qwen_tokenizer_path)
    loaded, _fresh = fresh_state.load_model(path, device="cpu", progress=None)
    return loaded


@pytest.fixture
def own_tiny(fresh_state, tiny_model_path: Path):
    """A tiny model of this test's own, loaded fresh, for a test that changes it for good
    (a compiled decoding step stays with its model)."""
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
