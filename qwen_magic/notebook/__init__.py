"""The IPython front end: ``%load_ext qwen_magic`` and everything a user sees.

* :mod:`~qwen_magic.notebook.magics` — :class:`~qwen_magic.notebook.magics.QwenMagics`, thin
  magics that parse (:mod:`~qwen_magic.notebook.arguments`), take defaults from config traits
  (:mod:`~qwen_magic.notebook.settings`), call the kernel's session and report;
* :mod:`~qwen_magic.notebook.views` — where a reply streams (a widget with a Stop button, plain
  text), and :mod:`~qwen_magic.notebook.comm_pump`, which lets that button be clicked while the
  cell runs;
* :mod:`~qwen_magic.notebook.report` — every line about a reply: footers, notices, history tables;
* :mod:`~qwen_magic.notebook.last_error`, :mod:`~qwen_magic.notebook.interpolation`,
  :mod:`~qwen_magic.notebook.code_cells` — the notebook assistant: the last error, cells and
  values in a message, code from a reply into a new cell.

This layer holds no tensors and no history: those live in the session and the backends below.
"""

from __future__ import annotations

from typing import Any


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext qwen_magic``: register the magics and the hook that keeps the last error."""
    from qwen_magic.notebook.last_error import ErrorWatcher
    from qwen_magic.notebook.magics import QwenMagics

    ipython.register_magics(QwenMagics)
    ErrorWatcher.install(ipython)  # for %qwen_error


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext qwen_magic``: remove the hook (the session, its model and its
    conversations stay, so ``%load_ext`` again chats on)."""
    from qwen_magic.notebook.last_error import ErrorWatcher

    ErrorWatcher.uninstall(ipython)
