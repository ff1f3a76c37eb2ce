"""The views: throttled widget redraws, the text fallback, the Stop button, and the widget path
in a kernel."""

from __future__ import annotations

import io
import sys
import time

import pytest

from qwen_magic.chat import STOPPED_NOTE, Chat
from qwen_magic.notebook.comm_pump import CommPump, ipykernel_supported
from qwen_magic.notebook.views import TextView, WidgetView, in_widget_frontend, make_view
from qwen_magic.options import GenerationOptions
from qwen_magic.testing.kernel import kernel


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
    """Each redraw puts the text so far (with a cursor) in the Output; the end is plain Markdown
    whose text/plain is the reply itself, then the footer (its text/plain too)."""
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, **k: shown.append(obj))
    view = WidgetView(redraw_seconds=0.0)
    widget_view = shown[0]["application/vnd.jupyter.widget-view+json"]
    assert widget_view["model_id"] == view.box.model_id
    assert shown[0]["text/plain"] == ""  # no widget repr where widgets do not render
    seen = []
    view.output.observe(lambda change: seen.append(change["new"]), names="outputs")
    for text in ("One", "One two", "One two three"):
        view.update(text)
    view.finish("One two three.", "4 tokens")
    texts = [outputs[0]["data"]["text/markdown"] if outputs else "" for outputs in seen]
    assert texts == ["One ▌", "One two ▌", "One two three ▌", ""]  # emptied before closing
    assert view.box.children == (view.output, view.stop_button)
    assert shown[1] == {"text/markdown": "One two three.", "text/plain": "One two three."}
    assert shown[2] == {"text/markdown": "<sub>4 tokens</sub>", "text/plain": "4 tokens"}


def test_a_slow_first_token_shows_a_wait_counter_until_text_arrives(monkeypatch):
    """Waiting over a second for the first token (a long prompt, --fast compiling) shows for how
    long; redrawn only when the seconds change; the reply replaces it and it never returns."""
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    view = WidgetView(redraw_seconds=10.0)

    def markdown() -> str:
        return view.output.outputs[0]["data"]["text/markdown"] if view.output.outputs else ""

    view.poll()
    assert markdown() == ""  # a short wait shows nothing
    view._started -= 3.2
    view.poll()
    view.poll()
    assert markdown() == "*waiting for the first token… 3 s*" and view.redraws == 1
    view.update("Hello")
    assert markdown() == "Hello ▌"
    view._started -= 60
    view.poll()
    assert markdown() == "Hello ▌"


def test_chat_shows_the_wait_counter_while_generate_is_slow_to_start(tiny, monkeypatch):
    """Chat.ask hands the view's poll to the generation: a slow start shows the counter."""
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    real = tiny.model.generate

    def slow_to_start(**kwargs):
        time.sleep(1.3)  # as a long prefill, or compiling, would
        return real(**kwargs)

    monkeypatch.setattr(tiny.model, "generate", slow_to_start)
    view = WidgetView(redraw_seconds=0.0)
    seen = []
    view.output.observe(lambda change: seen.append(change["new"]), names="outputs")
    options = GenerationOptions(max_new_tokens=40, do_sample=True, seed=3)
    turn = Chat().ask("Tell me a story.", options=options, view=view)
    texts = [outputs[0]["data"]["text/markdown"] for outputs in seen if outputs]
    assert texts[0] == "*waiting for the first token… 1 s*"
    assert texts[-1] == turn.assistant + " ▌"


def test_auto_view_is_text_outside_a_kernel():
    """Outside a Jupyter kernel, 'auto' picks the text view."""
    assert not in_widget_frontend()
    assert isinstance(make_view("auto"), TextView)


def test_no_message_pump_outside_a_kernel(monkeypatch):
    """Outside a kernel there are no shell messages to handle: no pump, and updates still work."""
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    assert CommPump.attach([]) is None
    view = WidgetView(redraw_seconds=0.0)
    view.update("Hello")
    assert view.redraws == 1


def test_the_pump_works_only_with_the_ipykernel_it_knows(monkeypatch):
    """The pump relies on ipykernel 7's internals: any other major version gets no pump (and so
    no Stop button), never a half-working one."""
    import ipykernel

    for version, supported in (("7.4.0", True), ("6.29.5", False), ("8.0.0", False)):
        monkeypatch.setattr(ipykernel, "__version__", version)
        assert ipykernel_supported() is supported


