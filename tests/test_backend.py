"""The backend seam's plain parts: ReplyStats and its footer."""

from __future__ import annotations

from qwen_magic.backends.base import ReplyStats


def stats(**fields) -> ReplyStats:
    return ReplyStats(new_tokens=512, first_token_seconds=0.5, total_seconds=51.6, **fields)


def test_footer_says_when_the_token_limit_cut_the_reply():
    """A reply stopped for "length" says it reached the -n limit; one that ended says nothing."""
    assert stats(stop_reason="length").footer() == (
        "512 tokens · first token 0.50 s · 10.0 tokens/s · stopped at the 512-token limit (-n)"
    )
    assert "limit" not in stats(stop_reason="eos").footer()
    assert "limit" not in stats().footer()  # a backend that does not know


def test_an_interrupted_reply_is_not_also_said_to_hit_the_limit():
    """Interrupted replies say so, and only that."""
    footer = stats(stop_reason="cancelled", interrupted=True).footer()
    assert footer.endswith("· interrupted") and "limit" not in footer


def test_the_stop_reason_is_kept_with_the_turn():
    """The saved turn's stats hold the stop reason."""
    assert stats(stop_reason="length").as_record()["stop_reason"] == "length"
