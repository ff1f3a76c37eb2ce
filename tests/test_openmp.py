"""One OpenMP thread team at a time: the kernel's thread lets its team go before a reply."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
    reason="libgomp's helper threads: Linux, two CPUs or more",
)


def thread_ids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def this_threads_team() -> set[str]:
    """Run a parallel region on this thread (its team is made); return the helpers it made."""
    import torch

    from qwen_magic.backends.kernel.openmp import _libgomp, release_thread_team

    if torch.get_num_threads() < 2 or _libgomp() is None:
        pytest.skip("torch runs on one thread here, or not on libgomp")
    release_thread_team()
    before = thread_ids()
    block = torch.ones(4096, 4096)
    (block * 2).sum()
    helpers = thread_ids() - before
    assert helpers, "a parallel region on two CPUs starts a helper thread"
    return helpers


def gone(helpers: set[str], seconds: float = 2.0) -> bool:
    """Whether the helper threads have all exited (they leave as they wake)."""
    deadline = time.monotonic() + seconds
    while helpers & thread_ids() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not helpers & thread_ids()


def test_release_thread_team_lets_this_threads_helpers_go():
    from qwen_magic.backends.kernel.openmp import release_thread_team

    helpers = this_threads_team()
    assert not gone(helpers, seconds=0.2), "a team outlives its parallel region"
    release_thread_team()
    assert gone(helpers)


def test_a_reply_leaves_no_second_team_behind(tiny_model_path: Path):
    """The team this thread made (as loading a model does) is gone once a reply has run on
    the worker: no two teams make each other wait (openmp.py)."""
    from qwen_magic.backends.kernel import loading
    from qwen_magic.backends.kernel.backend import KernelBackend
    from qwen_magic.options import GenerationOptions

    loaded = loading.load_model(
        loading.model_spec(str(tiny_model_path), device="cpu"), progress=None
    )
    helpers = this_threads_team()
    reply = KernelBackend(loaded).start(
        [{"role": "user", "content": "Hello"}], GenerationOptions(max_new_tokens=4)
    )
    assert reply.run()
    assert gone(helpers)
