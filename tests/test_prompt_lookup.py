"""Prompt-lookup decoding: drafts from the latest match, the same ids as plain decoding.

Mechanics (cache reuse, chunked prefill, the static cache, several tokens per step, Stop) run
on the tiny random Qwen2, whose greedy text repeats itself, so drafts are accepted; the same
ids on the real demo model, bf16 and int4, carry the ``demo`` marker.
"""

from __future__ import annotations

import pytest
import torch

import qwen_magic
from qwen_magic.backends.kernel import prefill as prefill_module
from qwen_magic.backends.kernel import reply as generation
from qwen_magic.backends.kernel.prompt_lookup import (
    GIVE_UP_WINDOW,
    ROW_BY_ROW,
    LookupPolicy,
    drafting,
    latest_match,
    plan_lookup,
)
from qwen_magic.errors import QwenMagicError
from qwen_magic.options import GenerationOptions

from .helpers import install, load_aside, spy_on_generate, start

CODE = "\n".join(
    f"def total_{i}(items):\n    result = 0\n    for item in items:\n"
    f"        result += item.price * {i}\n    return result\n"
    for i in range(3)
)
RENAME = f"```python\n{CODE}```\nRename total_1 to sum_prices. Reply with the whole code only."


def greedy(lookup: str, **extra) -> GenerationOptions:
    return GenerationOptions(
        **{"max_new_tokens": 40, **extra}, do_sample=False, prompt_lookup=lookup
    )


def reply_ids(messages, options, **kwargs) -> tuple[list[int], generation.KernelReply]:
    reply = start(messages, options, **kwargs)
    reply.run()
    return reply._sequence[len(reply.prompt_ids) :], reply


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- the candidate generator and the policy ------------------------------------------------


def test_latest_match_drafts_from_the_newest_occurrence():
    """The draft follows the latest earlier occurrence of the text's last n-gram, not the
    first one (the newest version of the code)."""
    ids = [1, 2, 3, 10, 11, 12, 9, 1, 2, 3, 20, 21, 22, 9, 1, 2, 3]
    assert latest_match(ids, 3) == [20, 21, 22]


def test_latest_match_prefers_a_full_draft_and_shorter_ngrams_after_longer():
    """An occurrence too near the end for a full draft loses to an earlier full one; with no
    3-gram match, a 2-gram is used; with no match at all, there is no draft."""
    assert latest_match([5, 6, 7, 8, 9, 5, 6, 5, 6], 3) == [7, 8, 9]
    assert latest_match([4, 5, 6, 7, 8, 1, 5, 6], 2) == [7, 8]
    assert latest_match([1, 2, 3, 4], 3) == []


def test_auto_gives_up_on_drafts_that_keep_failing_and_on_never_does():
    """Under auto, a window of drafts that accepted almost nothing stops the drafting for the
    rest of the reply; on keeps drafting; plain steps without a draft count for neither."""
    auto, forced = LookupPolicy(3), LookupPolicy(3, may_give_up=False)
    for policy in (auto, forced):
        for _ in range(GIVE_UP_WINDOW * 2):
            policy.record(0, 0)  # no draft found: a plain step
        assert not policy.gave_up
        for _ in range(GIVE_UP_WINDOW):
            policy.record(3, 0)
    assert auto.gave_up and not forced.gave_up
    assert auto.steps == GIVE_UP_WINDOW * 3 and auto.drafts == GIVE_UP_WINDOW


def test_auto_keeps_drafting_while_drafts_are_accepted():
    """Drafts that are mostly accepted never make auto give up."""
    policy = LookupPolicy(3)
    for _ in range(50):
        policy.record(3, 2)
    assert not policy.gave_up and policy.accepted_per_step == 2


@pytest.mark.parametrize(
    ("setting", "quantization", "sampling", "attention", "device", "drafts"),
    [
        ("auto", "int4", False, "sdpa", "cpu", 3),
        ("auto", "int8", False, "sdpa", "cpu", 3),
        ("auto", "none", False, "sdpa", "cpu", None),  # bf16 matmuls: ids not proven
        ("auto", "int4", True, "sdpa", "cpu", None),  # sampling: seeded replies repeat
        ("auto", "int4", False, "eager", "cpu", None),
        ("auto", "int4", False, "sdpa", "cuda", None),
        ("on", "none", True, "eager", "cuda", 6),
        ("off", "int4", False, "sdpa", "cpu", None),
    ],
)
def test_when_lookup_is_on(setting, quantization, sampling, attention, device, drafts):
    """auto drafts only for greedy replies of an int8/int4 model on the CPU with sdpa (3
    tokens: the kernels tile rows by 4); on always drafts; off never."""
    policy = plan_lookup(
        setting,
        quantization=quantization,
        sampling=sampling,
        attention=attention,
        device_type=device,
    )
    assert (policy.draft_tokens if policy else None) == drafts


