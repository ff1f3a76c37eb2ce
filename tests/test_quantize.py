"""``--quantize int8|int4``: weight-only quantization, its disk cache, its errors, its words.

Mechanics run on the tiny random Qwen2 (quantized in a scratch cache, in a second or two); the
words come from the real demo model quantized both ways (cached in the user's qwen_magic cache,
so only the first run of the suite quantizes it).
"""

from __future__ import annotations

import json

import pytest
import torch

import qwen_magic
from qwen_magic.backends.base import ReplyStats
from qwen_magic.backends.kernel import devices, loading
from qwen_magic.backends.kernel.quantize import cache as quantize_cache
from qwen_magic.backends.kernel.quantize import formats as quantize
from qwen_magic.conversation import ConversationBook
from qwen_magic.errors import QwenMagicError
from qwen_magic.options import GenerationOptions
from qwen_magic.presentation import NullView

from .helpers import install, load_aside, start

pytest.importorskip("torchao")


@pytest.fixture
def scratch_cache(tmp_path, monkeypatch):
    """qwen_magic's cache in a fresh folder (the demo model stays where it was converted)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("QWEN_MAGIC_CACHE", str(folder))
    return folder


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: False)


def load_tiny(path, fmt: str):
    return loading.load_model(
        loading.model_spec(str(path), device="cpu", quantize=fmt), progress=None
    )


def logits(loaded) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits


def test_int8_layers_multiply_with_pytorchs_int8_kernel(tiny_model_path, scratch_cache, no_cuda):
    """With int8, every linear layer but the tied output layer runs PyTorch's int8 kernel on
    int8 weights, and the model's outputs stay close to the unquantized model's."""
    from qwen_magic.backends.kernel.quantize.int8_linear import Int8PackedLinear

    plain = load_tiny(tiny_model_path, "none")
    int8 = load_tiny(tiny_model_path, "int8")
    layers = [m for m in int8.model.modules() if isinstance(m, Int8PackedLinear)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(layer.weight.dtype == torch.int8 for layer in layers)
    assert int8.model.lm_head.weight is int8.model.get_input_embeddings().weight  # still tied
    difference = (logits(int8) - logits(plain)).abs().max() / logits(plain).abs().max()
    assert difference < 0.05
    assert int8.memory_bytes < plain.memory_bytes


def test_int8_layer_computes_the_dequantized_product():
    """Int8PackedLinear gives x @ (weight × per-row scale)ᵀ + bias."""
    from qwen_magic.backends.kernel.quantize.int8_linear import Int8PackedLinear

    layer = Int8PackedLinear(64, 32, bias=True, dtype=torch.float32)
    layer.weight.data = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    layer.scale = torch.rand(32) / 100
    layer.bias.data = torch.randn(32)
    x = torch.randn(2, 3, 64)
    expected = x @ (layer.weight.float() * layer.scale[:, None]).T + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-4)


def test_int4_uses_the_cpu_int4_tensor(tiny_model_path, scratch_cache, no_cuda):
    """With int4 on the CPU the weights become torchao's CPU int4 tensors (groups of 128, so here
    the layers whose input is 128 wide) and the summary says how the model is quantized."""
    int4 = load_tiny(tiny_model_path, "int4")
    down = int4.model.model.layers[0].mlp.down_proj.weight  # 128 inputs: one group per row
    assert type(down).__name__ == "Int4OpaqueTensor"
    assert int4.quantization == "int4"
    assert "int4 weight-only" in int4.summary() and "CPU int4 kernel" in int4.summary()
    assert torch.isfinite(logits(int4)).all()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_second_load_comes_from_the_cache_with_identical_outputs(
    tiny_model_path, scratch_cache, no_cuda, fmt
):
    """The first quantizing load keeps the weights in the cache; the next load reads them
    (saying so) and computes exactly the same logits, with the same generation config."""
    first = load_tiny(tiny_model_path, fmt)
    assert any("kept in" in note for note in first.notices)
    folders = [f for f in (scratch_cache / "quantized").iterdir() if f.is_dir()]
    assert [f.name.rsplit("-", 2)[1] for f in folders] == [fmt]
    manifest = json.loads((folders[0] / quantize_cache.QUANTIZED_MANIFEST).read_text())
    assert manifest["key"]["format"] == fmt and manifest["key"]["torchao"] != "none"

    second = load_tiny(tiny_model_path, fmt)
    assert any("from the cache" in note for note in second.notices)
    assert torch.equal(logits(first), logits(second))
    assert second.model.generation_config.to_dict() == first.model.generation_config.to_dict()
    assert second.memory_bytes == first.memory_bytes
    assert second.parameters == first.parameters


def test_damaged_cache_is_quantized_again(tiny_model_path, scratch_cache, no_cuda):
    """A cached weights file whose bytes changed fails the check and is rebuilt, not used."""
    first = load_tiny(tiny_model_path, "int8")
    (folder,) = [f for f in (scratch_cache / "quantized").iterdir() if f.is_dir()]
    weights = folder / quantize_cache.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    again = load_tiny(tiny_model_path, "int8")
    assert any("kept in" in note for note in again.notices)
    assert torch.equal(logits(first), logits(again))
    assert quantize_cache.cache_is_valid(
        folder, json.loads((folder / quantize_cache.QUANTIZED_MANIFEST).read_text())["key"]
    )


def test_a_cache_that_cannot_be_written_still_loads_the_model(
    tiny_model_path, scratch_cache, monkeypatch, no_cuda
):
    """When the quantized weights cannot be saved (full disk, read-only cache), the load still
    succeeds and a note says the next load quantizes again."""

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quantize_cache, "save_quantized", full_disk)
    loaded = load_tiny(tiny_model_path, "int8")
    assert loaded.quantization == "int8"
    assert any("No space left on device" in note for note in loaded.notices)
    assert torch.isfinite(logits(loaded)).all()


def test_cache_key_follows_source_format_and_versions(tiny_model_path, monkeypatch):
    """The cache key changes with the format, a library version, and the source's files."""
    key = quantize_cache.cache_key(str(tiny_model_path), None, None, "int8", torch.bfloat16)
    assert key != quantize_cache.cache_key(str(tiny_model_path), None, None, "int4", torch.bfloat16)
    monkeypatch.setattr(quantize_cache, "_version", lambda name: "0.0-other")
    assert key != quantize_cache.cache_key(str(tiny_model_path), None, None, "int8", torch.bfloat16)
    monkeypatch.undo()
    config = tiny_model_path / "config.json"
    stat = config.stat()
    import os

    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert key != quantize_cache.cache_key(str(tiny_model_path), None, None, "int8", torch.bfloat16)
    assert (
        quantize_cache.cache_key("Org/never-downloaded", None, None, "int8", torch.bfloat16) is None
    )


