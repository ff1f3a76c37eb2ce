"""The steps of a turn in which the assistant acted (``%%qwen --run``).

A turn asked with ``--run`` may hold *steps* before its final answer: each is one reply of the
model that ended with a Python code block, what became of that code, and what the model was
shown afterwards. A step is kept as a plain dict, so it travels through the history file as it
is (``Turn.steps``)::

    {"text": "Let me count them.\\n```python\\nlen(sales)\\n```",   # the model's reply
     "code": "len(sales)",        # the code it proposed
     "action": "ran",             # ran | edited | skipped | stopped | repeated | interrupted
     "ran_code": "len(sales)",    # what ran (the user's version when edited; None if nothing ran)
     "output": "1234",            # what the model was shown about it
     "note": "",                  # said to the model after the output (e.g. "last step")
     "stats": {...}}              # the reply's figures, as a turn's stats

:func:`step_messages` renders steps as chat messages, the same way while the loop runs and in
every later prompt, so step n+1's prompt extends step n's token for token (the backend's KV
cache then prefills only the new output), and follow-ups see what was done, compactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qwen_magic.messages import ActionResult, CodeAction, Message

#: What became of a step's code.
ACTIONS = ("ran", "edited", "skipped", "stopped", "repeated", "interrupted")
#: Actions after which the model is shown something and may go on.
ACTIONS_WITH_OUTPUT = ("ran", "edited", "skipped")

#: Characters of a step's output the model is shown (the rest is cut, saying so).
OUTPUT_LIMIT = 2000

SKIPPED_OUTPUT = (
    "The user chose not to run this code. Answer without running it, or propose other code."
)


def new_step(
    text: str,
    code: str,
    action: str,
    *,
    ran_code: str | None = None,
    output: str = "",
    note: str = "",
    stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A step as a turn keeps it."""
    return {
        "text": text,
        "code": code,
        "action": action,
        "ran_code": ran_code,
        "output": output,
        "note": note,
        "stats": dict(stats or {}),
    }


def output_message(step: dict[str, Any]) -> str:
    """What the user role says after the step's reply: the code's output, or that it was
    skipped; "" where the step ended the loop (stopped, repeated, interrupted)."""
    action = step["action"]
    note = f"\n\n{step['note']}" if step.get("note") else ""
    if action == "skipped":
        return (step["output"] or SKIPPED_OUTPUT) + note
    if action not in ACTIONS_WITH_OUTPUT:
        return ""
    edited = ""
    if action == "edited":
        edited = (
            f"I edited the code before running it; this ran:\n```python\n{step['ran_code']}\n```\n"
        )
    return f"{edited}Output of the code:\n```\n{step['output']}\n```{note}"


def step_messages(steps: list[dict[str, Any]]) -> list[Message]:
    """The steps as typed chat messages: each reply as the assistant's, carrying the code it
    asked to run as its action, then what came of it as the user's, carrying the action's result
    (steps that ended the loop have no output). Templates and servers read role and content
    only (``chat_dicts``), so the text says it all; the action and result are for code."""
    messages: list[Message] = []
    for step in steps:
        asked: Message = {"role": "assistant", "content": step["text"]}
        if step.get("code"):
            asked["action"] = CodeAction(step["code"])
        messages.append(asked)
        if said := output_message(step):
            status = "skipped" if step.get("action") == "skipped" else "ran"
            messages.append({"role": "user", "content": said, "result": ActionResult(said, status)})
    return messages


def steps_summary(steps: list[dict[str, Any]]) -> str:
    """``2 steps: ran, skipped`` for a history line ("" without steps)."""
    if not steps:
        return ""
    return f"{len(steps)} step{'s' * (len(steps) != 1)}: " + ", ".join(s["action"] for s in steps)


