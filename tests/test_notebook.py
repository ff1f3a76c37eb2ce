"""The notebook assistant: the last error, cells and values in prompts, code from replies
(``qwen_magic/notebook/``), and the magics that use them (``%qwen_error``, ``-i``, ``--code``).
Replies come from a scripted backend, except where a small context trims a traceback."""

from __future__ import annotations

import ast
import re

import pytest
from IPython.core.error import UsageError

from qwen_magic.errors import QwenMagicError
from qwen_magic.notebook import code_cells, interpolation, last_error
from qwen_magic.session import current as session
from qwen_magic.testing.kernel import kernel

from .helpers import ScriptedBackend

FAST = "-n 6 --greedy --view text"
ANSI = re.compile(r"\x1b\[")


@pytest.fixture
def cells(shell):
    """The shell with no earlier cell errors on record; yields a function running one cell as
    a notebook would (numbered, kept in In and in IPython's record of errors)."""
    shell.history_manager.exceptions.clear()
    shell.rl_next_input = None

    def run(source: str):
        return shell.run_cell(source, store_history=True)

    yield run
    shell.history_manager.exceptions.clear()
    shell.rl_next_input = None


def turns(name: str = "default") -> list:
    return session().conversations.get(name).turns


def script(*replies: str) -> ScriptedBackend:
    backend = ScriptedBackend(*replies)
    session().use(backend)
    return backend


# -- the last error ---------------------------------------------------------------------------


def test_strip_ansi_leaves_plain_text():
    """Colour codes go, the words stay."""
    assert last_error.strip_ansi("\x1b[31mZeroDivisionError\x1b[39m: division") == (
        "ZeroDivisionError: division"
    )


def test_last_error_is_the_latest_failing_cell_with_its_source_and_plain_traceback(shell, cells):
    """The last error names the cell that raised it, its source and its colour-free traceback,
    through a function defined in an earlier cell."""
    cells("def qm_ratio(a, b):\n    return a / b")
    first = cells("qm_ratio(1, 0)").execution_count
    cells("qm_fine = 1")
    failing = cells("qm_values = [1, 2]\nqm_values[5]")
    error = last_error.last_error(shell)
    assert error is not None and failing.execution_count == error.number > first
    assert error.source == "qm_values = [1, 2]\nqm_values[5]"
    assert (error.ename, error.evalue) == ("IndexError", "list index out of range")
    text = "\n".join(error.traceback)
    assert not ANSI.search(text)
    assert f"Cell In[{error.number}], line 2" in text
    assert text.rstrip().endswith("IndexError: list index out of range")


def test_a_syntax_error_counts_with_its_cell(shell, cells):
    """A cell that does not parse is an error too, with its source."""
    cells("qm_x = (1,")
    error = last_error.last_error(shell)
    assert error.ename == "SyntaxError" and error.source == "qm_x = (1,"


def test_no_error_yet_is_none(shell, cells):
    """With no failed cell, there is no last error."""
    cells("qm_ok = 1")
    assert last_error.last_error(shell) is None


def test_qwen_magics_own_mistakes_do_not_count_but_ipythons_do(shell, cells, scripted):
    """A one-line mistake of a qwen_magic magic is passed over; IPython's own (an unknown
    magic) and real errors count."""
    cells("1 / 0")
    cells("%%qwen --bogus\nhi")
    cells("%qwen_history -c nope")
    error = last_error.last_error(shell, session().magic_errors)
    assert error.ename == "ZeroDivisionError"
    cells("%qm_no_such_magic")
    assert last_error.last_error(shell, session().magic_errors).ename == "UsageError"


def test_failed_cells_are_watched_even_when_the_frontend_does_not_number_them(
    shell, cells, scripted
):
    """A cell run without history (as nbval runs them) is still the last error, with no number;
    qwen_magic's own mistakes are not watched."""
    shell.run_cell("qm_ratio = 1 / 0", store_history=False)
    shell.run_cell("%%qwen --bogus\nhi", store_history=False)
    shell.run_cell("%qm_no_such_magic", store_history=False)
    shell.run_cell("%qwen_pop -c nope", store_history=False)
    watched = session().last_cell_error
    assert (watched.ename, watched.number, watched.source) == (
        "UsageError",
        None,
        "%qm_no_such_magic",
    )
    shell.run_cell("qm_ratio = 1 / 0", store_history=False)
    shell.run_line_magic("qwen_error", FAST)
    user = turns()[-1].user
    assert user.startswith("Running a cell of my notebook raised ZeroDivisionError.")
    assert "The cell:\n```python\nqm_ratio = 1 / 0\n```" in user


