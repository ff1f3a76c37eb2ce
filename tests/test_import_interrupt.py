"""qwen_magic.backends.kernel.heavy_imports: a Ctrl-C during the first %qwen_load's imports leaves
a usable kernel.

The kernel tests interrupt a real ipykernel the way JupyterLab's stop button does
(``interrupt_kernel``: SIGINT to the kernel's process group) while its first ``%qwen_load`` is
still importing torch and transformers (several seconds on two cores), then load and chat again.
The unit tests check the SIGINT holding and the half-import detection in this process.
"""

from __future__ import annotations

import signal
import sys
import threading
import types
from importlib.machinery import ModuleSpec

import pytest

from qwen_magic.backends.kernel import heavy_imports
from qwen_magic.errors import QwenMagicError
from qwen_magic.testing.kernel import kernel

# torch is whole, or was never imported: no submodules left behind by a broken-off import.
TORCH_WHOLE_OR_ABSENT = (
    "('torch' in sys.modules and hasattr(sys.modules['torch'], 'Tensor')) "
    "or not any(name.startswith('torch.') for name in sys.modules)"
)


def interrupt_first_load(k, load: str, delay: float) -> dict:
    """Run ``load`` as the kernel's first %qwen_load and interrupt it ``delay`` s after sending."""
    k.run_ok("%load_ext qwen_magic\nimport sys")
    timer = threading.Timer(delay, k.manager.interrupt_kernel)
    timer.start()
    try:
        return k.run(load, timeout=120)
    finally:
        timer.join()


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.6, 1.0])
@pytest.mark.kernel
def test_interrupting_the_first_load_while_torch_imports_leaves_the_kernel_usable(
    tiny_model_path, delay
):
    """An interrupt early in the first %qwen_load ends that cell; the next load and chat work."""
    load = f"%qwen_load {tiny_model_path} --device cpu --quiet"
    with kernel() as k:
        reply = interrupt_first_load(k, load, delay)
        assert reply["status"] == "ok" or reply["ename"] == "KeyboardInterrupt", reply
        assert k.value(TORCH_WHOLE_OR_ABSENT) is True
        k.run_ok(load)
        k.run_ok("%%qwen -n 2 --greedy\nHello")
        assert (
            k.value("len(__import__('qwen_magic').current_session().conversations.get().turns)")
            == 1
        )


@pytest.mark.kernel
@pytest.mark.demo
def test_interrupting_a_bare_first_load_leaves_the_kernel_usable(demo_path):
    """A bare %qwen_load, which picks its default model with torch, survives an early interrupt."""
    load = "%qwen_load --device cpu --quiet"
    with kernel({"QWEN_MAGIC_MODEL": ""}) as k:  # no GPU here: the default is the demo model
        reply = interrupt_first_load(k, load, 0.3)
        assert reply["status"] == "ok" or reply["ename"] == "KeyboardInterrupt", reply
        assert k.value(TORCH_WHOLE_OR_ABSENT) is True
        k.run_ok(load)
        loaded = "__import__('qwen_magic').current_session().backend.loaded"
        assert k.value(f"{loaded}.spec.model") == "demo"


@pytest.fixture
def python_handles_sigint():
    """SIGINT raises KeyboardInterrupt, as while a cell runs in IPython or ipykernel."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def slow_module(tmp_path, monkeypatch):
    """Stand in for torch: a module that gets a SIGINT half-way through its own import."""
    (tmp_path / "qm_slow_import.py").write_text(
        "import signal\nhalf_way = True\nsignal.raise_signal(signal.SIGINT)\nfinished = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(heavy_imports, "HEAVY_MODULES", ("qm_slow_import",))
    yield
    sys.modules.pop("qm_slow_import", None)


def test_a_ctrl_c_during_the_imports_is_held_until_they_finish(python_handles_sigint, slow_module):
    """A SIGINT during the imports becomes a KeyboardInterrupt only once they have finished."""
    with pytest.raises(KeyboardInterrupt, match="finished importing"):
        heavy_imports.import_heavy_modules()
    assert sys.modules["qm_slow_import"].finished is True
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_sigint_goes_to_ipykernels_own_handler_afterwards(slow_module):
    """Under ipykernel's handler (async cells), the held SIGINT reaches it after the imports."""
    calls: list[tuple[int, bool]] = []

    def handle_sigint(signum: int, frame: object) -> None:
        calls.append((signum, getattr(sys.modules.get("qm_slow_import"), "finished", False)))

    handle_sigint.__module__ = "ipykernel.ipkernel"
    previous = signal.signal(signal.SIGINT, handle_sigint)
    try:
        heavy_imports.import_heavy_modules()
        assert signal.getsignal(signal.SIGINT) is handle_sigint
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls == [(signal.SIGINT, True)]


def test_a_sigint_handler_of_the_users_own_is_left_alone(slow_module):
    """Under a handler that is not Python's or IPython's, the signal reaches it at once."""
    seen: list[int] = []
    handler = lambda signum, frame: seen.append(signum)  # noqa: E731
    previous = signal.signal(signal.SIGINT, handler)
    try:
        heavy_imports.import_heavy_modules()
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.SIGINT]
    assert sys.modules["qm_slow_import"].finished is True


def test_imports_already_done_return_at_once_without_touching_signals(monkeypatch):
    """When torch and transformers are imported already, no handler is installed at all."""
    heavy_imports.import_heavy_modules()

    def refuse(*args: object) -> None:
        raise AssertionError("signal.signal called on the fast path")

    monkeypatch.setattr(signal, "signal", refuse)
    heavy_imports.import_heavy_modules()


def test_a_half_imported_torch_gets_a_one_line_restart_message(monkeypatch, fresh_state):
    """A torch left initialising in sys.modules makes %qwen_load say, in one line, to restart."""
    spec = ModuleSpec("torch", None)
    spec._initializing = True
    half = types.ModuleType("torch")
    half.__spec__ = spec
    monkeypatch.setitem(sys.modules, "torch", half)
    with pytest.raises(QwenMagicError) as info:
        fresh_state.load_model("demo", progress=None)
    message = str(info.value)
    assert "\n" not in message
    assert "torch" in message and "interrupted" in message
    assert "restart the kernel (Kernel → Restart) and run %qwen_load again" in message


def test_submodules_left_without_their_package_count_as_half_imported(monkeypatch):
    """Submodules in sys.modules whose package is missing mean the package's import broke off."""
    monkeypatch.setattr(heavy_imports, "WATCHED_PACKAGES", ("qm_fake", "torch"))
    assert heavy_imports.half_imported() is None
    monkeypatch.setitem(sys.modules, "qm_fake._C", types.ModuleType("qm_fake._C"))
    assert heavy_imports.half_imported() == "qm_fake"
    with pytest.raises(QwenMagicError, match="import of qm_fake was interrupted"):
        heavy_imports.check_not_half_imported()
