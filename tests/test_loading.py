"""qwen_magic.backends.kernel.loading: %qwen_load and load() on the real transformers path, with
the tiny model.

Mocks stand in only for what this CPU-only machine cannot produce: a GPU being present or absent,
little free memory, and an out-of-memory error while the weights load.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import transformers
from IPython.core.error import UsageError

import qwen_magic
from qwen_magic.backends.kernel import devices, loading
from qwen_magic.errors import QwenMagicError
from qwen_magic.options import GenerationOptions
from qwen_magic.session import current as session

from .helpers import install

CPU = "--device cpu"


def usage_error(call, *args, **kwargs) -> str:
    """Run ``call``; it must raise exactly ``UsageError`` with a one-line message, returned."""
    with pytest.raises(UsageError) as info:
        call(*args, **kwargs)
    assert type(info.value) in (UsageError, QwenMagicError)  # a magic's, or the Python API's
    message = str(info.value)
    assert message.strip() and "\n" not in message.strip()
    return message


def assert_usable(loaded) -> None:
    """``loaded`` is still the kernel's model and answers a short greedy prompt."""
    assert session().backend.loaded is loaded
    options = GenerationOptions(max_new_tokens=2, do_sample=False)
    turn = qwen_magic.Chat().ask("Say hi.", options=options, view="text")
    assert turn.model == loaded.name
    assert turn.stats["new_tokens"] >= 1


def output_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.fixture
def no_cuda(monkeypatch):
    """Pin "no GPU" so device decisions do not depend on the machine running the tests."""
    monkeypatch.setattr(devices, "cuda_available", lambda: False)


@pytest.fixture
def spy_from_pretrained(monkeypatch):
    """Record every call of the three Auto* ``from_pretrained`` and call the real ones."""
    calls: dict[str, list[dict]] = {"config": [], "tokenizer": [], "model": []}
    for key, cls in (
        ("config", transformers.AutoConfig),
        ("tokenizer", transformers.AutoTokenizer),
        ("model", transformers.AutoModelForCausalLM),
    ):
        real = cls.from_pretrained

        def spy(*args, _real=real, _key=key, **kwargs):
            calls[_key].append({"args": args, **kwargs})
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


@pytest.fixture
def tiny_once(tiny_loaded_once):
    """The session's tiny model (tests install it through `kept`)."""
    return tiny_loaded_once


@pytest.fixture
def kept(fresh_state, tiny_once):
    """The shared tiny model as the kernel's current model, for tests that must not replace it."""
    yield install(fresh_state, tiny_once)
    if getattr(fresh_state.backend, "loaded", None) is tiny_once:
        fresh_state.backend = None  # still alive in tiny_once: spare release() its gc pass