def test_one_watcher_after_reload_ext(shell):
    """%reload_ext replaces the error watcher instead of adding a second one."""
    shell.run_line_magic("reload_ext", "qwen_magic")
    shell.run_line_magic("reload_ext", "qwen_magic")
    watchers = [
        callback
        for callback in shell.events.callbacks["post_run_cell"]
        if type(getattr(callback, "__self__", None)).__name__ == "ErrorWatcher"
    ]
    assert len(watchers) == 1


def test_older_ipython_path_finds_the_cell_from_the_traceback(shell, cells):
    """Without IPython 9's record of errors, the last exception shown (sys.last_value) is used,
    and its cell is found from the traceback's frames."""
    result = cells("def qm_boom():\n    raise ValueError('boom')\nqm_boom()")
    error = last_error._from_sys(shell, set())
    assert error.number == result.execution_count
    assert error.source.startswith("def qm_boom")
    assert error.traceback[-1].strip() == "ValueError: boom"
    assert not ANSI.search("".join(error.traceback))


#: A traceback of 40 distinct frames (IPython folds repeated ones, as in plain recursion).
DEEP_CELL = (
    "for qm_i in range(40):\n"
    "    exec(f'def qm_f{qm_i}(n): return qm_f{qm_i + 1}(n)', globals())\n"
    "def qm_f40(n): raise RuntimeError('bottom' * n)\n"
    "qm_f0(1)"
)


def test_a_long_traceback_keeps_its_head_and_last_frames_and_says_it_was_trimmed(shell, cells):
    """A deep traceback is cut to fit: the cell's frame, the last frames and the error line
    stay, and the prompt says the middle was left out."""
    result = cells(DEEP_CELL)
    error = last_error.last_error(shell)
    full = "\n".join(error.traceback)
    text, left_out = last_error.trim_traceback(error.traceback, 2000)
    assert len(full) > 4000 and len(text) <= 2000
    assert left_out > 30
    assert f"Cell In[{result.execution_count}], line 4" in text.split("\n… ")[0]
    assert text.rstrip().endswith("RuntimeError: bottom")
    assert "frames left out" in text and "qm_f39" in text and "qm_f20" not in text
    prompt = last_error.error_prompt(error, limit=3000)
    assert "Traceback (trimmed to fit: the middle is left out)" in prompt
    assert len(prompt) < 3600


def test_one_enormous_frame_is_cut_in_the_middle():
    """A traceback too long even with frames left out is cut by characters, head and tail kept."""
    text, left_out = last_error.trim_traceback(["Header", "x" * 10_000, "ValueError: v"], 1000)
    assert len(text) <= 1000 and left_out
    assert text.startswith("Header") and text.endswith("ValueError: v")


def test_error_prompt_holds_the_cell_the_traceback_and_the_question():
    """The prompt shows the cell as Python, the traceback, then the default question or the
    user's instruction."""
    error = last_error.CellError(3, "1 / 0", "ZeroDivisionError", "division by zero", ["E: d"])
    prompt = last_error.error_prompt(error)
    assert prompt.startswith("Running cell In[3] of my notebook raised ZeroDivisionError.")
    assert "Cell In[3]:\n```python" in prompt
    assert "```python\n1 / 0\n```" in prompt and "```\nE: d\n```" in prompt
    assert prompt.endswith(last_error.EXPLAIN_AND_FIX)
    assert last_error.error_prompt(error, "Only name the error.").endswith("Only name the error.")


# -- %qwen_error ------------------------------------------------------------------------------


