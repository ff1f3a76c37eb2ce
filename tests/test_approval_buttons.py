"""%%qwen --run's approval buttons: Run, Skip, Edit and Stop decide a step, in a shell and in a
real kernel whose cell is still running when the click comes."""

from __future__ import annotations

import pytest

from qwen_magic.agent import Decision
from qwen_magic.notebook import approval_buttons
from qwen_magic.notebook.approval_buttons import ButtonApprover
from qwen_magic.testing.kernel import kernel

from .helpers import SCRIPTED_KERNEL_SETUP

CODE = "qm_seen = len(qm_rows)\nqm_seen"


class Never:
    """A fallback that must not be asked."""

    def decide(self, code: str, step: int) -> Decision:
        raise AssertionError("the fallback was asked")


def clicking(*actions):
    """An approver whose waits perform ``actions`` on the step's buttons, one per wait."""
    pending = list(actions)
    approver = ButtonApprover(Never(), sleep=lambda _s: pending.pop(0)(approver.buttons))
    return approver


def test_run_and_skip_and_stop_are_the_clicked_buttons():
    """Each button decides the step it shows, and a second click changes nothing."""
    assert clicking(lambda b: b.run.click()).decide(CODE, 1) == Decision("run")
    assert clicking(lambda b: b.skip.click()).decide(CODE, 2) == Decision("skip")
    both = clicking(lambda b: (b.stop.click(), b.run.click()))
    assert both.decide(CODE, 3) == Decision("stop")


def test_edit_runs_what_the_editor_holds_and_an_emptied_editor_skips():
    """Edit opens the code prefilled; Run then runs the edited text; emptied, it runs nothing."""

    def edit_to(text):
        def act(buttons):
            buttons.edit.click()
            assert buttons.editor.value == CODE and buttons.editor.layout.display is None
            assert buttons.run.description == "Run edited"
            buttons.editor.value = text
            buttons.run.click()

        return act

    assert clicking(edit_to("qm_seen = 99")).decide(CODE, 1) == Decision("edit", "qm_seen = 99")
    assert clicking(edit_to("  \n")).decide(CODE, 1) == Decision("skip")


def test_the_buttons_wait_until_clicked_and_ctrl_c_ends_the_wait(capsys):
    """No decision is made until a click; Ctrl-C while waiting propagates, the widgets closed."""
    waits = []

    def wait(buttons):
        waits.append(buttons)
        if len(waits) == 3:
            raise KeyboardInterrupt

    approver = clicking(wait, wait, wait)
    with pytest.raises(KeyboardInterrupt):
        approver.decide(CODE, 1)
    assert len(waits) == 3 and waits[0].decision is None
    assert waits[0].run.comm is None  # closed
    assert approver.buttons is None


def test_without_a_pump_in_a_kernel_the_fallback_asks(monkeypatch):
    """Where clicks could not reach a busy kernel, the text prompt asks instead of dead buttons."""

    class Prompt:
        asked = 0

        def decide(self, code: str, step: int) -> Decision:
            self.asked += 1
            return Decision("skip")

    prompt = Prompt()
    monkeypatch.setattr(approval_buttons.ApprovalButtons, "needs_pump", True)
    assert ButtonApprover(prompt).decide(CODE, 1) == Decision("skip") and prompt.asked == 1


# -- in a real kernel --------------------------------------------------------------------------

SETUP = SCRIPTED_KERNEL_SETUP + "qm_rows = [1, 2, 3]\n"
COUNT = f"Let me count.\n```python\n{CODE}\n```"
TURNS = "__import__('qwen_magic').Chat().conversation().turns"


def run_clicking(k, cell: str, steps: list[list[tuple[str, dict]]]) -> tuple[dict, list[str]]:
    """Run ``cell``; as each step's buttons appear, send that step's ``(button, editor state)``
    pairs in order: an update of the editor's state where one is given, then a click on the
    button. Returns the execute reply and the text lines the buttons were replaced by."""
    client = k.client
    msg_id = client.execute(cell, allow_stdin=True)
    buttons: dict[str, str] = {}
    editor = None
    outcomes: list[str] = []
    pending = list(steps)
    while True:
        message = client.get_iopub_msg(timeout=60)
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = message["msg_type"], message["content"]
        if kind == "comm_open":
            state = content["data"]["state"]
            if state["_model_name"] == "ButtonModel":
                buttons[state["description"]] = content["comm_id"]
            elif state["_model_name"] == "TextareaModel":
                editor = content["comm_id"]
        elif kind == "display_data" and "Click Run, Skip" in content["data"].get("text/plain", ""):
            for description, edits in pending.pop(0):
                if description == "interrupt":  # the kernel's stop button, not ours
                    k.manager.interrupt_kernel()
                    continue
                if edits:
                    update = {"method": "update", "state": edits, "buffer_paths": []}
                    send(client, editor, update)
                send(
                    client,
                    buttons[description],
                    {"method": "custom", "content": {"event": "click"}},
                )
        elif kind == "update_display_data":
            outcomes.append(content["data"]["text/plain"])
        elif kind == "status" and content["execution_state"] == "idle":
            break
    reply = client.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = client.get_shell_msg(timeout=60)
    return reply["content"], outcomes