def test_stop_button_cancels_generation_and_the_turn_ends_normally(tiny, monkeypatch):
    """Clicking Stop mid-reply cancels generate; ask() returns normally with a partial turn."""
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, **k: shown.append(obj))
    view = WidgetView(redraw_seconds=0.0)
    update = view.update
    updates = []

    def update_then_click(text: str) -> None:
        update(text)
        updates.append(text)
        if len(updates) == 3:
            view.stop_button.click()  # what the frontend's click message ends up calling

    view.update = update_then_click
    turn = Chat().ask(
        "Tell me a story.",
        options=GenerationOptions(max_new_tokens=400, do_sample=True, seed=3),
        view=view,
    )
    assert view.stopped and view.stop_button.disabled
    assert turn.interrupted
    assert 3 <= turn.stats["new_tokens"] < 50  # stopped soon after the click, far from 400
    assert turn.assistant.startswith(updates[2])
    assert shown[1]["text/plain"] == f"{turn.assistant}\n\n{STOPPED_NOTE}"
    assert "interrupted" in shown[2]["text/plain"]
    assert Chat().conversation().turns == [turn]


WAITING = "*waiting for the first token"  # shown on a busy machine before the first token


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
    lengths = [len(t.removesuffix(" ▌")) for t in texts if not t.startswith(WAITING)]
    assert lengths == sorted(lengths)


KERNEL_CELLS = """
%load_ext qwen_magic
%qwen_load {path} --device cpu --quiet
%config QwenMagics.redraw_seconds = 0.01
"""


@pytest.mark.kernel
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
        plain_outputs: list[str] = []

        def hook(message):
            content = message["content"]
            if message["msg_type"] == "comm_msg":
                state = content.get("data", {}).get("state", {})
                for output in state.get("outputs", []):
                    updates.append(output["data"]["text/markdown"])
            elif message["msg_type"] == "display_data":
                if "text/markdown" in content["data"]:
                    markdown_outputs.append(content["data"]["text/markdown"])
                    plain_outputs.append(content["data"]["text/plain"])
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
        # ...readable where Markdown is not rendered: text/plain is the reply and the footer
        assert plain_outputs[0] == reply_text
        assert plain_outputs[1] == markdown_outputs[1].removeprefix("<sub>").removesuffix("</sub>")
        assert "tokens/s" in plain_outputs[1]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


@pytest.mark.kernel
def test_stop_click_is_handled_while_the_cell_runs_and_queued_cells_keep_their_order(
    tiny_model_path,
):
    """In a real kernel, a Stop click sent mid-reply ends the cell normally within moments.

    The click is a comm_msg on the shell channel, queued behind the cell that is running; a cell
    queued before the click must still run after the %%qwen cell, not before it.
    """
    with kernel() as k:
        k.run_ok(KERNEL_CELLS.format(path=tiny_model_path))
        client = k.client
        msg_id = client.execute("%%qwen -n 1500 --sample --seed 5\nTell me a story.")
        button_id = None
        updates = 0
        queued_id = clicked = None
        markdown: list[str] = []
        started = time.perf_counter()
        while True:
            message = client.get_iopub_msg(timeout=120)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "comm_open" and content["data"]["state"]["_model_name"] == "ButtonModel":
                button_id = content["comm_id"]
            elif kind == "comm_msg" and "outputs" in content["data"].get("state", {}):
                updates += 1
                if updates == 3:
                    queued_id = client.execute("qm_order = 'queued cell ran'")
                    click = {"method": "custom", "content": {"event": "click"}}
                    client.shell_channel.send(
                        client.session.msg("comm_msg", {"comm_id": button_id, "data": click})
                    )
                    clicked = time.perf_counter()
            elif kind == "display_data" and "text/markdown" in content["data"]:
                markdown.append(content["data"]["text/markdown"])
            elif kind == "error":
                raise AssertionError("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                break
        assert button_id is not None and clicked is not None, updates
        assert time.perf_counter() - clicked < 5, "the click was not handled while the cell ran"
        replies = [client.get_shell_msg(timeout=60) for _ in range(2)]
        assert [r["parent_header"]["msg_id"] for r in replies] == [msg_id, queued_id]
        assert [r["content"]["status"] for r in replies] == ["ok", "ok"]  # no KeyboardInterrupt
        counts = [r["content"]["execution_count"] for r in replies]
        assert counts[1] == counts[0] + 1
        assert markdown[0].endswith(STOPPED_NOTE)
        assert "interrupted" in markdown[1]
        facts = k.value(
            "(lambda t: (t.interrupted, t.stats['new_tokens'], qm_order))"
            "(__import__('qwen_magic').Chat().conversation().turns[-1])"
        )
        assert facts[0] is True and facts[1] < 1500 and facts[2] == "queued cell ran", facts
        assert time.perf_counter() - started < 120


def _evaluate(client, expression: str) -> str:
    import ast

    msg_id = client.execute("", user_expressions={"value": expression})
    reply = client.get_shell_msg(timeout=30)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = client.get_shell_msg(timeout=30)
    return ast.literal_eval(reply["content"]["user_expressions"]["value"]["data"]["text/plain"])