def test_replies_footer_names_the_quantization(
    fresh_state, tiny_model_path, scratch_cache, no_cuda
):
    """A reply from a quantized model says so in its footer and its saved stats."""
    from qwen_magic.notebook import report

    install(fresh_state, load_tiny(tiny_model_path, "int4"))
    reply = start([{"role": "user", "content": "Hi"}], GenerationOptions(4, do_sample=False))
    reply.run()
    backend = fresh_state.require_backend()
    assert backend.info().weights == "int4"
    assert "int4 weights" in report.footer(reply.stats, backend.info())
    turn = qwen_magic.Chat(book=ConversationBook()).ask(
        "Hi", options=GenerationOptions(4, do_sample=False), view=NullView()
    )
    assert turn.stats["quantization"] == "int4"
    assert "quantization" not in ReplyStats().as_record()
    assert "weights" not in report.footer(ReplyStats(new_tokens=3))


def test_without_torchao_the_error_names_the_extra(kept_tiny, monkeypatch, no_cuda):
    """Without torchao, --quantize is one line naming the extra to install; the loaded model
    stays."""
    real = quantize.importlib.util.find_spec
    monkeypatch.setattr(
        quantize.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torchao" else real(name, *a),
    )
    with pytest.raises(QwenMagicError, match=r"qwen_magic\[quant\]") as raised:
        kept_tiny.load_model(
            str(kept_tiny.backend.loaded.spec.model), device="cpu", quantize="int8"
        )
    assert "\n" not in str(raised.value)
    assert kept_tiny.backend.loaded is not None