def test_an_unknown_setting_is_refused():
    """A prompt_lookup other than auto, on or off is a one-line error naming the choices."""
    with pytest.raises(QwenMagicError, match="'auto', 'on' or 'off'"):
        GenerationOptions(prompt_lookup="always")


def test_prompt_pass_runs_sdpa_and_later_passes_row_by_row(tiny):
    """With lookup, the pass that reads the prompt uses sdpa as plain decoding does (a few
    uncached prompt tokens get the same keys and values), the passes after it row-by-row
    attention; afterwards sdpa and transformers' own candidate generator are back."""
    model = tiny.model
    seen: list[str] = []
    hook = model.register_forward_pre_hook(
        lambda module, _args: seen.append(module.config._attn_implementation)
    )
    try:
        reply_ids(ask(RENAME), greedy("on", max_new_tokens=6))
    finally:
        hook.remove()
    assert seen[0] == "sdpa" and set(seen[1:]) == {ROW_BY_ROW}
    with pytest.raises(RuntimeError), drafting(model, LookupPolicy(3)):
        raise RuntimeError
    assert model.config._attn_implementation == "sdpa"
    assert "_get_candidate_generator" not in vars(model)
    assert "prepare_inputs_for_generation" not in vars(model)


# -- through the real generate path, tiny model -----------------------------------------------


def test_lookup_gives_the_plain_ids_with_several_tokens_per_step(tiny, monkeypatch):
    """With lookup on, the greedy reply is the same token ids as plain decoding, drafts are
    accepted, and the streamer receives several tokens at once."""
    counts: list[int] = []
    real = generation.KernelReply._on_tokens
    monkeypatch.setattr(
        generation.KernelReply, "_on_tokens", lambda self, n: (counts.append(n), real(self, n))
    )
    plain, _ = reply_ids(ask(RENAME), greedy("off"))
    assert max(counts) == 1
    counts.clear()
    drafted, reply = reply_ids(ask(RENAME), greedy("on"))
    assert drafted == plain
    assert reply.lookup.accepted_tokens > 0 and max(counts) > 1
    assert reply.stats.new_tokens == len(plain)


def test_lookup_reuses_the_conversation_cache_across_turns(tiny):
    """A follow-up with lookup continues from the cache the first lookup reply left, and both
    replies are the ids plain decoding gives with the same reuse."""
    first = ask(RENAME)

    def two_turns(lookup: str, key: str) -> tuple[list[int], list[int], int]:
        one, _ = reply_ids(first, greedy(lookup), conversation=key)
        text = tiny.tokenizer.decode(one, skip_special_tokens=True)
        follow = [*first, {"role": "assistant", "content": text}, *ask("Now add a docstring.")]
        two, reply = reply_ids(follow, greedy(lookup), conversation=key)
        return one, two, reply.stats.cached_prompt_tokens

    plain = two_turns("off", "plain")
    drafted = two_turns("on", "lookup")
    assert drafted[2] > 0 and drafted == plain
    caches = qwen_magic.current_session().require_backend().prompt_caches
    assert caches["lookup"].token_ids == caches["plain"].token_ids != []  # kept, not re-read


def test_lookup_after_a_chunked_prefill(tiny, monkeypatch):
    """After a prompt read in chunks, the lookup reply is the plain reply's ids."""
    monkeypatch.setattr(prefill_module, "PREFILL_FIRST_CHUNK", 16)
    monkeypatch.setattr(prefill_module, "PREFILL_MIN_CHUNK", 16)
    prefilled: list[int] = []
    real = generation.prefill
    monkeypatch.setattr(
        generation, "prefill", lambda *a: prefilled.append(real(*a)) or prefilled[-1]
    )
    plain, _ = reply_ids(ask(RENAME), greedy("off"), conversation="plain")
    drafted, reply = reply_ids(ask(RENAME), greedy("on"), conversation="lookup")
    assert prefilled[0] > 0 and prefilled[0] == prefilled[1]
    assert drafted == plain and reply.lookup.drafts > 0
    # The cache then holds each token once: the prompt was not read again after the prefill.
    assert reply.kv_cache.token_ids == reply._sequence[:-1]


