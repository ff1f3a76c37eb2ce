"""qwen_magic: chat with a local Qwen model from a Jupyter notebook.

In a notebook::

    %load_ext qwen_magic
    %qwen_load                 # Qwen/Qwen2-7B-Instruct on a GPU; the offline demo model without

    %%qwen
    Explain Python's GIL in two sentences.

The reply streams into the cell as the model writes it, and the next ``%%qwen`` cell is a
follow-up in the same conversation. ``%qwen_load?`` and ``%%qwen?`` list every option;
``%qwen_history``, ``%qwen_reset``, ``%qwen_pop`` and ``%qwen_system`` manage the conversation.
``%qwen_error`` sends the last failed cell and its traceback; ``%%qwen -i`` takes ``${In[3]}``,
``${Out[3]}`` and ``${df.columns}``; ``--code`` puts the reply's code into a new cell below.

From plain Python::

    import qwen_magic
    model = qwen_magic.load("demo")          # a LoadedModel: .model, .tokenizer, .summary()
    chat = qwen_magic.Chat()
    print(chat.ask("Hello!", view="text").assistant)

The model is loaded once per kernel and survives ``%reload_ext qwen_magic``. Importing this
package is instant: torch and transformers are imported at the first load (a test keeps it so).
"""

from __future__ import annotations

from typing import Any

from qwen_magic import notebook
from qwen_magic.backends.base import Backend, Message, Reply, ReplyStats
from qwen_magic.backends.kernel.loading import LoadedModel
from qwen_magic.chat import Chat
from qwen_magic.conversation import Conversation, ConversationBook, Turn
from qwen_magic.errors import QwenMagicError
from qwen_magic.notebook import report
from qwen_magic.options import GenerationOptions
from qwen_magic.presentation import set_default_presentation
from qwen_magic.session import Session
from qwen_magic.session import current as current_session

# The composition root: a Chat made from plain Python shows its replies as the notebook does.
set_default_presentation(report.NOTEBOOK)

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it from here
__all__ = [
    "Backend",
    "Chat",
    "Conversation",
    "ConversationBook",
    "GenerationOptions",
    "LoadedModel",
    "Message",
    "QwenMagicError",
    "Reply",
    "ReplyStats",
    "Session",
    "Turn",
    "current_session",
    "load",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def load(model: str | None = None, **how: Any) -> LoadedModel:
    """Load ``model`` into this kernel once (``%qwen_load``'s Python face) and return it.

    ``how``: ``dtype``, ``device``, ``attention``, ``revision``, ``trust_remote_code``,
    ``quantize`` ("none", "int8" or "int4": weight-only, see
    :mod:`qwen_magic.backends.kernel.quantize.formats`),
    ``progress`` (a function taking each progress line, or None for silence).
    """
    loaded, _fresh = current_session().load_model(model, **how)
    return loaded


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext qwen_magic``: the magics and the last-error hook (see qwen_magic.notebook)."""
    notebook.load_ipython_extension(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext qwen_magic`` (``%reload_ext`` calls it first): remove the hook."""
    notebook.unload_ipython_extension(ipython)