def test_qwen_error_sends_the_last_error_and_joins_the_conversation(shell, cells, scripted, capsys):
    """%qwen_error asks about the failing cell and its traceback; the reply streams, is recorded,
    and a follow-up sees it."""
    number = cells("qm_total = 10\nqm_total / 0").execution_count
    shell.run_line_magic("qwen_error", f"{FAST} -o qm_answer")
    (turn,) = turns()
    assert f"Running cell In[{number}] of my notebook raised ZeroDivisionError" in turn.user
    assert "qm_total / 0" in turn.user and "ZeroDivisionError: division by zero" in turn.user
    assert turn.user.endswith(last_error.EXPLAIN_AND_FIX)
    assert not ANSI.search(turn.user)
    assert shell.user_ns["qm_answer"] == turn.assistant
    assert "tokens · first token" in capsys.readouterr().out
    shell.run_cell_magic("qwen", FAST, "Now fix it another way.")
    assert [t.user for t in turns()][1:] == ["Now fix it another way."]


def test_qwen_error_follows_an_instruction_and_a_conversation_name(shell, cells, scripted):
    """Words after %qwen_error's options replace the default question, taken as written
    (quotes and apostrophes included); -c picks the conversation."""
    cells("int('x')")
    shell.run_line_magic("qwen_error", f'{FAST} -c debug Don\'t fix it, only name the "error".')
    (turn,) = turns("debug")
    assert "ValueError" in turn.user
    assert turn.user.endswith('\n\nDon\'t fix it, only name the "error".')
    assert not turns()


def test_qwen_error_with_no_error_says_so_in_one_line(shell, cells, scripted, capsys):
    """With no failed cell (qwen_magic's own mistakes aside), one line says so; nothing is sent."""
    cells("%%qwen --bogus\nhi")
    capsys.readouterr()
    shell.run_line_magic("qwen_error", FAST)
    assert capsys.readouterr().out.strip().count("\n") == 0
    assert not turns()


def test_qwen_error_passes_over_its_own_bad_options(shell, cells, scripted):
    """A %qwen_error with a bad option fails in one line and does not become the last error."""
    cells("1 / 0")
    cells("%qwen_error -n ten")
    shell.run_line_magic("qwen_error", FAST)
    assert "ZeroDivisionError" in turns()[-1].user


@pytest.mark.demo
@pytest.mark.slow
def test_qwen_error_fits_a_small_context(shell, cells, tiny_with_qwen_tokenizer):
    """A huge traceback is trimmed to the model's context instead of being refused.

    With Qwen's tokenizer: %qwen_error trims by characters, assuming at least ~2 a token, which
    the tiny model's small vocabulary does not give on this traceback (1.7)."""
    cells(DEEP_CELL.replace("qm_f0(1)", "qm_f0(500)"))
    shell.run_line_magic("qwen_error", "-n 400 --greedy --view text")
    assert "trimmed to fit" in turns()[-1].user


# -- cells and values in a prompt --------------------------------------------------------------

NAMESPACE = {
    "qm_n": 3,
    "data": {"key": ["first", "second"], "n": 2},
    "In": ["", "x = 1", "x + 1"],
    "Out": {2: 2},
    "_": 2,
    "text": "plain words",
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("$qm_n and ${qm_n}", "3 and 3"),
        ("${In[1]} / ${Out[2]} / ${_}", "x = 1 / 2 / 2"),
        ("${data['key'][0]} ${data['key'][-1]} ${ data['n'] }", "first second 2"),
        ("${data['key']}", "['first', 'second']"),
        ("$text, not '${text}'", "plain words, not 'plain words'"),
        ("$$5 costs $5; {qm_n} and {} stay", "$5 costs $5; {qm_n} and {} stay"),
    ],
)
def test_interpolate_fills_names_cells_and_values(template, expected):
    """$name, ${name} and ${expression} take values (strings as they are); $$ and braces stay."""
    assert interpolation.interpolate(template, NAMESPACE) == expected


def test_interpolate_reads_attributes():
    """${x.attr} follows attributes."""

    class Frame:
        columns = ("a", "b")

    assert interpolation.interpolate("${df.columns}", {"df": Frame()}) == "('a', 'b')"


