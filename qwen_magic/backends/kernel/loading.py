"""Turn a model spec into a loaded model, once per kernel.

A :class:`ModelSpec` names what to load: a hub id (``Qwen/Qwen2-7B-Instruct``), a local Hugging
Face folder, a ``.gguf`` file, or ``demo`` (the offline demo model, see ``demo_model``), plus how
(dtype, device, attention, revision, trust_remote_code, and ``quantize``: the weights kept in 8 or 4
bits, see :mod:`qwen_magic.backends.kernel.quantize.formats`). :func:`load_model` returns a
:class:`LoadedModel`: the spec is checked first (path, config, device, memory), so a mistake
leaves the current model usable; only then is room made (the kernel's session releases the old
model: references dropped, ``gc``, CUDA cache emptied) and the weights loaded. Keeping one model
per kernel, and the same spec again being a no-op, is the session's rule
(:mod:`qwen_magic.session`).

Loading follows Qwen2's own recipe: ``AutoModelForCausalLM.from_pretrained(id, dtype="auto",
device_map="auto")`` on CUDA, the tokenizer from the same place, ``trust_remote_code`` off
unless asked for. Every user mistake is a one-line ``QwenMagicError`` that says the fix.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_magic.backends.kernel import devices
from qwen_magic.backends.kernel.devices import (
    check_memory,
    choose_attention,
    device_map_for,
    free_memory,
    is_out_of_memory,
)
from qwen_magic.backends.kernel.quantize.formats import FORMATS as QUANTIZE_FORMATS
from qwen_magic.errors import QwenMagicError

DEFAULT_GPU_MODEL = "Qwen/Qwen2-7B-Instruct"
MODEL_ENV_VAR = "QWEN_MAGIC_MODEL"
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTIONS = ("auto", "sdpa", "flash_attention_2", "eager")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how; two equal specs mean the same loaded model."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    attention: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    #: Weight-only quantization: "none", "int8" or "int4" (see ``backends.kernel.quantize``).
    quantize: str = "none"

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise QwenMagicError("Give a model: a hub id, a local folder, a .gguf file, or 'demo'.")
        if self.dtype not in DTYPES:
            raise QwenMagicError(
                f"Unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}."
            )
        if self.attention not in ATTENTIONS:
            raise QwenMagicError(
                f"Unknown attention {self.attention!r}; choose one of {', '.join(ATTENTIONS)}."
            )
        if self.quantize not in QUANTIZE_FORMATS:
            raise QwenMagicError(
                f"Unknown --quantize {self.quantize!r}; choose one of "
                f"{', '.join(QUANTIZE_FORMATS)}."
            )


@dataclass
class LoadedModel:
    """A model and its tokenizer, ready to generate, with the facts the summary line shows."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    name: str
    source: str
    dtype: str
    devices: list[str]
    attention: str
    parameters: int
    memory_bytes: int
    load_seconds: float
    notices: list[str] = field(default_factory=list)
    #: "none", "int8" or "int4": how the linear layers' weights are stored.
    quantization: str = "none"
    #: How the quantized weights are stored and multiplied, in a few words ("" if none).
    quantization_method: str = ""

    @property
    def device(self) -> Any:
        """Where inputs go: the device of the input embeddings."""
        return self.model.get_input_embeddings().weight.device

    @property
    def context_length(self) -> int:
        """The most tokens (prompt + reply) the model attends to."""
        return int(getattr(self.model.config, "max_position_embeddings", 32768))

    def summary(self) -> str:
        """One line: name, parameters, dtype (and quantization), device(s), memory, seconds."""
        dtype = self.dtype
        if self.quantization != "none":
            dtype = f"{self.quantization_method}, {self.dtype} activations"
        return (
            f"Loaded {self.name}: {self.parameters / 1e9:.2f}B parameters, {dtype}, "
            f"{'+'.join(self.devices)}, attention {self.attention}, "
            f"{self.memory_bytes / 2**30:.2f} GiB, {self.load_seconds:.1f} s"
        )


def default_model_name() -> str:
    """``$QWEN_MAGIC_MODEL``, else Qwen2-7B-Instruct with CUDA, else the offline demo model."""
    if from_env := os.environ.get(MODEL_ENV_VAR, "").strip():
        return from_env
    return DEFAULT_GPU_MODEL if devices.cuda_available() else "demo"


def default_model_reason() -> str:
    """Why :func:`default_model_name` chose what it chose, in a few words."""
    if os.environ.get(MODEL_ENV_VAR, "").strip():
        return f"from ${MODEL_ENV_VAR}"
    if devices.cuda_available():
        return "a CUDA GPU is available"
    return "no CUDA GPU here, so the offline demo model"


