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
from collections import Counter, OrderedDict
from dataclasses import dataclass

from dna_core.errors import CapacityError

__all__ = [
    "SITE_TIER",
    "SOURCE_TIER",
    "RateLimited",
    "RateLimiter",
    "SiteTier",
    "SourceCounts",
    "TokenBucket",
    "grpc_peer_ip",
    "source_key",
]

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

# Which tier refused: the source's own key (an IPv4 address, an IPv6 /64) or its site's.
SOURCE_TIER = "source"
SITE_TIER = "site"


@dataclass(frozen=True)
class SiteTier:
    """The second, aggregate tier of every per-source limit: the IPv6 site (``prefix_len``,
    a /48) a source key belongs to gets ``share`` times the budget of one source key.

    Without it a /48, what any customer site is assigned (RIPE-690 section 4.2), holds
    65,536 /64s and so 65,536 times every per-/64 budget. ``share`` is 8, as in the libp2p
    resource manager (8 connections per /56, 8 * 8 per /48): a site may run 8 /64s at full
    rate at once, which leaves room for an office's few subnets (the hosts of one LAN share
    one /64 and its budget anyway), while what a /48 can take is bounded whatever number of
    /64s it uses. A single /64 never reaches its site's budget (it is ``share`` >= 1 times
    its own), so a source alone in its /48, loopback included, is judged as before.
    IPv4 keys, and IPv6 keys already grouped at ``prefix_len`` or wider, have no site tier.
    """

    prefix_len: int = 48
    share: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.prefix_len <= 128 or self.share < 1:
            raise ValueError(f"site tier: prefix_len in [0, 128], share >= 1; got {self}")

    def of(self, key: Key) -> str | None:
        """The site key of source key ``key`` (`source_key`'s ``net/len``), or None."""
        return _site_key(key, self.prefix_len) if isinstance(key, str) else None


