"""qwen_magic: chat with a local Qwen model from a Jupyter notebook.

In a notebook::

    %load_ext qwen_magic
    %qwen_load                 # Qwen/Qwen2-7B-Instruct on a GPU; the offline demo model without

    %%qwen
    Explain Python's GIL in two sentences.

The reply streams into the cell as the model writes it, and the next ``%%qwen`` cell is a
follow-up in the same conversation. ``%qwen_load?`` and ``%%qwen?`` list every option;
``%qwen_history``, ``%qwen_reset``, ``%qwen_pop`` and ``%qwen_system`` manage the conversation.

From plain Python::

    import qwen_magic
    model = qwen_magic.load("demo")          # a LoadedModel: .model, .tokenizer, .summary()
    chat = qwen_magic.Chat()
    print(chat.ask("Hello!", view="text").assistant)

The model is loaded once per kernel and survives ``%reload_ext qwen_magic``. Importing this
package is instant: torch and transformers are imported at the first load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "Chat",
    "Conversation",
    "GenerationOptions",
    "LoadedModel",
    "load",
    "load_ipython_extension",
]

if TYPE_CHECKING:
    from .chat import Chat
    from .conversation import Conversation
    from .generation import GenerationOptions
    from .loading import LoadedModel, load


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics (``%load_ext qwen_magic``)."""
    from .magics import QwenMagics

    ipython.register_magics(QwenMagics)


def __getattr__(name: str) -> Any:
    # Lazy exports keep `import qwen_magic` and `%load_ext` free of torch/transformers imports.
    if name == "load":
        from .loading import load

        return load
    if name == "LoadedModel":
        from .loading import LoadedModel

        return LoadedModel
    if name == "Chat":
        from .chat import Chat

        return Chat
    if name == "Conversation":
        from .conversation import Conversation

        return Conversation
    if name == "GenerationOptions":
        from .generation import GenerationOptions

        return GenerationOptions
    raise AttributeError(f"module 'qwen_magic' has no attribute {name!r}")
