"""Interrupts at any moment: during a long prefill, during decoding, several at once, and in
the middle of re-running an earlier cell. No generation may outlive its cell or run beside
another, and an interrupted re-run leaves the conversation as it was."""

from __future__ import annotations

import threading
import time

import pytest

import qwen_magic
from qwen_magic.backends.base import TextDelta
from qwen_magic.backends.kernel import prefill as prefill_module
from qwen_magic.backends.kernel import reply as generation
from qwen_magic.backends.kernel.prefill import cache_argument
from qwen_magic.conversation import ConversationBook
from qwen_magic.options import GenerationOptions
from qwen_magic.presentation import NullView
from qwen_magic.testing.kernel import kernel

from .helpers import start

GREEDY = GenerationOptions(max_new_tokens=6, do_sample=False)
WORKERS = "[t.name for t in threading.enumerate() if t.name.startswith('qwen_magic-generate')]"
TURNS = "qwen_magic.current_session().conversations.get().turns"


class InterruptAfter(NullView):
    """Raises KeyboardInterrupt at the n-th update, as Ctrl-C in the reading loop would."""

    def __init__(self, updates: int) -> None:
        self.left = updates

    def update(self, text: str) -> None:
        self.left -= 1
        if self.left <= 0:
            raise KeyboardInterrupt


def test_an_interrupted_rerun_of_an_early_cell_changes_nothing(tiny):
    """Interrupting the re-run of cell 1 keeps turns 1-3 as they were; a completed re-run then
    replaces turn 1 and drops the turns after it."""
    chat = qwen_magic.Chat(book=ConversationBook())
    long = GenerationOptions(max_new_tokens=60, do_sample=True, seed=1)
    for number, cell in enumerate(("c1", "c2", "c3")):
        chat.ask(f"Question {number}", options=GREEDY, cell_id=cell, view=NullView())
    before = list(chat.conversation().turns)
    with pytest.raises(KeyboardInterrupt):
        chat.ask("Question 0, again", options=long, cell_id="c1", view=InterruptAfter(2))
    assert chat.conversation().turns == before
    chat.ask("Question 0, again", options=GREEDY, cell_id="c1", view=NullView())
    assert [turn.cell_id for turn in chat.conversation().turns] == ["c1"]
    assert chat.conversation().turns[0].user == "Question 0, again"


class InterruptWhileWaiting(NullView):
    """Raises KeyboardInterrupt while the first token is awaited, as Ctrl-C during a prefill."""

    def wait(self) -> None:
        raise KeyboardInterrupt


def test_an_interrupt_before_the_first_word_records_nothing(tiny, monkeypatch):
    """A reply interrupted before it wrote anything leaves no empty turn behind."""
    real_prefill = generation.prefill

    def slow_prefill(*args, **kwargs):
        time.sleep(0.3)  # a long prompt being read
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(generation, "prefill", slow_prefill)
    chat = qwen_magic.Chat(book=ConversationBook())
    with pytest.raises(KeyboardInterrupt):
        chat.ask("Hello", options=GREEDY, view=InterruptWhileWaiting())
    assert chat.conversation().turns == []
    assert not [t for t in threading.enumerate() if t.name == "qwen_magic-generate"]


def test_prefill_reads_the_prompt_in_chunks_and_stops_between_them(tiny, monkeypatch):
    """A long prompt is read in chunks; a cancel between chunks ends the work before generate
    ever runs, and the next reply starts from a clean cache."""
    monkeypatch.setattr(prefill_module, "PREFILL_FIRST_CHUNK", 16)
    monkeypatch.setattr(prefill_module, "PREFILL_MAX_CHUNK", 16)
    chunks, generate_calls = [], []
    real_forward = tiny.model.forward
    real_generate = tiny.model.generate

    def counting_forward(*args, **kwargs):
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] > 1:
            chunks.append(kwargs["input_ids"].shape[1])
            if len(chunks) == 3:
                reply.cancel()  # as a Stop click or Ctrl-C would, mid-prefill
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny.model, "forward", counting_forward)
    monkeypatch.setattr(tiny.model, "generate", lambda **k: generate_calls.append(k))
    messages = [{"role": "user", "content": "word " * 300}]
    reply = start(messages, GREEDY)
    assert [event for event in reply if isinstance(event, TextDelta)] == []
    assert chunks == [16, 16, 16]  # stopped after the chunk that saw the cancel
    assert generate_calls == [] and reply.cancelled
    monkeypatch.setattr(tiny.model, "generate", real_generate)
    again = start(messages, GREEDY)
    again.run()
    assert again.text and again.stats.cached_prompt_tokens == 0


def test_a_cancel_is_seen_before_the_next_decoder_layer(tiny, monkeypatch):
    """Within one chunk, a cancel stops the prefill before the next decoder layer runs, and the
    layer checks are gone once the prefill has ended."""
    import torch

    from qwen_magic.backends.kernel.caches import new_dynamic_cache

    monkeypatch.setattr(prefill_module, "PREFILL_FIRST_CHUNK", 16)  # a prompt longer than a chunk
    layers = tiny.model.model.layers
    cancel = threading.Event()
    ran: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda *_a, index=index: ran.append(index))
        for index, layer in enumerate(layers)
    ]
    first_done = layers[0].register_forward_hook(lambda *_a: cancel.set())
    ids = torch.tensor([list(range(100, 140))])
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        cache_argument(): new_dynamic_cache(tiny.model.config),
    }
    try:
        covered = generation.prefill(tiny.model, kwargs, cancel)
    finally:
        for hook in [*hooks, first_done]:
            hook.remove()
    assert ran == [0] and covered == 0
    assert all(not layer._forward_pre_hooks for layer in layers)


def test_a_chunked_prefill_leaves_no_short_last_chunk(tiny, monkeypatch):
    """A rest shorter than the smallest chunk is read with the chunk before it, never alone (a
    quantized model would read a short pass with its one-row kernel)."""
    import torch

    from qwen_magic.backends.kernel.caches import new_dynamic_cache

    for name in ("PREFILL_FIRST_CHUNK", "PREFILL_MIN_CHUNK", "PREFILL_MAX_CHUNK"):
        monkeypatch.setattr(prefill_module, name, 16)
    chunks: list[int] = []
    hook = tiny.model.model.layers[0].register_forward_pre_hook(
        lambda _module, args: chunks.append(args[0].shape[1])
    )
    ids = torch.tensor([list(range(100, 140))])  # 39 tokens to prefill: 16, then 23
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        cache_argument(): new_dynamic_cache(tiny.model.config),
    }
    try:
        covered = generation.prefill(tiny.model, kwargs, threading.Event())
    finally:
        hook.remove()
    assert chunks == [16, 23] and covered == 39


def test_chunked_prefill_says_the_same_as_one_prefill(tiny, monkeypatch):
    """Reading a prompt in many small chunks gives the same greedy reply as in one go."""
    messages = [{"role": "user", "content": "Tell me about the sea. " * 30}]
    options = GenerationOptions(max_new_tokens=12, do_sample=False)
    whole = start(messages, options).run()
    monkeypatch.setattr(prefill_module, "PREFILL_FIRST_CHUNK", 7)
    monkeypatch.setattr(prefill_module, "PREFILL_MAX_CHUNK", 7)
    assert start(messages, options).run() == whole


LONG_MESSAGE = "Here is a long report to summarise. " + "The quarterly numbers went up. " * 700


@pytest.mark.demo
@pytest.mark.parametrize("interrupts", [1, 2, 3])
@pytest.mark.kernel
def test_interrupts_during_a_long_prefill_end_the_cell_at_once(demo_path, interrupts):
    """One, two or three interrupts while a ~5,000-token prompt is read end the cell within
    about a second; no worker is left running, nothing is recorded, and the next reply works."""
    with kernel() as k:
        k.run_ok("%load_ext qwen_magic\n%qwen_load demo --quiet\nimport qwen_magic, threading")
        sent: list[float] = []

        def interrupt_later() -> None:
            time.sleep(2.5)  # well inside the prefill, which takes about 40 s here
            for number in range(interrupts):
                sent.append(time.perf_counter())
                k.manager.interrupt_kernel()
                time.sleep(0.05 * (number + 1))

        interrupter = threading.Thread(target=interrupt_later)
        interrupter.start()
        reply = k.run(f"%%qwen -n 20 --greedy\n{LONG_MESSAGE}", timeout=120)
        ended = time.perf_counter()
        interrupter.join()
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
        assert ended - sent[0] < 2.0, f"the cell ended {ended - sent[0]:.1f} s after Ctrl-C"
        assert k.value(WORKERS) == []
        assert k.value(f"len({TURNS})") == 0
        k.run_ok("%%qwen -n 8 --greedy\nWhat is 2 + 2? Answer with the number.")
        assert "4" in k.value(f"{TURNS}[-1].assistant")
