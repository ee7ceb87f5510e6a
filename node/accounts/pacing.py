"""Failed authentication, paced per client address (the admin API, /v1 and the other client APIs, console sign-in).

Each address has a bucket of `burst` failures that refills at `per_minute`; while it is
empty, that address is answered 429 with Retry-After before its credential is even looked
at, so guessing keys or tokens costs a guesser a minute per `per_minute` tries whatever it
sends. Only failures count: a valid client is never slowed by its own successes, and a
client from another address is never slowed at all. The table is bounded
(`max_addresses`, least recently failed out); an address whose bucket has refilled holds
no entry worth keeping.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

PER_MINUTE = 20          # failures an address may make per minute, once its burst is spent
BURST = 20               # failures an address may make at once
MAX_ADDRESSES = 65_536   # addresses remembered (about 100 bytes each)


class FailurePacer:
    """A token bucket of allowed failures per client address."""

    def __init__(self, *, per_minute: float = PER_MINUTE, burst: int = BURST, max_addresses: int = MAX_ADDRESSES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = per_minute > 0   # 0: no pacing at all
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_addresses = max_addresses
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()   # address -> (tokens, at)
        self.refused = 0

    def _tokens(self, ip: str, now: float) -> float:
        entry = self._buckets.get(ip)
        if entry is None:
            return self.burst
        tokens, at = entry
        return min(self.burst, tokens + (now - at) * self.rate)

    def retry_after(self, ip: str) -> int:
        """Seconds the address must wait before its next try is looked at; 0 when it may try now."""
        if not self.enabled or ip not in self._buckets:   # the common case: an address that has not failed lately
            return 0
        tokens = self._tokens(ip, self.clock())
        if tokens >= 1.0 - 1e-9:   # float rounding must not cost a whole Retry-After
            return 0
        self.refused += 1
        return max(1, math.ceil((1.0 - tokens) / self.rate))

    def failed(self, ip: str) -> None:
        """Count one failed authentication from the address."""
        if not self.enabled:
            return
        now = self.clock()
        tokens = self._tokens(ip, now) - 1.0
        self._buckets[ip] = (tokens, now)
        self._buckets.move_to_end(ip)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
