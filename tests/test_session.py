"""The kernel's one state object, the backend seam and the project's error type."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from IPython.core.error import UsageError

import qwen_magic
from qwen_magic import _state
from qwen_magic.backends.base import Backend, Reply, TextDelta
from qwen_magic.backends.kernel.backend import KernelBackend
from qwen_magic.conversation import Turn
from qwen_magic.errors import QwenMagicError
from qwen_magic.notebook.views import TextView
from qwen_magic.options import GenerationOptions
from qwen_magic.presentation import NullView, View

from .helpers import start

GREEDY = GenerationOptions(max_new_tokens=4, do_sample=False)


def run_python(code: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_session_is_one_object_that_survives_reload_ext(shell, tiny):
    """%reload_ext keeps the very session object: its backend and its conversations."""
    session = qwen_magic.current_session()
    shell.run_cell_magic("qwen", "-n 2 --greedy --view text", "Hello")
    shell.run_line_magic("reload_ext", "qwen_magic")
    assert qwen_magic.current_session() is session is _state.session
    assert session.backend.loaded is tiny
    assert [turn.user for turn in session.conversations.get().turns] == ["Hello"]


def test_the_same_spec_again_is_a_no_op_and_says_so(fresh_state, tiny_model_path):
    """Loading the spec already loaded returns it without reading anything, marked not fresh."""
    first, fresh = fresh_state.load_model(str(tiny_model_path), device="cpu", progress=None)
    again, fresh_again = fresh_state.load_model(str(tiny_model_path), device="cpu", progress=None)
    assert (fresh, fresh_again) == (True, False)
    assert again is first
    assert fresh_state.backend.loaded is first


def test_using_another_backend_closes_the_previous_one(fresh_state, tiny):
    """Session.use closes the backend it replaces, which frees the model it held."""
    old = fresh_state.backend
    replacement = KernelBackend(tiny)
    assert fresh_state.use(replacement) is replacement
    assert old.loaded is None
    with pytest.raises(QwenMagicError, match="run %qwen_load again"):
        old.summary()
    assert fresh_state.release() is True and fresh_state.backend is None
    assert fresh_state.release() is False


def test_restoring_conversations_drops_the_backend_caches(fresh_state, tiny, tmp_path):
    """Replacing the conversations (%qwen_restore) forgets every per-conversation KV cache."""
    chat = qwen_magic.Chat()
    chat.ask("Hello", options=GREEDY, view=NullView())
    assert fresh_state.backend.prompt_caches
    saved = tmp_path / "chat.qwen.json"
    fresh_state.save(saved)
    assert fresh_state.restore(saved) == "1 turn in 1 conversation"
    assert fresh_state.backend.prompt_caches == {}
    assert [t.user for t in fresh_state.conversations.get().turns] == ["Hello"]


def test_without_a_backend_the_chat_says_to_load_one(fresh_state):
    """Asking before any %qwen_load is a one-line error naming the command."""
    with pytest.raises(QwenMagicError, match="run %qwen_load first"):
        qwen_magic.Chat().ask("Hello", view=NullView())


def test_the_in_kernel_backend_and_its_replies_follow_the_protocol(tiny):
    """KernelBackend is a Backend and its replies are Replies: the seam the chat layer uses."""
    backend = qwen_magic.current_session().backend
    assert isinstance(backend, Backend)
    reply = start([{"role": "user", "content": "Hi"}], GREEDY)
    assert isinstance(reply, Reply)
    pieces = [event.text for event in reply if isinstance(event, TextDelta)]
    assert "".join(pieces) == reply.text and reply.stats.new_tokens >= 1
    assert backend.count_tokens([{"role": "user", "content": "Hi"}]) == reply.stats.prompt_tokens
    assert backend.context_length(GREEDY) == tiny.context_length
    fast = GenerationOptions(fast=True, fast_cache_tokens=256)
    assert backend.context_length(fast) == 256
    assert [notice.code for notice in backend.context_advice(fast)] == ["fast_cache_size"]
    assert backend.context_advice(GREEDY) == []
    assert backend.info().kind == "kernel" and backend.info().location == "cpu"


class RecordingView(View):
    """Remembers what the chat layer asked of it, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self, reply: Reply) -> None:
        self.calls.append("start")
        assert isinstance(reply, Reply)

    def update(self, text: str) -> None:
        self.calls.append("update")

    def finish(self, text: str, footer: str) -> None:
        self.calls.append("finish")
        self.footer = footer


