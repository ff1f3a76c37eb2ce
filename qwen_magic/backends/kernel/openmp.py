"""Keep one OpenMP thread team alive at a time, so a CPU decodes at full speed.

PyTorch's CPU kernels run on OpenMP: GNU ``libgomp`` in the Linux wheels. libgomp keeps a team
of helper threads for every thread that has run a parallel region, and once it manages more
threads than the process has CPUs it stops spinning while it waits between regions ("throttled"
waiting) and sleeps instead. Decoding one token runs hundreds of small parallel regions, so the
wake-ups add up: on the 2-core demo machine, a reply generated on a worker thread while the
kernel's main thread still held the team it made while loading the model decoded at 36 tokens/s
with int4 weights instead of 54, and bf16 at 17 instead of 19 (the seed recipe's
``generate``-on-a-thread has the same loss).

:func:`release_thread_team` frees the calling thread's team (OpenMP's
``omp_pause_resource_all``); a new one is made, in microseconds, the next time that thread runs
parallel work. :mod:`qwen_magic.backends.kernel.reply` calls it on the kernel's thread before a
reply starts
on the worker, and on the worker when the reply is done, so the user's own code after the reply
runs at full speed too.

Elsewhere (macOS, Windows, LLVM's or Intel's OpenMP, torch not imported yet) it does nothing:
the throttling above is libgomp's.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Any

#: ``omp_pause_soft``: free the threads, keep the runtime.
_OMP_PAUSE_SOFT = 1

_lock = threading.Lock()
_library: Any = None
_looked = False


def _libgomp() -> Any:
    """The libgomp this process runs (torch's own copy), or None where there is none."""
    global _library, _looked
    with _lock:
        if _looked or "torch" not in sys.modules:  # torch brings libgomp; look once it has
            return _library
        _looked = True
        if not sys.platform.startswith("linux"):
            return None
        try:
            with open("/proc/self/maps") as maps:
                paths = {
                    line.split()[-1]
                    for line in maps
                    if "libgomp" in line.rsplit("/", 1)[-1] and "/" in line
                }
        except OSError:
            return None
        for path in sorted(paths):
            try:
                library = ctypes.CDLL(path)
                pause = library.omp_pause_resource_all
            except (OSError, AttributeError):
                continue
            pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
            _library = library
            break
        return _library


def release_thread_team() -> None:
    """Free the calling thread's OpenMP helper threads, if it has any; otherwise do nothing."""
    library = _libgomp()
    if library is not None:
        library.omp_pause_resource_all(_OMP_PAUSE_SOFT)
