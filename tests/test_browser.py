"""Browser test: a cell's ipywidgets.Output must visibly stream in JupyterLab.

Runs a real JupyterLab server and headless Debian Chromium (via playwright), executes a
cell that rewrites an ``ipywidgets.Output`` several times a second from the cell's own
thread, and polls the DOM of that cell's output while it runs.  The stand-in cell below
uses plain ipywidgets; the same helper can run a ``%%qwen`` cell later.

Needs ``/usr/bin/chromium`` (apt-get install -y chromium) and ``pip install playwright``;
never ``playwright install``.  Skipped, with the reason, only when one of them is absent.
"""

from __future__ import annotations

import pytest

try:  # `python -m pytest` from the repo root, or tests/ as a package
    from tests.browser import (
        ARTIFACTS_DIR,
        JupyterLabServer,
        missing_requirements,
        run_cell_and_watch,
        write_notebook,
    )
except ImportError:  # plain `pytest`: rootdir-less "prepend" import puts tests/ on sys.path
    from browser import (
        ARTIFACTS_DIR,
        JupyterLabServer,
        missing_requirements,
        run_cell_and_watch,
        write_notebook,
    )

SETUP_CELLS = ["%load_ext qwen_magic", "%qwen_load demo --quiet"]
QUESTION_CELL = "%%qwen --greedy -n 60\nDescribe Paris in three short sentences for a travel guide."


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        pytest.skip(f"browser test needs Chromium and playwright: {reason}")
    with JupyterLabServer(tmp_path_factory.mktemp("lab-root")) as server:
        yield server


@pytest.mark.browser
@pytest.mark.demo
def test_qwen_reply_streams_visibly_in_jupyterlab(lab_server, demo_path):
    """In JupyterLab, a %%qwen reply grows on screen while the cell runs, then stays in full."""
    notebook = write_notebook(
        lab_server.root_dir / "browser_stream.ipynb", [*SETUP_CELLS, QUESTION_CELL]
    )
    result = run_cell_and_watch(
        notebook,
        cell_index=len(SETUP_CELLS),
        timeout=240,
        server=lab_server,
        screenshot_path=ARTIFACTS_DIR / "browser_stream.png",
        poll_ms=50,
        output_selector=".jp-Cell-outputArea",
    )
    detail = (
        f"samples (ms, length, busy)={result.samples}\n"
        f"final={result.final_text!r}\nconsole={result.console[-10:]}"
    )
    # Several partial replies were on screen while the cell was still executing...
    partial = [length for length in result.busy_lengths if length < len(result.final_text)]
    assert len(partial) >= 3, detail
    # ...growing as the model wrote (the widget closing at the end may blank one frame)...
    shown = [length for _t, length, busy in result.samples if length and busy]
    assert shown == sorted(shown), detail
    # ...and the finished cell shows the whole reply and its footer.
    assert "Paris" in result.final_text, detail
    assert "tokens/s" in result.final_text, detail
    assert result.screenshot_path.is_file()