def model_spec(
    model: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    attention: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    quantize: str = "none",
) -> ModelSpec:
    """The spec for ``model`` (default: :func:`default_model_name`) and how to load it."""
    return ModelSpec(
        model=(model or default_model_name()).strip(),
        dtype=dtype,
        device=device,
        attention=attention,
        revision=revision,
        trust_remote_code=trust_remote_code,
        quantize=quantize,
    )


def load_model(
    spec: ModelSpec,
    *,
    progress: Progress | None = print,
    make_room: Callable[[], None] = lambda: None,
    freed_bytes: int = 0,
) -> LoadedModel:
    """Check ``spec`` without the weights, call ``make_room`` (e.g. release the model loaded
    now, whose ``freed_bytes`` then count as free), and load the weights.

    Every mistake that can be found before loading raises first, so ``make_room`` is called
    only for a load that can start.
    """
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    plan = check(spec, say, freed_bytes=freed_bytes)
    make_room()
    loaded = _load_weights(spec, plan, say)
    loaded.load_seconds = time.perf_counter() - started
    return loaded


@dataclass
class _Plan:
    """The checked, resolved instructions for ``from_pretrained``."""

    path: str
    gguf_file: str | None
    name: str
    source: str
    torch_dtype: Any
    device_map: Any
    attention: str
    notices: list[str]
    on_cuda: bool = False


def check(spec: ModelSpec, say: Progress, *, freed_bytes: int = 0) -> _Plan:
    """Resolve and check a spec without loading weights; raise ``QwenMagicError`` on any mistake."""
    import torch

    notices: list[str] = []
    path, gguf_file, name, source = _resolve_source(spec, say)
    config = _load_config(spec, path, gguf_file)
    _check_causal_lm(config, spec.model)

    device_map = device_map_for(spec.device)
    on_cuda = device_map not in ("cpu", None) and devices.cuda_available()

    if spec.dtype == "auto":
        # GGUF weights are quantized; dequantize to bf16 rather than transformers' fp32 default.
        torch_dtype: Any = torch.bfloat16 if gguf_file else "auto"
    else:
        torch_dtype = getattr(torch, spec.dtype)
        if spec.dtype == "float16" and not on_cuda:
            notices.append("float16 is slow on CPU; bfloat16 or float32 is the better choice.")

    attention = choose_attention(spec.attention, on_cuda, notices)
    if spec.quantize != "none":
        from qwen_magic.backends.kernel.quantize.formats import check_format

        check_format(spec.quantize, on_cuda)
        if on_cuda and device_map != "auto" and not isinstance(device_map, (str, int)):
            notices.append("quantizing a model spread by a device map is untested.")
    check_memory(path, gguf_file, spec, on_cuda, freed_bytes)
    return _Plan(
        path, gguf_file, name, source, torch_dtype, device_map, attention, notices, on_cuda
    )


def _resolve_source(spec: ModelSpec, say: Progress) -> tuple[str, str | None, str, str]:
    """Return (path or hub id, gguf file name, display name, source description)."""
    text = spec.model
    if text == "demo":
        from qwen_magic.backends.kernel.demo_model import DEMO_NAME, ensure_demo_model

        folder = ensure_demo_model(progress=say)
        return str(folder), None, f"{DEMO_NAME} (offline demo)", str(folder)
    expanded = Path(text).expanduser()
    if expanded.exists():
        if expanded.is_file():
            if expanded.suffix != ".gguf":
                raise QwenMagicError(
                    f"{text} is a file but not a .gguf model; give a model folder, a .gguf file, "
                    "a hub id, or 'demo'."
                )
            _check_gguf_magic(expanded)
            return str(expanded.parent), expanded.name, expanded.stem, str(expanded)
        if not (expanded / "config.json").is_file():
            raise QwenMagicError(
                f"{text} has no config.json, so it is not a Hugging Face model folder; "
                "point at the folder that holds config.json and the weights."
            )
        return str(expanded), None, expanded.name, str(expanded)
    if text.startswith(("/", ".", "~")) or text.endswith(".gguf") or text.count("/") > 1:
        raise QwenMagicError(f"No such file or folder: {text}. Check the path (or use 'demo').")
    return text, None, text, f"hub:{text}" + (f"@{spec.revision}" if spec.revision else "")


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise QwenMagicError(
            f"{path} is not a GGUF file (it does not start with 'GGUF'); it may be truncated "
            "or another format. Download it again."
        )