def test_a_view_is_started_updated_and_finished_in_that_order(tiny):
    """Chat.ask drives the explicit view protocol: start once, updates, finish once."""
    view = RecordingView()
    turn = qwen_magic.Chat().ask("Hello", options=GREEDY, view=view)
    assert view.calls[0] == "start" and view.calls[-1] == "finish"
    assert view.calls.count("start") == view.calls.count("finish") == 1
    assert "update" in view.calls
    assert view.footer.startswith(f"{turn.stats['new_tokens']} tokens")
    assert all(isinstance(v, View) for v in (NullView(), TextView()))


def test_any_object_with_update_and_finish_is_a_view(tiny):
    """A plain class with update(text) and finish(text, footer), no start, works as a view."""

    class CountingView:
        updates = 0

        def update(self, text: str) -> None:
            self.updates += 1

        def finish(self, text: str, footer: str) -> None:
            self.final = text

    view = CountingView()
    turn = qwen_magic.Chat().ask("Hello", options=GREEDY, view=view)
    assert view.updates >= 1 and view.final == turn.assistant


def test_the_project_error_is_a_usage_error_and_magics_show_it_as_one(shell, tiny):
    """QwenMagicError subclasses UsageError; a magic re-raises it as UsageError itself, the only
    class IPython shows as one line without a traceback."""
    assert issubclass(QwenMagicError, UsageError)
    with pytest.raises(UsageError) as info:
        shell.run_cell_magic("qwen", "--seed -1", "Hello")
    assert type(info.value) is UsageError
    assert "--seed must be between 0 and" in str(info.value)
    assert isinstance(info.value.__cause__, QwenMagicError)


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"temperature": float("nan")}, "--temperature must be a finite number"),
        ({"top_p": float("nan")}, "--top-p must be a finite number"),
        ({"repetition_penalty": float("inf")}, "--repetition-penalty must be a finite number"),
        ({"seed": -1}, "--seed must be between 0"),
        ({"seed": 2**32}, "--seed must be between 0"),
    ],
)
def test_non_finite_and_out_of_range_values_are_one_line_errors(options, flag):
    """nan, inf and seeds torch refuses are caught as options, before any work."""
    with pytest.raises(QwenMagicError, match=flag):
        GenerationOptions(**options)


def test_importing_every_module_of_the_package_is_free_of_torch_and_transformers():
    """Importing qwen_magic and every one of its submodules (walked, not listed) imports no
    torch, transformers or ipywidgets: those come with the first load or widget."""
    facts = run_python(
        """
        import importlib, json, pkgutil, sys
        import qwen_magic
        names = [m.name for m in pkgutil.walk_packages(qwen_magic.__path__, "qwen_magic.")]
        for name in names:
            importlib.import_module(name)
        heavy = {m: m in sys.modules for m in ("torch", "transformers", "ipywidgets")}
        print(json.dumps({"modules": len(names), **heavy}))
        """
    )
    assert facts.pop("modules") > 40
    assert facts == {"torch": False, "transformers": False, "ipywidgets": False}


def test_the_core_works_where_ipython_is_missing():
    """Without IPython (a GPU image) the core imports and its error is a plain Exception."""
    facts = run_python(
        """
        import json, sys
        sys.modules["IPython"] = None  # as if not installed
        import qwen_magic
        from qwen_magic.errors import QwenMagicError
        from qwen_magic.options import GenerationOptions
        try:
            GenerationOptions(max_new_tokens=0)
        except QwenMagicError as error:
            message = str(error)
        print(json.dumps({
            "bases": [c.__name__ for c in QwenMagicError.__mro__[1:]],
            "message": message,
        }))
        """
    )
    assert facts["bases"] == ["Exception", "BaseException", "object"]
    assert facts["message"].startswith("--max-new-tokens must be at least 1")


def test_qwen_help_reads_as_a_manual_with_groups(shell):
    """%%qwen? groups its options: the reply, the conversation, the message, speed."""
    text = shell.find_cell_magic("qwen").__doc__
    headings = ["The reply:", "The conversation:", "The message and the result:", "Speed:"]
    places = [text.index(heading) for heading in headings]
    assert places == sorted(places)
    reply, conversation, message, speed = (
        text[a:b] for a, b in zip(places, [*places[1:], None], strict=True)
    )
    assert "--max-new-tokens" in reply and "--seed" in reply
    assert "--conversation" in conversation and "--set-system" in conversation
    assert "--interpolate" in message and "--out" in message
    assert "--fast" in speed


def test_a_recorded_turn_names_the_backend(tiny):
    """Each turn keeps the name of the model that wrote it."""
    turn = qwen_magic.Chat().ask("Hello", options=GREEDY, view=NullView())
    assert isinstance(turn, Turn) and turn.model == tiny.name == "tiny-qwen2"
