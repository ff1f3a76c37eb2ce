"""KV-cache reuse across turns: only new tokens are prefilled, and replies do not change."""

from __future__ import annotations

import itertools

import pytest
import torch

from qwen_magic.backends.kernel.caches import PromptCache
from qwen_magic.backends.kernel.encoding import encode
from qwen_magic.backends.kernel.prefill import cache_argument
from qwen_magic.backends.kernel.reply import KernelReply
from qwen_magic.chat import Chat
from qwen_magic.conversation import ConversationBook
from qwen_magic.options import GenerationOptions
from qwen_magic.presentation import NullView
from qwen_magic.session import current as session

GREEDY = GenerationOptions(max_new_tokens=12, do_sample=False)
QUESTIONS = ["Name a fruit.", "Name another one.", "Which is sweeter?", "Why?"]


def chat_through(model, reuse: bool, questions=QUESTIONS, options=GREEDY):
    chat = Chat(book=ConversationBook(), reuse_cache=reuse)
    return chat, [chat.ask(q, options=options, view=NullView()) for q in questions]


def test_follow_ups_prefill_only_new_tokens(tiny):
    """Turn 1 prefills everything; later turns reuse all but the new message's tokens."""
    _chat, turns = chat_through(tiny, reuse=True)
    assert turns[0].stats["cached_prompt_tokens"] == 0
    for earlier, turn in itertools.pairwise(turns):
        cached = turn.stats["cached_prompt_tokens"]
        # The tiny model's junk reply can merge with the prompt's last "\n" when re-tokenized,
        # so the shared prefix may stop one token short of the earlier prompt.
        assert cached >= earlier.stats["prompt_tokens"] - 1


def test_greedy_replies_are_identical_with_and_without_reuse(tiny):
    """Reusing the cache changes the cost, never the greedy text."""
    _, with_reuse = chat_through(tiny, reuse=True)
    _, without = chat_through(tiny, reuse=False)
    assert [t.assistant for t in with_reuse] == [t.assistant for t in without]
    assert all(t.stats["cached_prompt_tokens"] == 0 for t in without)


def test_reused_cache_gives_the_same_logits_as_a_full_prefill(tiny):
    """After cropping to the shared prefix, the cached forward pass equals a fresh one."""
    messages = [{"role": "user", "content": "Count to three."}]
    slot = PromptCache(tiny.model.config)
    first = KernelReply(tiny, encode(tiny.tokenizer, messages), GREEDY, slot)
    first.run()
    follow_up = [
        *messages,
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And back down."},
    ]
    ids = torch.tensor([encode(tiny.tokenizer, follow_up)])
    cache, kept = slot.take(ids[0].tolist())
    assert 0 < kept < ids.shape[1]
    assert cache.get_seq_length() == kept
    with torch.no_grad():
        reused = tiny.model(ids[:, kept:], **{cache_argument(): cache}).logits[0, -1]
        fresh = tiny.model(ids).logits[0, -1]
    torch.testing.assert_close(reused, fresh, rtol=1e-4, atol=1e-4)


def test_popped_and_replaced_turns_invalidate_the_cached_part(tiny):
    """After a pop, the next prompt reuses only what it still shares with the cache."""
    chat, turns = chat_through(tiny, reuse=True, questions=QUESTIONS[:3])
    chat.conversation().pop()
    chat.conversation().pop()
    after_pop = chat.ask("Something else.", options=GREEDY, view=NullView())
    assert after_pop.stats["cached_prompt_tokens"] < turns[1].stats["prompt_tokens"]
    fresh_chat, _ = chat_through(tiny, reuse=False, questions=QUESTIONS[:1])
    fresh = fresh_chat.ask("Something else.", options=GREEDY, view=NullView())
    assert after_pop.assistant == fresh.assistant


def test_a_failed_generation_drops_the_cache(tiny, monkeypatch):
    """If generate raises, the half-updated cache is discarded and the next turn starts clean."""
    chat, _ = chat_through(tiny, reuse=True, questions=QUESTIONS[:1])

    def broken(**kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(tiny.model, "generate", broken)
        with pytest.raises(RuntimeError):
            chat.ask("Fail.", options=GREEDY, view=NullView())
    assert session().backend.prompt_caches[id(chat.conversation())].cache is None
    turn = chat.ask("Recover.", options=GREEDY, view=NullView())
    assert turn.stats["cached_prompt_tokens"] == 0
    assert len(chat.conversation()) == 2


@pytest.mark.demo
def test_demo_greedy_replies_identical_with_and_without_reuse(demo):
    """On the real model, a four-turn greedy chat reads the same with and without reuse."""
    options = GenerationOptions(max_new_tokens=24, do_sample=False)
    questions = ["What is the capital of Italy?", "And its population?", "Name a famous dish."]
    _, with_reuse = chat_through(demo, reuse=True, questions=questions, options=options)
    _, without = chat_through(demo, reuse=False, questions=questions, options=options)
    assert [t.assistant for t in with_reuse] == [t.assistant for t in without]
    assert with_reuse[-1].stats["cached_prompt_tokens"] > 0
