"""What the benchmarks share: the machine's facts, a timer, and BENCHMARKS.md's sections.

``benchmarks/run.py`` (``make bench``, the CPU) and ``benchmarks/gpu.py`` (``make bench-gpu``)
each own sections of ``BENCHMARKS.md``: a run rewrites its own and keeps the others as they are,
since no single machine can measure them all. Nothing here needs IPython (GPU images lack it).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "BENCHMARKS.md"


def say(message: str) -> None:
    """A progress line, shown at once."""
    print(message, flush=True)


def timed(run: Callable[[], Any]) -> tuple[Any, float]:
    """``run()``'s result and the seconds it took."""
    started = time.perf_counter()
    result = run()
    return result, time.perf_counter() - started


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(device: str = "cpu") -> dict[str, str]:
    """The facts a reader needs to compare numbers: hardware and library versions."""
    import torch
    import transformers

    facts: dict[str, str] = {}
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        facts.update(
            GPU=torch.cuda.get_device_name(0),
            **{"GPU memory": f"{properties.total_memory / 2**30:.0f} GiB"},
            CUDA=str(torch.version.cuda),
        )
    else:
        try:
            import psutil

            memory = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
        except ImportError:
            memory = "unknown"
        facts.update(
            CPU=f"{cpu_name()}, {os.cpu_count()} cores",
            memory=memory,
            GPU=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        )
    facts.update(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        **{"torch threads": str(torch.get_num_threads())},
        **{"flash-attn": package_version("flash-attn") or "not installed"},
    )
    return facts


def _section_pattern(heading: str) -> re.Pattern[str]:
    return re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)


def read_section(text: str, heading: str) -> str | None:
    """The ``## heading`` section of ``text`` (up to the next ``## `` heading), if any."""
    match = _section_pattern(heading).search(text)
    return match.group(0) if match else None


def replace_section(text: str, heading: str, section: str) -> str:
    """``text`` with its ``## heading`` section replaced by ``section`` (appended if missing)."""
    pattern = _section_pattern(heading)
    section = section.rstrip("\n") + "\n"
    match = pattern.search(text)
    if match is None:
        return text.rstrip("\n") + "\n\n" + section
    following = match.end() < len(text)
    return text[: match.start()] + section + ("\n" if following else "") + text[match.end() :]