def test_a_long_value_is_cut_with_a_note():
    """A value over the limit is cut, and the prompt says how long it was."""
    text = interpolation.interpolate("${big}", {"big": "y" * 5000})
    assert text.startswith("y" * 4000) and "y" * 4001 not in text
    assert text.endswith("[… cut: ${big} is 5,000 characters long; only the first 4,000 are shown]")


@pytest.mark.parametrize(
    ("template", "named"),
    [
        ("$nope", "no variable 'nope'"),
        ("${nope.x}", "no variable 'nope'"),
        ("${In[9]}", "In has no cell 9"),
        ("${Out[1]}", "Out has no entry 1"),
        ("${data['missing']}", "data has no key 'missing'"),
        ("${data['key'][7]}", "data['key'] has no index 7"),
        ("${qm_n.nothing}", "int object has no attribute 'nothing'"),
        ("${len(data)}", "${len(data)} is not allowed"),
        ("${qm_n + 1}", "${qm_n + 1} is not allowed"),
        ("${data[qm_n]}", "an index must be a literal"),
        ("${qm_n.__class__}", "no .__dunder__ attributes"),
        ("${data['key'][1:]}", "an index must be a literal"),
        ("${ qm_n", "is not closed"),
    ],
)
def test_interpolation_mistakes_are_one_line_errors_naming_them(template, named):
    """An unknown name, a missing index or a disallowed expression is one line naming it."""
    with pytest.raises(QwenMagicError) as caught:
        interpolation.interpolate(template, NAMESPACE)
    message = str(caught.value)
    assert named in message and "\n" not in message


def test_a_closing_brace_inside_a_string_literal_does_not_end_the_placeholder():
    """${x['}']} reads the key '}', and ${x["a}b"]} the key "a}b": a } inside quotes is text."""
    values = {"x": {"}": "brace", "a}b": "both", "it's": "quote"}}
    assert interpolation.interpolate("${x['}']} ${x[\"a}b\"]}", values) == "brace both"
    assert interpolation.interpolate("${x['it\\'s']}!", values) == "quote!"


def test_out_with_a_negative_index_points_to_the_underscore_names():
    """${Out[-1]} (Out is keyed by cell number) is one line that suggests ${_}."""
    with pytest.raises(QwenMagicError) as caught:
        interpolation.interpolate("${Out[-1]}", NAMESPACE)
    message = str(caught.value)
    assert "use ${_} for the last output" in message and "\n" not in message


class ManyLines:
    def __repr__(self) -> str:
        return "0123456789\n" * 10_000_000  # 110 MB in ten million lines


class CallsItself:
    def __repr__(self) -> str:
        return repr(self)


class NeverEnds:
    def __repr__(self) -> str:
        while True:
            pass


@pytest.mark.parametrize(
    "value",
    [ManyLines(), ["y" * 50_000_000, list(range(10**6))], {"k": list(range(10**7))}],
    ids=["huge-repr", "list-with-a-huge-string", "dict-of-a-long-list"],
)
def test_a_huge_value_is_cut_in_bounded_time(value):
    """A value whose text is huge (a 110 MB repr, a 50 MB string in a list, ten million items)
    is cut to the limit in well under a second, not after formatting it all."""
    import time

    started = time.perf_counter()
    text = interpolation.render(value, "${big}")
    assert time.perf_counter() - started < 1.5
    assert len(text) < interpolation.VALUE_LIMIT + 100
    assert text.endswith("is longer than 4,000 characters as text; only the first 4,000 are shown]")


def test_a_recursive_or_endless_repr_is_one_line(monkeypatch):
    """A __repr__ that calls itself, or runs past the time limit, is a one-line error."""
    from qwen_magic.notebook import bounded_repr

    with pytest.raises(QwenMagicError, match="repr calls itself") as caught:
        interpolation.interpolate("${x}", {"x": CallsItself()})
    assert "\n" not in str(caught.value)
    monkeypatch.setattr(bounded_repr, "REPR_SECONDS", 0.2)
    with pytest.raises(QwenMagicError, match=r"took more than 0\.2 s") as caught:
        interpolation.interpolate("${x}", {"x": NeverEnds()})
    assert "\n" not in str(caught.value)
    assert interpolation.interpolate("${x}", {"x": [1, 2]}) == "[1, 2]"  # the timer is gone


