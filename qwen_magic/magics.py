"""The IPython magics: argument parsing and reporting, nothing else.

Every option is declared with ``magic_arguments``, so ``%qwen_load?`` and ``%%qwen?`` print the
manual and an unknown flag is a one-line ``QwenMagicError``. Defaults are config traitlets, settable
with ``%config QwenMagics.max_new_tokens = 256`` or in ``ipython_config.py``.
The work happens in plain objects: the kernel's :class:`~qwen_magic.session.Session` (the
backend, the conversations, the history file) and :class:`~qwen_magic.chat.Chat` (one turn).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from collections.abc import Callable
from keyword import iskeyword
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, argument_group, magic_arguments
from traitlets import Bool, CFloat, CInt, Enum, Unicode

from . import acting, loading, notebook, persistence
from . import session as kernel_session
from .chat import HISTORY_SHOWN, Chat, describe
from .conversation import DEFAULT_NAME, DEFAULT_SYSTEM_PROMPT
from .errors import QwenMagicError
from .heavy_imports import import_heavy_modules
from .options import DEFAULT_FAST_CACHE_TOKENS, GenerationOptions
from .view import make_view

#: The environment variable naming the server a bare ``%qwen_load`` connects to.
SERVER_ENV_VAR = "QWEN_MAGIC_SERVER"


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
            shown = notebook.mark_own_error(UsageError(str(error)))
            notebook.note_magic_error(self.shell, shown, self.session.magic_errors)
            raise shown from error
        except (UsageError, KeyboardInterrupt) as error:  # a bad option; an interrupted reply
            notebook.mark_own_error(error)
            notebook.note_magic_error(self.shell, error, self.session.magic_errors)
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
_MAX_NEW_TOKENS = argument(
    "-n", "--max-new-tokens", type=int, default=None, help="Reply length cap (512)."
)
_GREEDY = argument("--greedy", action="store_true", help="Always take the likeliest token.")
_SAMPLE = argument("--sample", action="store_true", help="Sample (with the model's settings).")
_TEMPERATURE = argument(
    "-t", "--temperature", type=float, default=None, help="Sampling temperature."
)
_SEED = argument("--seed", type=int, default=None, help="Random seed, for a repeatable sample.")
_CONVERSATION = argument(
    "-c", "--conversation", default=DEFAULT_NAME, help="Conversation name (default)."
)
_NEW = argument("--new", action="store_true", help="Start the conversation afresh.")
_OUT = argument("-o", "--out", default=None, help="Store the reply text in this variable.")
_CODE = argument(
    "-x",
    "--code",
    action="store_true",
    help="Put the reply's Python code blocks into a new cell below (not run).",
)
_VIEW = argument(
    "--view", choices=("auto", "widget", "text"), default=None, help="Where to stream."
)
_RUN = argument(
    "--run",
    action="store_true",
    help="Let the model run Python in this kernel (it sees your variables): each step's code "
    "is shown and runs only once you approve it; its output goes back to the model.",
)
_YES = argument("--yes", action="store_true", help="With --run: approve every step of this cell.")
_MAX_STEPS = argument(
    "--max-steps", default=None, metavar="N", help="With --run: at most N steps (5)."
)


@magics_class
class QwenMagics(Magics):
    """``%qwen_load``, ``%%qwen`` and the conversation helpers."""

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
    redraw_seconds = CFloat(
        0.15, help="Least time between two redraws of a streaming reply in the notebook."
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.chat = Chat()
        notebook.ErrorWatcher.install(self.shell)  # for %qwen_error
        self._attach_history()

    @property
    def session(self) -> kernel_session.Session:
        """The kernel's session (it outlives this object across ``%reload_ext``)."""
        return kernel_session.current()

    def _attach_history(self) -> None:
        if self.autosave and (
            message := self.session.attach_history(self.shell, self.history_file)
        ):
            print(message)

    def _changed(self) -> None:
        """Save the conversations after a change, where a history file is attached."""
        if self.autosave and (message := self.session.autosave()):
            print(message)

    # -- loading -------------------------------------------------------------------------

    @magic_arguments()
    @argument(
        "model",
        nargs="?",
        default=None,
        help="Hub id (Qwen/Qwen2-7B-Instruct), local folder, .gguf file, or 'demo'; with "
        "--server, the served model's name (default: the one it serves). Default: "
        "QwenMagics.model, $QWEN_MAGIC_MODEL, then Qwen2-7B-Instruct with CUDA or the offline "
        "demo model without; or, where QwenMagics.server / $QWEN_MAGIC_SERVER is set, that "
        "server.",
    )
    @argument_group("On a server (vLLM, SGLang, transformers serve)")
    @argument(
        "--server",
        metavar="URL",
        default=None,
        help="Chat with a model on an OpenAI-compatible server instead of loading one, "
        "e.g. http://gpu-box:8000 (or .../v1).",
    )
    @argument(
        "--api-key-env",
        metavar="NAME",
        default=None,
        help="Environment variable holding the server's API key (default: QWEN_MAGIC_API_KEY, "
        "then OPENAI_API_KEY). The key itself is never printed or saved.",
    )
    @argument(
        "--context-length",
        type=int,
        default=None,
        help="The server's context in tokens, where it does not report its own.",
    )
    @argument_group("In this kernel")
    @argument("--dtype", choices=loading.DTYPES, default=None, help="Weights' dtype (auto).")
    @argument(
        "--device",
        default=None,
        help="auto (GPU if any, via accelerate), cpu, cuda, cuda:N, balanced, sequential, "
        "or a JSON device_map.",
    )
    @argument(
        "--attention",
        choices=loading.ATTENTIONS,
        default=None,
        help="Attention kernel; auto picks flash_attention_2 when installed on CUDA, else sdpa.",
    )
    @argument(
        "--quantize",
        choices=loading.QUANTIZE_FORMATS,
        default=None,
        help="Store the linear layers' weights in 8 or 4 bits (torchao, weight-only; needs "
        "qwen_magic[quant]): faster decoding on a CPU, less memory. Quantized once, then cached.",
    )
    @argument("--revision", default=None, help="Hub branch, tag or commit.")
    @argument(
        "--trust-remote-code",
        action="store_true",
        help="Run Python code shipped with the model repository (off unless you ask).",
    )
    @argument("--quiet", action="store_true", help="Print only the summary line.")
    @line_magic
    @one_line_errors
    def qwen_load(self, line: str = "") -> None:
        """Load a Qwen2-family chat model, once per kernel, or connect to one on a server."""
        args = parse_argstring(self.qwen_load, line)
        say = (lambda _message: None) if args.quiet else print
        server = args.server or (None if args.model else self._default_server())
        if server:
            self._connect(server, args, say)
            return
        if args.api_key_env or args.context_length is not None:
            raise QwenMagicError(
                "--api-key-env and --context-length go with --server URL; add it, or leave "
                "them out to load the model in this kernel."
            )
        import_heavy_modules()  # default_model_name() imports torch: a Ctrl-C waits for it
        model = args.model or self.model or None
        if model is None and self.session.loaded_model is None:
            say(
                f"No model named: using {loading.default_model_name()} "
                f"({loading.default_model_reason()})."
            )
        loaded, fresh = self.session.load_model(
            model,
            dtype=args.dtype or self.dtype,
            device=args.device or self.device,
            attention=args.attention or self.attention,
            revision=args.revision,
            trust_remote_code=args.trust_remote_code,
            quantize=args.quantize or self.quantize,
            progress=say,
        )
        if not fresh:
            print(f"{loaded.name} is already loaded; nothing to do.")
            return
        for notice in loaded.notices:
            print(f"Note: {notice}")
        print(loaded.summary())

    def _default_server(self) -> str | None:
        return self.server or os.environ.get(SERVER_ENV_VAR, "").strip() or None

    def _connect(self, server: str, args: Any, say: Callable[[str], None]) -> None:
        in_kernel_only = {
            "--dtype": args.dtype,
            "--device": args.device,
            "--attention": args.attention,
            "--quantize": args.quantize,
            "--revision": args.revision,
            "--trust-remote-code": args.trust_remote_code or None,
        }
        if given := [flag for flag, value in in_kernel_only.items() if value is not None]:
            raise QwenMagicError(
                f"{', '.join(given)} set how a model loads in this kernel; a server has loaded "
                "its model already, so leave them out with --server."
            )
        if not args.server:
            say(f"Connecting to {server} (from QwenMagics.server or ${SERVER_ENV_VAR}).")
        backend, fresh = self.session.connect(
            server,
            args.model,
            api_key_env=args.api_key_env,
            context_length=args.context_length,
            progress=None,
        )
        if not fresh:
            print(f"Already connected to {backend.name} at {server}; nothing to do.")
            return
        print(backend.summary())

    @magic_arguments()
    @line_magic
    @one_line_errors
    def qwen_unload(self, line: str = "") -> None:
        """Free the model's memory (or disconnect from the server); the conversations stay."""
        parse_argstring(self.qwen_unload, line)
        backend = self.session.backend
        if backend is None:
            print("No model is loaded; nothing to free.")
            return
        from .server_backend import ServerBackend

        if isinstance(backend, ServerBackend):
            done = f"Disconnected from {backend.name} at {backend.base_url}"
        else:
            done = f"Unloaded {backend.name}"
        del backend  # the session's reference must be the last one, so the memory can go
        self.session.release()
        print(f"{done}; the conversations stay. Run %qwen_load to chat again.")

    # -- chatting ------------------------------------------------------------------------

    @magic_arguments()
    @argument_group("The reply")
    @_MAX_NEW_TOKENS
    @_GREEDY
    @_SAMPLE
    @_TEMPERATURE
    @argument("--top-p", type=float, default=None, help="Nucleus sampling mass, in (0, 1].")
    @argument("--top-k", type=int, default=None, help="Sample from the k likeliest tokens.")
    @argument("--repetition-penalty", type=float, default=None, help="Above 1 discourages repeats.")
    @_SEED
    @argument_group("The conversation")
    @_CONVERSATION
    @_NEW
    @argument("-s", "--system", default=None, help="System prompt for this turn only.")
    @argument("--set-system", default=None, help="Set the conversation's system prompt.")
    @argument_group("The message and the result")
    @argument(
        "-i",
        "--interpolate",
        action="store_true",
        help="Replace $name, ${name} and ${expression} (a name with .attributes and [literal] "
        "indexes: ${In[3]}, ${Out[3]}, ${_}, ${df.columns}) with their values; $$ is a $; "
        "braces {} stay as written.",
    )
    @_OUT
    @_CODE
    @_VIEW
    @argument_group("Acting in the notebook")
    @_RUN
    @_YES
    @_MAX_STEPS
    @argument(
        "--vars",
        default=None,
        metavar="NAME,...",
        help="Tell the model about these variables only (with --run: all of yours); without "
        "--run, a plain chat gets the same summary.",
    )
    @argument_group("Speed")
    @argument(
        "--fast",
        action="store_true",
        help="Decode into a static KV cache, compiled with torch.compile on CUDA: faster "
        "decoding after a slow first reply (compiling). Context: QwenMagics.fast_cache_tokens.",
    )
    @cell_magic
    @one_line_errors
    def qwen(self, line: str, cell: str) -> None:
        """Send the cell to the model; the reply streams below and joins the conversation."""
        args = parse_argstring(self.qwen, line)
        message = cell.strip()
        if not message:
            raise QwenMagicError("The cell is empty; write your message below %%qwen.")
        if args.interpolate:
            message = notebook.interpolate(message, self.shell.user_ns)
        self._reply(args, message)

    def _reply(self, args: Any, message: str) -> None:
        """Send ``message`` with the options in ``args``; the reply streams below, joins the
        conversation, and goes where -o and --code say."""
        if args.greedy and args.sample:
            raise QwenMagicError("Choose one of --greedy and --sample.")
        if args.out is not None and not (args.out.isidentifier() and not iskeyword(args.out)):
            raise QwenMagicError(
                f"-o {args.out!r} is not a Python variable name; use letters, digits and _, "
                "e.g. -o reply."
            )
        acting.check_options(args)
        greedy = True if args.greedy else False if args.sample else self.greedy
        options = self._options(args, greedy)
        # --run's and --vars' mistakes (no stdin, a missing name) come before --new resets
        variables = acting.variables_for(self.shell, args)
        ask: Callable[..., Any] = self.chat.ask
        if getattr(args, "run", False):
            ask = functools.partial(
                acting.make_agent(self.shell, self.chat, args).ask, variables=variables
            )
        self.chat.book.default_system_prompt = self.system_prompt
        conversation = self.chat.conversation(args.conversation)
        if getattr(args, "new", False):
            conversation.reset()
        if getattr(args, "set_system", None) is not None:
            conversation.system_prompt = args.set_system
        self._attach_history()
        self.chat.reuse_cache = self.reuse_cache
        system = getattr(args, "system", None)
        if variables and not getattr(args, "run", False):
            system = acting.with_variables(system or conversation.system_prompt, variables)
        try:
            turn = ask(
                message,
                conversation=args.conversation,
                options=options,
                system_prompt=system,
                cell_id=current_cell_id(self.shell),
                view=lambda: make_view(args.view or self.view, self.redraw_seconds),
            )
        finally:  # an interrupted turn is recorded too
            self._changed()
        if args.out:
            self.shell.user_ns[args.out] = turn.assistant
        if args.code:
            ran = acting.offer_ran_code(self.shell, turn) if getattr(args, "run", False) else None
            print(ran or notebook.offer_code(self.shell, turn.assistant))

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
        )

    @magic_arguments()
    @argument(
        "instruction",
        nargs="*",
        help="What to ask about the error (default: explain it and correct the cell).",
    )
    @argument_group("The reply")
    @_MAX_NEW_TOKENS
    @_GREEDY
    @_SAMPLE
    @_TEMPERATURE
    @_SEED
    @argument_group("The conversation and the result")
    @_CONVERSATION
    @_NEW
    @_OUT
    @_CODE
    @_VIEW
    @argument_group("Acting in the notebook")
    @_RUN
    @_YES
    @_MAX_STEPS
    @line_magic
    @one_line_errors
    def qwen_error(self, line: str = "") -> None:
        """Send the last error (the failing cell and its traceback) to the model, which explains
        and fixes it, or does what INSTRUCTION says; the reply streams below and joins the
        conversation, so a follow-up can ask for more. Errors of qwen_magic's own magics do not
        count."""
        args, instruction = split_instruction(self.qwen_error, line)
        session = self.session
        error = notebook.last_error(self.shell, session.magic_errors, session.last_cell_error)
        if error is None:
            print("No error to send yet: no cell has raised one since the kernel started.")
            return
        options = self._options(args, None)
        backend = self.session.require_backend()
        room = backend.context_length(options) - options.max_new_tokens
        limit = min(notebook.ERROR_LIMIT, max(room * 2, 800))  # ~2 characters a token at worst
        if args.run and not instruction:
            instruction = acting.FIX_AND_CHECK
        self._reply(args, notebook.error_prompt(error, instruction, limit))

    # -- the conversation ----------------------------------------------------------------

    @magic_arguments()
    @argument("-c", "--conversation", default=DEFAULT_NAME, help="Conversation name.")
    @argument("--all", action="store_true", help="Show every turn, not only the latest ones.")
    @line_magic
    @one_line_errors
    def qwen_history(self, line: str = "") -> None:
        """Show a conversation's latest turns and token counts."""
        args = parse_argstring(self.qwen_history, line)
        conversation = self.chat.conversation(args.conversation, create=False)
        backend = self.session.backend
        counter = backend.count_tokens if backend is not None else None
        print(describe(conversation, counter, last=None if args.all else HISTORY_SHOWN))

    @magic_arguments()
    @argument("-c", "--conversation", default=DEFAULT_NAME, help="Conversation name.")
    @argument("--all", action="store_true", help="Reset every conversation of this notebook.")
    @line_magic
    @one_line_errors
    def qwen_reset(self, line: str = "") -> None:
        """Forget a conversation's turns (its system prompt stays)."""
        args = parse_argstring(self.qwen_reset, line)
        names = self.chat.book.names() if args.all else [args.conversation]
        dropped = sum(self.chat.conversation(name, create=False).reset() for name in names)
        self._changed()
        print(f"Reset {', '.join(map(repr, names)) or 'nothing'}: {dropped} turns forgotten.")

    @magic_arguments()
    @argument("-c", "--conversation", default=DEFAULT_NAME, help="Conversation name.")
    @line_magic
    @one_line_errors
    def qwen_pop(self, line: str = "") -> None:
        """Remove the last turn of a conversation."""
        args = parse_argstring(self.qwen_pop, line)
        turn = self.chat.conversation(args.conversation, create=False).pop()
        self._changed()
        print(f"Removed the last turn: {turn.user[:60]!r}")

    @magic_arguments()
    @argument("-c", "--conversation", default=DEFAULT_NAME, help="Conversation name.")
    @argument("prompt", nargs="*", help="The new system prompt (none: show the current one).")
    @line_magic
    @one_line_errors
    def qwen_system(self, line: str = "") -> None:
        """Show or set a conversation's system prompt."""
        args = parse_argstring(self.qwen_system, line)
        conversation = self.chat.conversation(args.conversation)
        if args.prompt:
            conversation.system_prompt = " ".join(args.prompt)
            self._changed()
        print(f"System prompt of {conversation.name!r}: {conversation.system_prompt!r}")

    # -- saving and restoring ------------------------------------------------------------

    @magic_arguments()
    @argument("file", nargs="?", default=None, help="JSON file (default: the notebook's).")
    @line_magic
    @one_line_errors
    def qwen_save(self, line: str = "") -> None:
        """Save every conversation of this notebook to a JSON file."""
        args = parse_argstring(self.qwen_save, line)
        print(self.session.save(self.session.history_target(args.file, self.history_file)))

    @magic_arguments()
    @argument("file", nargs="?", default=None, help="JSON file (default: the notebook's).")
    @line_magic
    @one_line_errors
    def qwen_restore(self, line: str = "") -> None:
        """Replace this notebook's conversations with those saved in a JSON file."""
        args = parse_argstring(self.qwen_restore, line)
        path = self.session.history_target(args.file, self.history_file)
        self.session.conversations.default_system_prompt = self.system_prompt
        print(f"Restored {self.session.restore(path)} from {path}.")

    @magic_arguments()
    @argument("-c", "--conversation", default=DEFAULT_NAME, help="Conversation name.")
    @argument(
        "--force",
        action="store_true",
        help="Overwrite FILE even when it is not one of qwen_magic's own exports.",
    )
    @argument("file", help="Markdown file to write, e.g. chat.md.")
    @line_magic
    @one_line_errors
    def qwen_export(self, line: str = "") -> None:
        """Write a conversation as a Markdown document (its first line marks it as an export)."""
        args = parse_argstring(self.qwen_export, line)
        conversation = self.chat.conversation(args.conversation, create=False)
        what = f"{len(conversation)} turns of {conversation.name!r}"
        text = conversation.to_markdown()
        print(persistence.export_markdown(Path(args.file), text, force=args.force, what=what))