def steps_markdown(steps: list[dict[str, Any]]) -> list[str]:
    """The steps as Markdown lines for an export."""
    lines: list[str] = []
    for number, step in enumerate(steps, start=1):
        lines += [f"**Step {number}** ({step['action']})", "", step["text"], ""]
        if step["action"] == "edited":
            lines += ["*Edited and ran:*", "", f"```python\n{step['ran_code']}\n```", ""]
        if step["output"] and step["action"] in ACTIONS_WITH_OUTPUT:
            lines += ["*Output:*", "", f"```\n{step['output']}\n```", ""]
    return lines


# -- running a step: the code asked for, its result ----------------------------------------


@dataclass
class RunResult:
    """What running a step's code gave."""

    stdout: str = ""
    stderr: str = ""
    #: The last expression's value as text (None: no value).
    value: str | None = None
    #: Placeholders for rich outputs the user saw: "[figure]", "[image/png]", ...
    displays: list[str] = field(default_factory=list)
    #: The error's traceback, trimmed (None: no error).
    error: str | None = None
    #: The run was interrupted (Ctrl-C); what it printed until then is kept.
    interrupted: bool = False

    def for_model(self, limit: int = OUTPUT_LIMIT) -> str:
        """The output as the model is shown it, cut to about ``limit`` characters."""
        parts = [self.stdout.rstrip("\n")] if self.stdout.strip() else []
        if self.stderr.strip():
            parts.append(f"[stderr]\n{self.stderr.rstrip()}")
        parts.extend(self.displays)
        if self.value is not None:
            parts.append(self.value)
        if self.error:
            parts.append(self.error)
        if self.interrupted:
            parts.append("[the user interrupted the code here]")
        text = "\n".join(parts) or "(no output: the code ran without error and printed nothing)"
        return cut(text, limit)


def cut(text: str, limit: int) -> str:
    """``text`` with its middle left out beyond ``limit`` characters, saying so."""
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 3
    return (
        f"{text[:head]}\n[… {len(text) - head - tail:,} characters left out: the output was "
        f"{len(text):,} characters long …]\n{text[len(text) - tail :]}"
    )


_FENCE = re.compile(
    r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^\s`]*)[^\n]*\n(?P<body>.*?)"
    r"(?:^[ \t]*(?P=fence)[`~]*[ \t]*$|\Z)",
    re.M | re.S,
)
#: At most this much text may follow the code block that a step runs.
TRAILING_TEXT = 300


def proposed_code(reply: str) -> str | None:
    """The code a reply asks to run: its last python code block, when little text follows."""
    last = None
    for match in _FENCE.finditer(reply):
        if match["lang"].lower() in ("python", "py", "python3", "ipython", ""):
            last = match
    if last is None or not last["body"].strip():
        return None
    if len(reply[last.end() :].strip()) > TRAILING_TEXT:
        return None  # a code example inside an explanation, not a request to run
    lines = last["body"].strip("\n").splitlines()
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines if ln.strip())
    return "\n".join(line[indent:] for line in lines)


# -- checking saved steps -------------------------------------------------------------------

_STEP_FIELDS = {
    "text": (str,),
    "code": (str,),
    "action": (str,),
    "ran_code": (str, type(None)),
    "output": (str,),
    "note": (str,),
    "stats": (dict,),
}


def steps_problem(steps: object) -> str | None:
    """Why ``steps`` is not a saved list of steps (one phrase), or None."""
    if not isinstance(steps, list):
        return "'steps' must be a list"
    for number, step in enumerate(steps, start=1):
        if not isinstance(step, dict):
            return f"step {number} must be an object"
        for name, kinds in _STEP_FIELDS.items():
            if name not in step:
                return f"step {number}: {name!r} is missing"
            if not isinstance(step[name], kinds):
                return f"step {number}: {name!r} has the wrong type"
        if unknown := sorted(set(step) - set(_STEP_FIELDS)):
            return f"step {number} has an unknown field {unknown[0]!r}"
        if step["action"] not in ACTIONS:
            return f"step {number}: 'action' must be one of {', '.join(ACTIONS)}"
    return None
