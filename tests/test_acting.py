"""%%qwen --run, --yes, --max-steps, --vars and %qwen_error --run: the magics, in a shell and in
real kernels (stdin or none, Ctrl-C while the code runs), and the demo model's words."""

from __future__ import annotations

import threading
import time

import pytest
from IPython.core.error import UsageError

from qwen_magic import current_session as session
from qwen_magic.backends.scripted import ScriptedBackend
from qwen_magic.testing.kernel import kernel

from .helpers import SCRIPTED_KERNEL_SETUP

COUNT = "Let me count.\n```python\nqm_seen = len(qm_rows)\nqm_seen\n```"
TURNS = "__import__('qwen_magic').Chat().conversation().turns"


def scripted(*replies: str) -> ScriptedBackend:
    return session().use(ScriptedBackend(*replies))


def turns() -> list:
    return session().conversations.get("default").turns


def test_run_yes_runs_the_steps_and_records_one_turn(shell, capsys):
    """%%qwen --run --yes runs the proposed code in the namespace and answers with its result."""
    shell.user_ns["qm_rows"] = [1, 2, 3]
    backend = scripted(COUNT, "There are 3 rows.")
    shell.run_cell_magic("qwen", "--run --yes --view text -o qm_answer", "How many rows?")
    assert shell.user_ns["qm_seen"] == 3 and shell.user_ns["qm_answer"] == "There are 3 rows."
    assert "qm_rows: list, 3 items" in backend.prompts[0][0]["content"]
    (turn,) = turns()
    assert turn.user == "How many rows?" and [s["action"] for s in turn.steps] == ["ran"]
    assert "Step 1: running the code (--yes)." in capsys.readouterr().out


def test_run_without_stdin_or_yes_is_one_line_and_asks_nothing(shell):
    """Where no one can answer the prompt, --run without --yes refuses before asking, and
    before --new would forget the conversation."""
    shell.user_ns["qm_rows"] = [1]
    backend = scripted("Hello.", COUNT)
    shell.run_cell_magic("qwen", "--view text", "Hi.")
    with pytest.raises(UsageError, match="add --yes to approve every step"):
        shell.run_cell_magic("qwen", "--run --new --view text", "How many rows?")
    assert len(backend.prompts) == 1 and len(turns()) == 1 and "qm_seen" not in shell.user_ns


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("--run --max-steps 0", "--max-steps must be a whole number from 1 to 50 (got '0')"),
        ("--run --max-steps -1", "--max-steps must be a whole number from 1 to 50 (got '-1')"),
        ("--run --max-steps abc", "--max-steps must be a whole number from 1 to 50 (got 'abc')"),
        ("--yes", "--yes approves the steps of --run; add --run"),
        ("--max-steps 3", "--max-steps limits the steps of --run"),
        ("--run --yes --vars qm_nothing", "--vars: no variable named 'qm_nothing'"),
    ],
)
def test_bad_acting_options_are_one_line_and_change_nothing(shell, line, said):
    """Each mistake is one UsageError line; nothing is asked, run or recorded."""
    backend = scripted(COUNT)
    with pytest.raises(UsageError) as caught:
        shell.run_cell_magic("qwen", f"{line} --view text", "How many rows?")
    assert said in str(caught.value)
    assert backend.prompts == [] and turns() == []


def test_vars_without_run_gives_a_plain_chat_the_summary(shell):
    """--vars NAME adds that variable's summary to a plain chat's system prompt only."""
    shell.user_ns["qm_table"] = {"a": 1}
    shell.user_ns["qm_other"] = 5
    backend = scripted("It has one key.")
    shell.run_cell_magic("qwen", "--vars qm_table --view text", "What is in qm_table?")
    system = backend.prompts[0][0]["content"]
    assert "qm_table: dict, 1 key" in system and "qm_other" not in system
    assert "python code block" not in system  # no acting without --run
    assert turns()[0].steps == []


