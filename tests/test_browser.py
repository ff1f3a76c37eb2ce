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

FINAL_TEXT = (
    "Streaming works: every word of this sentence reached the notebook page "
    "while the cell was still running, one small update at a time."
)

# Stand-in for a `%%qwen` cell: grow the text word by word, about ten updates a second.
STREAM_CELL = f"""\
import time

import ipywidgets
from IPython.display import display

FINAL = {FINAL_TEXT!r}
out = ipywidgets.Output()
display(out)
text = ""
for word in FINAL.split(" "):
    text = f"{{text}} {{word}}" if text else word
    out.outputs = (
        {{
            "output_type": "display_data",
            "data": {{"text/markdown": text, "text/plain": text}},
            "metadata": {{}},
        }},
    )
    time.sleep(0.1)
"""


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        pytest.skip(f"browser test needs Chromium and playwright: {reason}")
    with JupyterLabServer(tmp_path_factory.mktemp("lab-root")) as server:
        yield server


@pytest.mark.browser
def test_output_widget_streams_in_jupyterlab(lab_server):
    notebook = write_notebook(lab_server.root_dir / "browser_stream.ipynb", [STREAM_CELL])
    result = run_cell_and_watch(
        notebook,
        cell_index=0,
        timeout=60,
        server=lab_server,
        screenshot_path=ARTIFACTS_DIR / "browser_stream.png",
        poll_ms=50,
    )
    detail = (
        f"samples (ms, length, busy)={result.samples}\n"
        f"final={result.final_text!r}\nconsole={result.console[-10:]}"
    )

    # At least three partial texts were on screen while the cell was still executing...
    partial = [length for length in result.busy_lengths if length < len(FINAL_TEXT)]
    assert len(partial) >= 3, detail
    # ...and they only ever grew (empty frames between re-renders are ignored).
    shown = [length for _t, length, _busy in result.samples if length]
    assert shown == sorted(shown), detail
    # The end state is exactly the full text.
    assert result.final_text == FINAL_TEXT, detail
    assert result.lengths_seen[-1] == len(FINAL_TEXT), detail
    assert result.screenshot_path.is_file()