def test_interpolation_never_calls_anything():
    """A property may run (it is an attribute), but no call in the expression is ever made."""
    called = []
    with pytest.raises(QwenMagicError):
        interpolation.interpolate("${f()}", {"f": lambda: called.append(1)})
    assert called == []


def test_qwen_i_takes_cells_and_outputs_from_the_notebook(shell, cells, scripted):
    """%%qwen -i puts In[n] and Out[n] of the notebook into the message."""
    number = cells("qm_a = 20\nqm_a + 22").execution_count
    shell.run_cell_magic(
        "qwen", f"{FAST} -i", f"Cell:\n${{In[{number}]}}\nshowed ${{Out[{number}]}} ($$)."
    )
    assert turns()[-1].user == "Cell:\nqm_a = 20\nqm_a + 22\nshowed 42 ($)."


def test_qwen_i_with_a_bad_expression_records_nothing(shell, scripted):
    """A disallowed expression is a UsageError naming it; nothing is sent."""
    with pytest.raises(UsageError, match=r"\$\{open\('x'\)\} is not allowed"):
        shell.run_cell_magic("qwen", f"{FAST} -i", "Read ${open('x')}")
    assert not turns()


# -- code from a reply -------------------------------------------------------------------------

REPLY_WITH_CODE = (
    "Here it is:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nRun it:\n\n"
    "```bash\npython add.py\n```\n\nOr:\n\n```py\nprint(add(1, 2))\n```\n"
)


@pytest.mark.parametrize(
    ("reply", "blocks"),
    [
        (REPLY_WITH_CODE, ["def add(a, b):\n    return a + b", "print(add(1, 2))"]),
        ("```\nx = 1\n```", ["x = 1"]),
        ("1. Step:\n   ```python\n   y = 2\n   ```", ["y = 2"]),
        ("~~~Python\nz = 3\n~~~", ["z = 3"]),
        (
            "cut short:\n```python\nfor i in range(3):\n    print(i)",
            ["for i in range(3):\n    print(i)"],
        ),
        ("```json\n{}\n```\nno python here", []),
        (
            'A string:\n\n```python\ns = """\n```\n"""\nprint(s)\n```\n\nDone.',
            ['s = """\n```\n"""\nprint(s)'],
        ),
        ("````python\nfence = '''\n```\n'''\n````\n", ["fence = '''\n```\n'''"]),
        ("> ```python\n> quoted = 1\n> ```", ["quoted = 1"]),
        ("```python\nbroken = '''\n```\nafter", ["broken = '''"]),
        ("no code at all", []),
    ],
)
def test_code_blocks_are_the_python_fences(reply, blocks):
    """Python, py and bare fences count (also indented, or left open at the end); others not."""
    assert code_cells.code_blocks(reply) == blocks


def test_code_says_when_the_last_block_looks_cut(shell, capsys):
    """A reply that ends inside its code block (cut by -n) still gives its code, and the line
    says the block looks cut short; a closed block gets no such note."""
    script("Here:\n```python\nfor i in range(3):\n    print(i")
    shell.run_cell_magic("qwen", "--view text --code", "Count.")
    out = capsys.readouterr().out
    assert "its last block looks cut short" in out
    assert shell.rl_next_input == "for i in range(3):\n    print(i"
    script("```python\nx = 1\n```")
    shell.run_cell_magic("qwen", "--view text --code", "Again.")
    assert "cut short" not in capsys.readouterr().out


def test_python_code_joins_the_blocks_into_one_cell():
    """Several blocks become one cell's source, which parses."""
    code = code_cells.python_code(REPLY_WITH_CODE)
    assert code == "def add(a, b):\n    return a + b\n\nprint(add(1, 2))"
    ast.parse(code)
    assert code_cells.python_code("none") is None


