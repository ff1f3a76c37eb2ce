"""One generation on the tiny random Qwen2: streaming, options, cancel, failures, stats."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import replace

import pytest
import torch
from IPython.core.error import UsageError

from qwen_magic.backends.base import TextDelta
from qwen_magic.backends.kernel.encoding import PromptEncoder, encode, plain_prompt
from qwen_magic.backends.kernel.reply import generate_kwargs
from qwen_magic.errors import QwenMagicError
from qwen_magic.notebook import report
from qwen_magic.options import GenerationOptions
from qwen_magic.presentation import NullView

from .helpers import compile_on_any_device, spy_on_generate, start

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me a story."},
]
SAMPLE = GenerationOptions(max_new_tokens=40, do_sample=True, seed=7)


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "qwen_magic-generate"]


def finishes(function, seconds: float = 60.0):
    """Run ``function`` on a thread; fail (instead of hanging the suite) if it does not end."""
    box: dict = {}

    def target():
        try:
            box["value"] = function()
        except BaseException as error:
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s"
    return box


def test_a_turn_renders_its_prompt_once(tiny, monkeypatch):
    """Fitting a follow-up into the context and generating from it share one rendering of the
    full prompt (the tokenizer's chat template runs once for it, not twice)."""
    from qwen_magic.chat import Chat
    from qwen_magic.conversation import ConversationBook

    chat = Chat(book=ConversationBook())
    chat.ask("Hello.", options=GenerationOptions(4), view=NullView())
    rendered: list[list[dict]] = []
    real = tiny.tokenizer.apply_chat_template

    def spy(messages, *args, **kwargs):
        rendered.append([dict(message) for message in messages])
        return real(messages, *args, **kwargs)

    monkeypatch.setattr(tiny.tokenizer, "apply_chat_template", spy)
    turn = chat.ask("And again?", options=GenerationOptions(4), view=NullView())
    full_prompt = chat.conversation().messages()[:-1]  # everything before this reply
    assert rendered.count(full_prompt) == 1
    assert turn.stats["prompt_tokens"] == len(encode(tiny.tokenizer, full_prompt))


def test_the_prompt_encoder_never_serves_stale_ids(tiny):
    """The encoder's memo is keyed by content: an edited message is encoded afresh."""
    encoder = PromptEncoder(tiny.tokenizer)
    messages = [dict(message) for message in MESSAGES]
    before = encoder.token_ids(messages)
    messages[-1]["content"] = "Tell me a much longer story, please."
    after = encoder.token_ids(messages)
    assert after != before and after == PromptEncoder(tiny.tokenizer).token_ids(messages)


def test_reply_streams_in_several_chunks(tiny):
    """The reply arrives as several chunks whose concatenation is the final text."""
    generation = start(MESSAGES, SAMPLE)
    chunks = [event.text for event in generation if isinstance(event, TextDelta)]
    assert len(chunks) > 1
    assert "".join(chunks) == generation.text
    assert generation.stats.new_tokens > 1
    assert generation.stats.prompt_tokens == len(encode(tiny.tokenizer, MESSAGES))
    assert generation.stats.first_token_seconds is not None
    assert not worker_threads()


def test_same_seed_gives_the_same_sample(tiny):
    """Sampling with a fixed seed is repeatable; another seed differs."""
    first = start(MESSAGES, SAMPLE).run()
    second = start(MESSAGES, SAMPLE).run()
    other = start(MESSAGES, GenerationOptions(40, do_sample=True, seed=8)).run()
    assert first == second
    assert other != first


def test_options_reach_generate(tiny, monkeypatch):
    """Every option set is passed to model.generate, with the streamer and stopping criteria."""
    calls = spy_on_generate(tiny, monkeypatch)
    options = GenerationOptions(
        max_new_tokens=5,
        do_sample=True,
        temperature=0.5,
        top_p=0.9,
        top_k=3,
        repetition_penalty=1.2,
        seed=1,
    )
    start(MESSAGES, options).run()
    (seen,) = calls
    assert seen["max_new_tokens"] == 5
    assert seen["do_sample"] is True
    assert (seen["temperature"], seen["top_p"], seen["top_k"]) == (0.5, 0.9, 3)
    assert seen["repetition_penalty"] == 1.2
    assert seen["streamer"].skip_prompt is True
    assert seen["streamer"].decode_kwargs == {"skip_special_tokens": True}
    assert len(seen["stopping_criteria"]) == 1


def test_greedy_and_temperature_zero_disable_sampling():
    """--greedy and temperature 0 mean greedy; a temperature or top-p alone means sampling."""
    assert (
        generate_kwargs(GenerationOptions(do_sample=False, temperature=0.7))["do_sample"] is False
    )
    kwargs = generate_kwargs(GenerationOptions(temperature=0))
    assert kwargs["do_sample"] is False and kwargs["temperature"] is None
    assert "do_sample" not in generate_kwargs(GenerationOptions())  # the model's own default
    assert generate_kwargs(GenerationOptions(temperature=1.2))["do_sample"] is True
    assert generate_kwargs(GenerationOptions(top_p=0.9))["do_sample"] is True


@pytest.mark.parametrize(
    ("options", "fix"),
    [
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"temperature": -1.0}, "--temperature"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
        ({"top_k": -2}, "--top-k"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty"),
    ],
)
def test_out_of_range_options_are_usage_errors(options, fix):
    """Each out-of-range option is a UsageError naming the option."""
    with pytest.raises(UsageError, match=fix):
        GenerationOptions(**options)


def test_cancel_stops_within_a_step_and_keeps_the_partial_text(tiny):
    """cancel() ends generation early; the worker is joined and the partial text kept."""
    generation = start(MESSAGES, GenerationOptions(max_new_tokens=400, do_sample=True))
    for event in generation:
        if isinstance(event, TextDelta):
            generation.cancel()
    assert generation.stats.interrupted
    assert generation.stats.stop_reason == "cancelled"
    assert generation.text
    assert generation.stats.new_tokens < 400
    assert not worker_threads()


def test_stop_reason_tells_the_length_cap_from_the_models_own_end(tiny, monkeypatch):
    """A reply that runs into max_new_tokens stops for "length"; one that ends with an
    end-of-turn token (here: made the greedy reply's first token) stops for "eos"."""
    greedy = GenerationOptions(max_new_tokens=5, do_sample=False)
    capped = start(MESSAGES, greedy)
    capped.run()
    assert capped.stats.stop_reason == "length" and capped.stats.new_tokens == 5
    assert "stopped at the 5-token limit (-n)" in report.footer(capped.stats)
    first = capped._sequence[len(capped.prompt_ids)]
    monkeypatch.setattr(tiny.model.generation_config, "eos_token_id", [first])
    ended = start(MESSAGES, greedy)
    ended.run()
    assert ended.stats.stop_reason == "eos" and ended.stats.new_tokens == 1
    assert "limit" not in report.footer(ended.stats)


def test_interrupt_while_reading_stops_the_worker(tiny):
    """A KeyboardInterrupt in the reading loop cancels and joins the worker before it spreads."""
    generation = start(MESSAGES, GenerationOptions(max_new_tokens=400, do_sample=True))
    with pytest.raises(KeyboardInterrupt):
        for _chunk in generation:
            raise KeyboardInterrupt
    assert generation.cancelled
    assert generation.stats.new_tokens < 400
    assert not worker_threads()


def test_worker_exception_reaches_the_caller_without_hanging(tiny, monkeypatch):
    """An exception inside generate ends the stream and is re-raised on the caller's thread."""

    def broken(**kwargs):
        time.sleep(0.2)
        raise ValueError("tokenizer exploded")

    monkeypatch.setattr(tiny.model, "generate", broken)
    box = finishes(lambda: start(MESSAGES, SAMPLE).run(), seconds=30)
    assert isinstance(box.get("error"), ValueError)
    assert not worker_threads()


def test_worker_exception_after_some_text_still_ends(tiny, monkeypatch):
    """A failure midway through streaming ends the stream and raises."""
    real = tiny.model.generate

    def fails_midway(**kwargs):
        streamer = kwargs["streamer"]
        kwargs = {**kwargs, "max_new_tokens": 5}
        real(**kwargs)  # streams some text and ends the streamer
        streamer.next_tokens_are_prompt = True
        raise RuntimeError("late failure")

    monkeypatch.setattr(tiny.model, "generate", fails_midway)
    box = finishes(lambda: start(MESSAGES, SAMPLE).run(), seconds=30)
    assert isinstance(box.get("error"), RuntimeError)


def test_cuda_out_of_memory_becomes_a_usage_error(tiny, monkeypatch):
    """A CUDA OOM in the worker is reported as a UsageError saying what to lower."""

    def oom(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tiny.model, "generate", oom)
    box = finishes(lambda: start(MESSAGES, SAMPLE).run(), seconds=30)
    error = box.get("error")
    assert isinstance(error, QwenMagicError)
    assert "--max-new-tokens" in str(error)


def test_only_one_generation_at_a_time(tiny):
    """A second generation while one streams is refused, never run alongside."""
    first = start(MESSAGES, GenerationOptions(max_new_tokens=30, do_sample=True))
    iterator = iter(first)
    next(iterator)
    with pytest.raises(UsageError, match="still being generated"):
        start(MESSAGES, SAMPLE).run()
    first.cancel()
    for _chunk in iterator:
        pass
    assert start(MESSAGES, GenerationOptions(max_new_tokens=3)).run() is not None


def test_plain_prompt_for_models_without_a_chat_template():
    """Without a chat template, messages become a simple transcript ending in 'Assistant:'."""
    text = plain_prompt(MESSAGES)
    assert text.startswith("System: You are a helpful assistant.")
    assert text.endswith("User: Tell me a story.\n\nAssistant:")


# -- fast mode: a static KV cache, compiled with torch.compile on CUDA ----------------------------

GREEDY_FAST = GenerationOptions(max_new_tokens=16, do_sample=False, fast=True)


def test_fast_mode_gives_the_same_text(tiny):
    """--fast changes the cache, not the reply: greedy and seeded samples are identical."""
    greedy = GenerationOptions(max_new_tokens=16, do_sample=False)
    assert start(MESSAGES, GREEDY_FAST).run() == start(MESSAGES, greedy).run()
    for seed in (1, 2):
        plain = start(MESSAGES, GenerationOptions(24, do_sample=True, seed=seed)).run()
        fast = GenerationOptions(24, do_sample=True, seed=seed, fast=True)
        assert start(MESSAGES, fast).run() == plain


def test_fast_mode_hands_generate_a_static_cache(tiny, monkeypatch):
    """generate receives a StaticCache sized min(context, fast_cache_tokens); no other mode."""
    from transformers import StaticCache

    from qwen_magic.backends.kernel.prefill import cache_argument

    calls = spy_on_generate(tiny, monkeypatch)
    start(MESSAGES, GREEDY_FAST).run()
    cache = calls[-1][cache_argument()]
    assert isinstance(cache, StaticCache)
    assert cache.get_max_length() == min(tiny.context_length, GREEDY_FAST.fast_cache_tokens)
    assert "cache_implementation" not in calls[-1]  # the cache object itself says static
    start(MESSAGES, GenerationOptions(max_new_tokens=4)).run()
    assert type(calls[-1][cache_argument()]).__name__ == "DynamicCache"  # kept nowhere


def test_fast_mode_reuses_one_cache_across_calls(tiny, monkeypatch):
    """A second reply gets the same StaticCache object, with the same tensors (no reallocation,
    so nothing to recompile), and the reply runs on the one long-lived fast-mode thread."""
    from qwen_magic.backends.kernel.prefill import cache_argument

    calls = spy_on_generate(tiny, monkeypatch)
    start(MESSAGES, GREEDY_FAST).run()
    first = calls[-1][cache_argument()]
    addresses = [layer.keys.data_ptr() for layer in first.layers]
    other = [{"role": "user", "content": "Something else entirely."}]
    start(other, GREEDY_FAST).run()
    assert calls[-1][cache_argument()] is first
    assert [layer.keys.data_ptr() for layer in first.layers] == addresses
    assert not worker_threads()  # no per-reply thread is left behind
    fast_threads = [t for t in threading.enumerate() if t.name == "qwen_magic-fast"]
    assert len(fast_threads) == 1 and fast_threads[0].daemon


@pytest.mark.slow
def test_compiled_fast_mode_compiles_once_and_says_the_same(own_tiny):
    """Where transformers compiles --fast's decoding step (CUDA; forced onto the CPU here with
    its own testing switch), the step is compiled on the first reply and reused by every later
    one: follow-ups, another conversation, another length. The replies match normal mode."""
    from torch._dynamo.utils import counters

    from qwen_magic.chat import Chat
    from qwen_magic.conversation import ConversationBook

    def talk(options: GenerationOptions) -> list[str]:
        chat = Chat(book=ConversationBook())
        replies = [chat.ask(q, options=options, view=NullView()).assistant for q in QUESTIONS]
        longer = replace(options, max_new_tokens=options.max_new_tokens + 5)
        other = chat.ask("Something else.", conversation="other", options=longer, view=NullView())
        return [*replies, other.assistant]

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    expected = talk(GenerationOptions(max_new_tokens=12, do_sample=False))
    own_tiny.model.generation_config.compile_config = compile_on_any_device()
    before = graphs()
    first = start(MESSAGES, GREEDY_FAST)
    first.run()
    assert graphs() == before + 1  # the decoding step, compiled
    assert talk(replace(GREEDY_FAST, max_new_tokens=12)) == expected
    assert graphs() == before + 1  # and never again


QUESTIONS = ["Name a fruit.", "Name another one.", "Which is sweeter?"]


def test_the_first_fast_reply_says_what_to_expect(tiny, capsys, monkeypatch):
    """The first reply in a model's static cache says what --fast does on this device (on a GPU:
    compile, slowly, once); the later ones say nothing."""
    from qwen_magic.backends.kernel.backend import fast_mode_notice
    from qwen_magic.notebook.report import notice_text

    def fast_mode_note(loaded):
        return notice_text(fast_mode_notice(loaded))

    from qwen_magic.chat import Chat
    from qwen_magic.conversation import ConversationBook

    chat = Chat(book=ConversationBook())
    chat.ask("Hello.", options=GREEDY_FAST, view=NullView())
    assert "Note: --fast compiles only on a GPU (this model is on cpu)" in capsys.readouterr().out
    chat.ask("Again.", options=GREEDY_FAST, view=NullView())
    chat.ask("And normally.", options=replace(GREEDY_FAST, fast=False), view=NullView())
    assert "Note" not in capsys.readouterr().out
    # as on CUDA
    monkeypatch.setattr(tiny.model.generation_config, "compile_config", compile_on_any_device())
    assert "first --fast reply compiles the decoding step" in fast_mode_note(tiny)
    # accelerate spilled layers to the CPU: generate would not compile, and the note says so
    monkeypatch.setattr(tiny.model, "hf_device_map", {"model": 0, "lm_head": "cpu"}, raising=False)
    assert "layers offloaded to the CPU or disk" in fast_mode_note(tiny)


def test_fast_mode_follow_ups_reuse_the_prefix_and_match_normal_mode(tiny):
    """In a chat, --fast prefills only the new tokens of a follow-up, and says the same."""
    from qwen_magic.chat import Chat
    from qwen_magic.conversation import ConversationBook

    questions = QUESTIONS
    replies = {}
    for fast in (False, True):
        chat = Chat(book=ConversationBook())
        options = GenerationOptions(max_new_tokens=10, do_sample=True, seed=3, fast=fast)
        turns = [chat.ask(q, options=options, view=NullView()) for q in questions]
        replies[fast] = [turn.assistant for turn in turns]
        if fast:
            assert turns[-1].options["fast"] is True
            for earlier, turn in itertools.pairwise(turns):
                assert turn.stats["cached_prompt_tokens"] >= earlier.stats["prompt_tokens"] - 1
    assert replies[True] == replies[False]


def test_fast_mode_without_reuse_prefills_everything(tiny):
    """Without a prompt cache (reuse_cache off), the static cache is emptied before each reply."""
    first = start(MESSAGES, GREEDY_FAST)
    first.run()
    again = start(MESSAGES, GREEDY_FAST)
    assert again.run() == first.text
    assert again.stats.cached_prompt_tokens == 0


def test_a_prompt_too_long_for_the_static_cache_is_a_usage_error(tiny):
    """Prompt + --max-new-tokens beyond the static cache is refused up front, model intact."""
    small = GenerationOptions(max_new_tokens=8, fast=True, fast_cache_tokens=16)
    with pytest.raises(UsageError, match="16-token static"):
        start(MESSAGES, small).run()
    assert not worker_threads()
    assert start(MESSAGES, GREEDY_FAST).run() is not None


def test_fast_mode_chat_fits_the_conversation_into_the_static_cache(tiny):
    """A chat in fast mode leaves out the oldest turns to fit the static cache, and refuses a
    message that cannot fit at all, saying how to make room."""
    from qwen_magic.chat import Chat
    from qwen_magic.conversation import ConversationBook

    chat = Chat(book=ConversationBook())
    options = GenerationOptions(max_new_tokens=8, do_sample=False, fast=True, fast_cache_tokens=80)
    for number in range(6):
        turn = chat.ask(f"Question number {number}.", options=options, view=NullView())
        assert turn.stats["prompt_tokens"] + 8 <= 80
    assert turn.stats["dropped_turns"] > 0
    with pytest.raises(UsageError, match="fast_cache_tokens"):
        chat.ask("word " * 100, options=options, view=NullView())
    assert len(chat.conversation()) == 6


def test_a_failed_fast_reply_resets_the_static_cache(tiny, monkeypatch):
    """After generate fails midway, the next fast reply starts from an empty cache."""
    from qwen_magic.chat import Chat
    from qwen_magic.conversation import ConversationBook

    chat = Chat(book=ConversationBook())
    expected = chat.ask("Hello.", options=GREEDY_FAST, view=NullView()).assistant
    real = tiny.model.generate

    def fails_after_prefill(**kwargs):
        real(**{**kwargs, "max_new_tokens": 2})  # fills the static cache partly
        raise RuntimeError("late failure")

    with monkeypatch.context() as patch:
        patch.setattr(tiny.model, "generate", fails_after_prefill)
        with pytest.raises(RuntimeError):
            chat.ask("Fail.", options=GREEDY_FAST, view=NullView())
    fresh = Chat(book=ConversationBook()).ask("Hello.", options=GREEDY_FAST, view=NullView())
    assert fresh.stats["cached_prompt_tokens"] == 0
    assert fresh.assistant == expected


def test_cancel_in_fast_mode_keeps_the_partial_text(tiny):
    """Cancelling a fast reply stops it within a step; the next reply still works."""
    generation = start(MESSAGES, GenerationOptions(max_new_tokens=400, do_sample=True, fast=True))
    for event in generation:
        if isinstance(event, TextDelta):
            generation.cancel()
    assert generation.stats.interrupted and generation.text
    assert generation.stats.new_tokens < 400
    assert start(MESSAGES, GREEDY_FAST).run() is not None


def test_fast_mode_is_recorded_only_when_on():
    """Saved turns mention fast mode only when it was used."""
    assert "fast" not in GenerationOptions().as_record()
    assert GenerationOptions(fast=True).as_record()["fast"] is True
    with pytest.raises(UsageError, match="fast_cache_tokens"):
        GenerationOptions(fast=True, fast_cache_tokens=1)


def test_the_static_cache_is_freed_with_its_model(fresh_state, tiny_model_path):
    """Releasing the model (a new %qwen_load) frees fast mode's static cache too."""
    import gc
    import weakref

    fresh_state.load_model(str(tiny_model_path), device="cpu", progress=None)
    start(MESSAGES, GREEDY_FAST).run()
    cache = weakref.ref(fresh_state.backend.static_slot.cache)
    fresh_state.release()
    gc.collect()
    assert cache() is None
