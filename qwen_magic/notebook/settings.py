"""The magics' defaults: config traits, set with ``%config QwenMagics.NAME = value``.

They live on :class:`MagicsSettings`, the base of :class:`~qwen_magic.notebook.magics.QwenMagics`
(traitlets applies a section's config to the traits a class inherits, so ``%config QwenMagics``
lists them all and ``ipython_config.py`` sets them as ``c.QwenMagics.NAME``). An option given
in a cell wins over its trait; :meth:`MagicsSettings._options` merges the two into one reply's
:class:`~qwen_magic.options.GenerationOptions`.
"""

from __future__ import annotations

from typing import Any

from IPython.core.magic import Magics
from traitlets import Bool, CFloat, CInt, Enum, Unicode

from qwen_magic.backends.kernel import loading
from qwen_magic.conversation import DEFAULT_SYSTEM_PROMPT
from qwen_magic.options import DEFAULT_FAST_CACHE_TOKENS, GenerationOptions


class MagicsSettings(Magics):
    """Every default of the magics, as a config trait."""

    model = Unicode(
        "",
        help="Model %qwen_load uses when none is given (empty: $QWEN_MAGIC_MODEL, else "
        "Qwen/Qwen2-7B-Instruct with CUDA, else the offline demo).",
    ).tag(config=True)
    server = Unicode(
        "",
        help="OpenAI-compatible server a bare %qwen_load connects to (empty: "
        "$QWEN_MAGIC_SERVER, else load a model in the kernel).",
    ).tag(config=True)
    dtype = Enum(loading.DTYPES, "auto", help="Default --dtype for %qwen_load.").tag(config=True)
    device = Unicode("auto", help="Default --device for %qwen_load.").tag(config=True)
    attention = Enum(loading.ATTENTIONS, "auto", help="Default --attention.").tag(config=True)
    quantize = Enum(
        loading.QUANTIZE_FORMATS,
        "none",
        help="Default --quantize for %qwen_load: none, int8 or int4 weight-only (torchao).",
    ).tag(config=True)
    max_new_tokens = CInt(512, help="Default --max-new-tokens for %%qwen.").tag(config=True)
    temperature = CFloat(None, allow_none=True, help="Default --temperature.").tag(config=True)
    top_p = CFloat(None, allow_none=True, help="Default --top-p.").tag(config=True)
    top_k = CInt(None, allow_none=True, help="Default --top-k.").tag(config=True)
    repetition_penalty = CFloat(None, allow_none=True, help="Default --repetition-penalty.").tag(
        config=True
    )
    greedy = Bool(None, allow_none=True, help="True: greedy; False: sample; None: model's.").tag(
        config=True
    )
    system_prompt = Unicode(DEFAULT_SYSTEM_PROMPT, help="System prompt of new conversations.").tag(
        config=True
    )
    view = Enum(("auto", "widget", "text"), "auto", help="Where replies stream.").tag(config=True)
    approval = Enum(
        ("auto", "buttons", "prompt"),
        "auto",
        help="How %%qwen --run asks before each step's code runs: buttons under the cell "
        "(auto: where replies stream into widgets; never in a terminal) or a text prompt "
        "(the kernel's stdin, or the terminal).",
    ).tag(config=True)
    history_file = Unicode(
        "",
        help="Where to save conversations after each turn; empty: beside the notebook "
        "(NAME.qwen.json) when the frontend names it, else nowhere.",
    ).tag(config=True)
    autosave = Bool(True, help="Save conversations after every turn.").tag(config=True)
    reuse_cache = Bool(
        True, help="Keep each conversation's KV cache so a follow-up prefills only new tokens."
    ).tag(config=True)
    fast = Bool(
        False,
        help="Fast mode for every %%qwen cell (as --fast): a static KV cache, and the decoding "
        "step compiled with torch.compile on CUDA.",
    ).tag(config=True)
    fast_cache_tokens = CInt(
        DEFAULT_FAST_CACHE_TOKENS,
        help="Fast mode's static cache size in tokens (prompt + reply), at most the model's "
        "context; allocated once per model, so changing it recompiles.",
    ).tag(config=True)
    prompt_lookup = Enum(
        ("auto", "on", "off"),
        "auto",
        help="Prompt-lookup decoding in this kernel (as --lookup / --no-lookup): drafts the "
        "reply from the prompt and checks several tokens per pass, faster for edits. auto: "
        "greedy replies of an int8/int4 model on the CPU, whose ids it provably keeps.",
    ).tag(config=True)
    context_tokens = CInt(
        0,
        help="The most context one %%qwen may read (a prompt is fitted into the smaller of this "
        "and the model's context; the oldest turns are left out). 0: 8192 for a model on the "
        "CPU (reading 8192 tokens there takes about a minute and a half), the model's whole "
        "context on a GPU or a server.",
    ).tag(config=True)
    redraw_seconds = CFloat(
        0.15, help="Least time between two redraws of a streaming reply in the notebook."
    ).tag(config=True)

    def _options(self, args: Any, greedy: bool | None) -> GenerationOptions:
        def pick(name: str, default: Any) -> Any:
            value = getattr(args, name, None)  # %qwen_error has fewer options than %%qwen
            return default if value is None else value

        return GenerationOptions(
            max_new_tokens=pick("max_new_tokens", self.max_new_tokens),
            do_sample=None if greedy is None else not greedy,
            temperature=pick("temperature", self.temperature),
            top_p=pick("top_p", self.top_p),
            top_k=pick("top_k", self.top_k),
            repetition_penalty=pick("repetition_penalty", self.repetition_penalty),
            seed=getattr(args, "seed", None),
            fast=getattr(args, "fast", False) or self.fast,
            fast_cache_tokens=self.fast_cache_tokens,
            prompt_lookup=(
                "on"
                if getattr(args, "lookup", False)
                else "off"
                if getattr(args, "no_lookup", False)
                else self.prompt_lookup
            ),
        )