def test_a_format_this_cpu_cannot_run_names_those_it_can(kept_tiny, monkeypatch, no_cuda):
    """A format whose kernel this torch lacks is refused in one line naming the runnable ones."""
    monkeypatch.setattr(quantize, "_has_aten_op", lambda name: "int4" not in name)
    with pytest.raises(QwenMagicError, match=r"cannot run on this CPU.*--quantize none, int8\.$"):
        kept_tiny.load_model(
            str(kept_tiny.backend.loaded.spec.model), device="cpu", quantize="int4"
        )
    assert kept_tiny.backend.loaded is not None


def test_cuda_int4_needs_mslk(monkeypatch):
    """On CUDA, int4 without the mslk kernels is refused, naming int8 as what can run."""
    real = quantize.importlib.util.find_spec
    monkeypatch.setattr(
        quantize.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mslk" else real(name, *a),
    )
    with pytest.raises(QwenMagicError, match=r"mslk.*--quantize none, int8\.$"):
        quantize.check_format("int4", on_cuda=True)
    quantize.check_format("int8", on_cuda=True)


def test_unknown_format_is_refused():
    """A format that does not exist is refused with the choices."""
    with pytest.raises(QwenMagicError, match="none, int8, int4"):
        loading.model_spec("demo", quantize="int3")


@pytest.fixture
def kept_tiny(fresh_state, tiny_model_path, no_cuda):
    """The tiny model, unquantized, as the kernel's model."""
    fresh_state.load_model(str(tiny_model_path), device="cpu", progress=None)
    return fresh_state


def test_qwen_load_quantize_option_and_config(
    shell, tiny_model_path, scratch_cache, capsys, no_cuda
):
    """%qwen_load --quantize int8 loads and prints a summary naming int8; QwenMagics.quantize is
    the default for a load without the option; another format is another model."""
    from qwen_magic import current_session

    shell.run_line_magic("qwen_load", f"{tiny_model_path} --device cpu --quantize int8")
    summary = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert "int8 weight-only" in summary
    assert current_session().backend.loaded.spec.quantize == "int8"

    shell.run_line_magic("config", "QwenMagics.quantize = 'int4'")
    try:
        shell.run_line_magic("qwen_load", f"{tiny_model_path} --device cpu --quiet")
        assert current_session().backend.loaded.quantization == "int4"
        assert "int4 weight-only" in capsys.readouterr().out
    finally:
        shell.run_line_magic("config", "QwenMagics.quantize = 'none'")


# -- the real demo model: words -------------------------------------------------------------


@pytest.fixture(scope="module", params=["int8", "int4"])
def demo_quantized(request, demo_path):
    """The demo model quantized (from the user's cache after the first run), loaded once per
    format for this module."""
    return load_aside("demo", quantize=request.param)


@pytest.mark.demo
def test_quantized_demo_answers_factual_questions(fresh_state, demo_quantized):
    """Quantized to int8 and to int4, the demo model still answers Paris, then Berlin to the
    follow-up, and 4 to 2 + 2."""
    import qwen_magic
    from qwen_magic.presentation import NullView

    install(fresh_state, demo_quantized)
    chat = qwen_magic.Chat()
    options = GenerationOptions(max_new_tokens=30, do_sample=False)
    first = chat.ask(
        "What is the capital of France? Answer in one sentence.", options=options, view=NullView()
    )
    assert "Paris" in first.assistant
    second = chat.ask("And of Germany? Answer the same way.", options=options, view=NullView())
    assert "Berlin" in second.assistant
    assert chat.conversation().turns[-1].stats["quantization"] == demo_quantized.quantization
    sums = chat.ask(
        "What is 2 + 2? Answer with just the number.",
        conversation="api",
        options=GenerationOptions(max_new_tokens=10, do_sample=False),
        view=NullView(),
    )
    assert sums.assistant.strip() == "4"
