"""Token-bucket rate limits per source (sans-I/O): shared by every node that takes writes
from the network (mailbox puts on storage nodes, record stores on every overlay node).

Nothing here reads a clock: ``now`` is the caller's *monotonic* time in seconds. Memory is
bounded (`RateLimiter` holds at most ``max_keys`` buckets). Over any interval
``[t0, t1]`` a key is admitted at most ``burst + rate * (t1 - t0)`` times (the token-bucket
bound, property-tested in tests/storage/test_storage_admission.py).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import urllib.parse
from collections import OrderedDict

from dna_core.errors import CapacityError

__all__ = ["RateLimited", "RateLimiter", "TokenBucket", "grpc_peer_ip", "source_key"]

# Float rounding tolerance, in tokens. A client that waits exactly the retry-after it was
# given must be admitted, but `now + wait - last` rounds at the ulp of `now` (~2e-9 s for a
# monotonic clock at 1e7 s of uptime). 1e-6 token absorbs that and gives away nothing real.
_TOKEN_EPSILON = 1e-6


class RateLimited(CapacityError):  # noqa: N818 (names a status, like the gRPC codes)
    """Over a token-bucket rate limit; ``retry_after_s`` (> 0) says when a retry can pass.

    Adapters answer RESOURCE_EXHAUSTED with the retry-after (rounded up) in the trailers.
    """

    kind = "rate"

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_ms(self) -> int:
        """The retry-after in whole milliseconds, rounded up: a retry then passes."""
        return max(1, math.ceil(self.retry_after_s * 1000))


class TokenBucket:
    """A token bucket: holds up to ``burst`` tokens, refilled at ``rate`` tokens per second.

    It starts full. `take` spends ``cost`` tokens if it can and returns 0.0, or returns the
    exact number of seconds after which the same `take` would succeed and changes nothing.
    Time going backwards (an injected clock, a bug) neither refills nor crashes.
    """

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"token bucket rate must be > 0, got {rate}")
        if not (math.isfinite(burst) and burst >= 1):
            raise ValueError(f"token bucket burst must be >= 1, got {burst}")
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = self._burst
        self._last: float | None = None  # when _tokens was last brought up to date

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (read-only)."""
        if self._last is None:
            return self._burst
        elapsed = now - self._last
        if elapsed <= 0:
            return self._tokens
        return min(self._burst, self._tokens + elapsed * self._rate)

    def peek(self, now: float, cost: float = 1.0) -> float:
        """What `take` would return, without taking anything."""
        if not 0 < cost <= self._burst:
            raise ValueError(f"cost must be in (0, burst={self._burst}], got {cost}")
        deficit = cost - self.tokens(now)
        if deficit <= _TOKEN_EPSILON:
            return 0.0
        return deficit / self._rate

    def take(self, now: float, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens and return 0.0, or return the seconds to wait (no change)."""
        wait = self.peek(now, cost)
        if wait > 0:
            return wait
        self._tokens = max(0.0, self.tokens(now) - cost)
        self._last = now if self._last is None else max(self._last, now)
        return 0.0

    def refund(self, now: float, cost: float) -> None:
        """Give back ``cost`` tokens a `take` spent for work that was then not done (never
        past ``burst``): the bucket is as if that `take` had not happened, or fuller."""
        self._tokens = min(self._burst, self.tokens(now) + cost)
        self._last = now if self._last is None else max(self._last, now)


Key = str | bytes


class RateLimiter:
    """One `TokenBucket` per key (a source address string, a mailbox ID), at most ``max_keys``.

    Memory is bounded by evicting the least recently used key; an evicted key comes back
    with a full bucket. That is acceptable because a bucket left alone for ``burst / rate``
    seconds is full anyway, so eviction only gives tokens away if ``max_keys`` other keys
    were used within that time. Keys are inserted only by admitted requests (`check`), so
    that takes more than ``max_keys * rate / burst`` admissions per second, e.g. 65,536
    mailboxes in 5 s = 13,000 puts/s, well above what one node admits. Even then the gift
    is at most ``burst`` tokens to a key that has itself waited behind ``max_keys`` others.

    Recency is refreshed by every `check` (admitted or not): a key hammering the limiter
    holds the emptiest bucket, the one most worth remembering. `peek` touches nothing.
    """

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        TokenBucket(rate, burst)  # validates rate and burst
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[Key, TokenBucket] = OrderedDict()

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def max_keys(self) -> int:
        return self._max_keys

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def by_recency(self) -> list[Key]:
        """The keys held, least recently used first (the next to be evicted)."""
        return list(self._buckets)

    def tokens(self, key: Key, now: float) -> float:
        """Tokens ``key`` has at ``now`` (``burst`` for a key not held); read-only."""
        bucket = self._buckets.get(key)
        return self._burst if bucket is None else bucket.tokens(now)

    def peek(self, key: Key, now: float, cost: float = 1.0) -> float:
        """What `check` would return, changing nothing (not even recency)."""
        bucket = self._buckets.get(key)
        return (
            TokenBucket(self._rate, self._burst).peek(now, cost)
            if bucket is None
            else (bucket.peek(now, cost))
        )

    def check(self, key: Key, now: float, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens of ``key`` (at most ``burst``) and return 0.0, or return
        the retry-after in seconds."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
            return bucket.take(now, cost)
        bucket = TokenBucket(self._rate, self._burst)
        wait = bucket.take(now, cost)  # a fresh bucket is full: admitted when cost <= burst
        self._buckets[key] = bucket
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait

    def refund(self, key: Key, now: float, cost: float) -> None:
        """`TokenBucket.refund` for ``key`` (nothing for a key no longer held: it comes back
        with a full bucket anyway)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.refund(now, cost)


@functools.lru_cache(maxsize=4096)  # a pure function, asked once per put
def source_key(source_ip: str, *, ipv6_prefix_len: int = 64) -> str:
    """The rate-limit key of a client address.

    An IPv6 host is routinely given a whole /64 (RFC 4291 §2.5.4, SLAAC), so per-address
    limits would be per-/64 anyway for an honest host and worthless against a dishonest
    one: IPv6 addresses are grouped by ``ipv6_prefix_len``. IPv4-mapped IPv6 addresses
    count as their IPv4 address. Anything that is not an IP address is used as given.
    """
    try:
        addr = ipaddress.ip_address(source_ip)
    except ValueError:
        return source_ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        host_bits = 128 - ipv6_prefix_len
        network = (int(addr) >> host_bits) << host_bits  # drops any %scope too
        return f"{ipaddress.IPv6Address(network)}/{ipv6_prefix_len}"
    return str(addr)


def grpc_peer_ip(peer: str) -> str:
    """The address part of a gRPC peer string: `ipv4:1.2.3.4:5` / `ipv6:[::1]:5` -> the
    host (what `source_key` groups by); anything else is returned as given. grpcio writes
    IPv6 peers URI-escaped (`ipv6:%5B::1%5D:5`): left escaped, the address would not parse
    and every address of one /64 would be a rate-limit key of its own."""
    _, _, rest = urllib.parse.unquote(peer).partition(":")
    host = rest.rpartition(":")[0]
    return host.strip("[]") or peer