def _load_config(spec: ModelSpec, path: str, gguf_file: str | None) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            path,
            gguf_file=gguf_file,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
        )
    except Exception as error:
        if gguf_file:  # a damaged GGUF header fails in the parser with any error (struct.error)
            raise QwenMagicError(
                f"Could not read {gguf_file}: it looks corrupt or is not a supported model "
                f"({_first_line(error)}). Download it again."
            ) from error
        if not isinstance(error, (OSError, ValueError, KeyError, RuntimeError)):
            raise
        if Path(path).exists():
            raise QwenMagicError(
                f"Could not read the model config in {path} ({_first_line(error)})."
            ) from error
        if "trust_remote_code" in str(error):
            raise QwenMagicError(
                f"{path} needs custom code from its repository; if you trust it, add "
                "--trust-remote-code."
            ) from error
        raise QwenMagicError(
            f"Could not get {path!r} from the Hugging Face Hub (unknown id, private, or no "
            "network). Check the id, log in with `hf auth login`, or use a local folder, "
            "a .gguf file, or 'demo'."
        ) from error


def _check_causal_lm(config: Any, model: str) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    causal_names = set()
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal_names.update([names] if isinstance(names, str) else names)
    if any(a in causal_names or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return
    # The saved architectures decide (a BertModel folder is no chat model, although Bert has a
    # causal-LM class); only a config that names none falls back to its type.
    if not architectures and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return
    kind = ", ".join(architectures) or getattr(config, "model_type", "unknown")
    raise QwenMagicError(
        f"{model} is a {kind} model, not a chat (causal language) model; load a Qwen2 "
        "instruct model such as Qwen/Qwen2-7B-Instruct or 'demo'."
    )


def _load_weights(spec: ModelSpec, plan: _Plan, say: Progress) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    quantized = spec.quantize != "none"
    say(
        f"Loading {plan.name}: dtype {spec.dtype}, device {spec.device}, "
        f"attention {plan.attention}" + (f", quantize {spec.quantize}" if quantized else "") + "…"
    )
    common = {
        "gguf_file": plan.gguf_file,
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
    }
    # transformers' weight-loading bar would land in saved notebooks as a widget; we print our own
    # lines instead. Hub downloads (huggingface_hub's bars) still show.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(plan.path, **common)
        if quantized:
            from qwen_magic.backends.kernel.quantize.cache import load_quantized

            model, quantize_notes = load_quantized(
                path=plan.path,
                gguf_file=plan.gguf_file,
                name=plan.name,
                fmt=spec.quantize,
                dtype=plan.torch_dtype,
                device_map=plan.device_map,
                on_cuda=plan.on_cuda,
                attention=plan.attention,
                common=common,
                say=say,
            )
            plan.notices.extend(quantize_notes)
            if not plan.on_cuda:  # prompts read at bf16 speed (quantized_prefill.py)
                from qwen_magic.backends.kernel.quantize.prefill import use_many_row_prefill

                use_many_row_prefill(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                plan.path,
                dtype=plan.torch_dtype,
                device_map=plan.device_map,
                attn_implementation=plan.attention,
                **common,
            )
    except Exception as error:
        if is_out_of_memory(error):
            # The old model went before loading began; what is left is the partial new one.
            free_memory()
            raise QwenMagicError(
                f"Out of memory while loading {plan.name} ({spec.dtype} on {spec.device}); the "
                "previous model was released. Try --dtype bfloat16, a smaller model, or "
                "--device auto to spread it over GPU and CPU."
            ) from error
        if isinstance(error, (OSError, ValueError)) and plan.gguf_file:
            raise QwenMagicError(
                f"Could not load {plan.gguf_file}: {_first_line(error)}. The file may be corrupt."
            ) from error
        raise
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id

    device_map = getattr(model, "hf_device_map", None)
    devices = sorted({str(d) for d in device_map.values()}) if device_map else [str(model.device)]
    if quantized:
        from qwen_magic.backends.kernel.quantize.formats import describe_format, weight_bytes

        memory_bytes, method = weight_bytes(model), describe_format(spec.quantize, plan.on_cuda)
    else:
        memory_bytes, method = int(model.get_memory_footprint()), ""
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        name=plan.name,
        source=plan.source,
        dtype=str(model.dtype).removeprefix("torch."),
        devices=devices,
        attention=str(getattr(model.config, "_attn_implementation", plan.attention)),
        parameters=model.num_parameters(),
        memory_bytes=memory_bytes,
        load_seconds=0.0,
        notices=plan.notices,
        quantization=spec.quantize,
        quantization_method=method,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