def send(client, comm_id: str | None, data: dict) -> None:
    client.shell_channel.send(client.session.msg("comm_msg", {"comm_id": comm_id, "data": data}))


@pytest.mark.kernel
def test_in_a_kernel_the_buttons_decide_while_the_cell_runs():
    """In a real kernel (widget view, stdin allowed), clicks on Run, Edit + Run and Stop reach
    the running cell: approved code runs in the user's namespace, edited code runs instead, a
    stopped step runs nothing, nor does one interrupted while the buttons wait; each step's
    buttons become one line saying what was chosen; and
    with ``QwenMagics.approval = 'prompt'`` the kernel's stdin asks instead."""
    with kernel() as k:
        k.run_ok(SETUP)
        k.run_ok(f"qm_script({COUNT!r}, 'Three.')")
        reply, outcomes = run_clicking(k, "%%qwen --run\nHow many?", [[("Run", {})]])
        assert reply["status"] == "ok", reply
        assert outcomes == ["Step 1: run (approved)."]
        assert k.value("qm_seen") == 3

        k.run_ok(f"qm_script({COUNT!r}, 'Edited.')")
        edited = {"value": "qm_seen = 41 + 1\nqm_seen"}
        reply, outcomes = run_clicking(k, "%%qwen --run\nAgain?", [[("Edit", {}), ("Run", edited)]])
        assert reply["status"] == "ok" and outcomes == ["Step 1: your edited code runs."], reply
        assert k.value("qm_seen") == 42
        assert k.value(f"{TURNS}[-1].steps[0]['action']") == "edited"

        k.run_ok(f"qm_script({COUNT.replace('qm_seen', 'qm_stop')!r}, 'unused')")
        reply, outcomes = run_clicking(k, "%%qwen --run\nOnce more?", [[("Stop", {})]])
        assert reply["status"] == "ok" and outcomes == ["Step 1: stopped."], reply
        assert k.value("'qm_stop' in globals()") is False
        assert k.value(f"{TURNS}[-1].steps[0]['action']") == "stopped"
        assert k.value(f"len({TURNS})") == 3

        k.run_ok(f"qm_script({COUNT.replace('qm_seen', 'qm_int')!r}, 'unused')")
        reply, outcomes = run_clicking(k, "%%qwen --run\nInterrupted?", [[("interrupt", {})]])
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
        assert outcomes == ["Step 1: interrupted at the approval; nothing ran."]
        assert k.value("'qm_int' in globals()") is False
        assert k.value(f"{TURNS}[-1].steps[0]['action']") == "interrupted"
        assert k.value(f"{TURNS}[-1].interrupted") is True

        k.run_ok("%config QwenMagics.approval = 'prompt'")
        k.run_ok(f"qm_script({COUNT.replace('qm_seen', 'qm_skip')!r}, 'Skipped.')")
        prompts: list[str] = []

        def answer(message: dict) -> None:
            prompts.append(message["content"]["prompt"])
            k.client.input("s")

        reply = k.client.execute_interactive(
            "%%qwen --run\nSkip it?", stdin_hook=answer, timeout=60
        )["content"]
        assert reply["status"] == "ok" and len(prompts) == 1, (reply, prompts)
        assert k.value(f"{TURNS}[-1].steps[0]['action']") == "skipped"


def test_in_a_terminal_even_approval_buttons_asks_at_the_prompt(shell, monkeypatch):
    """Outside a Jupyter kernel no one could click, so approval='buttons' asks at the prompt
    (pytest has no terminal: stdin is taken to be one here)."""
    from types import SimpleNamespace

    import qwen_magic
    from qwen_magic.notebook import acting
    from qwen_magic.notebook.approval import PromptApprover

    monkeypatch.setattr(acting, "stdin_available", lambda _shell: True)
    args = SimpleNamespace(yes=False, max_steps=None)
    for approval in ("auto", "buttons", "prompt"):
        agent = acting.make_agent(shell, qwen_magic.Chat(), args, approval, "auto")
        assert type(agent.approver) is PromptApprover, approval
