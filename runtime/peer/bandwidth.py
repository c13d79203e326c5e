"""A token bucket for ``replication.max_bandwidth``: bytes per second received from peers.

:class:`TokenBucket` is pure (``now`` is passed in): :meth:`TokenBucket.reserve`
takes ``n`` bytes' worth of tokens at once and returns how long the caller
must wait before using them. Tokens may go negative (a chunk larger than the
burst still passes, later), so over any interval of ``t`` seconds at most
``burst + rate * t`` bytes are admitted, and a steady stream gets ``rate``.
:class:`Bandwidth` is the async shell: it sleeps for the reservation. One
instance is shared by every transfer of a node, so the limit is the node's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["Bandwidth", "TokenBucket"]


class TokenBucket:
    """``rate`` bytes per second with bursts of up to ``burst`` bytes; ``rate == 0`` means unlimited."""

    def __init__(self, rate: float, burst: float | None = None, *, now: float = 0.0) -> None:
        if rate < 0 or (burst is not None and burst <= 0):
            raise ValueError("rate must be >= 0 and burst > 0")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate, 1.0))
        self.tokens = self.burst
        self.updated = now
        self.admitted = 0
        """Bytes handed out so far (for accounting and tests)."""

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def reserve(self, n: int, now: float) -> float:
        """Take ``n`` bytes' worth now; returns the seconds to wait before sending or receiving them."""
        if n < 0:
            raise ValueError("cannot reserve a negative amount")
        self.admitted += n
        if self.unlimited:
            return 0.0
        self._refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Bandwidth:
    """The async limiter around a :class:`TokenBucket` (``rate == 0``: never waits)."""

    def __init__(self, rate: float, burst: float | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = asyncio.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self.bucket = TokenBucket(rate, burst, now=clock())

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` more bytes may be received."""
        delay = self.bucket.reserve(n, self._clock())
        if delay > 0:
            result = self._sleep(delay)
            if asyncio.iscoroutine(result):
                await result
