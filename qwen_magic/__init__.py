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

from .backend import Backend, Reply, ReplyStats
from .chat import Chat
from .conversation import Conversation, ConversationBook, Turn
from .errors import QwenMagicError
from .loading import LoadedModel
from .options import GenerationOptions
from .session import Session
from .session import current as current_session

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it from here
__all__ = [
    "Backend",
    "Chat",
    "Conversation",
    "ConversationBook",
    "GenerationOptions",
    "LoadedModel",
    "QwenMagicError",
    "Reply",
    "ReplyStats",
    "Session",
    "Turn",
    "current_session",
    "load",
    "load_ipython_extension",
]


def load(model: str | None = None, **how: Any) -> LoadedModel:
    """Load ``model`` into this kernel once (``%qwen_load``'s Python face) and return it.

    ``how``: ``dtype``, ``device``, ``attention``, ``revision``, ``trust_remote_code``,
    ``quantize`` ("none", "int8" or "int4": weight-only, see :mod:`qwen_magic.quantize`),
    ``progress`` (a function taking each progress line, or None for silence).
    """
    loaded, _fresh = current_session().load_model(model, **how)
    return loaded


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics (``%load_ext qwen_magic``)."""
    from .magics import QwenMagics

    ipython.register_magics(QwenMagics)