def linked_copy(source: Path, target: Path) -> Path:
    """A copy of a model folder whose weights are hard links (config files are real copies)."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.suffix == ".safetensors":
            os.link(item, target / item.name)
        else:
            (target / item.name).write_bytes(item.read_bytes())
    return target


def stored_weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# -- loading the tiny model --------------------------------------------------------------------


def test_load_fills_every_field_of_loaded_model(fresh_state, tiny_model_path, no_cuda):
    """load() of a local folder reports progress and returns a LoadedModel describing the model."""
    import torch

    said: list[str] = []
    loaded = qwen_magic.load(str(tiny_model_path), device="cpu", progress=said.append)
    model = loaded.model
    assert len(said) == 1 and said[0].startswith("Loading tiny-qwen2: dtype auto, device cpu")
    assert isinstance(loaded, loading.LoadedModel)
    assert isinstance(model, transformers.Qwen2ForCausalLM)
    assert loaded.name == "tiny-qwen2"
    assert loaded.source == str(tiny_model_path)
    assert loaded.parameters == sum(p.numel() for p in model.parameters()) > 0
    assert loaded.dtype == "float32"  # dtype="auto" keeps the stored float32
    assert loaded.devices == ["cpu"]
    assert loaded.device == torch.device("cpu")
    assert loaded.attention == "sdpa"
    assert loaded.memory_bytes == model.get_memory_footprint() > 0
    assert loaded.load_seconds > 0
    assert loaded.context_length == 2048
    assert loaded.notices == []
    assert loaded.spec == loading.ModelSpec(str(tiny_model_path), device="cpu")
    assert not model.training
    assert model.generation_config.pad_token_id is not None
    assert loaded.tokenizer.convert_ids_to_tokens(model.config.eos_token_id) == "<|im_end|>"
    assert session().backend.loaded is loaded is session().backend.loaded


def test_summary_is_one_line_with_name_size_dtype_device_memory_time(kept):
    """summary() is one line naming the model, parameters, dtype, devices, attention, GiB, s."""
    line = kept.summary()
    assert "\n" not in line
    expected = (
        f"Loaded tiny-qwen2: {kept.parameters / 1e9:.2f}B parameters, float32, cpu, "
        f"attention sdpa, {kept.memory_bytes / 2**30:.2f} GiB, {kept.load_seconds:.1f} s"
    )
    assert line == expected


def test_qwen_load_prints_progress_then_the_summary(shell, tiny_model_path, capsys, no_cuda):
    """%qwen_load prints a 'Loading …' line, then the loaded model's summary as its last line."""
    shell.run_line_magic("qwen_load", f"{tiny_model_path} {CPU}")
    loaded = session().backend.loaded
    lines = output_lines(capsys)
    assert lines[0].startswith("Loading tiny-qwen2: dtype auto, device cpu, attention sdpa")
    assert lines[-1] == loaded.summary()
    assert re.fullmatch(r"Loaded tiny-qwen2: \d+\.\d\dB parameters, float32, cpu, .*", lines[-1])


def test_quiet_prints_only_the_summary(shell, tiny_model_path, capsys, no_cuda):
    """%qwen_load --quiet prints the summary line and nothing else."""
    shell.run_line_magic("qwen_load", f"{tiny_model_path} {CPU} --quiet")
    assert output_lines(capsys) == [session().backend.loaded.summary()]


# -- once per kernel ---------------------------------------------------------------------------


def test_same_spec_again_returns_the_identical_object(
    shell, tiny_model_path, capsys, no_cuda, spy_from_pretrained
):
    """A second %qwen_load with the same spec is the same object, reads nothing, says so."""
    shell.run_line_magic("qwen_load", f"{tiny_model_path} {CPU}")
    first = session().backend.loaded
    capsys.readouterr()
    model_calls = len(spy_from_pretrained["model"])

    shell.run_line_magic("qwen_load", f"{tiny_model_path} {CPU}")
    assert session().backend.loaded is first
    assert output_lines(capsys) == ["tiny-qwen2 is already loaded; nothing to do."]
    assert qwen_magic.load(str(tiny_model_path), device="cpu", progress=None) is first
    assert len(spy_from_pretrained["model"]) == model_calls


