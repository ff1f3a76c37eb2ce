"""How the magics read their lines: shared option declarations, parsing, one-line errors.

Every option is declared with IPython's ``magic_arguments``, so ``%%qwen?`` prints the manual and
a bad flag is a one-line ``UsageError``. Options that ``%%qwen`` and ``%qwen_error`` share are
declared once here (:data:`MAX_NEW_TOKENS` …) and stacked on both. Lines are split like a
shell's (quotes group words), never with ``str.split``; :func:`split_instruction` leaves the
free text after the options as written.
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, argument_group

from qwen_magic.backends.kernel import loading
from qwen_magic.conversation import DEFAULT_NAME
from qwen_magic.errors import QwenMagicError
from qwen_magic.notebook import last_error


def one_line_errors(magic: Callable[..., Any]) -> Callable[..., Any]:
    """Show the project's mistakes as IPython shows its own: one ``UsageError`` line.

    IPython hides the traceback only for ``UsageError`` itself, not for subclasses such as
    :class:`~qwen_magic.errors.QwenMagicError`, so each magic re-raises them as the base class.
    Such a mistake, or an interrupted reply, is noted so ``%qwen_error`` passes over it.
    """

    @functools.wraps(magic)
    def reporting(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return magic(self, *args, **kwargs)
        except QwenMagicError as error:
            shown = last_error.mark_own_error(UsageError(str(error)))
            last_error.note_magic_error(self.shell, shown, self.session.magic_errors)
            raise shown from error
        except (UsageError, KeyboardInterrupt) as error:  # a bad option; an interrupted reply
            last_error.mark_own_error(error)
            last_error.note_magic_error(self.shell, error, self.session.magic_errors)
            raise

    return reporting


def current_cell_id(shell: Any) -> str | None:
    """The id JupyterLab sends with the running cell; None where the frontend sends none."""
    kernel = getattr(shell, "kernel", None)
    try:
        parent = kernel.get_parent() if kernel is not None else None
    except Exception:  # older ipykernel, or no request in flight
        return None
    metadata = (parent or {}).get("metadata") or {}
    cell_id = metadata.get("cellId")
    return str(cell_id) if cell_id else None


def parse_argstring(magic: Any, line: str) -> Any:
    """Parse a magic's line like a shell would: quotes group words and are removed."""
    try:
        argv = shlex.split(line)
    except ValueError as error:
        raise QwenMagicError(f"Could not read the options ({error}); check the quotes.") from error
    return magic.parser.parse_args(argv)


def split_instruction(magic: Any, line: str) -> tuple[Any, str]:
    """Parse the options at the start of ``line``; the words after them are a free-text
    instruction, taken as written (an apostrophe in "don't" is no unclosed quote)."""
    takes_value = {
        option
        for action in magic.parser._actions
        if action.option_strings and action.nargs != 0
        for option in action.option_strings
    }
    position, expect_value = 0, False
    for match in re.finditer(r"""\s*("[^"]*"|'[^']*'|\S+)""", line):
        token = match.group(1)
        if expect_value:
            expect_value = False
        elif token == "--":
            return parse_argstring(magic, line[: match.start()]), line[match.end() :].strip()
        elif token.startswith("-"):
            expect_value = token in takes_value
        else:
            break
        position = match.end()
    return parse_argstring(magic, line[:position]), line[position:].strip()


# Options %%qwen and %qwen_error share (an argument decorator only records its arguments).
MAX_NEW_TOKENS = argument(
    "-n", "--max-new-tokens", type=int, default=None, help="Reply length cap (512)."
)


GREEDY = argument("--greedy", action="store_true", help="Always take the likeliest token.")


SAMPLE = argument("--sample", action="store_true", help="Sample (with the model's settings).")


TEMPERATURE = argument(
    "-t", "--temperature", type=float, default=None, help="Sampling temperature."
)


SEED = argument("--seed", type=int, default=None, help="Random seed, for a repeatable sample.")


CONVERSATION = argument(
    "-c", "--conversation", default=DEFAULT_NAME, help="Conversation name (default)."
)


NEW = argument("--new", action="store_true", help="Start the conversation afresh.")


OUT = argument("-o", "--out", default=None, help="Store the reply text in this variable.")


CODE = argument(
    "-x",
    "--code",
    action="store_true",
    help="Put the reply's Python code blocks into a new cell below (not run).",
)


VIEW = argument("--view", choices=("auto", "widget", "text"), default=None, help="Where to stream.")


