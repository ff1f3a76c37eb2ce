"""A real ``transformers serve`` process for the server backend's tests and its benchmark.

``transformers serve DIR --device cpu --host 127.0.0.1 --port P`` (from ``transformers[serving]``)
serves one model folder over the OpenAI chat-completions API, offline. :class:`ServeProcess`
starts it on a free loopback port, waits for ``GET /health``, and stops or kills it by its own
process id (never by name), so a test can also cut it off mid-reply and start it again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

#: A cold start loads torch, transformers and the 1.2 GB demo folder: seconds, more when busy.
READY_SECONDS = 240.0


def serve_missing() -> str | None:
    """Why ``transformers serve`` cannot run here (None: it can)."""
    for module in ("transformers", "fastapi", "uvicorn", "openai"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'transformers[serving]' openai)"
    return None


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """``transformers serve`` on one model folder, on the CPU, on a loopback port."""

    def __init__(self, model_dir: Path, log_path: Path, port: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServeProcess:
        """Start the server (same port as before) and wait until it answers ``/health``."""
        from qwen_magic.testing import announce

        announce("server", "transformers serve")
        command = [
            sys.executable,
            "-m",
            "transformers.cli.transformers",
            "serve",
            str(self.model_dir),
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited early:\n{self.log_tail()}")
            health = f"{self.url}/health"
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as answer:
                if answer.status == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"transformers serve did not answer /health:\n{self.log_tail()}")

    def kill(self) -> None:
        """Cut the server off at once (SIGKILL), as a crash or an OOM kill would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def stop(self) -> None:
        """Stop the server politely, then firmly."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return "(no log)"


class SilentServer:
    """A stand-in server on 127.0.0.1 that lists one model, then accepts chat requests and never
    answers them: a server that hangs, or one that sends no headers until its first token.

    ``chat_arrived`` is set when a chat request has come; ``client_left`` when its connection is
    closed by the client (``recv`` returns nothing), ``left_at`` saying when.
    """

    MODELS = b'{"object": "list", "data": [{"id": "silent/model", "object": "model"}]}'

    def __init__(self) -> None:
        import threading

        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.chat_arrived = threading.Event()
        self.client_left = threading.Event()
        self.left_at: float | None = None
        self.bodies: list[bytes] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        import threading

        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            worker = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self._threads.append(worker)
            worker.start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                if not (data := connection.recv(65536)):
                    return
                request += data
            head, _, body = request.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                body += connection.recv(65536)
            if b" /v1/models " in head.split(b"\r\n")[0]:
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n"
                    % len(self.MODELS)
                    + self.MODELS
                )
                return
            self.bodies.append(body)
            self.chat_arrived.set()
            connection.settimeout(30)
            try:
                while connection.recv(65536):  # the client's FIN (or a reset) ends this
                    pass
            except TimeoutError:
                return  # the client never left
            except OSError:
                pass
            self.left_at = time.perf_counter()
            self.client_left.set()

    def close(self) -> None:
        self._listener.close()
