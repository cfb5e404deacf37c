"""The start/stop lifecycle shared by the pool's own services (the embedded pool, its Redis
child, the worker's status server) and the test kit's servers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

__all__ = ["Service"]


class Service(ABC):
    """Something started and stopped (a child process, a server on its own thread); as a
    context manager, ``with`` starts it and returns it, and leaving the block stops it (also on
    an exception, which is not suppressed)."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
