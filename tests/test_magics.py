"""%%qwen and the conversation magics in a real IPython shell.

The magics' mechanics (turns, names, options, interpolation, history) reply with a scripted
backend; the tiny model runs where its generate call or its loading is what is checked."""

from __future__ import annotations

import re

import pytest
from IPython.core.error import UsageError

from qwen_magic.session import current as session

from .helpers import spy_on_generate

FAST = "-n 6 --greedy --view text"


def turns(name: str = "default") -> list:
    return session().conversations.get(name).turns


def ask(shell, message: str, line: str = FAST) -> None:
    shell.run_cell_magic("qwen", line, message)


def test_qwen_without_a_model_says_to_load_one(shell):
    """%%qwen before %qwen_load is a UsageError telling the user to run %qwen_load."""
    with pytest.raises(UsageError, match="%qwen_load"):
        ask(shell, "hello")


def test_empty_cell_is_refused_and_history_untouched(shell, scripted):
    """An empty cell is a UsageError and the conversation keeps its turns."""
    ask(shell, "hello")
    with pytest.raises(UsageError, match="empty"):
        ask(shell, "   \n ")
    assert len(turns()) == 1


def test_each_cell_adds_one_user_assistant_pair(shell, scripted, capsys):
    """Each %%qwen cell adds exactly one turn whose text was streamed to the output."""
    ask(shell, "first")
    ask(shell, "second")
    assert [t.user for t in turns()] == ["first", "second"]
    out = capsys.readouterr().out
    assert turns()[1].assistant in out
    assert "3 tokens · first token" in out  # a footer (too short a reply for a rate)
    messages = session().conversations.get("default").messages("third")
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]


def test_rerunning_a_cell_replaces_its_turn(shell, scripted, monkeypatch):
    """A cell id seen before replaces that turn and drops the ones after it."""
    cell = {"id": "cell-a"}
    monkeypatch.setattr("qwen_magic.notebook.magics.current_cell_id", lambda _shell: cell["id"])
    ask(shell, "question A")
    cell["id"] = "cell-b"
    ask(shell, "question B")
    cell["id"] = "cell-a"
    ask(shell, "question A, edited")
    assert [t.user for t in turns()] == ["question A, edited"]
    assert turns()[0].cell_id == "cell-a"


def test_named_conversations_are_independent(shell, scripted):
    """-c NAME keeps a separate history."""
    ask(shell, "in default")
    ask(shell, "in other", f"{FAST} -c other")
    ask(shell, "in other again", f"{FAST} -c other")
    assert len(turns()) == 1
    assert [t.user for t in turns("other")] == ["in other", "in other again"]


def test_new_starts_the_conversation_afresh(shell, scripted):
    """--new forgets the earlier turns before asking."""
    ask(shell, "one")
    ask(shell, "two", f"{FAST} --new")
    assert [t.user for t in turns()] == ["two"]


def test_out_variable_receives_the_reply(shell, scripted):
    """-o NAME stores the reply text in the user's namespace."""
    ask(shell, "hello", f"{FAST} -o qm_reply")
    assert shell.user_ns["qm_reply"] == turns()[-1].assistant


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("print", "would hide Python's built-in print"),
        ("len", "would hide Python's built-in len"),
        ("Out", "one of IPython's own names"),
        ("In", "one of IPython's own names"),
        ("get_ipython", "one of IPython's own names"),
        ("exit", "one of IPython's own names"),
        ("_", "one of IPython's own names"),
        ("__", "one of IPython's own names"),
        ("_i", "one of IPython's own names"),
        ("_i3", "one of IPython's own names"),
        ("_7", "one of IPython's own names"),
        ("_oh", "one of IPython's own names"),
        ("_dh", "one of IPython's own names"),
    ],
)
def test_out_refuses_builtin_and_ipython_names(shell, name, says):
    """-o with a builtin's or IPython's own name is refused in one line before anything is
    generated, and the name keeps its value."""
    before = shell.user_ns.get(name, "absent")
    with pytest.raises(UsageError, match=re.escape(says)) as error:
        ask(shell, "hello", f"{FAST} -o {name}")
    assert "\n" not in str(error.value) and "e.g. -o reply" in str(error.value)
    assert turns() == []
    assert shell.user_ns.get(name, "absent") is before
    shell.run_cell("qm_printed = print")
    assert shell.user_ns["qm_printed"] is print


