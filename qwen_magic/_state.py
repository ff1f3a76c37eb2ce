"""Kernel-wide state that must outlive ``%reload_ext qwen_magic``.

``%reload_ext`` re-imports ``qwen_magic.magics`` and friends, but not this module's *values*:
they live here, in a module nothing reloads, so a loaded model (gigabytes of GPU memory) and the
notebook's conversations survive a reload of the extension's code.
"""

from __future__ import annotations

from typing import Any

#: The one loaded model of this kernel (a ``qwen_magic.loading.LoadedModel``), or None.
loaded_model: Any = None

#: The notebook's conversations (a ``qwen_magic.conversation.ConversationBook``), made lazily.
conversations: Any = None

#: Where the conversations are saved after each turn (``persistence.HistoryStore``), or None.
history_store: Any = None
