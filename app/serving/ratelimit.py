"""Per-client rate limit on uploads: a token bucket per client address, in memory.

Each client (the request's client address: the peer, or the address a trusted
proxy names in `X-Forwarded-For`, see docs/OPERATIONS.md) may start `burst`
uploads at once and `per_minute` uploads a minute on average. An upload over
the limit is refused before its body is read, with 429 and `Retry-After` (whole
seconds until the next token). The buckets live in one server process: with
`--workers N` a client that spreads its uploads over connections may get up to
N times the limit, so put a strict limit in the proxy in front when that
matters. Memory is bounded: at most `max_clients` buckets are kept; full
(idle) buckets are dropped first, then the least recently used.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self, per_minute: int, burst: int, max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic
    ):
        if per_minute < 1 or burst < 1 or max_clients < 1:
            raise ValueError("per_minute, burst and max_clients must be at least 1")
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = float(burst)
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)
        self._lock = threading.Lock()

    def _tokens(self, key: str, now: float) -> float:
        tokens, when = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - when) * self.rate)

    def acquire(self, key: str) -> int:
        """Take one token for `key`: 0 when allowed, else the whole seconds to wait (at least 1)."""
        with self._lock:
            now = self._clock()
            tokens = self._tokens(key, now)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                self._buckets.move_to_end(key)
                return max(1, math.ceil((1.0 - tokens) / self.rate))
            self._buckets[key] = (tokens - 1.0, now)
            self._buckets.move_to_end(key)
            if len(self._buckets) > self.max_clients:
                self._shrink(now)
            return 0

    def _shrink(self, now: float) -> None:
        """Drop refilled buckets (they equal absent ones), then the least recently used."""
        for key in [k for k in self._buckets if self._tokens(k, now) >= self.burst]:
            del self._buckets[key]
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


def upload_limiter(settings) -> RateLimiter | None:
    """The limiter for `settings` (`upload_rate_limit` per minute, `upload_rate_burst`), or None when off."""
    if settings.upload_rate_limit <= 0:
        return None
    return RateLimiter(settings.upload_rate_limit, settings.upload_rate_burst)