@functools.lru_cache(maxsize=4096)  # a pure function, asked once per request
def _site_key(key: str, prefix_len: int) -> str | None:
    if "/" not in key:
        return None  # an IPv4 address, or what was not an address at all
    try:
        network = ipaddress.IPv6Network(key)
    except ValueError:
        return None
    if network.prefixlen <= prefix_len:
        return None
    return str(network.supernet(new_prefix=prefix_len))


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

    With a ``site`` tier (source limiters), a source key is also charged to its site's
    bucket (``share`` times the rate and burst, `SiteTier`): `check` spends both or
    neither, and the retry-after is the longer of the two waits.
    """

    def __init__(
        self, rate: float, burst: float, max_keys: int, site: SiteTier | None = None
    ) -> None:
        TokenBucket(rate, burst)  # validates rate and burst
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[Key, TokenBucket] = OrderedDict()
        self.site = site
        self._sites = (
            None if site is None else RateLimiter(rate * site.share, burst * site.share, max_keys)
        )

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
        return self.refusal(key, now, cost)[0]

    def refusal(self, key: Key, now: float, cost: float = 1.0) -> tuple[float, str]:
        """`peek`, and the tier that makes the wait (`SOURCE_TIER` or `SITE_TIER`; the
        source's when neither does)."""
        wait = self._peek_own(key, now, cost)
        site = self._site_of(key)
        if site is not None and self._sites is not None:
            site_wait = self._sites.peek(site, now, cost)
            if site_wait > wait:
                return site_wait, SITE_TIER
        return wait, SOURCE_TIER

    def check(self, key: Key, now: float, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens of ``key`` (at most ``burst``), and as many of its site's,
        and return 0.0; or return the retry-after in seconds and spend nothing."""
        site = self._site_of(key)
        if site is None or self._sites is None:
            return self._check_own(key, now, cost)
        wait = self.peek(key, now, cost)
        if wait > 0:
            self._touch(key)
            self._sites._touch(site)
            return wait
        self._sites._check_own(site, now, cost)
        return self._check_own(key, now, cost)

    def refund(self, key: Key, now: float, cost: float) -> None:
        """`TokenBucket.refund` for ``key`` and its site (nothing for a key no longer held:
        it comes back with a full bucket anyway)."""
        site = self._site_of(key)
        if site is not None and self._sites is not None:
            self._sites.refund(site, now, cost)
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.refund(now, cost)

    def budget(self, tier: str) -> tuple[str, float, float]:
        """Who ``tier`` limits, in words for a refusal, and its rate and burst."""
        if tier == SITE_TIER and self._sites is not None and self.site is not None:
            who = f"source's IPv6 /{self.site.prefix_len} (all its addresses)"
            return who, self._sites.rate, self._sites.burst
        return "source", self._rate, self._burst

    def _site_of(self, key: Key) -> str | None:
        return None if self.site is None else self.site.of(key)

    def _touch(self, key: Key) -> None:
        if key in self._buckets:
            self._buckets.move_to_end(key)

    def _peek_own(self, key: Key, now: float, cost: float) -> float:
        bucket = self._buckets.get(key)
        return (
            TokenBucket(self._rate, self._burst).peek(now, cost)
            if bucket is None
            else (bucket.peek(now, cost))
        )

    def _check_own(self, key: Key, now: float, cost: float) -> float:
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


class SourceCounts:
    """How many of something (connections, sessions, slots) each source key holds, and
    each site (`SiteTier`): at most ``per_source`` per key, ``share`` times that per site.
    `over` says which tier one more would exceed; `add` and `remove` count."""

    def __init__(self, per_source: int, site: SiteTier | None = None) -> None:
        self.site = site if site is not None else SiteTier()
        self.per_source = per_source
        self.per_site = per_source * self.site.share
        self._by_source: Counter[str] = Counter()
        self._by_site: Counter[str] = Counter()

    def held(self, key: str) -> int:
        return self._by_source[key]

    def by_source(self) -> dict[str, int]:
        """What each source key holds (those holding something)."""
        return dict(self._by_source)

    def held_by_site(self, key: str) -> int:
        """What ``key``'s site holds (``key``'s own count when it has no site tier)."""
        site = self.site.of(key)
        return self._by_source[key] if site is None else self._by_site[site]

    def over(self, key: str, count: int = 1) -> str | None:
        """`SOURCE_TIER` or `SITE_TIER` if ``count`` more for ``key`` would exceed that
        tier's cap, else None."""
        if self._by_source[key] + count > self.per_source:
            return SOURCE_TIER
        site = self.site.of(key)
        if site is not None and self._by_site[site] + count > self.per_site:
            return SITE_TIER
        return None

    def add(self, key: str, count: int = 1) -> None:
        self._by_source[key] += count
        if (site := self.site.of(key)) is not None:
            self._by_site[site] += count

    def remove(self, key: str, count: int = 1) -> None:
        """Count ``count`` fewer for ``key`` (never below none)."""
        _decrease(self._by_source, key, count)
        if (site := self.site.of(key)) is not None:
            _decrease(self._by_site, site, count)


def _decrease(counts: Counter[str], key: str, count: int) -> None:
    left = counts[key] - count
    if left > 0:
        counts[key] = left
    else:
        del counts[key]


@functools.lru_cache(maxsize=4096)  # a pure function, asked once per put
def source_key(source_ip: str, *, ipv6_prefix_len: int = 64) -> str:
    """The rate-limit key of a client address.

    An IPv6 host is routinely given a whole /64 (RFC 4291 §2.5.4, SLAAC), so per-address
    limits would be per-/64 anyway for an honest host and worthless against a dishonest
    one: IPv6 addresses are grouped by ``ipv6_prefix_len``. An IPv6 address that carries
    the client's IPv4 address counts as that IPv4 address (`_carried_ipv4`). Anything that
    is not an IP address is used as given.
    """
    try:
        addr = ipaddress.ip_address(source_ip)
    except ValueError:
        return source_ip
    if isinstance(addr, ipaddress.IPv6Address):
        carried = _carried_ipv4(addr)
        if carried is not None:
            return str(carried)
        host_bits = 128 - ipv6_prefix_len
        network = (int(addr) >> host_bits) << host_bits  # drops any %scope too
        return f"{ipaddress.IPv6Address(network)}/{ipv6_prefix_len}"
    return str(addr)


NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix


def _carried_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address of the client an IPv6 address stands for, if it carries one:
    IPv4-mapped (RFC 4291), 6to4 (RFC 3056), Teredo's client (RFC 4380) and the NAT64
    well-known prefix (RFC 6052). Grouped as IPv6, one IPv4 address held a whole 6to4 /48
    (a site's budget besides its own IPv4 one), and every client of one NAT64 translator
    or Teredo server shared one /64's."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def grpc_peer_ip(peer: str) -> str:
    """The address part of a gRPC peer string: `ipv4:1.2.3.4:5` / `ipv6:[::1]:5` -> the
    host (what `source_key` groups by); anything else is returned as given. grpcio writes
    IPv6 peers URI-escaped (`ipv6:%5B::1%5D:5`): left escaped, the address would not parse
    and every address of one /64 would be a rate-limit key of its own."""
    _, _, rest = urllib.parse.unquote(peer).partition(":")
    host = rest.rpartition(":")[0]
    return host.strip("[]") or peer