def test_lookup_in_fast_modes_static_cache(tiny):
    """--fast's static cache takes lookup too: the same ids as plain --fast, twice in a row
    (the second reply reuses the cache the first left)."""
    options = {"fast": True, "fast_cache_tokens": 512}
    plain = [reply_ids(ask(RENAME), greedy("off", **options), conversation=1)[0] for _ in "12"]
    drafted = [reply_ids(ask(RENAME), greedy("on", **options), conversation=1) for _ in "12"]
    assert [ids for ids, _ in drafted] == plain
    assert drafted[1][1].stats.cached_prompt_tokens > 0
    assert drafted[0][1].lookup.accepted_tokens > 0


def test_stop_ends_a_lookup_reply_within_one_step(tiny, monkeypatch):
    """A cancel arriving with the first tokens ends the reply after the pass that produced
    them: at most one draft and one token more."""
    reply = start(ask(RENAME), greedy("on", max_new_tokens=200))
    real = reply._on_tokens

    def cancel_soon(count: int) -> None:
        real(count)
        if reply.stats.new_tokens >= 8:
            reply.cancel()

    monkeypatch.setattr(reply, "_on_tokens", cancel_soon)
    reply.run()
    assert reply.stats.stop_reason == "cancelled"
    assert reply.stats.new_tokens <= 8 + reply.lookup.draft_tokens + 1


def test_lookup_flags_reach_generate(shell, tiny, monkeypatch):
    """%%qwen --lookup drafts, --no-lookup does not, the trait is the default, and both flags
    at once are a one-line error."""
    calls = spy_on_generate(tiny, monkeypatch)
    shell.run_cell_magic("qwen", "--lookup -n 4 --greedy --view text", "hi")
    shell.run_cell_magic("qwen", "--no-lookup -n 4 --greedy --view text", "hi")
    magics = shell.magics_manager.registry["QwenMagics"]
    magics.prompt_lookup = "on"
    shell.run_cell_magic("qwen", "-n 4 --greedy --view text", "hi")
    assert [("prompt_lookup_num_tokens" in call) for call in calls] == [True, False, True]
    result = shell.run_cell("%%qwen --lookup --no-lookup\nhi")
    assert "Choose one of --lookup and --no-lookup" in str(result.error_in_exec)
    magics.prompt_lookup = "auto"


# -- the real demo model: token ids ---------------------------------------------------------


@pytest.fixture(scope="module")
def demo_int4(demo_path):
    return load_aside("demo", quantize="int4")


@pytest.mark.demo
def test_int4_verification_logits_equal_one_token_steps_bit_for_bit(demo_int4):
    """On the int4 demo model, a 4-row verification pass (row-by-row attention) gives the same
    logits, bit for bit, as four one-token steps: the proof auto relies on."""
    from transformers import DynamicCache

    model = demo_int4.model
    ids = demo_int4.tokenizer(CODE, return_tensors="pt")["input_ids"]
    head, rows = ids[:, :-4], ids[:, -4:]
    with torch.inference_mode():
        steps_cache = DynamicCache(config=model.config)
        model(input_ids=head, cache=steps_cache)
        steps = [model(input_ids=rows[:, i : i + 1], cache=steps_cache).logits for i in range(4)]
        pass_cache = DynamicCache(config=model.config)
        model(input_ids=head, cache=pass_cache)
        with drafting(model, LookupPolicy(3)):
            # as generate's passes after the prompt's run (LatestMatchLookup.get_candidates)
            model.config._attn_implementation = ROW_BY_ROW
            verified = model(input_ids=rows, cache=pass_cache).logits
    assert torch.equal(torch.cat(steps, dim=1), verified)


@pytest.mark.demo
def test_int4_auto_lookup_keeps_the_greedy_ids(fresh_state, demo_int4):
    """With int4, auto drafts the rename from the prompt, accepts most drafts and gives
    exactly the token ids of plain greedy decoding."""
    install(fresh_state, demo_int4)
    plain, _ = reply_ids(ask(RENAME), greedy("off", max_new_tokens=60))
    drafted, reply = reply_ids(ask(RENAME), greedy("auto", max_new_tokens=60))
    assert drafted == plain
    assert reply.lookup.accepted_per_step > 1
    assert "sum_prices" in demo_int4.tokenizer.decode(drafted)


@pytest.mark.demo
def test_bf16_lookup_on_request_keeps_these_greedy_ids(demo):
    """bf16 drafts only when asked (auto leaves it plain); asked, the rename comes out as the
    same token ids as plain greedy decoding."""
    plain, auto = reply_ids(ask(RENAME), greedy("auto", max_new_tokens=60))
    assert auto.lookup is None
    drafted, reply = reply_ids(ask(RENAME), greedy("on", max_new_tokens=60))
    assert drafted == plain and reply.lookup.accepted_tokens > 0
