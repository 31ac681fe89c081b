"""What a runner's warm pool reports, whatever the backend (``docker_pool``).

A pool tells its observer about each request it served (``hit``, with the age of the
sandbox handed out), each it could not (``miss``: ``unpooled`` for a request no pool
is kept for, ``empty`` when none was ready) and each sandbox it failed to make.
``WarmPool`` is what the app reads for ``/metrics`` and ``/health``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["NullPoolObserver", "PoolObserver", "WarmPool"]


class PoolObserver(Protocol):
    def hit(self, image: str, age: float) -> None: ...

    def miss(self, image: str, reason: str) -> None: ...

    def refill_failed(self, image: str, code: str) -> None: ...


class NullPoolObserver:
    """Observes nothing (a pool nobody meters)."""

    def hit(self, image: str, age: float) -> None:
        pass

    def miss(self, image: str, reason: str) -> None:
        pass

    def refill_failed(self, image: str, code: str) -> None:
        pass


@runtime_checkable
class WarmPool(Protocol):
    observer: PoolObserver

    def ready(self) -> dict[str, int]:
        """Sandboxes ready now, per pooled image (an image whose pool is empty: 0)."""
        ...