#: IPython's own names in a kernel's namespace besides ``user_ns_hidden`` (output history
#: ``_3``, input history ``_i3``); -o must not overwrite them.
_IPYTHON_NAME = re.compile(r"_+|_i+|_i?\d+|_[a-z]h|In|Out|get_ipython|exit|quit")


def check_output_name(name: str, shell: Any = None) -> None:
    """Refuse an ``-o`` name that is not a variable name, or would shadow a builtin (``print``)
    or one of IPython's own names (``Out``, ``_``, ``_i3``), for the rest of the kernel."""
    import builtins
    from keyword import iskeyword

    advice = "choose another name, e.g. -o reply."
    if not name.isidentifier() or iskeyword(name):
        raise QwenMagicError(
            f"-o {name!r} is not a Python variable name; use letters, digits and _, e.g. -o reply."
        )
    hidden = getattr(shell, "user_ns_hidden", {}) if shell is not None else {}
    if _IPYTHON_NAME.fullmatch(name) or name in hidden or name.startswith("__"):
        raise QwenMagicError(f"-o {name} is one of IPython's own names in this kernel; {advice}")
    if hasattr(builtins, name):
        raise QwenMagicError(
            f"-o {name} would hide Python's built-in {name} for the rest of this kernel; {advice}"
        )


# Acting in the notebook (%%qwen --run, %qwen_error --run).
RUN = argument(
    "--run",
    action="store_true",
    help="Let the model run Python in this kernel (it sees your variables): each step's code "
    "is shown and runs only once you approve it; its output goes back to the model.",
)
YES = argument("--yes", action="store_true", help="With --run: approve every step of this cell.")
MAX_STEPS = argument(
    "--max-steps", default=None, metavar="N", help="With --run: at most N steps (5)."
)
VARS = argument(
    "--vars",
    default=None,
    metavar="NAME,...",
    help="Tell the model about these variables only (with --run: all of yours); without "
    "--run, a plain chat gets the same summary.",
)


def load_options(magic: Callable[..., Any]) -> Callable[..., Any]:
    """Every option of ``%qwen_load``, declared here so the magic itself stays a few lines."""
    declarations = [
        argument(
            "model",
            nargs="?",
            default=None,
            help="Hub id (Qwen/Qwen2-7B-Instruct), local folder, .gguf file, or 'demo'; with "
            "--server, the served model's name (default: the one it serves). Default: "
            "QwenMagics.model, $QWEN_MAGIC_MODEL, then Qwen2-7B-Instruct with CUDA or the offline "
            "demo model without; or, where QwenMagics.server / $QWEN_MAGIC_SERVER is set, that "
            "server.",
        ),
        argument_group("On a server (vLLM, SGLang, transformers serve)"),
        argument(
            "--server",
            metavar="URL",
            default=None,
            help="Chat with a model on an OpenAI-compatible server instead of loading one, "
            "e.g. http://gpu-box:8000 (or .../v1).",
        ),
        argument(
            "--api-key-env",
            metavar="NAME",
            default=None,
            help="Environment variable holding the server's API key (default: QWEN_MAGIC_API_KEY, "
            "then OPENAI_API_KEY). The key itself is never printed or saved.",
        ),
        argument(
            "--context-length",
            type=int,
            default=None,
            help="The server's context in tokens, where it does not report its own.",
        ),
        argument_group("In this kernel"),
        argument("--dtype", choices=loading.DTYPES, default=None, help="Weights' dtype (auto)."),
        argument(
            "--device",
            default=None,
            help="auto (GPU if any, via accelerate), cpu, cuda, cuda:N, balanced, sequential, "
            "or a JSON device_map.",
        ),
        argument(
            "--attention",
            choices=loading.ATTENTIONS,
            default=None,
            help="Attention kernel; auto picks flash_attention_2 when installed on CUDA, else "
            "sdpa.",
        ),
        argument(
            "--quantize",
            choices=loading.QUANTIZE_FORMATS,
            default=None,
            help="Store the linear layers' weights in 8 or 4 bits (torchao, weight-only; needs "
            "qwen_magic[quant]): faster decoding on a CPU, less memory. Quantized once, then "
            "cached.",
        ),
        argument("--revision", default=None, help="Hub branch, tag or commit."),
        argument(
            "--trust-remote-code",
            action="store_true",
            help="Run Python code shipped with the model repository (off unless you ask).",
        ),
        argument("--quiet", action="store_true", help="Print only the summary line."),
    ]
    for declare in reversed(declarations):  # as stacked decorators apply: the lowest first
        magic = declare(magic)
    return magic
