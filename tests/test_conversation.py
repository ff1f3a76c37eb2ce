"""Conversation state: turns, re-runs by cell id, names, trimming, serialisation."""

from __future__ import annotations

import itertools

import pytest
from IPython.core.error import UsageError

from qwen_magic.conversation import (
    DEFAULT_SYSTEM_PROMPT,
    Conversation,
    ConversationBook,
    Turn,
)


def words(messages: list[dict[str, str]]) -> int:
    """A stand-in token counter: one token per word plus four per message."""
    return sum(len(m["content"].split()) + 4 for m in messages)


def test_messages_start_with_the_system_prompt_and_end_with_the_new_message():
    """The rendered messages are system, then each turn's pair, then the new user message."""
    chat = Conversation()
    chat.record(Turn("hi", "hello"))
    assert chat.messages("next") == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "next"},
    ]


def test_one_off_system_prompt_overrides_without_changing_the_conversation():
    """A per-message system prompt replaces the stored one only in that rendering."""
    chat = Conversation()
    assert chat.messages("q", system_prompt="Be terse.")[0]["content"] == "Be terse."
    assert chat.system_prompt == DEFAULT_SYSTEM_PROMPT


def test_turns_without_cell_ids_append():
    """Turns from a frontend that sends no cell id simply append."""
    chat = Conversation()
    chat.record(Turn("a", "1"))
    chat.record(Turn("a", "1"))
    assert len(chat) == 2


def test_rerunning_a_cell_replaces_its_turn_and_drops_later_ones():
    """A turn from a cell already in the history replaces that turn and every turn after it."""
    chat = Conversation()
    chat.record(Turn("first", "1", cell_id="c1"))
    chat.record(Turn("second", "2", cell_id="c2"))
    chat.record(Turn("third", "3", cell_id="c3"))
    assert chat.history_for("c2") == chat.turns[:1]
    replaced = chat.record(Turn("second again", "2b", cell_id="c2"))
    assert replaced == 2
    assert [t.user for t in chat.turns] == ["first", "second again"]


def test_history_for_a_new_cell_is_everything():
    """A cell not yet in the conversation follows all turns."""
    chat = Conversation()
    chat.record(Turn("first", "1", cell_id="c1"))
    assert chat.history_for("new") == chat.turns


def test_pop_and_reset():
    """pop removes the last turn; reset forgets all turns but keeps the system prompt."""
    chat = Conversation(system_prompt="Be kind.")
    chat.record(Turn("a", "1"))
    chat.record(Turn("b", "2"))
    assert chat.pop().user == "b"
    assert chat.reset() == 1
    assert chat.turns == [] and chat.system_prompt == "Be kind."
    with pytest.raises(UsageError, match="no turns"):
        chat.pop()


def test_fit_keeps_everything_that_fits():
    """When history fits the budget, nothing is dropped."""
    chat = Conversation()
    chat.record(Turn("one two", "three"))
    messages, dropped = chat.fit("four", words, context_length=100, max_new_tokens=10)
    assert dropped == 0 and len(messages) == 4


def test_fit_drops_oldest_turns_but_never_the_system_prompt():
    """Over budget, the oldest turns go first and the system prompt stays."""
    chat = Conversation(system_prompt="sys")
    for number in range(10):
        chat.record(Turn(f"question {number} " + "word " * 10, f"answer {number}"))
    messages, dropped = chat.fit("last", words, context_length=80, max_new_tokens=20)
    assert dropped > 0
    assert words(messages) <= 60
    assert messages[0] == {"role": "system", "content": "sys"}
    assert messages[-1] == {"role": "user", "content": "last"}
    assert messages[1]["content"].startswith(f"question {dropped} ")
    assert len(chat) == 10  # trimming renders a shorter prompt; the record keeps every turn


def test_fit_refuses_a_message_larger_than_the_context():
    """A single message that cannot fit is a clear error."""
    chat = Conversation()
    with pytest.raises(UsageError, match="Shorten it"):
        chat.fit("word " * 100, words, context_length=50, max_new_tokens=10)