def test_code_with_run_puts_the_code_that_ran_below(shell, capsys):
    """--code with --run offers the code that ran, so the notebook reproduces without the model."""
    shell.user_ns["qm_rows"] = [1, 2]
    scripted(COUNT, "Two rows.")
    shell.rl_next_input = None
    shell.run_cell_magic("qwen", "--run --yes --code --view text", "How many rows?")
    assert shell.rl_next_input == "qm_seen = len(qm_rows)\nqm_seen"
    assert "the code that ran (1 step)" in capsys.readouterr().out
    shell.rl_next_input = None


def test_qwen_error_run_fixes_and_checks(shell):
    """%qwen_error --run --yes sends the failed cell, runs the proposed fix and sees it work."""
    shell.history_manager.exceptions.clear()
    shell.run_cell("qm_prices = [3, 4]\nqm_mean = sum(qm_prices) / 0", store_history=True)
    fix = "Divide by the count:\n```python\nqm_mean = sum(qm_prices) / len(qm_prices)\nqm_mean\n```"
    backend = scripted(fix, "It divided by zero; it now divides by the count, 3.5.")
    shell.run_line_magic("qwen_error", "--run --yes --view text")
    assert shell.user_ns["qm_mean"] == 3.5
    assert "ZeroDivisionError" in backend.prompts[0][1]["content"]
    assert "3.5" in backend.prompts[1][-1]["content"]
    shell.history_manager.exceptions.clear()


def test_history_shows_the_steps(shell, capsys):
    """%qwen_history names the steps of an acting turn."""
    shell.user_ns["qm_rows"] = [1]
    scripted(COUNT, "One.")
    shell.run_cell_magic("qwen", "--run --yes --view text", "How many rows?")
    capsys.readouterr()
    shell.run_line_magic("qwen_history", "")
    assert "[1 step: ran]" in capsys.readouterr().out


SETUP = SCRIPTED_KERNEL_SETUP


@pytest.mark.kernel
def test_in_a_kernel_stdin_input_and_interrupts(tmp_path):
    """In a real kernel: no stdin refuses --run, the prompt's answer decides (run, skip), code
    calling input() without stdin shows the model the error, and Ctrl-C while the code sleeps
    ends the cell with the step recorded as interrupted."""
    with kernel() as k:
        k.run_ok(SETUP + "qm_rows = [1, 2, 3]")
        reply = k.client.execute_interactive(
            "%%qwen --run --view text\nHow many?", allow_stdin=False, timeout=60
        )["content"]
        assert reply["status"] == "error" and "add --yes" in reply["evalue"], reply
        assert k.value(f"len({TURNS})") == 0 and k.value("'qm_seen' in globals()") is False

        answers = iter(["r", "s"])
        prompts: list[str] = []

        def answer(message: dict) -> None:
            prompts.append(message["content"]["prompt"])
            k.client.input(next(answers))

        run = "%%qwen --run --view text\nHow many?"
        k.run_ok(f"qm_script({COUNT!r}, 'Three.', {COUNT.replace('qm_seen', 'qm_skip')!r}, 'Ok.')")
        for _ in range(2):
            reply = k.client.execute_interactive(run, stdin_hook=answer, timeout=60)["content"]
            assert reply["status"] == "ok", reply
        assert prompts == ["Step 1: run this code? [r]un, [s]kip, [e]dit, s[t]op: "] * 2
        assert k.value("qm_seen") == 3 and k.value("'qm_skip' in globals()") is False
        assert k.value(f"[t.steps[0]['action'] for t in {TURNS}]") == ["ran", "skipped"]

        asks = "Ask.\n```python\nqm_name = input('Name? ')\n```"
        k.run_ok(f"qm_script({asks!r}, 'I cannot ask.')")
        reply = k.client.execute_interactive(
            "%%qwen --run --yes --view text\nAsk my name.", allow_stdin=False, timeout=60
        )["content"]
        assert reply["status"] == "ok", reply
        assert "StdinNotImplementedError" in k.value(f"{TURNS}[-1].steps[0]['output']")

        sleeps = "Wait.\n```python\nimport time\nprint('started')\ntime.sleep(60)\n```"
        k.run_ok(f"qm_script({sleeps!r}, 'unused')")
        interrupter = threading.Timer(3.0, k.manager.interrupt_kernel)
        interrupter.start()
        started = time.perf_counter()
        reply = k.run("%%qwen --run --yes --view text\nWait a minute.", timeout=60)
        interrupter.join()
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
        assert time.perf_counter() - started < 20
        step = k.value(f"{TURNS}[-1].steps[0]")
        assert step["action"] == "interrupted" and "started" in step["output"]
        assert k.value(f"{TURNS}[-1].interrupted") is True
        assert k.value("1 + 1") == 2  # the kernel goes on


