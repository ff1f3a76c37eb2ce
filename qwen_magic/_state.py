"""The one value that must outlive ``%reload_ext qwen_magic``: the kernel's session.

``%reload_ext`` re-imports ``qwen_magic.notebook.magics`` and friends, but not this module's value: it
lives here, in a module nothing reloads, so a loaded model (gigabytes of GPU memory) and the
notebook's conversations survive a reload of the extension's code. Only
:func:`qwen_magic.session.current` reads or writes it.
"""

from __future__ import annotations

from typing import Any

#: The kernel's ``qwen_magic.session.Session``, made on first use.
session: Any = None
