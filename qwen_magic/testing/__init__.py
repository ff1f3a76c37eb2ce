"""The harness that qwen_magic's tests and benchmarks share, shipped like jupysql's ``_testing``:

* :mod:`~qwen_magic.testing.kernel` — a real ipykernel to run cells in (interrupts, widgets);
* :mod:`~qwen_magic.testing.serving` — a real ``transformers serve`` on a loopback port;
* :mod:`~qwen_magic.testing.models` — loading a model once for many tests, and transformers'
  compile-everywhere switch.

For the scripted backend, see :mod:`qwen_magic.backends.scripted`. The product never imports
this package; its imports of ``jupyter_client`` and the like happen only when used (they come
with ``qwen_magic[test]``).
"""

from __future__ import annotations

from collections.abc import Callable

#: Called with ``(tier, what)`` before the harness starts a kernel ("kernel") or a server
#: ("server"); a test suite registers its checks here (qwen_magic's own fails a test that starts
#: one without that tier's marker). Empty outside tests: the benchmarks start them freely.
start_hooks: list[Callable[[str, str], None]] = []


def announce(tier: str, what: str) -> None:
    """Tell the registered hooks that ``what`` of ``tier`` is about to start."""
    for hook in start_hooks:
        hook(tier, what)
