"""qwen_magic.context_budget: the context one ask may read, and the word before a long read.

The tiny model's context is 2,048 tokens; tests that need a long context give it 32,768 (its
rotary positions work past 2,048; only the words are junk, as always with it).
"""

from __future__ import annotations

import threading
import time

import pytest

from qwen_magic.backends.base import TextDelta
from qwen_magic.chat import Chat
from qwen_magic.context_budget import CPU_BUDGET, context_for, runs_on_cpu
from qwen_magic.conversation import ConversationBook, Turn
from qwen_magic.errors import QwenMagicError
from qwen_magic.notebook.report import NOTEBOOK
from qwen_magic.options import GenerationOptions
from qwen_magic.presentation import NullView, Presentation
from qwen_magic.session import current as session

from .helpers import ScriptedBackend, start

GREEDY = GenerationOptions(max_new_tokens=4, do_sample=False)


@pytest.fixture
def long_context(tiny, monkeypatch):
    """The tiny model, claiming a 32,768-token context like the demo model's."""
    monkeypatch.setattr(type(tiny), "context_length", property(lambda self: 32768))
    return session().require_backend()


def saying(lines: list[str]) -> Presentation:
    """The notebook's words, with every line said kept in ``lines``."""
    return Presentation(NOTEBOOK.make_view, NOTEBOOK.footer, NOTEBOOK.notice_text, lines.append)


def restored_book(turns: int, name: str = "default") -> ConversationBook:
    """A book as restored from a long history: ``turns`` short old turns."""
    book = ConversationBook()
    for number in range(turns):
        book.get(name).record(Turn(f"old question {number} about lists", f"old answer {number}"))
    return book


def test_a_model_on_the_cpu_reads_at_most_8192_tokens_by_default(long_context):
    """On the CPU the default budget bounds the context to 8,192 tokens; a budget given is used
    as is, and never above the model's own context."""
    assert runs_on_cpu(long_context)
    assert context_for(long_context, GREEDY, None) == CPU_BUDGET == 8192
    assert context_for(long_context, GREEDY, 3000) == 3000
    assert context_for(long_context, GREEDY, 100_000) == 32768
    with pytest.raises(QwenMagicError, match="must be a number of tokens, or 0"):
        context_for(long_context, GREEDY, -1)
    scripted = ScriptedBackend(context_tokens=32768)  # not a model on this CPU
    assert not runs_on_cpu(scripted) and context_for(scripted, GREEDY, None) == 32768


def test_the_first_ask_after_a_long_restore_says_what_it_will_read_and_stays_in_budget(
    long_context,
):
    """After restoring 3,000 turns, the first ask says before the wait how many tokens it reads
    and about how long that takes, reads at most the budget, and the follow-up (its prompt
    cached) says nothing."""
    lines: list[str] = []
    chat = Chat(book=restored_book(3000), presentation=saying(lines))
    turn = chat.ask("And now?", options=GREEDY, view=NullView())
    (said,) = lines
    assert said.startswith("Reading ") and "tokens of conversation before the first word" in said
    assert "on this CPU, if it reads 100 tokens/s" in said
    assert "QwenMagics.context_tokens (8,192 of the model's 32,768) bounds it" in said
    assert "Stop or Ctrl-C ends it" in said
    read = int(said.split()[1].replace(",", ""))
    assert 4096 < read <= 8192 - GREEDY.max_new_tokens
    assert turn.stats["prompt_tokens"] + GREEDY.max_new_tokens <= 8192
    assert turn.stats["dropped_turns"] > 0
    lines.clear()
    chat.ask("And then?", options=GREEDY, view=NullView())
    assert lines == []


def test_a_later_long_read_uses_the_rate_measured_here(long_context):
    """Once a long read was timed on this backend, the next announcement uses that rate."""
    lines: list[str] = []
    book = restored_book(3000)
    for number in range(3000):
        book.get("other").record(Turn(f"other question {number}", f"other answer {number}"))
    chat = Chat(book=book, presentation=saying(lines))
    chat.ask("First.", options=GREEDY, view=NullView())
    chat.ask("Second.", conversation="other", options=GREEDY, view=NullView())
    assert "tokens/s measured here" in lines[-1]


def test_the_context_tokens_trait_bounds_what_a_cell_reads(shell, long_context, capsys):
    """%config QwenMagics.context_tokens = 3000 makes the next %%qwen read at most 3,000
    tokens, and the announcement names that budget."""
    session().conversations = restored_book(3000)
    shell.run_line_magic("config", "QwenMagics.context_tokens = 3000")
    try:
        shell.run_cell_magic("qwen", "-n 4 --greedy --view text", "And now?")
    finally:
        shell.run_line_magic("config", "QwenMagics.context_tokens = 0")
    out = capsys.readouterr().out
    assert "QwenMagics.context_tokens (3,000 of the model's 32,768) bounds it" in out
    assert session().conversations.get().turns[-1].stats["prompt_tokens"] + 4 <= 3000


def test_a_small_conversation_is_not_announced_and_replies_as_before(tiny):
    """A short conversation gets no announcement and the same greedy reply with or without a
    budget (the budget only matters when the context is full)."""
    lines: list[str] = []
    replies = []
    for budget in (None, 1000):
        chat = Chat(book=ConversationBook(), presentation=saying(lines))
        chat.context_tokens = budget
        replies.append(chat.ask("Hello there", options=GREEDY, view=NullView()).assistant)
    assert lines == [] and replies[0] == replies[1]


def test_stop_during_a_long_read_ends_it_before_the_whole_prompt_is_read(long_context):
    """Stop (a reply's cancel) while a 7,000-token prompt is read ends the reply within a
    fraction of the read's time, with no text: the read goes in chunks and checks in between."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    messages += [{"role": "user", "content": "word " * 7000}]
    options = GenerationOptions(max_new_tokens=2, do_sample=False)
    started = time.perf_counter()
    with start(messages, options) as whole:
        for _event in whole:
            pass
    full_read = time.perf_counter() - started
    long_context.forget_conversations()
    reply = start(messages, options)
    threading.Timer(full_read / 10, reply.cancel).start()
    started = time.perf_counter()
    with reply:
        texts = [event for event in reply if isinstance(event, TextDelta)]
    stopped_after = time.perf_counter() - started
    assert reply.cancelled and texts == [] and reply.text == ""
    assert stopped_after < full_read * 0.6, (stopped_after, full_read)