def test_qwen_system_refuses_an_unknown_conversation_unless_given_a_prompt(shell, capsys):
    """%qwen_system -c NAME without a prompt refuses a conversation that does not exist (none
    is created); with a prompt it creates it and says so."""
    with pytest.raises(UsageError, match=r"No conversation named 'nosuch'.*PROMPT") as error:
        shell.run_line_magic("qwen_system", "-c nosuch")
    assert "\n" not in str(error.value)
    assert "nosuch" not in session().conversations.conversations
    capsys.readouterr()
    shell.run_line_magic("qwen_system", "-c notes Be brief.")
    assert capsys.readouterr().out.startswith("Created the conversation; system prompt of 'notes'")
    assert session().conversations.get("notes", create=False).system_prompt == "Be brief."
    shell.run_line_magic("qwen_system", "-c notes")
    assert capsys.readouterr().out.startswith("System prompt of 'notes': 'Be brief.'")
    shell.run_line_magic("qwen_system", "")  # the default conversation always answers
    assert capsys.readouterr().out.startswith("System prompt of 'default'")


def test_options_reach_generate(shell, tiny, monkeypatch):
    """Magic options become generate() arguments; the turn records them."""
    calls = spy_on_generate(tiny, monkeypatch)
    ask(
        shell,
        "hi",
        "-n 4 --sample -t 0.6 --top-p 0.8 --top-k 5 --repetition-penalty 1.1 --seed 3 --view text",
    )
    (seen,) = calls
    assert seen["max_new_tokens"] == 4 and seen["do_sample"] is True
    assert (seen["temperature"], seen["top_p"], seen["top_k"]) == (0.6, 0.8, 5)
    assert seen["repetition_penalty"] == 1.1
    assert turns()[-1].options["seed"] == 3


def test_config_traitlets_set_defaults(shell, tiny, monkeypatch):
    """%config QwenMagics.max_new_tokens changes the default reply budget."""
    calls = spy_on_generate(tiny, monkeypatch)
    shell.run_line_magic("config", "QwenMagics.max_new_tokens = 3")
    try:
        ask(shell, "hi", "--greedy --view text")
    finally:
        shell.run_line_magic("config", "QwenMagics.max_new_tokens = 512")
    assert calls[-1]["max_new_tokens"] == 3


def test_system_prompts_one_off_and_persistent(shell, scripted, monkeypatch):
    """-s changes one turn's system prompt; --set-system changes the conversation's."""
    rendered = []
    backend = session().backend
    real = backend.start

    def spy(messages, *args, **kwargs):
        rendered.append(messages[0]["content"])
        return real(messages, *args, **kwargs)

    monkeypatch.setattr(backend, "start", spy)
    ask(shell, "a", f"{FAST} -s 'Be terse.'")
    ask(shell, "b")
    ask(shell, "c", f"{FAST} --set-system 'Answer in French.'")
    ask(shell, "d")
    assert rendered == [
        "Be terse.",
        "You are a helpful assistant.",
        "Answer in French.",
        "Answer in French.",
    ]


def test_interpolation_is_explicit_and_leaves_braces_alone(shell, scripted):
    """-i replaces $name; without -i nothing changes; braces in code always pass untouched."""
    shell.user_ns["qm_lang"] = "Rust"
    code = 'def f():\n    return {"key": [1, 2]}  # ${not_a_var} without -i'
    ask(shell, f"Explain in $qm_lang:\n{code}")
    assert turns()[-1].user == f"Explain in $qm_lang:\n{code}"
    ask(shell, 'Port to ${qm_lang}: def f(): return {"k": 1}', f"{FAST} -i")
    assert turns()[-1].user == 'Port to Rust: def f(): return {"k": 1}'


def test_interpolation_of_an_unknown_name_is_a_usage_error(shell, scripted):
    """-i with an undefined variable says which one, and records nothing."""
    with pytest.raises(UsageError, match="qm_missing"):
        ask(shell, "Tell me about $qm_missing", f"{FAST} -i")
    assert not turns()


@pytest.mark.parametrize(
    "line",
    ["--bogus", "-n 0", "-t -1", "--top-p 2", "--greedy --sample", "--view nowhere", "-n ten"],
)
def test_bad_options_are_usage_errors_and_lose_nothing(shell, scripted, line):
    """Bad flags or values raise a one-line UsageError and keep the conversation intact."""
    ask(shell, "kept")
    with pytest.raises(UsageError) as caught:
        ask(shell, "never recorded", line)
    assert "\n" not in str(caught.value).strip()
    assert [t.user for t in turns()] == ["kept"]