def test_different_spec_frees_the_old_model_before_loading_the_new_one(
    shell, tiny_model_path, capsys, monkeypatch, no_cuda
):
    """A different spec loads a new model; the old one is garbage before the new weights load."""
    first = qwen_magic.load(str(tiny_model_path), device="cpu", progress=None)
    old_loaded, old_model = weakref.ref(first), weakref.ref(first.model)
    del first
    alive_during_load: list[bool] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def checking(*args, **kwargs):
        gc.collect()
        alive_during_load.append(old_model() is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", checking)
    shell.run_line_magic("qwen_load", f"{tiny_model_path} {CPU} --dtype bfloat16")
    new = session().backend.loaded
    assert new is not None and new is not old_loaded()
    assert new.dtype == "bfloat16" and new.spec.dtype == "bfloat16"
    assert output_lines(capsys)[-1] == new.summary()
    assert alive_during_load == [False]  # one model at peak, not two
    gc.collect()
    assert old_loaded() is None
    assert old_model() is None


def test_reload_ext_keeps_the_loaded_model(shell, kept, tiny_model_path, capsys):
    """%reload_ext qwen_magic keeps the very same loaded model, and %qwen_load still sees it."""
    shell.run_line_magic("reload_ext", "qwen_magic")
    assert session().backend.loaded is kept
    assert session().backend.loaded is kept
    capsys.readouterr()
    shell.run_line_magic("qwen_load", f"{tiny_model_path} {CPU}")
    assert session().backend.loaded is kept
    assert "already loaded" in capsys.readouterr().out


def test_load_ext_does_not_import_torch_or_transformers():
    """%load_ext qwen_magic registers the magics without importing torch or transformers."""
    code = textwrap.dedent(
        """
        import json, sys
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "qwen_magic")
        print(json.dumps({
            "torch": "torch" in sys.modules,
            "transformers": "transformers" in sys.modules,
            "registered": ip.find_line_magic("qwen_load") is not None,
        }))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts == {"torch": False, "transformers": False, "registered": True}


# -- mistakes: one-line UsageErrors, current model kept ----------------------------------------


def _missing_path(tmp_path, tiny_path, monkeypatch):
    return str(tmp_path / "no-such-model"), [r"No such file or folder", r"Check the path"]


def _missing_gguf(tmp_path, tiny_path, monkeypatch):
    return "missing-model.gguf", [r"No such file or folder: missing-model\.gguf"]


def _folder_without_config(tmp_path, tiny_path, monkeypatch):
    folder = tmp_path / "just-weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return str(folder), [r"no config\.json", r"point at the folder that holds config\.json"]


def _file_not_gguf(tmp_path, tiny_path, monkeypatch):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    return str(path), [r"is a file but not a \.gguf model", r"give a model folder"]


def _not_a_causal_lm(tmp_path, tiny_path, monkeypatch):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    folder = tmp_path / "bert"
    BertModel(config).save_pretrained(folder)
    return str(folder), [r"is a BertModel model, not a chat \(causal language\) model", "'demo'"]


def _junk_gguf(tmp_path, tiny_path, monkeypatch):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"<html>404 Not Found</html>" * 40)
    return str(path), [r"is not a GGUF file", r"Download it again"]


def _gguf_magic_then_junk(tmp_path, tiny_path, monkeypatch):
    path = tmp_path / "y.gguf"
    path.write_bytes(b"GGUF" + b"junk" * 3)
    return str(path), [r"Could not read y\.gguf: it looks corrupt", r"Download it again"]


def _unknown_hub_id(tmp_path, tiny_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return "Qwen/No-Such-Model-7B-Instruct", [
        r"Could not get 'Qwen/No-Such-Model-7B-Instruct' from the Hugging Face Hub",
        r"local folder",
        r"'demo'",
    ]


def _device_cuda_without_gpu(tmp_path, tiny_path, monkeypatch):
    return f"{tiny_path} --dtype bfloat16 --device cuda", [r"no CUDA device", r"--device cpu"]


def _device_cuda_index_without_gpu(tmp_path, tiny_path, monkeypatch):
    return f"{tiny_path} --device cuda:1", [r"--device cuda:1 asks for a GPU", r"--device cpu"]


def _device_number_without_gpu(tmp_path, tiny_path, monkeypatch):
    return f"{tiny_path} --device 0", [r"--device 0 asks for a GPU", r"--device cpu"]


def _unknown_device(tmp_path, tiny_path, monkeypatch):
    return f"{tiny_path} --device gpu", [r"Unknown device 'gpu'", r"use auto, cpu, cuda"]


def _bad_json_device_map(tmp_path, tiny_path, monkeypatch):
    return f"""{tiny_path} --device '{{"": cpu'""", [r"is not valid JSON for a device_map"]


def _unknown_dtype(tmp_path, tiny_path, monkeypatch):
    return f"{tiny_path} --dtype int8", [r"invalid choice: 'int8'", r"bfloat16"]


def _unknown_attention(tmp_path, tiny_path, monkeypatch):
    return f"{tiny_path} --attention flash3", [r"invalid choice: 'flash3'", r"sdpa"]


def _unknown_option(tmp_path, tiny_path, monkeypatch):
    return f"{tiny_path} --frobnicate", [r"unrecognized arguments: --frobnicate"]


def _unbalanced_quote(tmp_path, tiny_path, monkeypatch):
    return f"'{tiny_path}", [r"Could not read the options", r"check the quotes"]


def _not_enough_memory(tmp_path, tiny_path, monkeypatch):
    padded = linked_copy(tiny_path, tmp_path / "padded")
    with open(padded / "extra.safetensors", "wb") as sparse:
        sparse.truncate(4 * 2**30)  # 4 GiB on paper, no disk used
    monkeypatch.setattr(devices, "available_memory_bytes", lambda on_cuda: 1024)
    return str(padded), [r"Not enough memory for .*padded", r"about 4\.0 GiB", r"--dtype bfloat16"]


ERROR_CASES = {
    "missing path": _missing_path,
    "missing gguf": _missing_gguf,
    "folder without config.json": _folder_without_config,
    "file that is not gguf": _file_not_gguf,
    "not a causal LM": _not_a_causal_lm,
    "junk .gguf": _junk_gguf,
    "GGUF magic then junk": _gguf_magic_then_junk,
    "unknown hub id offline": _unknown_hub_id,
    "--device cuda without GPU": _device_cuda_without_gpu,
    "--device cuda:1 without GPU": _device_cuda_index_without_gpu,
    "--device 0 without GPU": _device_number_without_gpu,
    "unknown --device": _unknown_device,
    "bad JSON device map": _bad_json_device_map,
    "unknown --dtype": _unknown_dtype,
    "unknown --attention": _unknown_attention,
    "unknown option": _unknown_option,
    "unbalanced quote": _unbalanced_quote,
    "not enough memory": _not_enough_memory,
}


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_mistake_is_a_one_line_usage_error_and_keeps_the_model(
    case, shell, kept, tiny_model_path, tmp_path, monkeypatch, no_cuda, spy_from_pretrained
):
    """Each mistake is one UsageError line naming the fix; no weights load; the model stays."""
    line, patterns = case(tmp_path, tiny_model_path, monkeypatch)
    message = usage_error(shell.run_line_magic, "qwen_load", line)
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    assert spy_from_pretrained["model"] == []
    assert_usable(kept)


def test_truncated_real_gguf_is_a_usage_error(kept, tmp_path, no_cuda):
    """A download of the demo GGUF cut off after 1 MB is a UsageError saying to download again."""
    from qwen_magic.backends.kernel.demo_model import part_paths

    truncated = tmp_path / "cut.gguf"
    with open(part_paths()[0], "rb") as part:
        truncated.write_bytes(part.read(1_000_000))  # header and part of the metadata
    message = usage_error(qwen_magic.load, str(truncated), device="cpu", progress=None)
    assert "Could not read cut.gguf: it looks corrupt" in message
    assert "Download it again" in message
    assert_usable(kept)


def test_api_mistakes_are_usage_errors(kept, tiny_model_path):
    """load() refuses a blank model name and an unknown dtype or attention, keeping the model."""
    path = str(tiny_model_path)
    assert "Give a model" in usage_error(qwen_magic.load, "   ", progress=None)
    assert "Unknown dtype 'int8'" in usage_error(qwen_magic.load, path, dtype="int8")
    assert "Unknown attention 'x'" in usage_error(qwen_magic.load, path, attention="x")
    assert_usable(kept)


def test_memory_of_the_current_model_counts_as_free(kept, tiny_model_path, monkeypatch, no_cuda):
    """A model that fits only once the current one is released is loaded; one byte less is not."""
    needed = stored_weight_bytes(tiny_model_path)  # bfloat16 of float32 files: counted as stored
    free = {"bytes": needed - kept.memory_bytes - 1}
    monkeypatch.setattr(devices, "available_memory_bytes", lambda on_cuda: free["bytes"])
    path = str(tiny_model_path)

    message = usage_error(qwen_magic.load, path, device="cpu", dtype="bfloat16", progress=None)
    assert message.startswith("Not enough memory")
    assert_usable(kept)

    free["bytes"] += 1
    loaded = qwen_magic.load(path, device="cpu", dtype="bfloat16", progress=None)
    assert loaded is not kept and loaded.dtype == "bfloat16"


def test_float32_of_half_precision_weights_needs_twice_the_files(
    kept, tiny_model_path, tmp_path, monkeypatch, no_cuda
):
    """--dtype float32 of bfloat16-stored weights is estimated at twice the file size."""
    half = linked_copy(tiny_model_path, tmp_path / "half")
    config = json.loads((half / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (half / "config.json").write_text(json.dumps(config))
    stored = stored_weight_bytes(half)
    free = 2 * stored - kept.memory_bytes - 1  # one byte short of the float32 estimate
    monkeypatch.setattr(devices, "available_memory_bytes", lambda on_cuda: free)

    message = usage_error(qwen_magic.load, str(half), device="cpu", dtype="float32")
    assert f"about {2 * stored / 2**30:.1f} GiB" in message
    assert_usable(kept)
    loaded = qwen_magic.load(str(half), device="cpu", dtype="bfloat16", progress=None)
    assert loaded.dtype == "bfloat16"


def test_out_of_memory_while_loading_releases_and_says_what_to_try(
    shell, tiny_model_path, monkeypatch, no_cuda
):
    """A CUDA OOM in from_pretrained is a UsageError saying the old model went and what to try."""
    import torch

    first = qwen_magic.load(str(tiny_model_path), device="cpu", progress=None)
    old_model = weakref.ref(first.model)
    del first

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", out_of_memory)
    with pytest.raises(UsageError) as info:  # kept alive, as IPython keeps sys.last_traceback
        shell.run_line_magic("qwen_load", f"{tiny_model_path} --dtype float16")
    assert type(info.value) in (UsageError, QwenMagicError)  # a magic's, or the Python API's
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("Out of memory while loading tiny-qwen2 (float16 on auto)")
    assert "the previous model was released" in message
    assert "--dtype bfloat16" in message and "smaller model" in message
    assert getattr(session().backend, "loaded", None) is None
    gc.collect()
    assert old_model() is None  # really released, even while the error's traceback is alive
    assert info.tb is not None


@pytest.mark.parametrize(
    ("error", "is_oom"),
    [
        (MemoryError(), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("size mismatch for lm_head.weight"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_out_of_memory_is_recognised_in_its_forms(error, is_oom):
    """torch's OOM, MemoryError and the CPU allocator's RuntimeError count as out of memory."""
    import torch

    assert loading.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert loading.is_out_of_memory(error) is is_oom


def test_other_errors_from_from_pretrained_are_not_disguised(
    fresh_state, tiny_model_path, monkeypatch, no_cuda
):
    """An unexpected failure while loading weights propagates as itself, not as a UsageError."""

    class Boom(Exception):
        pass

    def boom(*args, **kwargs):
        raise Boom("weights exploded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(Boom, match="weights exploded"):
        qwen_magic.load(str(tiny_model_path), device="cpu", progress=None)


def test_no_model_yet_says_to_run_qwen_load(fresh_state):
    """Without a model, require_current() says to run %qwen_load and release() is False."""
    assert getattr(session().backend, "loaded", None) is None
    assert "%qwen_load" in usage_error(session().require_backend)
    assert session().release() is False


def test_release_drops_the_model(kept):
    """release() forgets the kernel's model and reports that there was one."""
    assert session().release() is True
    assert getattr(session().backend, "loaded", None) is None


# -- attention and dtype notices ---------------------------------------------------------------


def test_flash_attention_on_cpu_falls_back_to_sdpa_with_a_note(
    shell, tiny_model_path, capsys, no_cuda
):
    """flash_attention_2 without CUDA loads with sdpa and %qwen_load prints one 'Note:' line."""
    shell.run_line_magic("qwen_load", f"{tiny_model_path} {CPU} --attention flash_attention_2")
    loaded = session().backend.loaded
    notice = "flash_attention_2 is unavailable (no CUDA device); using sdpa instead."
    assert loaded.notices == [notice]
    assert loaded.attention == "sdpa" == loaded.model.config._attn_implementation
    lines = output_lines(capsys)
    assert [line for line in lines if line.startswith("Note:")] == [f"Note: {notice}"]
    assert lines[-1] == loaded.summary()


def test_attention_choice_without_flash_attn_installed():
    """With CUDA but no flash-attn package, auto picks sdpa and an explicit request says why."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    notices: list[str] = []
    assert devices.choose_attention("auto", True, notices) == "sdpa"
    assert devices.choose_attention("eager", True, notices) == "eager"
    assert notices == []
    assert devices.choose_attention("flash_attention_2", True, notices) == "sdpa"
    assert notices == ["flash_attention_2 is unavailable (the flash-attn package is not installed);"
                       " using sdpa instead."]  # fmt: skip


def test_float16_on_cpu_is_planned_with_a_note(tiny_model_path, no_cuda):
    """--dtype float16 on CPU is allowed, with a notice recommending bfloat16 or float32."""
    import torch

    spec = loading.ModelSpec(str(tiny_model_path), dtype="float16", device="cpu")
    plan = loading.check(spec, print)
    assert plan.torch_dtype is torch.float16
    assert plan.notices == ["float16 is slow on CPU; bfloat16 or float32 is the better choice."]


@pytest.mark.parametrize(
    ("device", "device_map"),
    [
        ("cpu", "cpu"),
        ("auto", "cpu"),  # no GPU here
        (" cpu ", "cpu"),
        ('{"": "cpu"}', {"": "cpu"}),
        ('{"model": "cpu", "lm_head": "cpu"}', {"model": "cpu", "lm_head": "cpu"}),
        ("balanced", "balanced"),
        ("sequential", "sequential"),
    ],
)
def test_device_option_becomes_the_device_map(device, device_map, tiny_model_path, no_cuda):
    """--device is turned into from_pretrained's device_map (JSON is parsed)."""
    spec = loading.ModelSpec(str(tiny_model_path), device=device)
    assert loading.check(spec, print).device_map == device_map


def test_json_device_map_loads_on_that_device(shell, tiny_model_path, no_cuda):
    """A JSON --device is passed on as the device_map: '{"": "cpu"}' puts every layer on cpu."""
    shell.run_line_magic("qwen_load", f"""{tiny_model_path} --device '{{"": "cpu"}}'""")
    loaded = session().backend.loaded
    assert loaded.devices == ["cpu"]
    assert loaded.spec.device == '{"": "cpu"}'


# -- which model, and what from_pretrained is told ---------------------------------------------


@pytest.mark.parametrize(("cuda", "expected"), [(False, "demo"), (True, "Qwen/Qwen2-7B-Instruct")])
def test_default_model_depends_on_cuda(cuda, expected, monkeypatch):
    """Without $QWEN_MAGIC_MODEL the default is Qwen2-7B-Instruct with CUDA, else the demo."""
    monkeypatch.delenv("QWEN_MAGIC_MODEL", raising=False)
    monkeypatch.setattr(devices, "cuda_available", lambda: cuda)
    assert loading.default_model_name() == expected


@pytest.mark.parametrize("cuda", [False, True])
def test_env_var_wins_over_the_default(cuda, monkeypatch):
    """$QWEN_MAGIC_MODEL (stripped) is the default whether or not CUDA is there; blank is unset."""
    monkeypatch.setattr(devices, "cuda_available", lambda: cuda)
    monkeypatch.setenv("QWEN_MAGIC_MODEL", "  /models/my-qwen  ")
    assert loading.default_model_name() == "/models/my-qwen"
    monkeypatch.setenv("QWEN_MAGIC_MODEL", "   ")
    assert loading.default_model_name() == ("Qwen/Qwen2-7B-Instruct" if cuda else "demo")


def test_cuda_available_matches_torch():
    """cuda_available() is torch's own answer."""
    import torch

    assert devices.cuda_available() is torch.cuda.is_available()


def test_load_without_a_model_uses_the_env_var(fresh_state, tiny_model_path, monkeypatch, no_cuda):
    """load() with no model loads $QWEN_MAGIC_MODEL."""
    monkeypatch.setenv("QWEN_MAGIC_MODEL", str(tiny_model_path))
    loaded = qwen_magic.load(device="cpu", progress=None)
    assert loaded.spec.model == str(tiny_model_path) and loaded.name == "tiny-qwen2"


def test_bare_qwen_load_says_which_model_it_chose_and_why(
    shell, tiny_model_path, capsys, monkeypatch, no_cuda
):
    """A bare %qwen_load names the model it picked and the reason, in one line."""
    monkeypatch.setenv("QWEN_MAGIC_MODEL", str(tiny_model_path))
    shell.run_line_magic("qwen_load", "--device cpu")
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"No model named: using {tiny_model_path} (from $QWEN_MAGIC_MODEL)."
    monkeypatch.delenv("QWEN_MAGIC_MODEL")
    assert "offline demo" in loading.default_model_reason()


def test_config_makes_a_bare_qwen_load_load_that_model(
    shell, tiny_model_path, capsys, monkeypatch, no_cuda
):
    """%config QwenMagics.model/dtype/device set what a bare %qwen_load loads (over the env var)."""
    monkeypatch.setenv("QWEN_MAGIC_MODEL", str(tiny_model_path / "not-this-one"))
    shell.run_line_magic("config", f"QwenMagics.model = {str(tiny_model_path)!r}")
    shell.run_line_magic("config", "QwenMagics.dtype = 'bfloat16'")
    shell.run_line_magic("config", "QwenMagics.device = 'cpu'")
    try:
        shell.run_line_magic("qwen_load", "")
    finally:
        shell.run_line_magic("config", "QwenMagics.model = ''")
        shell.run_line_magic("config", "QwenMagics.dtype = 'auto'")
        shell.run_line_magic("config", "QwenMagics.device = 'auto'")
    loaded = session().backend.loaded
    assert loaded.spec == loading.ModelSpec(str(tiny_model_path), dtype="bfloat16", device="cpu")
    assert loaded.dtype == "bfloat16" and loaded.devices == ["cpu"]
    assert capsys.readouterr().out.rstrip().endswith(loaded.summary())


def test_help_lists_every_option(shell):
    """%qwen_load? shows the manual: every option of the magic is in its docstring."""
    doc = shell.find_line_magic("qwen_load").__doc__
    for option in ("--dtype", "--device", "--attention", "--revision", "--trust-remote-code"):
        assert option in doc
    for word in ("demo", "bfloat16", "flash_attention_2", "balanced"):
        assert word in doc


def test_trust_remote_code_is_off_unless_asked(
    shell, tiny_model_path, spy_from_pretrained, no_cuda
):
    """Config, tokenizer and model get trust_remote_code=False, and True only with the flag."""
    shell.run_line_magic("qwen_load", str(tiny_model_path))
    (call,) = spy_from_pretrained["model"]  # and the rest of Qwen2's recipe, as on CPU
    assert call["args"] == (str(tiny_model_path),)
    assert (call["dtype"], call["device_map"], call["attn_implementation"]) == (
        "auto",
        "cpu",
        "sdpa",
    )
    assert call["gguf_file"] is None and call["revision"] is None
    for key in ("config", "tokenizer", "model"):
        flags = {call.get("trust_remote_code") for call in spy_from_pretrained[key]}
        assert flags == {False}, key
        spy_from_pretrained[key].clear()

    shell.run_line_magic("qwen_load", f"{tiny_model_path} --trust-remote-code")
    assert session().backend.loaded.spec.trust_remote_code is True
    for key in ("config", "tokenizer", "model"):
        assert spy_from_pretrained[key], key
        assert {call.get("trust_remote_code") for call in spy_from_pretrained[key]} == {True}, key


def test_from_pretrained_gets_device_map_auto_with_a_gpu(
    fresh_state, tiny_model_path, monkeypatch, spy_from_pretrained
):
    """With a GPU (simulated), --device auto asks transformers for device_map='auto'."""

    class Stop(Exception):
        pass

    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(devices, "available_memory_bytes", lambda on_cuda: 2**40)

    def stop(*args, **kwargs):
        spy_from_pretrained["model"].append(kwargs)
        raise Stop  # this machine has no GPU to load onto

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", stop)
    with pytest.raises(Stop):
        qwen_magic.load(str(tiny_model_path), progress=None)
    (call,) = spy_from_pretrained["model"]
    assert call["device_map"] == "auto" and call["dtype"] == "auto"
