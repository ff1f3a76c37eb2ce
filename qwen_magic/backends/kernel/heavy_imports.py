"""Import torch and transformers once per kernel, safely against Ctrl-C.

The first ``%qwen_load`` in a kernel spends several seconds importing torch, transformers and
the parts of transformers that loading uses (``modeling_utils`` alone pulls in accelerate,
``torch._dynamo`` and sympy: over a thousand modules). A kernel interrupt (the toolbar's stop
button, Ctrl-C: ipykernel gets it as SIGINT, which Python turns into ``KeyboardInterrupt``) that
lands in the middle of that leaves the kernel broken for good. Python drops only the module
whose code was interrupted from ``sys.modules``; the submodules it had finished stay, and so
does state kept in C (torch's docstrings on its C functions, its operator registrations). The
next import runs ``torch/__init__.py`` again on top of them and fails with ``partially
initialized module 'torch'``, ``function 'abs' already has a docstring``, ``duplicate
registrations for aten...``, or a ``SystemError``. Only a new process recovers.

This module does two things about it:

* :func:`import_heavy_modules` performs those imports with SIGINT *held*: on the main thread,
  where the handler in place is Python's own (``signal.default_int_handler``, which IPython
  and ipykernel install while a cell runs) or one of IPython's/ipykernel's, it installs a
  handler that only records the signal, imports, restores the previous handler, and then
  delivers the interrupt (``KeyboardInterrupt``). The user's Ctrl-C still stops the cell, a
  few seconds later, with the kernel whole. Elsewhere (another thread, a handler of the
  user's own) it imports without touching signals. When everything is imported already it
  returns at once and does nothing.
* :func:`half_imported` and :func:`check_not_half_imported` recognise a kernel where such an
  import was broken off anyway (by an interrupt of the user's own ``import torch`` cell, say):
  a package in ``sys.modules`` still marked as initialising, a package missing from
  ``sys.modules`` while its submodules are there, or torch without ``torch.Tensor``. The
  check raises a one-line :class:`~qwen_magic.errors.QwenMagicError` that says to restart the
  kernel, instead of the baffling error the import would give.

``Session.load_model`` calls :func:`import_heavy_modules` before anything else, and so does
``%qwen_load`` (a bare one asks torch about CUDA to pick its default model before it loads).
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from types import FrameType, ModuleType
from typing import Any

from qwen_magic.errors import QwenMagicError

#: What loading and generation import, in order; the first load brings them all in.
HEAVY_MODULES = (
    "torch",
    "transformers",
    "transformers.models.auto.configuration_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.auto.modeling_auto",
    "transformers.modeling_utils",
    "transformers.generation.utils",
    "transformers.generation.streamers",
)

#: Packages whose half-finished import makes the kernel unable to load a model.
WATCHED_PACKAGES = ("torch", "transformers", "accelerate")

#: Attributes a whole package has; missing, the package's ``__init__`` stopped part-way.
_CORE_ATTRIBUTES = {"torch": "Tensor", "transformers": "__version__"}

_SIGNAL_OWNERS = ("IPython", "ipykernel")


def import_heavy_modules() -> None:
    """Import :data:`HEAVY_MODULES`, holding a Ctrl-C until they are done, then delivering it.

    Raises :class:`QwenMagicError` if an earlier import was broken off and left this kernel
    unable to import them (see :func:`check_not_half_imported`).
    """
    check_not_half_imported()
    if all(name in sys.modules for name in HEAVY_MODULES):
        return
    previous = signal.getsignal(signal.SIGINT)
    if not _may_hold(previous):
        _import_all()
        return
    held: list[FrameType | None] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(frame)

    signal.signal(signal.SIGINT, hold)
    try:
        _import_all()
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        _deliver(previous, held[0])


def half_imported() -> str | None:
    """The first of :data:`WATCHED_PACKAGES` left half-imported in this process, else None."""
    modules = dict(sys.modules)  # a snapshot: other threads may import meanwhile
    for package in WATCHED_PACKAGES:
        prefix = package + "."
        own = [m for name, m in modules.items() if name == package or name.startswith(prefix)]
        if not own:
            continue
        top = modules.get(package)
        if top is None or not _complete(package, top):
            return package
        if any(_initializing(module) for module in own):
            return package
    return None


def check_not_half_imported() -> None:
    """Raise a one-line :class:`QwenMagicError` if torch or transformers is half-imported."""
    if (package := half_imported()) is not None:
        raise QwenMagicError(
            f"This kernel's import of {package} was interrupted part-way and cannot be "
            "repeated; restart the kernel (Kernel → Restart) and run %qwen_load again."
        )


def _import_all() -> None:
    from qwen_magic.backends.kernel.quantize.formats import quiet_torchao_import

    with quiet_torchao_import():  # transformers imports torchao, where installed, on the way
        for name in HEAVY_MODULES:
            importlib.import_module(name)


def _may_hold(handler: Any) -> bool:
    """True where holding SIGINT is ours to do: the main thread, under Python's or IPython's."""
    if threading.current_thread() is not threading.main_thread():
        return False  # signal.signal works only on the main thread
    if handler is signal.default_int_handler:
        return True
    # SIG_IGN/SIG_DFL/None are left alone, and so is a handler of the user's own.
    module = getattr(handler, "__module__", None) or ""
    return callable(handler) and module.split(".")[0] in _SIGNAL_OWNERS


def _deliver(handler: Any, frame: FrameType | None) -> None:
    """Hand the held SIGINT to the handler it was meant for."""
    if handler is signal.default_int_handler:
        raise KeyboardInterrupt(
            "held until torch and transformers had finished importing: "
            "a broken-off import would have left the kernel unable to load"
        )
    handler(signal.SIGINT, frame)


def _complete(package: str, module: ModuleType) -> bool:
    attribute = _CORE_ATTRIBUTES.get(package)
    return not _initializing(module) and (attribute is None or hasattr(module, attribute))


def _initializing(module: object) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))
