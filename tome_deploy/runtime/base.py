"""The one runner lifecycle, as in Polygraphy: activate (load the session or engine), `infer(dict of arrays)
-> dict of arrays` any number of times, deactivate (release it); or `with runner:` for both. Imports no torch:
the runners live one per backend next to it (pytorch.py, onnxruntime.py, openvino.py, tensorrt.py), and
factory.py picks one for a file."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TypeVar

import numpy as np

from tome_deploy.errors import ToMeError


class RunnerStateError(ToMeError, RuntimeError):
    """A runner used out of order: infer before activate, or activate twice."""


RunnerT = TypeVar("RunnerT", bound="Runner")


class Runner(ABC):
    """A model behind `infer`; checks that need no loading happen in the constructor, loading in activate."""

    name: str

    def __init__(self) -> None:
        self._active = False

    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> None:
        """Load the session or engine; infer works from now until deactivate."""
        if self._active:
            raise RunnerStateError(
                f"the {self.name} runner is already active; deactivate it before activating it again"
            )
        self._load()
        self._active = True

    def deactivate(self) -> None:
        """Release what activate loaded; activate may load it again."""
        if not self._active:
            raise RunnerStateError(f"the {self.name} runner is not active, so there is nothing to deactivate")
        self._active = False
        self._release()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._active:
            raise RunnerStateError(
                f"the {self.name} runner is not active; call activate() first, or use it as `with runner:`"
            )
        return self._run(feed)

    def __enter__(self: RunnerT) -> RunnerT:
        self.activate()
        return self

    def __exit__(self, *exc_info) -> None:
        self.deactivate()

    @abstractmethod
    def _load(self) -> None:
        """Load the session or engine."""

    @abstractmethod
    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass on a loaded session or engine."""

    @abstractmethod
    def _release(self) -> None:
        """Drop the session or engine."""
