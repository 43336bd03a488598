"""The sender's token bucket: the migration link's bandwidth.

Loopback TCP is many times faster than the network the seed measured on, so the
source limits itself to the configured rate (QEMU's max-bandwidth does the same).
Tokens are bytes; they accrue at `rate` per second up to `burst`; a send of n bytes
takes n tokens and, when the bucket goes into debt, sleeps until the debt is paid.
Time spent scanning (no bytes on the wire) earns at most `burst` tokens, so an idle
link is not banked for later: a scan that keeps the link idle costs time, as it does
in QEMU's migration thread.
"""
from __future__ import annotations

import time


class TokenBucket:
    def __init__(self, rate_bytes_per_s: float, burst_bytes: float | None = None) -> None:
        if not rate_bytes_per_s > 0:
            raise ValueError(f"rate must be positive bytes/s, got {rate_bytes_per_s!r}")
        self.rate = float(rate_bytes_per_s)
        # default burst: 10 ms of the link, at least one 8 MiB message
        self.burst = float(burst_bytes) if burst_bytes is not None else max(self.rate * 0.01, float(8 << 20))
        self.tokens = self.burst
        self.last = time.monotonic()
        self.slept_s = 0.0
        self.bytes = 0

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def consume(self, n: int) -> None:
        """Take n bytes' worth of tokens, sleeping while the bucket is in debt."""
        self._refill()
        self.tokens -= n
        self.bytes += n
        if self.tokens < 0:
            wait = -self.tokens / self.rate
            t0 = time.monotonic()
            time.sleep(wait)
            self.slept_s += time.monotonic() - t0
            self._refill()
