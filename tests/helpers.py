"""Small test doubles shared by the test modules."""

from __future__ import annotations

from typing import Any


class QuietView:
    """A view that shows nothing: for tests about turns and caches, not about display."""

    def update(self, text: str) -> None:
        pass

    def finish(self, text: str, footer: str) -> None:
        pass


def spy_on_generate(loaded: Any, monkeypatch: Any) -> list[dict]:
    """Record the keyword arguments of every ``model.generate`` call, then call through."""
    calls: list[dict] = []
    real = loaded.model.generate

    def spy(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(loaded.model, "generate", spy)
    return calls
