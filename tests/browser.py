"""Drive a real JupyterLab in headless Chromium and watch a cell's output stream.

Used by ``tests/test_browser.py``.  Two building blocks:

* :class:`JupyterLabServer` - context manager that starts ``python -m jupyterlab`` on a
  free loopback port with a random token and throw-away Jupyter config/data/runtime
  directories, waits for ``/api/status`` and kills the whole process tree on exit.
* :func:`open_notebook` - context manager that opens a notebook in a fresh JupyterLab
  workspace, accepts a kernel dialog if one shows, waits for an idle kernel and yields a
  :class:`LabPage` to run cells, wait for them and click in their outputs; a screenshot is
  written on the way out, also when the test failed.
* :func:`run_cell_and_watch` - built on it: runs the cells before ``cell_index`` and then
  the cell itself, and polls (inside the page, every ``poll_ms`` ms) the text of that
  cell's ipywidgets ``Output`` while the cell executes.

Chromium is Debian's ``/usr/bin/chromium`` driven by the ``playwright`` Python package;
Playwright's own browser download is never used.  Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
CHROMIUM = Path(os.environ.get("QWEN_MAGIC_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

# The ipywidgets 8 Output view renders as <div class="jupyter-widgets widget-output ...">
# holding a JupyterLab OutputArea; it sits inside the cell's own output area.
OUTPUT_WIDGET_SELECTOR = ".jp-Cell-outputArea .widget-output"

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}

# Plugins that only add noise (toasts, update checks) in a throw-away lab.
_DISABLED_LAB_PLUGINS = {
    "@jupyterlab/apputils-extension:announcements": True,
}


def missing_requirements() -> str | None:
    """Why the browser test cannot run here, or ``None`` when it can."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    return None


def write_notebook(path: str | os.PathLike[str], cells: Sequence[str]) -> Path:
    """Write an nbformat-4 notebook whose code cells have the given sources."""
    path = Path(path)
    nb = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": KERNELSPEC,
            "language_info": {"name": "python"},
        },
        "cells": [
            {
                "cell_type": "code",
                "id": f"cell-{i}",
                "metadata": {},
                "execution_count": None,
                "outputs": [],
                "source": source,
            }
            for i, source in enumerate(cells)
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1) + "\n", encoding="utf-8")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLabServer:
    """A private JupyterLab server on 127.0.0.1, usable as a context manager.

    ``root_dir`` is served as the lab's file root (notebooks are opened relative to it);
    when omitted, a temporary directory is created.  Jupyter's config/data/runtime dirs
    and the IPython dir are fresh temporary directories, so nothing from ``~`` leaks in.
    The repository root is put on ``PYTHONPATH`` so kernels import this checkout's
    ``qwen_magic``.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str] | None = None,
        *,
        python: str = sys.executable,
        startup_timeout: float = 60.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self._own_root = root_dir is None
        self.root_dir = Path(root_dir) if root_dir is not None else None
        self.python = python
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.port = 0
        self.token = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._state_dir: Path | None = None
        self.log_path: Path | None = None

    # -- URLs ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def notebook_url(self, notebook: str, workspace: str | None = None) -> str:
        """URL that opens ``notebook`` (relative to root_dir) in a fresh workspace."""
        workspace = workspace or f"test-{secrets.token_hex(4)}"
        return (
            f"{self.base_url}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={self.token}"
        )

    def log_text(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        return ""

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> JupyterLabServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._state_dir = Path(tempfile.mkdtemp(prefix="qwen-magic-lab-"))
        if self.root_dir is None:
            self.root_dir = self._state_dir / "root"
        self.root_dir.mkdir(parents=True, exist_ok=True)
        config_dir = self._state_dir / "config"
        (config_dir / "labconfig").mkdir(parents=True)
        (config_dir / "labconfig" / "page_config.json").write_text(
            json.dumps({"disabledExtensions": _DISABLED_LAB_PLUGINS}), encoding="utf-8"
        )
        env = dict(os.environ)
        env.update(
            JUPYTER_CONFIG_DIR=str(config_dir),
            JUPYTER_DATA_DIR=str(self._state_dir / "data"),
            JUPYTER_RUNTIME_DIR=str(self._state_dir / "runtime"),
            IPYTHONDIR=str(self._state_dir / "ipython"),
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
            PYTHONUNBUFFERED="1",
        )
        env.pop("JUPYTER_PATH", None)
        env.pop("JUPYTER_CONFIG_PATH", None)
        env.update(self.extra_env)

        self.token = secrets.token_hex(16)
        self.log_path = self._state_dir / "jupyterlab.log"
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = _free_port()
            cmd = [
                self.python,
                "-m",
                "jupyterlab",
                "--no-browser",
                f"--port={self.port}",
                "--ServerApp.port_retries=0",
                "--ServerApp.ip=127.0.0.1",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={self.root_dir}",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                "--allow-root",
            ]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    cmd,
                    cwd=self.root_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: killed as a whole
                )
            try:
                self._wait_ready()
                return
            except RuntimeError as err:
                last_error = str(err)
                self.stop(keep_state=True)
        self.stop()
        raise RuntimeError(last_error)

    def _wait_ready(self) -> None:
        assert self.proc is not None
        url = f"{self.base_url}/api/status?token={self.token}"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"jupyterlab exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
                )
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(
            f"jupyterlab did not answer within {self.startup_timeout:.0f}s:\n"
            f"{self.log_text()[-4000:]}"
        )

    def _api(self, method: str, path: str) -> object:
        req = urllib.request.Request(
            f"{self.base_url}{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def stop(self, *, keep_state: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            # Kernels run in their own sessions (jupyter_client uses start_new_session),
            # so remember the whole tree before signalling the server's group.
            descendants = _descendants(proc.pid)
            with contextlib.suppress(Exception):
                kernels = self._api("GET", "/api/kernels")
                for kernel in kernels if isinstance(kernels, list) else []:
                    with contextlib.suppress(Exception):
                        self._api("DELETE", f"/api/kernels/{kernel['id']}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            for child in descendants:
                with contextlib.suppress(Exception):
                    if child.is_running():
                        child.kill()
        if not keep_state and self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            self._state_dir = None


def _descendants(pid: int) -> list:
    try:
        import psutil
    except ImportError:
        return []
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@dataclass
class WatchResult:
    """What :func:`run_cell_and_watch` saw."""

    lengths_seen: list[int]
    """Distinct text lengths of the Output widget, in order of first appearance."""
    final_text: str
    """The Output widget's text once the cell finished (``innerText``, stripped)."""
    screenshot_path: Path
    busy_lengths: list[int] = field(default_factory=list)
    """Distinct non-empty lengths seen while the cell's prompt still showed ``[*]``."""
    samples: list[tuple[float, int, bool]] = field(default_factory=list)
    """Every change seen: (ms since watching began, text length, cell busy)."""
    execution_s: float = 0.0
    """Seconds from pressing Shift+Enter to the prompt showing ``[n]``."""
    console: list[str] = field(default_factory=list)
    """Browser console messages (warnings and errors only)."""


