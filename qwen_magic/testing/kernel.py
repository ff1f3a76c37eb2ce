"""A real Jupyter kernel for tests that need one (interrupts, widgets, restarts)."""

from __future__ import annotations

import ast
import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any


class Kernel:
    """A started ipykernel with helpers to run code and read values back."""

    def __init__(self, manager: Any, client: Any) -> None:
        self.manager = manager
        self.client = client

    def run(self, code: str, hook: Callable[[dict], None] | None = None, timeout: float = 180):
        """Execute ``code``; return the reply content. Outputs go to ``hook``."""
        reply = self.client.execute_interactive(
            code, timeout=timeout, output_hook=hook or (lambda message: None)
        )
        return reply["content"]

    def run_ok(self, code: str, timeout: float = 180) -> str:
        """Execute ``code``, fail on error, return its printed text."""
        printed: list[str] = []

        def hook(message: dict) -> None:
            if message["msg_type"] == "stream":
                printed.append(message["content"]["text"])

        content = self.run(code, hook, timeout)
        assert content["status"] == "ok", content
        return "".join(printed)

    def value(self, expression: str) -> Any:
        """Evaluate ``expression`` in the kernel and return it as a Python literal."""
        msg_id = self.client.execute("", user_expressions={"value": expression})
        while True:
            reply = self.client.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        result = reply["content"]["user_expressions"]["value"]
        assert result["status"] == "ok", result
        return ast.literal_eval(result["data"]["text/plain"])


@contextmanager
def kernel(env: dict[str, str] | None = None):
    """Start a kernel from this interpreter, with extra environment variables."""
    from jupyter_client.manager import start_new_kernel

    from qwen_magic.testing import announce

    announce("kernel", "a Jupyter kernel")
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    manager, client = start_new_kernel(kernel_name="python3", env=full_env)
    try:
        yield Kernel(manager, client)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