def test_code_puts_the_replys_code_in_the_next_input(shell, cells, capsys):
    """--code hands the reply's code to set_next_input (a new cell in JupyterLab, the next
    prompt in a terminal), not run, and says so in one line."""
    script(REPLY_WITH_CODE)
    shell.run_cell_magic("qwen", "--view text --code -o qm_reply", "Write add.")
    assert shell.rl_next_input == code_cells.python_code(REPLY_WITH_CODE)
    assert "add" not in shell.user_ns
    out = capsys.readouterr().out
    assert "--code: the reply's code (4 lines) is in the next prompt, not run." in out


def test_code_without_a_code_block_adds_nothing_and_says_so(shell, cells, capsys):
    """A reply with no Python block leaves the next input alone, with a one-line note."""
    script("Just words.")
    shell.run_cell_magic("qwen", "--view text -x", "Hello")
    assert shell.rl_next_input is None
    out = capsys.readouterr().out
    assert "--code: the reply has no Python code block; no cell was added." in out


def test_qwen_error_code_offers_the_fixed_cell(shell, cells):
    """%qwen_error --code puts the corrected code of the reply into the next input."""
    backend = script("Divide by a non-zero number:\n```python\nprint(1 / 2)\n```")
    cells("print(1 / 0)")
    shell.run_line_magic("qwen_error", "--view text --code")
    assert shell.rl_next_input == "print(1 / 2)"
    assert "print(1 / 0)" in backend.prompts[-1][-1]["content"]


def last_message(k) -> str:
    return k.value("__import__('qwen_magic').Chat().conversation().turns[-1].user")


@pytest.mark.kernel
def test_in_a_kernel_the_error_cells_and_code_work(tiny_model_path):
    """In a real kernel, %qwen_error finds the failed cell, -i reads In[n] and Out[n], and
    --code sends a set_next_input payload (what JupyterLab turns into a new cell below), not
    run."""
    with kernel() as k:
        k.run_ok(f"%load_ext qwen_magic\n%qwen_load {tiny_model_path} --device cpu --quiet")
        failed = k.run("qm_items = {}\nqm_items['missing']")
        assert failed["status"] == "error" and failed["ename"] == "KeyError"
        k.run_ok("%qwen_error -n 4 --greedy --view text")
        user = last_message(k)
        assert f"cell In[{failed['execution_count']}]" in user and "KeyError: 'missing'" in user
        number = k.run("qm_n = 20\nqm_n + 22")["execution_count"]
        k.run_ok(
            f"%%qwen -i -n 4 --greedy --view text\n${{In[{number}]}} showed ${{Out[{number}]}}"
        )
        assert last_message(k) == "qm_n = 20\nqm_n + 22 showed 42"
        k.run_ok(
            "from tests.helpers import ScriptedBackend\n"
            "__import__('qwen_magic').current_session().use(ScriptedBackend("
            f"{REPLY_WITH_CODE!r}))"
        )
        reply = k.run("%%qwen --code\nWrite add.")
        assert reply["status"] == "ok", reply
        (payload,) = [p for p in reply["payload"] if p["source"] == "set_next_input"]
        assert payload["text"] == code_cells.python_code(REPLY_WITH_CODE)
        assert payload["replace"] is False
        assert k.value("'add' in globals()") is False


# -- the words of the real model ---------------------------------------------------------------


@pytest.mark.demo
def test_demo_explains_a_zero_division(shell, cells, demo):
    """The demo model, shown a ZeroDivisionError, names it and points at the zero."""
    cells("prices = [3, 4]\naverage = sum(prices) / 0")
    shell.run_line_magic("qwen_error", "-n 120 --greedy --view text -o qm_answer")
    answer = shell.user_ns["qm_answer"]
    assert "ZeroDivisionError" in answer or "division by zero" in answer.lower(), answer
    assert "zero" in answer.lower()


@pytest.mark.demo
def test_demo_code_is_a_runnable_function(shell, cells, demo):
    """Asked for a function with --code, the demo model's code lands in the next input and
    defines it."""
    shell.run_cell_magic(
        "qwen",
        "-n 80 --greedy --view text --code",
        "Write a Python function add(a, b) that returns a + b. Only the code.",
    )
    code = shell.rl_next_input
    namespace: dict = {}
    exec(compile(ast.parse(code), "<reply>", "exec"), namespace)
    assert namespace["add"](2, 3) == 5