# Runs in the page: every `interval` ms record the Output widget's text length and whether
# the cell's prompt still shows [*].  Only changes are stored, so the list stays short.
_WATCH_JS = r"""
([cellIndex, selector, interval]) => {
  const st = {samples: [], t0: performance.now(), last: null};
  const tick = () => {
    const c = document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell')[cellIndex];
    if (!c) return;
    const out = c.querySelector(selector);
    // The counter shown while the first token is awaited is not reply text, nor is the cursor
    // (the finished reply drops it: counted, the last streaming frame looks longer).
    const raw = out ? out.innerText : '';
    const text = raw.replace(/waiting for the first token… \d+ s/, '').replace(/ ?▌/g, '').trim();
    const prompt = c.querySelector('.jp-InputArea-prompt');
    const busy = !!prompt && prompt.textContent.includes('*');
    const key = text.length + (busy ? 'b' : 'i');
    if (key !== st.last) {
      st.last = key;
      st.samples.push([Math.round(performance.now() - st.t0), text.length, busy]);
    }
  };
  st.timer = setInterval(tick, interval);
  window.__qwenWatch = st;
}
"""

_CELL_DONE_JS = """
([cellIndex]) => {
  const c = document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell')[cellIndex];
  const p = c && c.querySelector('.jp-InputArea-prompt');
  return !!p && /\\[\\d+\\]/.test(p.textContent);
}
"""

_CELL_STARTED_JS = """
([cellIndex]) => {
  const c = document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell')[cellIndex];
  const p = c && c.querySelector('.jp-InputArea-prompt');
  return !!p && /\\[(\\*|\\d+)\\]/.test(p.textContent);
}
"""


def _cell(page, index: int):
    return page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").nth(index)


_KERNEL_STATE_JS = """
() => {
  // Status-bar kernel item, e.g. "Python 3 (ipykernel) | Idle" or "No Kernel | Initializing".
  const item = document.querySelector('.jp-StatusBar-TextItem[title^="Change kernel"]');
  const indicator = document.querySelector('.jp-NotebookPanel .jp-Notebook-ExecutionIndicator');
  return {
    statusbar: item ? item.textContent.trim() : '',
    indicator: indicator ? indicator.getAttribute('data-status') : '',
  };
}
"""


