"""Where a model goes and whether it fits: devices, device maps, attention kernels, memory."""

from __future__ import annotations

import gc
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_magic.errors import QwenMagicError

if TYPE_CHECKING:
    from qwen_magic.backends.kernel.loading import ModelSpec

DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def free_memory() -> None:
    """Collect unreachable tensors and hand CUDA's cached blocks back to the device."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_map_for(device: str) -> Any:
    """Map the ``--device`` option to ``from_pretrained``'s ``device_map``."""
    text = device.strip()
    if text == "auto":
        return "auto" if cuda_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "cuda" or text.startswith("cuda:") or text.isdigit():
        if not cuda_available():
            raise QwenMagicError(
                f"--device {text} asks for a GPU, but torch sees no CUDA device here; "
                "use --device cpu (or install a CUDA build of torch on a GPU machine)."
            )
        return text if not text.isdigit() else int(text)
    if text in DEVICE_MAP_NAMES[1:]:
        return text
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise QwenMagicError(
                f"--device {text} is not valid JSON for a device_map ({error.msg})."
            ) from error
    raise QwenMagicError(
        f"Unknown device {text!r}; use auto, cpu, cuda, cuda:N, balanced, sequential, "
        "or a JSON device_map such as '{\"\": 0}'."
    )


def choose_attention(requested: str, on_cuda: bool, notices: list[str]) -> str:
    """Pick the attention implementation; flash attention falls back to sdpa when unusable."""
    flash_ready = on_cuda and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if flash_ready else "sdpa"
    if requested == "flash_attention_2" and not flash_ready:
        why = "no CUDA device" if not on_cuda else "the flash-attn package is not installed"
        notices.append(f"flash_attention_2 is unavailable ({why}); using sdpa instead.")
        return "sdpa"
    return requested


def estimated_weight_bytes(path: str, gguf_file: str | None, spec: ModelSpec) -> int | None:
    """Bytes the weights will take after loading, from the files on disk; None if unknown."""
    folder = Path(path)
    if gguf_file or not folder.is_dir():
        return None
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if not stored:
        return None
    if spec.dtype == "float32":
        dtype = stored_dtype(folder)
        return stored * 2 if dtype in ("bfloat16", "float16") else stored
    return stored


def stored_dtype(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def check_memory(
    path: str, gguf_file: str | None, spec: ModelSpec, on_cuda: bool, freed_bytes: int
) -> None:
    """Refuse up front a local model that cannot fit, so the current model stays loaded."""
    needed = estimated_weight_bytes(path, gguf_file, spec)
    if needed is None:
        return
    available = available_memory_bytes(on_cuda) + freed_bytes  # the old model goes first
    if needed > available:
        raise QwenMagicError(
            f"Not enough memory for {spec.model}: its weights need about {needed / 2**30:.1f} GiB "
            f"but about {available / 2**30:.1f} GiB is free. Use a smaller model or a smaller "
            "dtype (--dtype bfloat16), or free memory."
        )


def available_memory_bytes(on_cuda: bool) -> int:
    import psutil

    free = psutil.virtual_memory().available
    if on_cuda:
        import torch

        free += sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return int(free)


def is_out_of_memory(error: BaseException) -> bool:
    """True for the ways torch and Python report running out of GPU or CPU memory."""
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )
