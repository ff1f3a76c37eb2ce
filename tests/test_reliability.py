"""Interrupts, restarts and long sessions, in real kernels where it matters."""

from __future__ import annotations

import gc
import threading
import time
import tracemalloc

import psutil
import pytest
from transformers import DynamicCache

from qwen_magic.chat import Chat
from qwen_magic.conversation import ConversationBook
from qwen_magic.options import GenerationOptions
from qwen_magic.presentation import NullView
from qwen_magic.session import current as session
from qwen_magic.testing.kernel import kernel

SETUP = """
%load_ext qwen_magic
%qwen_load {path} --device cpu --quiet
"""


@pytest.mark.kernel
def test_interrupting_the_kernel_stops_generation_and_keeps_the_partial_turn(tiny_model_path):
    """A kernel interrupt mid-reply ends generate, records the partial turn, and chat goes on."""
    with kernel() as k:
        k.run_ok(SETUP.format(path=tiny_model_path))
        k.run_ok("%config QwenMagics.redraw_seconds = 0.01")
        first_update = threading.Event()

        def hook(message: dict) -> None:
            if message["msg_type"] == "comm_msg":
                first_update.set()

        def interrupt_soon() -> None:
            first_update.wait(60)
            time.sleep(0.3)
            k.manager.interrupt_kernel()

        interrupter = threading.Thread(target=interrupt_soon)
        interrupter.start()
        started = time.perf_counter()
        reply = k.run("%%qwen -n 1500 --sample --seed 1\nTell me a very long story.", hook)
        interrupter.join()
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
        assert time.perf_counter() - started < 60
        turns = "qwen_magic.current_session().conversations.get().turns"
        k.run_ok("import qwen_magic, threading")
        assert k.value(f"len({turns})") == 1
        assert k.value(f"{turns}[-1].interrupted") is True
        assert 0 < k.value(f"{turns}[-1].stats['new_tokens']") < 1500
        assert k.value(f"len({turns}[-1].assistant)") > 0
        workers = "[t.name for t in threading.enumerate() if t.name == 'qwen_magic-generate']"
        assert k.value(workers) == []
        k.run_ok("%%qwen -n 5 --greedy\nAre you still there?")
        assert k.value(f"len({turns})") == 2


@pytest.mark.kernel
def test_conversations_survive_a_kernel_restart(tiny_model_path, tmp_path):
    """Turns saved by one kernel for a notebook are restored by the next kernel for it."""
    notebook = tmp_path / "notes.ipynb"
    notebook.write_text("{}")
    env = {"JPY_SESSION_NAME": str(notebook)}
    with kernel(env) as first:
        first.run_ok(SETUP.format(path=tiny_model_path))
        first.run_ok("%%qwen -n 5 --greedy -o qm_reply\nRemember the word banana.")
        reply = first.value("qm_reply")
    assert notebook.with_name("notes.qwen.json").exists()
    with kernel(env) as second:
        printed = second.run_ok("%load_ext qwen_magic")
        assert "Restored 1 turn in 1 conversation" in printed
        second.run_ok("import qwen_magic")
        turns = "qwen_magic.current_session().conversations.get().turns"
        assert second.value(f"{turns}[0].user") == "Remember the word banana."
        assert second.value(f"{turns}[0].assistant") == reply


@pytest.mark.slow
def test_two_hundred_turns_keep_memory_threads_and_context_flat(tiny):
    """A 200-turn session leaves no threads, keeps RSS flat and every prompt inside the context."""
    chat = Chat(book=ConversationBook())
    options = GenerationOptions(max_new_tokens=4, do_sample=False)
    process = psutil.Process()
    threads_before = threading.active_count()
    rss_at: dict[int, int] = {}
    python_heap_at: dict[int, int] = {}
    caches_at: dict[int, int] = {}
    tracemalloc.start()
    for number in range(1, 201):
        turn = chat.ask(
            f"Turn {number}: say something short about the number {number}.",
            options=options,
            view=NullView(),
        )
        assert turn.stats["prompt_tokens"] + 4 <= tiny.context_length
        if number in (50, 200):
            gc.collect()
            rss_at[number] = process.memory_info().rss
            python_heap_at[number] = tracemalloc.get_traced_memory()[0]
            # type(), not isinstance(): asking some deprecated torch objects their class warns
            caches = (o for o in gc.get_objects() if issubclass(type(o), DynamicCache))
            caches_at[number] = sum(1 for _ in caches)
    tracemalloc.stop()
    assert threading.active_count() == threads_before
    assert len(chat.conversation()) == 200
    assert turn.stats["dropped_turns"] > 0  # the tiny model's 2048-token context overflowed
    # No KV cache is left behind per turn: the conversation keeps one, always the same number.
    assert caches_at[200] == caches_at[50]
    assert len(session().backend.prompt_caches) == 1
    heap_growth = python_heap_at[200] - python_heap_at[50]
    assert heap_growth < 4 * 2**20, f"Python heap grew {heap_growth / 2**20:.1f} MiB"
    # RSS also moves with the allocator's arenas and other tests' leftovers: a coarse bound.
    growth = rss_at[200] - rss_at[50]
    assert growth < 160 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB over 150 turns"


def test_a_model_without_chat_template_gets_a_plain_prompt_and_a_notice(tiny, capsys):
    """Without a chat template, the reply still comes, after a one-line notice."""
    template = tiny.tokenizer.chat_template
    tiny.tokenizer.chat_template = None
    try:
        turn = Chat(book=ConversationBook()).ask(
            "Hello", options=GenerationOptions(max_new_tokens=4), view=NullView()
        )
    finally:
        tiny.tokenizer.chat_template = template
    assert "no chat template" in capsys.readouterr().out
    assert turn.stats["new_tokens"] >= 1


@pytest.mark.demo
def test_context_overflow_with_the_real_model_drops_oldest_turns(demo, monkeypatch):
    """When the history exceeds the context, the oldest turns are left out and the reply comes."""
    monkeypatch.setattr(type(demo), "context_length", property(lambda self: 96))
    chat = Chat(book=ConversationBook(), reuse_cache=False)
    options = GenerationOptions(max_new_tokens=16, do_sample=False)
    for question in ["What is 2+2?", "What is 3+3?", "What is 4+4?", "What is 5+5?"]:
        turn = chat.ask(question, options=options, view=NullView())
    assert turn.stats["dropped_turns"] > 0
    assert turn.stats["prompt_tokens"] + 16 <= 96
    assert "10" in turn.assistant
