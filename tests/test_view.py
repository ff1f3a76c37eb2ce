"""The views: throttled widget redraws, the text fallback, and the widget path in a kernel."""

from __future__ import annotations

import io
import sys
import time

from qwen_magic.chat import Chat
from qwen_magic.generation import GenerationOptions
from qwen_magic.view import TextView, WidgetView, in_widget_frontend, make_view


def test_text_view_writes_only_new_text_and_a_footer():
    """The text view appends each new piece once and ends with the footer line."""
    stream = io.StringIO()
    view = TextView(stream)
    view.update("Hel")
    view.update("Hello")
    view.update("Hello")
    view.finish("Hello world", "3 tokens")
    assert stream.getvalue() == "Hello world\n\n[3 tokens]\n"


def test_widget_view_throttles_redraws(monkeypatch):
    """Many updates within the redraw interval cause one redraw, not one per update."""
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    view = WidgetView(redraw_seconds=10.0)
    for length in range(1, 200):
        view.update("x" * length)
    assert view.redraws == 1


def test_widget_view_shows_growing_markdown_then_the_final_reply(monkeypatch):
    """Each redraw puts the text so far (with a cursor) in the Output; the end is plain Markdown."""
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, **k: shown.append(obj))
    view = WidgetView(redraw_seconds=0.0)
    seen = []
    view.output.observe(lambda change: seen.append(change["new"]), names="outputs")
    for text in ("One", "One two", "One two three"):
        view.update(text)
    view.finish("One two three.", "4 tokens")
    texts = [outputs[0]["data"]["text/markdown"] if outputs else "" for outputs in seen]
    assert texts == ["One ▌", "One two ▌", "One two three ▌", ""]  # emptied before closing
    assert shown[0] is view.output
    assert shown[1].data == "One two three."
    assert "4 tokens" in shown[2].data


def test_auto_view_is_text_outside_a_kernel():
    """Outside a Jupyter kernel, 'auto' picks the text view."""
    assert not in_widget_frontend()
    assert isinstance(make_view("auto"), TextView)


def test_chat_streams_into_the_widget_in_several_redraws(tiny, monkeypatch):
    """A real generation redraws the Output widget several times with growing text."""
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    view = WidgetView(redraw_seconds=0.0)
    seen = []
    view.output.observe(lambda change: seen.append(change["new"]), names="outputs")
    turn = Chat().ask(
        "Tell me a story.",
        options=GenerationOptions(max_new_tokens=40, do_sample=True, seed=3),
        view=view,
    )
    texts = [outputs[0]["data"]["text/markdown"] for outputs in seen if outputs]
    assert len(set(texts)) >= 3
    assert texts[-1] == turn.assistant + " ▌"
    assert seen[-1] == ()  # emptied when the final Markdown takes over
    lengths = [len(t.removesuffix(" ▌")) for t in texts]
    assert lengths == sorted(lengths)


KERNEL_CELLS = """
%load_ext qwen_magic
%qwen_load {path} --device cpu --quiet
%config QwenMagics.redraw_seconds = 0.01
"""


def test_widget_updates_cross_the_kernel_boundary(tiny_model_path):
    """In a real kernel, %%qwen sends the Output widget several state updates with growing text."""
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", executable=sys.executable)
    try:
        reply = client.execute_interactive(
            KERNEL_CELLS.format(path=tiny_model_path), timeout=120, output_hook=lambda m: None
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        updates: list[str] = []
        markdown_outputs: list[str] = []

        def hook(message):
            content = message["content"]
            if message["msg_type"] == "comm_msg":
                state = content.get("data", {}).get("state", {})
                for output in state.get("outputs", []):
                    updates.append(output["data"]["text/markdown"])
            elif message["msg_type"] == "display_data":
                if "text/markdown" in content["data"]:
                    markdown_outputs.append(content["data"]["text/markdown"])
            elif message["msg_type"] == "error":
                raise AssertionError("\n".join(content["traceback"]))

        started = time.perf_counter()
        reply = client.execute_interactive(
            "%%qwen -n 60 --sample --seed 5 -o qm_reply\nTell me a story.",
            timeout=120,
            output_hook=hook,
        )
        assert reply["content"]["status"] == "ok"
        assert time.perf_counter() - started < 120
        reply_text = _evaluate(client, "qm_reply")
        assert len(set(updates)) >= 3, updates
        assert reply_text.startswith(updates[-1].removesuffix(" ▌"))
        assert markdown_outputs[0] == reply_text  # the final Markdown, after the widget closed
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def _evaluate(client, expression: str) -> str:
    import ast

    msg_id = client.execute("", user_expressions={"value": expression})
    reply = client.get_shell_msg(timeout=30)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = client.get_shell_msg(timeout=30)
    return ast.literal_eval(reply["content"]["user_expressions"]["value"]["data"]["text/plain"])
