"""Quantized weights kept on disk, so a model is quantized once: :func:`load_quantized`.

**Quantize once.** Quantizing the demo model takes about 20 s on two cores, so on the CPU the
quantized weights are kept in ``<cache>/quantized/NAME-FORMAT-KEY/`` (see
:func:`qwen_magic.storage.cache_dir.cache_root`). KEY hashes what the weights depend on: the source
files (names, sizes, modification times), the format, the dtype, and the torch, torchao and
transformers versions and the CPU's instruction set (int4's packing depends on it). The folder
is written in a scratch folder and moved into place with one ``os.replace``, under a file lock;
its manifest, written last, records the weights file's size and sha256, checked at every load.
A cache that fails the check or does not load is quantized again. A later load builds the
model's skeleton without memory (the ``meta`` device) and assigns the saved tensors to it,
memory-mapped, so it takes about as long as a bfloat16 load.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from qwen_magic.backends.kernel.quantize.formats import (
    INT4_GROUP_SIZE,
    Progress,
    import_torchao,
    quiet_torchao_import,
    torchao_config,
)

#: Bumped whenever the cache's layout or meaning changes; old caches are then rebuilt.
CACHE_FORMAT = 1


WEIGHTS_FILE = "weights.pt"


QUANTIZED_MANIFEST = "qwen_magic-quantized.json"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _source_files(path: str, gguf_file: str | None, revision: str | None) -> list[Path] | None:
    """The files the weights come from; None when they cannot be found on disk (a hub id that
    was never downloaded)."""
    folder = Path(path)
    if gguf_file:
        return [folder / gguf_file]
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            config = try_to_load_from_cache(path, "config.json", revision=revision)
        except Exception:  # an id huggingface_hub refuses; the load itself will say why
            return None
        if not isinstance(config, str):
            return None
        folder = Path(config).parent  # snapshots/<commit>/: the commit is in the path
    files = [
        p
        for p in sorted(folder.iterdir())
        if p.suffix in (".safetensors", ".bin", ".json", ".gguf") and p.is_file()
    ]
    return files or None


def cache_key(
    path: str, gguf_file: str | None, revision: str | None, fmt: str, dtype: Any
) -> dict[str, Any] | None:
    """What the quantized weights depend on, or None when the source cannot be identified."""
    import torch

    files = _source_files(path, gguf_file, revision)
    if files is None:
        return None
    return {
        "cache_format": CACHE_FORMAT,
        "format": fmt,
        "int4_group_size": INT4_GROUP_SIZE if fmt == "int4" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "source": {str(p.resolve()): [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
        "torch": torch.__version__,
        "torchao": _version("torchao"),
        "transformers": _version("transformers"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def cache_folder(name: str, fmt: str, key: dict[str, Any]) -> Path:
    """Where the weights quantized with ``key`` live (they may not be there yet)."""
    from qwen_magic.storage.cache_dir import cache_root

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:60] or "model"
    return cache_root() / "quantized" / f"{slug}-{fmt}-{digest}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_is_valid(folder: Path, key: dict[str, Any]) -> bool:
    """True when ``folder`` holds finished weights for ``key``: the manifest names the same key,
    and the weights file has the size and sha256 it records."""
    try:
        manifest = json.loads((folder / QUANTIZED_MANIFEST).read_text())
        weights = folder / WEIGHTS_FILE
        return (
            manifest.get("key") == json.loads(json.dumps(key))
            and weights.stat().st_size == manifest["size"]
            and _sha256(weights) == manifest["sha256"]
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def save_quantized(model: Any, folder: Path, key: dict[str, Any]) -> None:
    """Write ``model``'s quantized weights to ``folder``, atomically (scratch folder, manifest
    last, one ``os.replace``). Earlier caches of the same model and format are removed."""
    import torch

    from qwen_magic.storage.atomic import move_into_place, write_atomic

    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
    try:
        weights = work / WEIGHTS_FILE
        buffers = {
            f"{prefix}.{name}" if prefix else name: tensor
            for prefix, module in model.named_modules()
            for name, tensor in module._buffers.items()
            if tensor is not None and name in module._non_persistent_buffers_set
        }
        torch.save({"state": model.state_dict(), "buffers": buffers}, weights)
        model.generation_config.save_pretrained(work)
        manifest = {"key": key, "size": weights.stat().st_size, "sha256": _sha256(weights)}
        write_atomic(work / QUANTIZED_MANIFEST, json.dumps(manifest, indent=2))
        move_into_place(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    prefix = folder.name.rsplit("-", 1)[0] + "-"
    for other in folder.parent.glob(prefix + "*"):  # older versions' caches of this model
        if other != folder and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def load_saved(
    folder: Path, config: Any, dtype: Any, attention: str, trust_remote_code: bool
) -> Any:
    """A model with ``config``'s architecture holding the weights saved in ``folder``: the
    skeleton is built on the meta device (no memory), then the saved tensors are assigned to it,
    memory-mapped. Raises ``ValueError`` when the file does not fit the skeleton."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from qwen_magic.backends.kernel.quantize.int8_linear import packed_skeleton

    import_torchao()
    saved = torch.load(folder / WEIGHTS_FILE, mmap=True, weights_only=True, map_location="cpu")
    state, buffers = saved["state"], saved["buffers"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attention, trust_remote_code=trust_remote_code
        )
    # Layers saved as int8 with their per-row scales become int8-kernel layers again.
    int8_layers = {
        key.removesuffix(".weight")
        for key, tensor in state.items()
        if key.endswith(".weight") and tensor.dtype == torch.int8
    }
    packed_skeleton(model, int8_layers, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    for full_name, tensor in buffers.items():
        owner, _, name = full_name.rpartition(".")
        model.get_submodule(owner)._buffers[name] = tensor
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise ValueError(f"the saved weights lack {', '.join(leftovers[:3])}")
    model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def load_quantized(
    *,
    path: str,
    gguf_file: str | None,
    name: str,
    fmt: str,
    dtype: Any,
    device_map: Any,
    on_cuda: bool,
    attention: str,
    common: dict[str, Any],
    say: Progress,
) -> tuple[Any, list[str]]:
    """Load the model at ``path`` with its weights quantized to ``fmt``: from the cache when it
    holds them, else quantized now (and, on the CPU, cached). Returns the model and notes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, **common)
    if dtype == "auto":  # the quantized layers' activations: the checkpoint's own dtype
        dtype = _checkpoint_dtype(config)
    key = None if on_cuda else cache_key(path, gguf_file, common.get("revision"), fmt, dtype)
    folder = cache_folder(name, fmt, key) if key is not None else None
    notes: list[str] = []
    if folder is not None and key is not None and cache_is_valid(folder, key):
        try:
            model = load_saved(folder, config, dtype, attention, common["trust_remote_code"])
            return model, [f"{fmt} weights from the cache, quantized at an earlier load"]
        except Exception as error:  # a file the checks passed but torch cannot use
            notes.append(f"the quantized cache could not be used ({error}); quantized again")
    started = time.perf_counter()
    say(f"Quantizing {name} to {fmt} (once{'' if folder else ' per load'})…")
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    with quiet_torchao_import():
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            device_map=device_map,
            attn_implementation=attention,
            quantization_config=torchao_config(fmt, on_cuda, tied),
            **common,
        )
    if fmt == "int8" and not on_cuda:
        from qwen_magic.backends.kernel.quantize.int8_linear import use_cpu_int8_kernel

        use_cpu_int8_kernel(model)
    model.eval()
    seconds = time.perf_counter() - started
    if folder is None or key is None:
        why = "on CUDA" if on_cuda else "for a source not on disk"
        notes.append(f"quantized to {fmt} in {seconds:.0f} s (no cache {why})")
        return model, notes
    from filelock import FileLock

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder.parent / f".{folder.name}.lock")):
            if not cache_is_valid(folder, key):  # another kernel may have written it meanwhile
                save_quantized(model, folder, key)
    except OSError as error:  # a full disk or a read-only cache: the model is loaded anyway
        notes.append(
            f"quantized to {fmt} in {seconds:.0f} s, but could not keep it in {folder.parent} "
            f"({error.strerror or error}); the next load quantizes again"
        )
        return model, notes
    notes.append(f"quantized to {fmt} in {seconds:.0f} s; kept in {folder} for the next load")
    return model, notes


def _checkpoint_dtype(config: Any) -> Any:
    import torch

    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.bfloat16
