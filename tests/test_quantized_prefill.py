"""Quantized prefill: many rows multiply a weight widened to bfloat16 for that call only.

Runs on the tiny random Qwen2 quantized in a scratch cache (int4 quantizes only its layers
whose input is 128 wide, a group); the speed is measured by ``make bench``'s Prefill section.
"""

from __future__ import annotations

import pytest
import torch

from qwen_magic.backends.kernel import devices, loading
from qwen_magic.backends.kernel.quantize import prefill as quantized_prefill
from qwen_magic.backends.kernel.quantize.formats import weight_bytes

from .helpers import load_aside

pytest.importorskip("torchao")


@pytest.fixture
def quantized_tiny(tiny_model_path, tmp_path, monkeypatch):
    """Load the tiny model quantized to a format, in a scratch cache, on the CPU."""
    monkeypatch.setenv("QWEN_MAGIC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(devices, "cuda_available", lambda: False)

    def load(fmt: str):
        spec = loading.model_spec(str(tiny_model_path), device="cpu", quantize=fmt)
        return loading.load_model(spec, progress=None)

    return load


def test_this_cpus_int4_packing_is_read_exactly():
    """unpack_int4 reads the int4 kernel's packing on this CPU (the check the install runs)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the int4 unpacking reads the AVX-512 layout; this CPU keeps the kernel")
    assert quantized_prefill.int4_layout_matches()


def test_widened_int4_weight_multiplies_like_the_kernel():
    """A torchao int4 weight widened by unpack_int4 gives the int4 kernel's product, to bf16
    rounding."""
    if not quantized_prefill.int4_layout_matches():
        pytest.skip("this CPU's int4 layout is not the one unpack_int4 reads")
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    torch.manual_seed(0)
    weight = Int4OpaqueTensor.from_hp(torch.randn(192, 256, dtype=torch.bfloat16), [1, 128])
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    kernel = torch.nn.functional.linear(x, weight)
    widened = x @ quantized_prefill.unpack_int4(
        weight.qdata, weight.scale_and_zero, 128, torch.bfloat16
    )
    assert (widened.float() - kernel.float()).abs().max() <= 0.02 * kernel.abs().max()


def test_int4_weight_widened_in_slabs_is_the_kernels_weight(monkeypatch):
    """unpack_int4 written in several slabs (the last one short) is, to bf16 rounding, the
    weight the int4 kernel multiplies by: the kernel applied to the identity returns it."""
    if not quantized_prefill.int4_layout_matches():
        pytest.skip("this CPU's int4 layout is not the one unpack_int4 reads")
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    monkeypatch.setattr(quantized_prefill, "UNPACK_SLAB", 256)
    torch.manual_seed(1)
    inputs = 640  # slabs of 256, 256 and 128 inputs
    weight = Int4OpaqueTensor.from_hp(torch.randn(128, inputs, dtype=torch.bfloat16), [1, 128])
    by_kernel = torch.nn.functional.linear(torch.eye(inputs, dtype=torch.bfloat16), weight)
    widened = quantized_prefill.unpack_int4(
        weight.qdata, weight.scale_and_zero, 128, torch.bfloat16
    )
    assert widened.shape == (inputs, 128) and widened.is_contiguous()
    tolerance = 2**-7 * by_kernel.float().abs() + 1e-6  # one bf16 rounding, either side
    assert ((widened.float() - by_kernel.float()).abs() <= tolerance).all()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_long_prompt_is_read_with_widened_weights_and_a_step_with_the_kernel(
    quantized_tiny, monkeypatch, fmt
):
    """A pass of MANY_ROWS tokens or more widens each quantized layer's weight (and its logits
    match the kernel's closely); a one-token step and a short pass use the kernel; the model
    keeps no widened copy afterwards."""
    loaded = quantized_tiny(fmt)
    model = loaded.model
    if fmt == "int4" and not quantized_prefill.int4_layout_matches():
        pytest.skip("this CPU's int4 layout is not the one unpack_int4 reads")
    widened_layers = [m for m in model.modules() if hasattr(m, "_quantized_forward")]
    assert widened_layers, "no layer got the many-row path"
    memory = weight_bytes(model)
    calls: list[str] = []
    for layer in widened_layers:
        real = layer._quantized_forward
        layer._quantized_forward = lambda x, real=real: (calls.append("kernel"), real(x))[1]
    ids = torch.arange(10, 10 + quantized_prefill.MANY_ROWS + 20).unsqueeze(0)
    with torch.inference_mode():
        long = model(ids).logits
        assert calls == []  # every quantized layer widened its weight
        short = model(ids[:, :8]).logits
        assert len(calls) == len(widened_layers)
        monkeypatch.setattr(quantized_prefill, "MANY_ROWS", 10**9)
        kernel = model(ids).logits
    assert (long - kernel).abs().max() <= 0.02 * kernel.abs().max()
    assert torch.allclose(short, kernel[:, :8], atol=1e-5)
    assert weight_bytes(model) == memory


@pytest.mark.demo
def test_int4_demo_reads_a_long_prompt_with_widened_weights_and_explains_it(demo_path):
    """The int4 demo model, reading a ~1,000-token code prompt through the many-row path (every
    layer widened at least once), says what the code does."""
    from qwen_magic.backends.kernel.backend import KernelBackend
    from qwen_magic.options import GenerationOptions

    if not quantized_prefill.int4_layout_matches():
        pytest.skip("this CPU's int4 layout is not the one unpack_int4 reads")
    loaded = load_aside("demo", quantize="int4")
    widened: set[int] = set()
    hooks = [
        module.register_forward_pre_hook(
            lambda module, args: (
                widened.add(id(module))
                if args[0].numel() // args[0].shape[-1] >= quantized_prefill.MANY_ROWS
                else None
            )
        )
        for module in loaded.model.modules()
        if hasattr(module, "_quantized_forward")
    ]
    code = "\n".join(
        f"def total_{n}(orders):\n    return sum(o.amount for o in orders)\n" for n in range(60)
    )
    messages = [{"role": "user", "content": f"```python\n{code}\n```\nWhat do these functions do?"}]
    backend = KernelBackend(loaded)
    try:
        reply = backend.start(messages, GenerationOptions(max_new_tokens=40, do_sample=False))
        reply.run()
    finally:
        for hook in hooks:
            hook.remove()
    assert reply.stats.prompt_tokens >= 900
    assert len(widened) >= 24 * 7  # every decoder layer's projections took the path
    assert "sum" in reply.text.lower() or "total" in reply.text.lower(), reply.text
