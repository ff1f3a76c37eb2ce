"""The notebook side of ``%%qwen --run``, ``--vars`` and ``%qwen_error --run``.

The magics hand their parsed options here; this module checks them (one line for each
mistake, before the model is asked), builds the :class:`~qwen_magic.agent.Agent` with the
notebook's approver (:mod:`qwen_magic.notebook.approval`) and runner
(:mod:`qwen_magic.notebook.code_runner`),
and gives the model the variables summary (:mod:`qwen_magic.notebook.variables`).
"""

from __future__ import annotations

from typing import Any

from qwen_magic.agent import DEFAULT_MAX_STEPS, Agent, check_max_steps
from qwen_magic.chat import Chat
from qwen_magic.conversation import Turn
from qwen_magic.errors import QwenMagicError
from qwen_magic.notebook.approval import PromptApprover, YesApprover, stdin_available
from qwen_magic.notebook.approval_buttons import ButtonApprover
from qwen_magic.notebook.code_runner import NotebookRunner
from qwen_magic.notebook.variables import parse_names, summarize
from qwen_magic.notebook.views import in_widget_frontend

#: What ``%qwen_error --run`` asks for when given no instruction.
FIX_AND_CHECK = (
    "Find the cause and fix it: end your reply with the corrected code in one python code "
    "block, so that it runs and you see whether it works. When it works, say in a few "
    "sentences what was wrong."
)
NO_STDIN = (
    "--run asks before running each step's code, and this frontend cannot answer (it has no "
    "input: nbclient, jupyter execute, nbval); add --yes to approve every step of this cell, "
    "or run it in JupyterLab. Nothing was run."
)


def check_options(args: Any) -> None:
    """Refuse options that need ``--run`` without it, and a bad ``--max-steps``."""
    if getattr(args, "run", False):
        if getattr(args, "max_steps", None) is not None:
            check_max_steps(args.max_steps)
        return
    if getattr(args, "yes", False):
        raise QwenMagicError("--yes approves the steps of --run; add --run, or leave out --yes.")
    if getattr(args, "max_steps", None) is not None:
        raise QwenMagicError("--max-steps limits the steps of --run; add --run, or leave it out.")


def variables_for(shell: Any, args: Any) -> str:
    """The variables summary the model gets: all of them with --run, those --vars names."""
    names = parse_names(getattr(args, "vars", None))
    if names is None and not getattr(args, "run", False):
        return ""
    hidden = getattr(shell, "user_ns_hidden", {}) or {}
    return summarize(shell.user_ns, names, hidden=hidden) or "(none yet)"


def make_agent(
    shell: Any, chat: Chat, args: Any, approval: str = "auto", view: str = "auto"
) -> Agent:
    """The agent for one cell: ``--yes`` approves each step, else the user is asked, with
    buttons in a Jupyter kernel (``approval`` ``"buttons"``, or ``"auto"`` where replies stream
    into widgets) or at the text prompt (``"prompt"``, and wherever widgets cannot show)."""
    if args.yes:
        approver: Any = YesApprover()
    elif stdin_available(shell):
        # Without stdin (nbclient, nbval) nobody could click either: refused below.
        approver = PromptApprover()
        # Buttons only where widgets show (a terminal could never click them): "buttons" there,
        # or "auto" with replies streaming into widgets.
        wanted = approval == "buttons" or (approval == "auto" and view != "text")
        if wanted and in_widget_frontend():
            approver = ButtonApprover(fallback=approver)
    else:
        raise QwenMagicError(NO_STDIN)
    max_steps = DEFAULT_MAX_STEPS if args.max_steps is None else check_max_steps(args.max_steps)
    return Agent(chat, approver, NotebookRunner(shell), max_steps=max_steps, say=print)


def with_variables(system_prompt: str, variables: str) -> str:
    """A plain chat's system prompt with the variables summary (``--vars`` without --run)."""
    return f"{system_prompt.strip()}\n\nThe user's variables:\n{variables}".strip()


def offer_ran_code(shell: Any, turn: Turn) -> str | None:
    """``--code`` with ``--run``: the code that ran, in one new cell below (not run), so the
    notebook reproduces without the assistant; None when no code ran."""
    ran = [s["ran_code"] for s in turn.steps if s["action"] in ("ran", "edited") and s["ran_code"]]
    if not ran:
        return None
    shell.set_next_input("\n\n".join(ran), replace=False)
    where = "a new cell below" if hasattr(shell, "kernel") else "the next prompt"
    count = f"{len(ran)} step{'s' * (len(ran) != 1)}"
    return f"--code: the code that ran ({count}) is in {where}, not run."
