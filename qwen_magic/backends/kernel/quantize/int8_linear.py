"""``--quantize int8`` on the CPU: a linear layer that multiplies with PyTorch's int8 kernel.

torchao's ``Int8WeightOnlyConfig`` chooses the int8 weights (symmetric, one scale per output
row), but its eager matmul widens the whole weight back to bfloat16 at every call, which decodes
slower than plain bfloat16 on the CPU. PyTorch ships a CPU kernel for exactly this layout,
``aten._weight_int8pack_mm(x, weight_int8[N, K], scales[N])``, that reads the int8 weights as
they are; no torchao config uses it, so :func:`use_cpu_int8_kernel` swaps each quantized layer
for an :class:`Int8PackedLinear` holding the same int8 weights and scales. (The kernel wants the
scales in the activations' dtype: they are stored in it.)

Importing this module does not import torch: the layer class is made on first use
(:func:`int8_packed_linear`), like every other part of qwen_magic that needs torch.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def int8_packed_linear() -> Any:
    """The :class:`Int8PackedLinear` class (made once, when torch is first needed)."""
    import torch

    return _define(torch)


def __getattr__(name: str) -> Any:
    if name == "Int8PackedLinear":  # qwen_magic...int8_linear.Int8PackedLinear still works
        return int8_packed_linear()
    raise AttributeError(name)


def _define(torch: Any) -> Any:
    class Int8PackedLinear(torch.nn.Module):
        """``y = x @ (weight * scale[:, None]).T + bias`` with int8 ``weight``, computed by
        ``aten._weight_int8pack_mm`` without widening the weights."""

        def __init__(
            self,
            in_features: int,
            out_features: int,
            bias: bool,
            dtype: torch.dtype,
            device: Any = None,
        ) -> None:
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = torch.nn.Parameter(
                torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                requires_grad=False,
            )
            self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
            self.bias = (
                torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
                if bias
                else None
            )

        @classmethod
        def from_torchao(cls, linear: Any) -> Any:
            """The same layer from a linear whose weight is torchao's per-row ``Int8Tensor``."""
            weight: Any = linear.weight
            dtype = weight.dtype  # the logical dtype: what the activations are
            packed = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype)
            packed.weight = torch.nn.Parameter(weight.qdata.contiguous(), requires_grad=False)
            packed.scale = weight.scale.reshape(-1).to(dtype).contiguous()
            if linear.bias is not None:
                packed.bias = linear.bias
            return packed

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            y = torch.ops.aten._weight_int8pack_mm(
                x.reshape(-1, shape[-1]).contiguous(), self.weight, self.scale.to(x.dtype)
            )
            y = y.reshape(*shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y

        def extra_repr(self) -> str:
            return (
                f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 weights"
            )

    return Int8PackedLinear


def use_cpu_int8_kernel(model: Any) -> int:
    """Swap every linear holding torchao ``Int8Tensor`` weights for :class:`Int8PackedLinear`;
    returns how many were swapped."""
    packed_linear = int8_packed_linear()
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(getattr(child, "weight", None)).__name__ == "Int8Tensor":
                setattr(parent, name, packed_linear.from_torchao(child))
                swapped += 1
    return swapped


def packed_skeleton(model: Any, names: set[str], dtype: Any) -> None:
    """Replace the linears called ``names`` with empty ``meta`` :class:`Int8PackedLinear`s, so
    that saved int8 weights can be assigned to them."""
    packed_linear = int8_packed_linear()
    for name in names:
        owner, _, attribute = name.rpartition(".")
        parent = model.get_submodule(owner)
        child = getattr(parent, attribute)
        setattr(
            parent,
            attribute,
            packed_linear(
                child.in_features, child.out_features, child.bias is not None, dtype, "meta"
            ),
        )