# -- the words of the real model ---------------------------------------------------------------

SALES = (
    "import numpy as np, pandas as pd\n"
    "qm_rng = np.random.default_rng(7)\n"
    "sales = pd.DataFrame({'region': qm_rng.choice(['north', 'south', 'east', 'west'], 1234),\n"
    "                      'amount': qm_rng.uniform(0, 100, 1234).round(2)})\n"
)


@pytest.mark.demo
@pytest.mark.kernel
def test_demo_counts_rows_by_running_code_and_answers_arithmetic_directly(demo_path):
    """In a real kernel, the demo model counts `sales` rows by running code, answers with the
    true count (its second step continuing the first's KV cache), and runs no code for 2 + 2."""
    with kernel() as k:
        k.run_ok("%load_ext qwen_magic\n%qwen_load demo --quiet\n" + SALES)
        true_count = k.value("int((sales['amount'] > 50).sum())")
        k.run_ok(
            "%%qwen --run --yes --greedy --view text -n 120\n"
            "How many rows of `sales` have an amount above 50?",
            timeout=900,
        )
        turn = f"{TURNS}[-1]"
        answer = k.value(f"{turn}.assistant")
        steps = k.value(f"[(s['action'], s['output']) for s in {turn}.steps]")
        assert steps and steps[0] == ("ran", str(true_count)), steps
        assert str(true_count) in answer, answer
        first_prompt = k.value(f"{turn}.steps[0]['stats']['prompt_tokens']")
        assert k.value(f"{turn}.stats['cached_prompt_tokens']") >= first_prompt
        k.run_ok("%%qwen --run --yes --greedy --view text -n 60 --new\nWhat is 2 + 2?", timeout=600)
        assert k.value(f"{turn}.steps") == []
        assert "4" in k.value(f"{turn}.assistant")


@pytest.mark.slow
def test_in_terminal_ipython_the_prompt_reads_the_terminal():
    """--run --view text in terminal IPython asks on the terminal and runs what is approved."""
    import os
    import sys

    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    argv = ["-m", "IPython", "--no-banner", "--colors=NoColor", "--simple-prompt"]
    argv.append("--HistoryManager.hist_file=:memory:")
    child = pexpect.spawn(sys.executable, argv, env=env, encoding="utf-8", timeout=60)
    try:
        child.expect(r"In \[1\]: ")
        child.sendline("%load_ext qwen_magic")
        child.expect(r"In \[2\]: ")
        code = "Count.\n```python\nqm_seen = 7\nqm_seen\n```"
        child.sendline(
            "from qwen_magic.backends.scripted import ScriptedBackend; import qwen_magic; "
            f"qwen_magic.current_session().use(ScriptedBackend({code!r}, 'Seven.'))"
        )
        child.expect(r"In \[3\]: ")
        child.sendline("get_ipython().run_cell_magic('qwen', '--run --view text', 'How many?')")
        child.expect(r"Step 1: run this code\? \[r\]un, \[s\]kip, \[e\]dit, s\[t\]op: ")
        child.sendline("r")
        child.expect("Seven.")
        child.expect(r"In \[4\]: ")
        child.sendline("print('seen', qm_seen)")
        child.expect("seen 7")
    finally:
        child.terminate(force=True)