def _wait_kernel_idle(page, timeout: float) -> None:
    """Wait until the notebook's kernel is started, connected and idle.

    Accepts a kernel-selection dialog if one appears.  The toolbar's execution indicator
    alone is not enough: it reads ``idle`` while there is still "No Kernel", and a cell
    run in that window is silently dropped.
    """
    deadline = time.monotonic() + timeout
    dialog_accept = page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
    state: dict = {}
    while time.monotonic() < deadline:
        if dialog_accept.count() and dialog_accept.first.is_visible():
            dialog_accept.first.click()
        else:
            state = page.evaluate(_KERNEL_STATE_JS)
            if (
                state["indicator"] == "idle"
                and state["statusbar"].endswith("| Idle")
                and not state["statusbar"].startswith("No Kernel")
            ):
                return
        page.wait_for_timeout(100)
    raise TimeoutError(f"kernel not idle after {timeout:.0f}s (last state: {state})")


_CELL_PROMPT_JS = """
([cellIndex]) => {
  const c = document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell')[cellIndex];
  const p = c && c.querySelector('.jp-InputArea-prompt');
  return p ? p.textContent.trim() : '';
}
"""


def _start_cell(page, index: int, timeout: float) -> float:
    """Select cell ``index``, press Ctrl+Enter and wait until the run is accepted.

    Ctrl+Enter (notebook:run-cell) rather than Shift+Enter, which would also move on and
    append a new cell at the end of the notebook.  Returns the ``time.monotonic()`` of the
    key press.
    """
    cell = _cell(page, index)
    cell.locator(".jp-InputArea-prompt").click()  # selects the cell, command mode
    t0 = time.monotonic()
    page.keyboard.press("Control+Enter")
    try:  # [*] (running or queued) or [n] (already done) proves the run was accepted
        page.wait_for_function(
            _CELL_STARTED_JS, arg=[index], timeout=min(timeout, 15.0) * 1000, polling=50
        )
    except Exception as err:
        prompt = page.evaluate(_CELL_PROMPT_JS, [index])
        raise RuntimeError(f"cell {index} did not start (prompt {prompt!r})") from err
    return t0


def _wait_cell_done(page, index: int, timeout: float) -> None:
    """Wait for cell ``index``'s prompt to read ``[n]:``."""
    page.wait_for_function(_CELL_DONE_JS, arg=[index], timeout=timeout * 1000, polling=50)


def _run_cell(page, index: int, timeout: float) -> float:
    """Run cell ``index`` to completion; return the seconds from key press to ``[n]:``."""
    t0 = _start_cell(page, index, timeout)
    _wait_cell_done(page, index, timeout)
    return time.monotonic() - t0


class LabPage:
    """A notebook open in JupyterLab, as yielded by :func:`open_notebook`.

    Every wait is bounded by what is left of the ``timeout`` given to :func:`open_notebook`.
    """

    def __init__(self, page, deadline: float, timeout: float, console: list[str]) -> None:
        self.page = page
        self.deadline = deadline
        self.timeout = timeout
        self.console = console
        """Browser console messages (warnings and errors only)."""
        self.scroll_to = None
        """A locator brought into view before the closing screenshot (default: none)."""

    def left(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"browser run exceeded {self.timeout:.0f}s")
        return remaining

    def cell(self, index: int):
        """Playwright locator of cell ``index``."""
        return _cell(self.page, index)

    def run_cell(self, index: int) -> float:
        """Run cell ``index`` and wait for it; return the seconds it took."""
        return _run_cell(self.page, index, self.left())

    def start_cell(self, index: int) -> float:
        """Start cell ``index`` without waiting for it; return the key press's monotonic time."""
        return _start_cell(self.page, index, self.left())

    def wait_cell_done(self, index: int) -> None:
        _wait_cell_done(self.page, index, self.left())

    def output_text(self, index: int, selector: str = ".jp-Cell-outputArea") -> str:
        """The visible text of cell ``index``'s output (``innerText``, stripped)."""
        out = self.cell(index).locator(selector)
        return out.first.inner_text().strip() if out.count() else ""

    def wait_output_length(
        self, index: int, length: int, selector: str = OUTPUT_WIDGET_SELECTOR
    ) -> None:
        """Wait until cell ``index``'s ``selector`` shows at least ``length`` characters."""
        self.page.wait_for_function(
            _OUTPUT_LENGTH_JS,
            arg=[index, selector, length],
            timeout=self.left() * 1000,
            polling=50,
        )


_OUTPUT_LENGTH_JS = """
([cellIndex, selector, length]) => {
  const c = document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell')[cellIndex];
  const out = c && c.querySelector(selector);
  return !!out && out.innerText.trim().length >= length;
}
"""


