"""Quantized prefill: many rows multiply a weight widened to bfloat16 for that call only.

PyTorch's CPU int4 and int8 kernels are built for decoding, one row (token) at a time: reading
a long prompt with them was measured 3x slower than bfloat16 (a ~1,100-token prompt: int4 8.9
s, bf16 3.0 s), whose matmul uses the CPU's matrix units for many rows. So a quantized layer
given at least :data:`MANY_ROWS` rows at once (a prompt, never a decoding or verification step)
widens its own weight to bfloat16 for that one call and multiplies with bfloat16's matmul; the
widened weight is freed when the layer returns, so memory holds one layer's bf16 weight at a
time, never a second copy of the model. Decoding keeps the quantized kernels. With the CPU's
bf16 matrix units the matmul is cheap, so the widening itself is the cost to keep small: see
:func:`unpack_int4`. (Measured in
BENCHMARKS.md's Prefill section: a 1,005-token prompt read 3-4x faster than with the kernels,
at about 1.03x (int8) and 1.06x (int4) bf16's time; README.md has the runs.)

* **int8** (:class:`~qwen_magic.int8_linear.Int8PackedLinear`): ``weight * scale[:, None]``.
* **int4** (torchao's CPU ``Int4OpaqueTensor``): the weight is packed for the int4 kernel in
  blocks of 64 output rows, two 4-bit values per byte, in a layout that depends on the CPU's
  instruction set. :func:`unpack_int4` reads the AVX-512 layout; at install time it is checked
  against ``aten._convert_weight_to_int4pack_for_cpu`` on a probe, and where it does not match
  (another CPU) the int4 layers keep their kernel for every call. Each 128-wide group of a row
  has a scale and a zero: ``w = (q - 8) * scale + zero``.

The widened product is not the quantized kernel's bit for bit (the sums run in another order),
so a prompt read this way gives keys and values that differ in the last bits from the int4
kernel's: a greedy reply to a prompt of :data:`MANY_ROWS` tokens or more may differ from what
it was before this path existed. Shorter prompts, follow-ups that reuse the cache for all but a
few tokens, and every decoding step run exactly as before.
"""

from __future__ import annotations

import types
from typing import Any

#: Rows (tokens in one forward pass) from which a quantized layer widens its weight.
MANY_ROWS = 128
#: The int4 kernel's block of output rows in its packed layout (AVX-512).
INT4_BLOCK = 64
#: :func:`unpack_int4` widens this many inputs (rows of its ``[in, out]`` result) at a time.
UNPACK_SLAB = 256


