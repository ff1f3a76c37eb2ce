"""Where qwen_magic keeps what it builds once: converted models, quantized weights."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where qwen_magic keeps converted models."""
    if explicit := os.environ.get("QWEN_MAGIC_CACHE"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "qwen_magic"
