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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from IPython.core.magic import cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, argument_group, magic_arguments

from qwen_magic import session as kernel_session
from qwen_magic.backends.kernel import loading
from qwen_magic.backends.kernel.heavy_imports import import_heavy_modules
from qwen_magic.backends.server.guards import redact_url
from qwen_magic.chat import Chat
from qwen_magic.conversation import DEFAULT_NAME
from qwen_magic.errors import QwenMagicError
from qwen_magic.notebook import acting, arguments, code_cells, interpolation, last_error
from qwen_magic.notebook.arguments import (
    current_cell_id,
    one_line_errors,
    parse_argstring,
    split_instruction,
)
from qwen_magic.notebook.report import HISTORY_SHOWN, NOTEBOOK, describe_conversation
from qwen_magic.notebook.settings import MagicsSettings
from qwen_magic.notebook.views import make_view
from qwen_magic.storage import export

#: The environment variable naming the server a bare ``%qwen_load`` connects to.
SERVER_ENV_VAR = "QWEN_MAGIC_SERVER"


@magics_class
class QwenMagics(MagicsSettings):
    """``%qwen_load``, ``%%qwen`` and the conversation helpers."""

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.chat = Chat(presentation=NOTEBOOK)
        self._attach_history()

    @property
    def user_namespace(self) -> dict[str, Any]:
        """The notebook's variables."""
        assert self.shell is not None, "the magics run in an IPython shell"
        return self.shell.user_ns

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
    @arguments.load_options
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
        backend = self.session.backend
        if model is None and (backend is None or backend.info().kind != "kernel"):
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
            shown = redact_url(server)
            say(f"Connecting to {shown} (from QwenMagics.server or ${SERVER_ENV_VAR}).")
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
        info = backend.info()
        if info.kind == "server":
            done = f"Disconnected from {info.name} at {info.location}"
        else:
            done = f"Unloaded {info.name}"
        del backend  # the session's reference must be the last one, so the memory can go
        self.session.release()
        print(f"{done}; the conversations stay. Run %qwen_load to chat again.")

    # -- chatting ------------------------------------------------------------------------

    @magic_arguments()
    @argument_group("The reply")
    @arguments.MAX_NEW_TOKENS
    @arguments.GREEDY
    @arguments.SAMPLE
    @arguments.TEMPERATURE
    @argument("--top-p", type=float, default=None, help="Nucleus sampling mass, in (0, 1].")
    @argument("--top-k", type=int, default=None, help="Sample from the k likeliest tokens.")
    @argument("--repetition-penalty", type=float, default=None, help="Above 1 discourages repeats.")
    @arguments.SEED
    @argument_group("The conversation")
    @arguments.CONVERSATION
    @arguments.NEW
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
    @arguments.OUT
    @arguments.CODE
    @arguments.VIEW
    @argument_group("Acting in the notebook")
    @arguments.RUN
    @arguments.YES
    @arguments.MAX_STEPS
    @arguments.VARS
    @argument_group("Speed")
    @argument(
        "--fast",
        action="store_true",
        help="Decode into a static KV cache, compiled with torch.compile on CUDA: faster "
        "decoding after a slow first reply (compiling). Context: QwenMagics.fast_cache_tokens.",
    )
    @argument(
        "--lookup",
        action="store_true",
        help="Prompt-lookup decoding for this reply, whatever the dtype and sampling "
        "(default: QwenMagics.prompt_lookup). Faster where the reply copies the prompt.",
    )
    @argument("--no-lookup", action="store_true", help="Plain decoding for this reply.")
    @cell_magic
    @one_line_errors
    def qwen(self, line: str, cell: str) -> None:
        """Send the cell to the model; the reply streams below and joins the conversation."""
        args = parse_argstring(self.qwen, line)
        message = cell.strip()
        if not message:
            raise QwenMagicError("The cell is empty; write your message below %%qwen.")
        if args.interpolate:
            message = interpolation.interpolate(message, self.user_namespace)
        self._reply(args, message)

    def _reply(self, args: Any, message: str) -> None:
        """Send ``message`` with the options in ``args``; the reply streams below, joins the
        conversation, and goes where -o and --code say."""
        if args.greedy and args.sample:
            raise QwenMagicError("Choose one of --greedy and --sample.")
        if getattr(args, "lookup", False) and getattr(args, "no_lookup", False):
            raise QwenMagicError("Choose one of --lookup and --no-lookup.")
        if args.out is not None:
            arguments.check_output_name(args.out, self.shell)
        acting.check_options(args)
        greedy = True if args.greedy else False if args.sample else self.greedy
        options = self._options(args, greedy)
        # --run's and --vars' mistakes (no stdin, a missing name) come before --new resets
        variables = acting.variables_for(self.shell, args)
        ask: Callable[..., Any] = self.chat.ask
        if getattr(args, "run", False):
            ask = functools.partial(
                acting.make_agent(
                    self.shell, self.chat, args, self.approval, args.view or self.view
                ).ask,
                variables=variables,
            )
        self.chat.book.default_system_prompt = self.system_prompt
        conversation = self.chat.conversation(args.conversation)
        if getattr(args, "new", False):
            conversation.reset()
        if getattr(args, "set_system", None) is not None:
            conversation.system_prompt = args.set_system
        self._attach_history()
        self.chat.reuse_cache = self.reuse_cache
        self.chat.context_tokens = self.context_tokens
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
            self.user_namespace[args.out] = turn.assistant
        if args.code:
            ran = acting.offer_ran_code(self.shell, turn) if getattr(args, "run", False) else None
            print(ran or code_cells.offer_code(self.shell, turn.assistant))

    @magic_arguments()
    @argument(
        "instruction",
        nargs="*",
        help="What to ask about the error (default: explain it and correct the cell).",
    )
    @argument_group("The reply")
    @arguments.MAX_NEW_TOKENS
    @arguments.GREEDY
    @arguments.SAMPLE
    @arguments.TEMPERATURE
    @arguments.SEED
    @argument_group("The conversation and the result")
    @arguments.CONVERSATION
    @arguments.NEW
    @arguments.OUT
    @arguments.CODE
    @arguments.VIEW
    @argument_group("Acting in the notebook")
    @arguments.RUN
    @arguments.YES
    @arguments.MAX_STEPS
    @line_magic
    @one_line_errors
    def qwen_error(self, line: str = "") -> None:
        """Send the last error (the failing cell and its traceback) to the model, which explains
        and fixes it, or does what INSTRUCTION says; the reply streams below and joins the
        conversation, so a follow-up can ask for more. Errors of qwen_magic's own magics do not
        count."""
        args, instruction = split_instruction(self.qwen_error, line)
        session = self.session
        error = last_error.last_error(self.shell, session.magic_errors, session.last_cell_error)
        if error is None:
            print("No error to send yet: no cell has raised one since the kernel started.")
            return
        options = self._options(args, None)
        backend = self.session.require_backend()
        room = backend.context_length(options) - options.max_new_tokens
        limit = min(last_error.ERROR_LIMIT, max(room * 2, 800))  # ~2 characters a token at worst
        if args.run and not instruction:
            instruction = acting.FIX_AND_CHECK
        self._reply(args, last_error.error_prompt(error, instruction, limit))

    # -- the conversation ----------------------------------------------------------------

    @magic_arguments()
    @arguments.CONVERSATION
    @argument("--all", action="store_true", help="Show every turn, not only the latest ones.")
    @line_magic
    @one_line_errors
    def qwen_history(self, line: str = "") -> None:
        """Show a conversation's latest turns and token counts."""
        args = parse_argstring(self.qwen_history, line)
        conversation = self.chat.conversation(args.conversation, create=False)
        backend = self.session.backend
        counter = backend.count_tokens if backend is not None else None
        print(
            describe_conversation(conversation, counter, last=None if args.all else HISTORY_SHOWN)
        )

    @magic_arguments()
    @arguments.CONVERSATION
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
    @arguments.CONVERSATION
    @line_magic
    @one_line_errors
    def qwen_pop(self, line: str = "") -> None:
        """Remove the last turn of a conversation."""
        args = parse_argstring(self.qwen_pop, line)
        turn = self.chat.conversation(args.conversation, create=False).pop()
        self._changed()
        print(f"Removed the last turn: {turn.user[:60]!r}")

    @magic_arguments()
    @arguments.CONVERSATION
    @argument("prompt", nargs="*", help="The new system prompt (none: show the current one).")
    @line_magic
    @one_line_errors
    def qwen_system(self, line: str = "") -> None:
        """Show or set a conversation's system prompt."""
        args = parse_argstring(self.qwen_system, line)
        new = args.conversation not in self.chat.book.conversations
        if new and not args.prompt and args.conversation != DEFAULT_NAME:
            known = ", ".join(self.chat.book.names()) or "none yet"
            raise QwenMagicError(
                f"No conversation named {args.conversation!r} (known: {known}); to start it "
                f"with a system prompt, give one: %qwen_system -c {args.conversation} PROMPT."
            )
        conversation = self.chat.conversation(args.conversation)
        if args.prompt:
            conversation.system_prompt = " ".join(args.prompt)
            self._changed()
        created = "Created the conversation; s" if new and args.prompt else "S"
        print(f"{created}ystem prompt of {conversation.name!r}: {conversation.system_prompt!r}")

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
    @arguments.CONVERSATION
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
        print(export.export_markdown(Path(args.file), text, force=args.force, what=what))