def unpack_int4(packed: Any, scale_and_zero: Any, group_size: int, dtype: Any) -> Any:
    """The transposed dequantized weight ``[in, out]`` of an int4 weight packed (AVX-512
    layout) as ``packed [out, in / 2]`` with ``scale_and_zero [in / group, out, 2]``.

    Written in slabs of :data:`UNPACK_SLAB` inputs, so a slab's unpacked 4-bit values stay in
    the CPU's cache between the passes that make them: the nibbles are split four bytes at a
    time, copied into the output dtype, then scaled and offset there in place. Every pass has one
    dtype in and out: ATen's mixed-dtype elementwise ops (a uint8 tensor times a bf16 scale) are
    not vectorized and were measured 5x slower than a copy plus a one-dtype ``addcmul``."""
    import torch

    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    # Byte j of a block's 32 for input k holds rows j (low nibble) and j + 32 (high nibble).
    by_input = packed.view(out_features // INT4_BLOCK, in_features, 32).transpose(0, 1)
    words = by_input.view(torch.int32)  # [in, out / 64, 8]: four packed bytes per word
    scale = scale_and_zero[:, :, 0].float()
    # w = (q - 8) * scale + zero = q * scale + offset; offset rounded once to the dtype.
    offset = (scale_and_zero[:, :, 1].float() - 8 * scale).to(dtype).unsqueeze(1)
    scale = scale.to(dtype).unsqueeze(1)
    widened = torch.empty(in_features, out_features, dtype=dtype, device=packed.device)
    slab = max(group_size, UNPACK_SLAB // group_size * group_size)
    values = torch.empty(
        min(slab, in_features),
        out_features // INT4_BLOCK,
        2,
        32,
        dtype=torch.uint8,
        device=packed.device,
    )
    for start in range(0, in_features, slab):
        stop = min(start + slab, in_features)
        nibbles = values[: stop - start]
        as_words = nibbles.view(torch.int32)  # [rows, out / 64, 2, 8]
        torch.bitwise_and(words[start:stop], 0x0F0F0F0F, out=as_words[:, :, 0])
        torch.bitwise_right_shift(words[start:stop], 4, out=as_words[:, :, 1])
        as_words[:, :, 1].bitwise_and_(0x0F0F0F0F)
        part = widened[start:stop]
        part.copy_(nibbles.view(stop - start, out_features))
        groups = slice(start // group_size, stop // group_size)
        part = part.view(-1, group_size, out_features)
        torch.addcmul(offset[groups], part, scale[groups], out=part)
    return widened


def int4_layout_matches() -> bool:
    """Whether :func:`unpack_int4` reads this CPU's int4 packing (checked on a probe)."""
    import torch

    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return False
    generator = torch.Generator().manual_seed(0)
    rows, inputs = 2 * INT4_BLOCK, 256
    values = torch.randint(0, 16, (rows, inputs), dtype=torch.int32, generator=generator)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    if tuple(packed.shape) != (rows, inputs // 2) or packed.dtype != torch.uint8:
        return False
    ones = torch.zeros(inputs // 128, rows, 2)
    ones[:, :, 0] = 1.0
    ones[:, :, 1] = 8.0  # scale 1, zero 8: the values themselves
    unpacked = unpack_int4(packed, ones, 128, torch.float32)
    return torch.equal(unpacked.t(), values.float())


def _int4_weight_of(module: Any) -> Any:
    weight: Any = getattr(module, "weight", None)
    if type(weight).__name__ != "Int4OpaqueTensor":
        return None
    if getattr(weight, "act_mapping_type", None) is not None:  # da8w4: another kernel
        return None
    if getattr(weight, "act_pre_scale", None) is not None:
        return None
    if weight.shape[0] % INT4_BLOCK or weight.block_size[0] != 1:
        return None
    return weight


def _many_rows(x: Any) -> bool:
    return x.dim() >= 2 and x.numel() // x.shape[-1] >= MANY_ROWS


def _int4_forward(self: Any, x: Any) -> Any:
    import torch

    if not _many_rows(x):
        return self._quantized_forward(x)
    weight = self.weight
    widened = unpack_int4(weight.qdata, weight.scale_and_zero, weight.block_size[1], x.dtype)
    y = torch.matmul(x, widened)
    return y + self.bias if self.bias is not None else y


def _int8_forward(self: Any, x: Any) -> Any:
    import torch

    if not _many_rows(x):
        return self._quantized_forward(x)
    widened = self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
    return torch.nn.functional.linear(x, widened, self.bias)


def use_many_row_prefill(model: Any) -> int:
    """Give every int4 (where the layout matches) and int8 layer of ``model`` the many-row
    path; returns how many layers got it. Idempotent."""
    from qwen_magic.backends.kernel.quantize.int8_linear import Int8PackedLinear

    int4_ok: bool | None = None
    count = 0
    for module in model.modules():
        if hasattr(module, "_quantized_forward"):
            count += 1
            continue
        if isinstance(module, Int8PackedLinear):
            forward = _int8_forward
        elif _int4_weight_of(module) is not None:
            if int4_ok is None:
                int4_ok = int4_layout_matches()
            if not int4_ok:
                continue
            forward = _int4_forward
        else:
            continue
        module._quantized_forward = module.forward
        module.forward = types.MethodType(forward, module)
        count += 1
    return count
