"""The one value that must outlive ``%reload_ext qwen_magic``: the kernel's session.

``%reload_ext qwen_magic`` calls ``unload_ipython_extension``, reloads the package module
(``importlib.reload(qwen_magic)``: its submodules are not re-imported) and calls
``load_ipython_extension`` again, which registers a fresh ``QwenMagics``. The session is not an
attribute of the package module but lives here, in a module no reload touches, so a loaded model
(gigabytes of GPU memory) and the notebook's conversations survive the reload. Only
:func:`qwen_magic.session.current` reads or writes it.
"""

from __future__ import annotations

from typing import Any

#: The kernel's ``qwen_magic.session.Session``, made on first use.
session: Any = None
