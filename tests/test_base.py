"""qwen_magic.backends.base: typed messages, and the one threaded reply every backend uses."""

from __future__ import annotations

import time

import pytest

from qwen_magic.backends.base import (
    ActionResult,
    CodeAction,
    Message,
    ReplyEnd,
    TextDelta,
    ThreadedReply,
    Waiting,
    chat_dicts,
)
from qwen_magic.backends.scripted import ScriptedBackend
from qwen_magic.options import GenerationOptions


class Slow(ThreadedReply):
    """Writes ``words`` one every ``seconds``, until cancelled."""

    poll_seconds = 0.01

    def __init__(self, words: list[str], seconds: float) -> None:
        super().__init__()
        self.words, self.seconds = words, seconds
        self.aborted = False

    def _produce(self, emit):
        for word in self.words:
            if self.cancelled:
                return
            time.sleep(self.seconds)
            emit(word)

    def _abort(self):
        self.aborted = True


def test_events_are_text_then_one_end_and_the_text_adds_up():
    """A reply yields its pieces as TextDelta events, maybe Waiting ones, and one ReplyEnd last."""
    events = list(Slow(["a", "b", "c"], 0.03))
    texts = [event.text for event in events if isinstance(event, TextDelta)]
    assert texts == ["a", "b", "c"]
    assert any(isinstance(event, Waiting) for event in events)
    assert isinstance(events[-1], ReplyEnd) and events[-1].reason is None
    assert sum(isinstance(event, ReplyEnd) for event in events) == 1


def test_closing_early_cancels_aborts_and_waits_for_the_worker():
    """Leaving the with-block mid-reply cancels, calls _abort, and no worker thread is left."""
    reply = Slow(["w"] * 100, 0.02)
    with reply:
        for event in reply:
            if isinstance(event, TextDelta):
                break
    assert reply.cancelled and reply.aborted
    assert reply._done.is_set() and not reply._thread.is_alive()
    assert reply.stats.interrupted and reply.stats.stop_reason == "cancelled"


def test_an_error_in_the_worker_is_raised_on_the_reading_thread():
    """The worker's exception ends the stream and is raised by the iteration, not lost."""

    class Broken(ThreadedReply):
        def _produce(self, emit):
            emit("partial")
            raise ValueError("boom")

    reply = Broken()
    with pytest.raises(ValueError, match="boom"):
        list(reply)
    assert reply.text == "partial"


def test_ctrl_c_in_the_reading_loop_ends_the_worker_before_it_goes_on():
    """An interrupt inside ``with reply`` reaches the caller only after the worker has ended."""
    reply = Slow(["w"] * 50, 0.05)
    with pytest.raises(KeyboardInterrupt), reply:
        for event in reply:
            if isinstance(event, TextDelta):
                raise KeyboardInterrupt
    assert reply.cancelled and not reply._thread.is_alive()


def test_messages_are_typed_and_sent_as_role_and_content():
    """A message may carry an action and its result; templates and servers get role/content."""
    asked: Message = {
        "role": "assistant",
        "content": "```python\n1+1\n```",
        "action": CodeAction("1+1"),
    }
    shown: Message = {"role": "user", "content": "Output: 2", "result": ActionResult("2")}
    assert chat_dicts([asked, shown]) == [
        {"role": "assistant", "content": "```python\n1+1\n```"},
        {"role": "user", "content": "Output: 2"},
    ]


def test_the_scripted_backend_streams_words_and_cuts_at_the_limit():
    """Replies come word by word in order; -n cuts one and it ends for "length"."""
    backend = ScriptedBackend("one two three", "four")
    reply = backend.start([{"role": "user", "content": "hi"}], GenerationOptions(max_new_tokens=2))
    assert reply.run() == "one two " and reply.stats.stop_reason == "length"
    again = backend.start([{"role": "user", "content": "hi"}], GenerationOptions())
    assert again.run() == "four" and again.stats.stop_reason == "eos"
    assert backend.prompts[0] == [{"role": "user", "content": "hi"}]