def test_round_trip_through_dict():
    """to_dict and from_dict preserve every field of every turn."""
    chat = Conversation(name="n", system_prompt="s")
    chat.record(Turn("u", "a", cell_id="c", interrupted=True, model="m", stats={"new_tokens": 3}))
    again = Conversation.from_dict(chat.to_dict())
    assert again == chat


def test_from_dict_refuses_foreign_data():
    """Data that is not a conversation is a UsageError."""
    with pytest.raises(UsageError, match="Not a qwen_magic conversation"):
        Conversation.from_dict({"hello": 1})


def test_markdown_export_contains_each_turn():
    """The Markdown export lists each question and answer in order."""
    chat = Conversation(name="trip")
    chat.record(Turn("Where?", "Paris."))
    chat.record(Turn("When?", "June.", interrupted=True))
    text = chat.to_markdown()
    assert text.index("Where?") < text.index("Paris.") < text.index("When?")
    assert "*(interrupted)*" in text


def test_book_names_are_independent():
    """Named conversations in a book do not share turns."""
    book = ConversationBook()
    book.get("a").record(Turn("x", "y"))
    assert len(book.get("b")) == 0
    assert book.names() == ["a", "b"]
    with pytest.raises(UsageError, match="No conversation named 'zzz'"):
        book.get("zzz", create=False)


def test_book_uses_its_default_system_prompt_for_new_conversations():
    """A new conversation takes the book's default system prompt."""
    book = ConversationBook(default_system_prompt="Speak French.")
    assert book.get("fr").system_prompt == "Speak French."


def test_after_an_overflow_the_same_oldest_turns_stay_out():
    """Once the context overflows, a quarter of it is freed at once, and the following turns
    keep the same first turn (so a backend's cached prefix still matches)."""
    chat = Conversation(system_prompt="sys")
    starts = []
    for number in range(100):  # about 28 tokens a turn, 2,800 in all
        messages, dropped = chat.fit(f"q{number}", words, context_length=1000, max_new_tokens=20)
        assert words(messages) <= 980
        starts.append(dropped)
        chat.record(Turn(f"question {number} " + "word " * 8, f"answer {number} " + "x " * 8))
    steps = [b - a for a, b in itertools.pairwise(starts) if b != a]
    assert steps, "the history never overflowed"
    overflowing = sum(1 for start in starts if start)  # turns that left something out
    assert len(steps) <= overflowing // 6  # in steps, not one turn per turn
    assert all(step * 28 >= 1000 // 4 - 28 for step in steps)  # a quarter of the context each


def test_each_turn_is_counted_once_however_long_the_history():
    """Fitting a long history counts each turn's tokens once, and later fits count only the
    new turn: the cost does not grow with the number of turns."""
    calls = []

    def counting(messages):
        calls.append(len(messages))
        return words(messages)

    chat = Conversation(system_prompt="sys")
    chat.turns = [Turn(f"question {n}", f"answer {n}") for n in range(20_000)]
    chat.fit("new", counting, context_length=500, max_new_tokens=50)
    first = len(calls)
    assert first < 400  # only the turns that can fit were looked at, not 20,000
    chat.record(Turn("another", "reply"))
    calls.clear()
    chat.fit("newer", counting, context_length=500, max_new_tokens=50)
    assert len(calls) <= 8  # the bare message, the new turn, the final prompt


def test_a_larger_context_takes_left_out_turns_back():
    """Turns left out for a small context come back when the context grows (e.g. after
    leaving --fast's small static cache)."""
    chat = Conversation(system_prompt="sys")
    chat.turns = [Turn(f"question {n} word word", f"answer {n}") for n in range(40)]
    _, small = chat.fit("q", words, context_length=100, max_new_tokens=10)
    _, large = chat.fit("q", words, context_length=10_000, max_new_tokens=10)
    assert small > 0 and large == 0