def test_history_pop_reset_and_system_magics(shell, scripted, capsys):
    """%qwen_history lists turns; %qwen_pop and %qwen_reset remove them; %qwen_system sets."""
    ask(shell, "alpha")
    ask(shell, "beta")
    capsys.readouterr()
    shell.run_line_magic("qwen_history", "")
    listing = capsys.readouterr().out
    assert "2 turns" in listing and "alpha" in listing and "beta" in listing
    assert re.search(r"History: \d+ tokens", listing)
    shell.run_line_magic("qwen_pop", "")
    assert [t.user for t in turns()] == ["alpha"]
    shell.run_line_magic("qwen_system", "Be brief.")
    assert session().conversations.get("default").system_prompt == "Be brief."
    shell.run_line_magic("qwen_reset", "")
    assert turns() == []
    with pytest.raises(UsageError, match="No conversation named 'nope'"):
        shell.run_line_magic("qwen_history", "-c nope")


def test_help_lists_every_option(shell):
    """%%qwen? shows the options, because they are declared with magic_arguments."""
    doc = shell.find_cell_magic("qwen").__doc__
    for option in (
        "--max-new-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--greedy",
        "--system",
        "--new",
        "--conversation",
        "--out",
        "--interpolate",
    ):
        assert option in doc


def test_conversations_survive_reload_ext(shell, tiny):
    """%reload_ext keeps the conversation and the loaded model."""
    ask(shell, "remember me")
    shell.run_line_magic("reload_ext", "qwen_magic")
    assert [t.user for t in turns()] == ["remember me"]
    assert session().backend.loaded is tiny


def test_qwen_unload_frees_the_model_and_keeps_the_conversation(shell, tiny_model_path, capsys):
    """%qwen_unload lets the model's memory go; the turns stay, and a new load chats on."""
    import gc
    import weakref

    load = f"{tiny_model_path} --device cpu --quiet"
    shell.run_line_magic("qwen_load", load)
    ask(shell, "remember me")
    weights = weakref.ref(session().backend.loaded.model)
    shell.run_line_magic("qwen_unload", "")
    gc.collect()
    assert weights() is None, "something still holds the unloaded model"
    assert "Unloaded" in capsys.readouterr().out
    with pytest.raises(UsageError, match="%qwen_load"):
        ask(shell, "are you there?")
    assert [t.user for t in turns()] == ["remember me"]
    shell.run_line_magic("qwen_unload", "")
    assert "nothing to free" in capsys.readouterr().out
    shell.run_line_magic("qwen_load", load)
    ask(shell, "still here?")
    assert [t.user for t in turns()] == ["remember me", "still here?"]


@pytest.mark.demo
def test_demo_answers_and_follows_up(shell, demo):
    """The real model answers a factual question and a follow-up that needs the first turn."""
    ask(
        shell,
        "What is the capital of France? Answer in one short sentence.",
        "-n 30 --greedy --view text -o qm_first",
    )
    assert "Paris" in shell.user_ns["qm_first"]
    ask(shell, "And of Germany? Answer the same way.", "-n 30 --greedy --view text -o qm_second")
    assert "Berlin" in shell.user_ns["qm_second"]


@pytest.mark.demo
def test_demo_answers_in_chinese_without_broken_characters(shell, demo):
    """A Chinese prompt yields Chinese text with no U+FFFD replacement characters."""
    ask(shell, "用一句话介绍一下北京。", "-n 40 --greedy --view text -o qm_zh")
    reply = shell.user_ns["qm_zh"]
    assert re.search(r"[\u4e00-\u9fff]", reply)
    assert "\ufffd" not in reply
    assert "北京" in reply


def test_fast_reaches_generate_as_a_static_cache(shell, tiny, monkeypatch):
    """--fast (or %config QwenMagics.fast) makes generate decode into a StaticCache."""
    from transformers import StaticCache

    from qwen_magic.backends.kernel.prefill import cache_argument

    seen = spy_on_generate(tiny, monkeypatch)
    ask(shell, "hi")
    assert not isinstance(seen[-1].get(cache_argument()), StaticCache)
    ask(shell, "hi again", f"{FAST} --fast")
    assert isinstance(seen[-1][cache_argument()], StaticCache)
    assert turns()[-1].options["fast"] is True
    shell.run_line_magic("config", "QwenMagics.fast = True")
    try:
        ask(shell, "and again")
    finally:
        shell.run_line_magic("config", "QwenMagics.fast = False")
    assert isinstance(seen[-1][cache_argument()], StaticCache)
    assert "--fast" in shell.find_cell_magic("qwen").__doc__
