"""Weight-only quantization: ``%qwen_load MODEL --quantize int8|int4``.

Decoding reads every weight once per token, so smaller weights decode faster wherever a fast
kernel multiplies them. ``--quantize`` stores the linear layers' weights in 8 or 4 bits (the
activations stay bfloat16, the embedding table stays as loaded) through transformers'
``TorchAoConfig`` with torchao's configs, installed by ``pip install 'qwen_magic[quant]'``.

What runs where, and why (figures in README.md and BENCHMARKS.md):

* **int4 on the CPU**: ``torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig``,
  groups of 128 weights sharing a scale and zero point, packed for PyTorch's own CPU int4 kernel
  (``aten._weight_int4pack_mm_for_cpu``). torchao's default ``Int4WeightOnlyConfig`` needs the
  ``mslk`` CUDA kernels, so it is the GPU's choice, not the CPU's.
* **int8 on the CPU**: torchao's ``Int8WeightOnlyConfig`` chooses the weights (one scale per
  output row), then each layer is swapped for :class:`Int8PackedLinear`, which multiplies with
  PyTorch's own CPU int8 kernel (``aten._weight_int8pack_mm``). torchao's eager int8 path
  converts the whole weight back to bfloat16 at every call and decodes *slower* than bfloat16;
  compiling it with a static cache is about as fast as the int8 kernel but costs a minute of
  compiling before the first reply. No torchao config uses the int8 kernel, hence the small
  swap here.
* **On CUDA** (untested: the project's machines have no GPU): torchao's standard
  ``Int8WeightOnlyConfig()`` and ``Int4WeightOnlyConfig()`` (the latter needs ``mslk``),
  quantized at every load, not cached.

The output layer (``lm_head``, a quarter of the weights a small model reads per token) is
quantized too, unless it shares its weights with the embedding table (tied embeddings), which
must stay unquantized.

Caching the quantized weights on disk: :mod:`~qwen_magic.backends.kernel.quantize.cache`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable, Iterator
from typing import Any

from qwen_magic.errors import QwenMagicError

#: ``--quantize`` choices; ``none`` keeps the weights as loaded.
FORMATS = ("none", "int8", "int4")
TORCHAO_INSTALL_HINT = "pip install 'qwen_magic[quant]'"
#: int4 groups: this many weights along a row share one scale and zero point.
INT4_GROUP_SIZE = 128

Progress = Callable[[str], None]


# -- what can run here -----------------------------------------------------------------


def _has_aten_op(name: str) -> bool:
    import torch

    return hasattr(torch.ops.aten, name)


def runnable_formats(on_cuda: bool) -> tuple[str, ...]:
    """The ``--quantize`` formats this machine can run, on CUDA or on the CPU."""
    formats = ["none"]
    if on_cuda:
        formats.append("int8")
        if importlib.util.find_spec("mslk") is not None:
            formats.append("int4")
    else:
        if _has_aten_op("_weight_int8pack_mm"):
            formats.append("int8")
        if _has_aten_op("_weight_int4pack_mm_for_cpu"):
            formats.append("int4")
    return tuple(formats)


def check_format(fmt: str, on_cuda: bool) -> None:
    """Raise a one-line ``QwenMagicError`` unless ``fmt`` can run here."""
    if fmt not in FORMATS:
        raise QwenMagicError(f"Unknown --quantize {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if fmt == "none":
        return
    if importlib.util.find_spec("torchao") is None:
        raise QwenMagicError(
            f"--quantize {fmt} needs torchao, which is not installed; run: {TORCHAO_INSTALL_HINT}"
        )
    runnable = runnable_formats(on_cuda)
    if fmt not in runnable:
        where = "this CUDA GPU" if on_cuda else "this CPU"
        why = (
            "torchao's int4 CUDA kernels come with the mslk package (pip install mslk-cuda)"
            if on_cuda and fmt == "int4"
            else "this torch build lacks its kernel"
        )
        raise QwenMagicError(
            f"--quantize {fmt} cannot run on {where} ({why}); it can run --quantize "
            f"{', '.join(runnable)}."
        )


def describe_format(fmt: str, on_cuda: bool) -> str:
    """How the weights are stored and multiplied, in a few words (the load summary's)."""
    if fmt == "none":
        return "not quantized"
    if on_cuda:
        return f"{fmt} weight-only (torchao)"
    if fmt == "int8":
        return "int8 weight-only (PyTorch's CPU int8 kernel)"
    return f"int4 weight-only, groups of {INT4_GROUP_SIZE} (PyTorch's CPU int4 kernel)"


@contextlib.contextmanager
def quiet_torchao_import() -> Iterator[None]:
    """torchao's import logs a warning for each CUDA library it cannot load on a CPU machine,
    and torch one about an enum; neither concerns the user."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def import_torchao() -> Any:
    """Import torchao (and its CPU int4 tensor, so saved int4 weights can be unpickled)."""
    with quiet_torchao_import():
        import torchao
        import torchao.prototype.quantization.int4
    return torchao


def torchao_config(fmt: str, on_cuda: bool, tied_embeddings: bool) -> Any:
    """transformers' ``TorchAoConfig`` for ``fmt`` on this device."""
    import_torchao()
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    if fmt == "int8":
        quant_type = Int8WeightOnlyConfig(set_inductor_config=on_cuda)
    elif on_cuda:
        quant_type = Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE)
    else:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        quant_type = PrototypeInt4WeightOnlyConfig(
            group_size=INT4_GROUP_SIZE, set_inductor_config=False
        )
    # An empty list quantizes lm_head too; a tied lm_head is the embedding table: keep it.
    skip = ["lm_head"] if tied_embeddings else []
    return TorchAoConfig(quant_type, modules_to_not_convert=skip)


# -- sizes -------------------------------------------------------------------------------


def _stored_bytes(tensor: Any) -> int:
    """Bytes a tensor really holds: a torchao tensor's inner tensors, not its logical shape."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: Any) -> int:
    """What the model's parameters and buffers take in memory (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _stored_bytes(tensor)
    return total


# -- loading, with the disk cache ------------------------------------------------------
