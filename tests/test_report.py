"""qwen_magic.notebook.report: the footer under a reply and the words of notices."""

from __future__ import annotations

from qwen_magic.backends.base import BackendInfo, Notice, ReplyStats
from qwen_magic.notebook import report


def stats(**fields) -> ReplyStats:
    return ReplyStats(new_tokens=512, first_token_seconds=0.5, total_seconds=51.6, **fields)


def test_footer_says_when_the_token_limit_cut_the_reply():
    """A reply stopped for "length" says it reached the -n limit; one that ended says nothing."""
    assert report.footer(stats(stop_reason="length")) == (
        "512 tokens · first token 0.50 s · 10.0 tokens/s · stopped at the 512-token limit (-n)"
    )
    assert "limit" not in report.footer(stats(stop_reason="eos"))
    assert "limit" not in report.footer(stats())  # a backend that does not know


def test_an_interrupted_reply_is_not_also_said_to_hit_the_limit():
    """Interrupted replies say so, and only that."""
    footer = report.footer(stats(stop_reason="cancelled", interrupted=True))
    assert footer.endswith("· interrupted") and "limit" not in footer


def test_a_one_token_reply_is_singular_and_shows_no_rate():
    """One token reads "1 token", and a reply too short to time shows no tokens/s."""
    one = report.footer(ReplyStats(new_tokens=1, first_token_seconds=0.2, total_seconds=0.2))
    assert one == "1 token · first token 0.20 s"
    three = report.footer(ReplyStats(new_tokens=3, first_token_seconds=0.2, total_seconds=0.3))
    assert "tokens/s" not in three and three.startswith("3 tokens")


def test_the_footer_names_quantized_weights_from_the_backend():
    """The backend's weights ("int4") appear in the footer; unquantized ones leave no trace."""
    assert "int4 weights" in report.footer(stats(), BackendInfo("kernel", "m", "cpu", "int4"))
    assert "weights" not in report.footer(stats(), BackendInfo("kernel", "m", "cpu"))


def test_the_stop_reason_is_kept_with_the_turn():
    """The saved turn's stats hold the stop reason."""
    assert stats(stop_reason="length").as_record()["stop_reason"] == "length"


def test_notices_are_worded_here_and_unknown_codes_still_show():
    """Known codes read as sentences; a code no one worded shows itself and its facts."""
    text = report.notice_text(Notice("no_chat_template", {"model": "tiny"}))
    assert text.startswith("Note: tiny has no chat template")
    assert report.notice_text(Notice("line", {"text": "as it is"})) == "as it is"
    assert report.notice_text(Notice("mystery", {"n": 2})) == "Note: mystery (n=2)"
