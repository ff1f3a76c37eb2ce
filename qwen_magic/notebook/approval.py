"""Asking the user before a step's code runs: the approvers of ``%%qwen --run``.

Approval is the safety boundary of acting: nothing the model proposes runs unless the user
says so, for each step, or gave ``--yes`` for that one cell. There is no global auto-approve.

* :class:`PromptApprover` asks with ``input()``: in a Jupyter kernel that is the kernel's stdin
  request (JupyterLab and Notebook show a text box under the cell); in terminal IPython, the
  terminal. The answer is ``r``un, ``s``kip, ``e``dit (type the code to run instead, ending
  with an empty line) or s``t``op. Ctrl-C or the kernel's stop button at the prompt ends the
  turn like ``stop``, keeping what happened.
* :class:`YesApprover` approves every step (``--yes``: headless runs, nbval), saying so.
* :func:`stdin_available` tells whether the frontend can answer a prompt at all: nbclient,
  ``jupyter execute`` and nbval send ``allow_stdin: false``, so ``--run`` without ``--yes`` is
  refused there up front, before the model is asked (nothing runs, nothing is lost).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from qwen_magic.agent import Decision

ANSWERS = {
    "r": "run",
    "run": "run",
    "y": "run",
    "yes": "run",
    "s": "skip",
    "skip": "skip",
    "n": "skip",
    "no": "skip",
    "e": "edit",
    "edit": "edit",
    "t": "stop",
    "stop": "stop",
    "q": "stop",
}
QUESTION = "Step {step}: run this code? [r]un, [s]kip, [e]dit, s[t]op: "
EDIT_PROMPT = "Type the code to run instead, line by line; an empty line ends it."


def stdin_available(shell: Any) -> bool:
    """Whether the running cell may ask the user with ``input()``."""
    kernel = getattr(shell, "kernel", None)
    if kernel is None:  # terminal IPython or plain Python: a terminal answers
        stdin = sys.stdin
        return stdin is not None and hasattr(stdin, "isatty") and stdin.isatty()
    allowed = getattr(kernel, "_allow_stdin", None)
    if allowed is None:  # another kernel: the request's own flag
        try:
            allowed = (kernel.get_parent() or {}).get("content", {}).get("allow_stdin")
        except Exception:
            allowed = False
    return bool(allowed)


class PromptApprover:
    """Asks for each step with ``input``; unclear answers are asked again."""

    def __init__(self, ask: Callable[[str], str] = input, say: Callable[[str], None] = print):
        self.ask = ask
        self.say = say

    def decide(self, code: str, step: int) -> Decision:
        while True:
            try:
                answer = self.ask(QUESTION.format(step=step)).strip().lower()
            except EOFError:  # the input was closed: nothing runs
                return Decision("stop")
            action = ANSWERS.get(answer)
            if action == "edit":
                return self._edit(code)
            if action is not None:
                return Decision(action)
            self.say("Answer r (run), s (skip), e (edit) or t (stop).")

    def _edit(self, code: str) -> Decision:
        self.say(EDIT_PROMPT)
        lines = []
        while True:
            try:
                line = self.ask("")
            except EOFError:
                break
            if not line.strip():
                break
            lines.append(line)
        edited = "\n".join(lines)
        if not edited.strip():
            self.say("No code typed: running nothing, as with skip.")
            return Decision("skip")
        return Decision("edit", edited)


class YesApprover:
    """``--yes``: every step of this one cell runs, each announced in one line."""

    def __init__(self, say: Callable[[str], None] = print) -> None:
        self.say = say

    def decide(self, code: str, step: int) -> Decision:
        self.say(f"Step {step}: running the code (--yes).")
        return Decision("run")