@contextlib.contextmanager
def open_notebook(
    notebook_path: str | os.PathLike[str],
    *,
    server: JupyterLabServer,
    timeout: float = 60.0,
    screenshot_path: str | os.PathLike[str] | None = None,
    viewport: tuple[int, int] = (1280, 800),
    wait_for_cell: int = 0,
) -> Iterator[LabPage]:
    """Open ``notebook_path`` in JupyterLab (headless Chromium) and yield a :class:`LabPage`.

    The notebook is copied into the server's root_dir unless already there.  Returns once
    cell ``wait_for_cell`` is visible and the kernel is idle.  ``timeout`` bounds the whole
    browser session.  A screenshot is written on exit (default
    ``test-artifacts/browser.png``), also when the body failed.
    """
    from playwright.sync_api import sync_playwright

    notebook_path = Path(notebook_path)
    screenshot = Path(screenshot_path or ARTIFACTS_DIR / "browser.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert server.root_dir is not None
    try:
        rel = notebook_path.resolve().relative_to(server.root_dir.resolve())
    except ValueError:
        rel = Path(notebook_path.name)
        shutil.copy(notebook_path, server.root_dir / rel)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            console: list[str] = []
            page.on(
                "console",
                lambda msg: (
                    console.append(f"{msg.type}: {msg.text}")
                    if msg.type in ("error", "warning")
                    else None
                ),
            )
            page.set_default_timeout(30_000)
            lab = LabPage(page, time.monotonic() + timeout, timeout, console)
            try:
                page.goto(server.notebook_url(rel.as_posix()), timeout=lab.left() * 1000)
                lab.cell(wait_for_cell).wait_for(state="visible", timeout=lab.left() * 1000)
                _wait_kernel_idle(page, lab.left())
                yield lab
            finally:
                if lab.scroll_to is not None:
                    with contextlib.suppress(Exception):
                        lab.scroll_to.scroll_into_view_if_needed(timeout=2000)
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(screenshot))
        finally:
            browser.close()


def run_cell_and_watch(
    notebook_path: str | os.PathLike[str],
    cell_index: int = 0,
    timeout: float = 60.0,
    *,
    server: JupyterLabServer | None = None,
    screenshot_path: str | os.PathLike[str] | None = None,
    poll_ms: int = 50,
    output_selector: str = OUTPUT_WIDGET_SELECTOR,
    run_previous: bool = True,
    viewport: tuple[int, int] = (1280, 800),
) -> WatchResult:
    """Open ``notebook_path`` in JupyterLab, run cell ``cell_index`` and watch its output.

    With ``run_previous`` the cells before ``cell_index`` run first (each to completion),
    e.g. ``%load_ext`` / ``%qwen_load`` before a ``%%qwen`` cell.  If ``server`` is given,
    the notebook is copied into its root_dir unless already there; otherwise a private
    server is started and stopped around the run.  ``timeout`` bounds the whole browser
    session (page load, kernel start and every cell run).  A screenshot is always
    written (default ``test-artifacts/browser_stream.png``), also when the run fails.
    """
    screenshot = Path(screenshot_path or ARTIFACTS_DIR / "browser_stream.png")
    with contextlib.ExitStack() as stack:
        if server is None:
            server = stack.enter_context(JupyterLabServer())
        lab = stack.enter_context(
            open_notebook(
                notebook_path,
                server=server,
                timeout=timeout,
                screenshot_path=screenshot,
                viewport=viewport,
                wait_for_cell=cell_index,
            )
        )
        page = lab.page
        # Long replies: bring the output into view for the screenshot taken on exit.
        lab.scroll_to = lab.cell(cell_index).locator(output_selector).first
        if run_previous:
            for i in range(cell_index):
                lab.run_cell(i)
        page.evaluate(_WATCH_JS, [cell_index, output_selector, poll_ms])
        execution_s = lab.run_cell(cell_index)
        page.wait_for_timeout(3 * poll_ms)  # let the poller see the final state
        samples = page.evaluate(
            "() => { const s = window.__qwenWatch; clearInterval(s.timer); return s.samples; }"
        )
        final_text = lab.output_text(cell_index, output_selector)
        console = lab.console

    lengths: list[int] = []
    busy_lengths: list[int] = []
    for _t, length, busy in samples:
        if length not in lengths:
            lengths.append(length)
        if busy and length and length not in busy_lengths:
            busy_lengths.append(length)
    return WatchResult(
        lengths_seen=lengths,
        final_text=final_text,
        screenshot_path=screenshot,
        busy_lengths=busy_lengths,
        samples=[tuple(s) for s in samples],
        execution_s=execution_s,
        console=console,
    )
