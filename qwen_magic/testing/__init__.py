"""The harness that qwen_magic's tests and benchmarks share, shipped like jupysql's ``_testing``:

* :mod:`~qwen_magic.testing.kernel` — a real ipykernel to run cells in (interrupts, widgets);
* :mod:`~qwen_magic.testing.serving` — a real ``transformers serve`` on a loopback port;
* :mod:`~qwen_magic.testing.models` — loading a model once for many tests, and transformers'
  compile-everywhere switch.

For the scripted backend, see :mod:`qwen_magic.backends.scripted`. The product never imports
this package; its imports of ``jupyter_client`` and the like happen only when used (they come
with ``qwen_magic[test]``).
"""
