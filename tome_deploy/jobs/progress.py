"""How a job reports progress: one callable that takes a line of text (the CLI passes a printer)."""

from __future__ import annotations

from typing import Callable

Say = Callable[[str], None]


def silent(_: str) -> None:
    """The default reporter: says nothing."""
