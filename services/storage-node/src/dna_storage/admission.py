"""Admission control for mailbox puts (sans-I/O): size, proof of work, rate limits, quotas, disk.

Every entry point takes the time from the caller; nothing here sleeps, reads a clock or does
I/O, and all state lives in instances. Two clocks are used on purpose: ``now_s`` is the
node's *monotonic* clock in seconds (rate limits, load tracking: never steps back when NTP
adjusts the wall clock) and ``now_ms`` is *wall-clock* milliseconds (a proof of work carries a
wall-clock timestamp, docs/crypto.md "Proof of work").

`Admission.admit_put` either returns (the put is admitted and its rate tokens are spent) or
raises one distinct `ProtocolError` per reason, leaving every piece of state as it was (the
last word in each bracket is the error's ``kind``, the service's metrics label):

1. disk high-water  -> `NodeFullError` (RESOURCE_EXHAUSTED; ``disk``)
2. blob size        -> `MalformedError` "blob too large" (INVALID_ARGUMENT; ``size``)
3. PoW difficulty   -> `PowRequired` with ``required_bits`` (PERMISSION_DENIED; ``pow``)
4. rate limits      -> `RateLimited` with ``retry_after_s`` (RESOURCE_EXHAUSTED; ``rate``),
                       per source address and per mailbox
5. PoW hash and age -> `VerificationError` (PERMISSION_DENIED) or `ExpiredError`
                       (FAILED_PRECONDITION), from `dna_core.crypto.pow.verify` (``pow``)
6. mailbox quota    -> `CapacityError` (RESOURCE_EXHAUSTED; ``quota``); judged again by the
                       backend where it writes (``MailboxBackend.put_many``), whose refusal
                       gives the mailbox's token back, not the source's (``refund_put``)

Why this order: cheapest first, so junk is turned away before it costs anything. 1-3 are
integer comparisons (3 after summing the PoW policy's small ring of load counters); 4 parses
the address and does two dictionary look-ups; 5 is one SHA-256, the only CPU a request can
make us spend, and only once it is within its rate budget; 6 needs the mailbox's stored
usage, the one input that comes from the backend. Rate tokens are spent last, once every
check has passed: a request refused for size, proof of work or quota is one the client has
to redo, and charging it a token would turn a difficulty raise under load into a cascade of
rate refusals on the retries. Not charging a bad-PoW request costs us at most one hash, far
below the transport's own cost per call (~590 µs for a ``grpc.aio`` unary call here).

Invariants kept:

* a refused request changes no state (no token spent, no key inserted or reordered, no put
  counted towards the load that drives the PoW difficulty);
* memory is bounded by configuration: ``max_keys`` buckets per limiter, ``window_s``
  counters in the PoW policy;
* over any interval ``[t0, t1]`` a key is admitted at most ``burst + rate * (t1 - t0)``
  puts (the token-bucket bound, property-tested): a source's puts whatever their write
  then did, so its writer jobs too; a mailbox's puts stored (``refund_put`` gives its
  token back for one the write refused).
"""

from __future__ import annotations

import math

from dna_core.crypto import pow
from dna_core.crypto.pow import Proof
from dna_core.errors import (
    CapacityError,
    MalformedError,
    VerificationError,
)
from dna_core.ops.config import ConfigModel
from dna_core.ratelimit import RateLimited, RateLimiter, SiteTier, TokenBucket, source_key
from pydantic import Field, model_validator

from dna_storage.backends.base import Quota, TombstoneBounds, Usage

__all__ = [
    "Admission",
    "AdmissionConfig",
    "HighWaterMark",
    "NodeFullError",
    "PowPolicy",
    "PowRequired",
    "Quota",
    "RateLimited",
    "RateLimiter",
    "TokenBucket",
    "source_key",
]

KIB = 1024
MIB = 1024 * KIB

_MAX_WINDOW_S = 3600  # a PoW load window longer than an hour would not react to load at all
_NEVER = -(1 << 62)  # the "second" of a ring slot that has never been written


# --- errors ----------------------------------------------------------------------------------


class PowRequired(VerificationError):  # noqa: N818
    """The proof of work is missing or below the difficulty currently required.

    ``required_bits`` is the difficulty to solve for on the retry (it rises under load).
    """

    kind = "pow"

    def __init__(self, reason: str, required_bits: int) -> None:
        super().__init__(reason)
        self.required_bits = required_bits


class NodeFullError(CapacityError):
    """The node's disk is over its high-water mark: it takes no writes (try another replica)."""

    kind = "disk"


# --- adaptive proof of work ------------------------------------------------------------------


class PowPolicy:
    """The proof-of-work difficulty a put needs, raised automatically under load.

    The policy counts admitted puts in a ring of ``window_s`` per-second counters (bounded
    memory whatever the load) and takes the observed rate as their sum over the window
    divided by ``window_s``. ``required = base_bits + extra``, where ``extra`` is one bit
    per full doubling of the observed rate over the target (0 below twice the target, 1
    from 2x, 2 from 4x...), capped at ``max_bits``. Each extra bit doubles a sender's cost,
    so a hash-bound flood of admitted puts settles near the target rate. As load falls,
    old seconds leave the window and the difficulty steps back down to ``base_bits``
    within ``window_s`` seconds.

    Only admitted puts count: floods that the rate limits refuse cost nothing and must not
    raise everyone's price; what the PoW prices is aggregate write load from many sources
    each within its own limit. `required` is a pure query.
    """

    def __init__(
        self, base_bits: int, max_bits: int, target_puts_per_s: float, window_s: int
    ) -> None:
        if not 0 <= base_bits <= max_bits <= pow.MAX_DIFFICULTY:
            raise ValueError(
                f"need 0 <= base_bits ({base_bits}) <= max_bits ({max_bits}) "
                f"<= {pow.MAX_DIFFICULTY}"
            )
        if not (math.isfinite(target_puts_per_s) and target_puts_per_s > 0):
            raise ValueError(f"target_puts_per_s must be > 0, got {target_puts_per_s}")
        if not 1 <= window_s <= _MAX_WINDOW_S:
            raise ValueError(f"window_s must be 1..{_MAX_WINDOW_S}, got {window_s}")
        self.base_bits = base_bits
        self.max_bits = max_bits
        self.target_puts_per_s = float(target_puts_per_s)
        self.window_s = window_s
        self._second = [_NEVER] * window_s  # which second each slot counts
        self._count = [0] * window_s
        self._latest = _NEVER  # latest second seen; an earlier `now` is counted there
        self._sum = (_NEVER, 0)  # (second, puts in the window up to it): summed once a second

    def record_put(self, now: float) -> None:
        """Count one admitted put at ``now``."""
        second = max(math.floor(now), self._latest)
        self._latest = second
        slot = second % self.window_s
        if self._second[slot] != second:
            self._second[slot] = second
            self._count[slot] = 0
        self._count[slot] += 1
        if self._sum[0] == second:
            self._sum = (second, self._sum[1] + 1)

    def puts_in_window(self, now: float) -> int:
        """Admitted puts counted in the ``window_s`` seconds up to and including ``now``."""
        second = max(math.floor(now), self._latest)
        if self._sum[0] != second:
            oldest = second - self.window_s
            total = sum(c for s, c in zip(self._second, self._count, strict=True) if s > oldest)
            self._sum = (second, total)
        return self._sum[1]

    def observed_rate(self, now: float) -> float:
        """Admitted puts per second, averaged over the window."""
        return self.puts_in_window(now) / self.window_s

    def required(self, now: float) -> int:
        """The difficulty (leading zero bits) a put must carry at ``now``."""
        ratio = self.puts_in_window(now) / (self.target_puts_per_s * self.window_s)
        # frexp gives ratio = m * 2**e with 0.5 <= m < 1, so floor(log2(ratio)) == e - 1
        # exactly, with no float log at the doubling boundaries (frexp(0) gives e = 0).
        extra = max(0, math.frexp(ratio)[1] - 1)
        return min(self.max_bits, self.base_bits + extra)


# --- quota and disk --------------------------------------------------------------------------


class HighWaterMark:
    """Trips when the disk is ``limit_fraction`` full; clears below ``resume_fraction``.

    A tripped node refuses writes (`NodeFullError`) and reports itself unready, but keeps
    serving fetches, deletes and repair reads (deletes and GC are what free space). The
    gap between the two fractions (2 points by default) stops readiness from flapping
    while GC and writes hover around the mark. An unknown capacity (<= 0, a failed
    ``statvfs``) counts as full: refusing writes is the safe side.
    """

    def __init__(self, limit_fraction: float, *, resume_fraction: float | None = None) -> None:
        if not 0 < limit_fraction <= 1:
            raise ValueError(f"limit_fraction must be in (0, 1], got {limit_fraction}")
        if resume_fraction is None:
            resume_fraction = max(0.0, limit_fraction - 0.02)
        if not 0 <= resume_fraction <= limit_fraction:
            raise ValueError(f"resume_fraction must be in [0, {limit_fraction}]")
        self.limit_fraction = limit_fraction
        self.resume_fraction = resume_fraction
        self.used_fraction = 0.0
        self._tripped = False

    @property
    def tripped(self) -> bool:
        return self._tripped

    def trip(self) -> None:
        """A write found no room: tripped now, whatever the last reading said (the disk
        filled between two readings); the next reading below ``resume_fraction`` clears it."""
        self._tripped = True

    def update(self, used_bytes: int, capacity_bytes: int) -> bool:
        """Take a new disk reading; returns `tripped`."""
        self.used_fraction = used_bytes / capacity_bytes if capacity_bytes > 0 else 1.0
        if self._tripped:
            self._tripped = self.used_fraction >= self.resume_fraction
        else:
            self._tripped = self.used_fraction >= self.limit_fraction
        return self._tripped


# --- composition -----------------------------------------------------------------------------


class AdmissionConfig(ConfigModel):
    """How big, how often and how much a sender may put (docs/storage.md "Admission"). The
    bounds are those the admission checks accept, so a bad value is refused naming its key."""

    max_blob_bytes: int = Field(default=256 * KIB, ge=1)
    """The largest blob (one envelope) a put may carry."""
    ip_rate_per_s: float = Field(default=20.0, gt=0)
    """Puts per second from one source address (per ipv6_prefix_len for IPv6)..."""
    ip_burst: float = Field(default=40.0, ge=1)
    """...and the burst above it."""
    ip_max_keys: int = Field(default=65_536, ge=1)
    """Source addresses tracked (the least recently seen are forgotten)."""
    ipv6_prefix_len: int = Field(default=64, ge=0, le=128)
    """IPv6 sources are grouped by this prefix."""
    ipv6_site_prefix_len: int = Field(default=48, ge=0, le=128)
    """Every per-source limit of the node (put and delete rates, sessions, subscriptions,
    page slots) has a second tier: all the sources of one IPv6 site, this prefix (a /48,
    what a customer site is assigned), share one budget, so a site cannot multiply its
    budget by using many /64s. No second tier if it is not shorter than ipv6_prefix_len."""
    ipv6_site_share: int = Field(default=8, ge=1)
    """A site's budget is this many times one source's: 8 sources of a site at full rate
    at once (as the libp2p resource manager allows a /48 8 times a /56's connections)."""
    mailbox_rate_per_s: float = Field(default=10.0, gt=0)
    """Puts per second into one mailbox..."""
    mailbox_burst: float = Field(default=50.0, ge=1)
    """...and the burst above it."""
    mailbox_max_keys: int = Field(default=65_536, ge=1)
    """Mailboxes tracked by the rate limiter."""
    pow_base_bits: int = Field(default=12, ge=0, le=pow.MAX_DIFFICULTY)
    """Proof of work asked for when the node is not loaded."""
    pow_max_bits: int = Field(default=24, ge=0, le=pow.MAX_DIFFICULTY)
    """The most proof of work asked for under load."""
    pow_target_puts_per_s: float = Field(default=200.0, gt=0)
    """Load above which the difficulty rises (+1 bit per doubling)."""
    pow_window_s: int = Field(default=10, ge=1, le=_MAX_WINDOW_S)
    """Seconds the load is averaged over."""
    quota_max_blobs: int = Field(default=10_000, ge=1)
    """Blobs one mailbox may hold."""
    quota_max_bytes: int = Field(default=64 * MIB, ge=1)
    """Bytes one mailbox may hold."""
    delete_ip_rate_per_s: float = Field(default=20.0, gt=0)
    """IDs per second from one source address that deletes may name without this node
    holding them (neither the blob nor its tombstone): each becomes a tombstone stored for
    the tombstone lifetime, as much as a small put. IDs held cost nothing..."""
    delete_ip_burst: float = Field(default=1000.0, ge=1)
    """...and the burst above it (one full delete's worth; a delete naming more costs this)."""
    max_tombstones_unheld: int = Field(default=20_000, ge=1)
    """A delete naming IDs this node holds neither way is refused (nothing stored) if the
    mailbox would then hold more tombstones than this; a delete of held IDs always passes."""
    node_max_tombstones_unheld: int = Field(default=1_000_000, ge=1)
    """The same, node-wide: a delete naming IDs this node holds neither way is refused if
    the node would then hold more tombstones stored for such IDs (every mailbox's, repair's
    included) than this; a delete of held IDs always passes."""
    disk_high_water: float = Field(default=0.90, gt=0, le=1)
    """Refuse writes and turn unready above this fraction of the disk used (SQLite)."""

    @property
    def site_tier(self) -> SiteTier:
        """The second tier of the per-source limits (`dna_core.ratelimit.SiteTier`)."""
        return SiteTier(self.ipv6_site_prefix_len, self.ipv6_site_share)

    @model_validator(mode="after")
    def _base_bits_at_most_max(self) -> AdmissionConfig:
        if self.pow_base_bits > self.pow_max_bits:
            raise ValueError(
                f"pow_base_bits ({self.pow_base_bits}) must be <= pow_max_bits "
                f"({self.pow_max_bits})"
            )
        return self


class Admission:
    """The admission decision for puts: composes the checks above in cheapest-first order.

    Quota: ``usage`` is read by the caller before the put is stored, so puts to one
    mailbox admitted together each pass against the same usage; the check here is the
    fast path (a flood is refused before any write), and the backend judges ``quota``
    again where it writes (``MailboxBackend.put_many``). A put it refuses there
    (``PutOutcome.OVER_QUOTA``) gets its mailbox token back, not its source's
    (``refund_put``: the writer job was done).
    A put of a blob already held is judged like a new one here (conservative at the
    limit); the backend lets it through (it stores nothing).
    """

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        c = config if config is not None else AdmissionConfig()
        self.config = c
        site = c.site_tier
        self.per_ip = RateLimiter(c.ip_rate_per_s, c.ip_burst, c.ip_max_keys, site)
        self.per_mailbox = RateLimiter(c.mailbox_rate_per_s, c.mailbox_burst, c.mailbox_max_keys)
        self.deletes_per_ip = RateLimiter(
            c.delete_ip_rate_per_s, c.delete_ip_burst, c.ip_max_keys, site
        )
        self.pow = PowPolicy(
            c.pow_base_bits, c.pow_max_bits, c.pow_target_puts_per_s, c.pow_window_s
        )
        self.quota = Quota(c.quota_max_blobs, c.quota_max_bytes)
        self.tombstone_bounds = TombstoneBounds(
            c.max_tombstones_unheld, c.node_max_tombstones_unheld
        )
        self.high_water = HighWaterMark(c.disk_high_water)

    @property
    def ready(self) -> bool:
        """False while the disk is over its high-water mark (``/readyz`` answers 503)."""
        return not self.high_water.tripped

    def required_bits(self, now_s: float) -> int:
        """The PoW difficulty a put needs now (for status pages and client hints)."""
        return self.pow.required(now_s)

    def precheck_put(
        self, *, source_ip: str, mailbox_id: bytes, blob_len: int, proof: Proof | None, now_s: float
    ) -> None:
        """Checks 1-4 alone: no I/O, no state change. The service runs them before it reads
        the mailbox's usage from the backend, so a flood refused for its rate costs no
        storage read; ``admit_put`` runs them again (integer comparisons and look-ups)."""
        self._cheap_checks(source_ip, mailbox_id, blob_len, proof, now_s)

    def admit_put(
        self,
        *,
        source_ip: str,
        mailbox_id: bytes,
        blob_len: int,
        proof: Proof | None,
        payload_hash: bytes,
        now_s: float,
        now_ms: int,
        usage: Usage,
    ) -> None:
        """Admit one put or raise why not (module docstring: order, errors, invariants).

        ``payload_hash`` is what the proof is bound to, SHA-256(mailbox_id || blob);
        ``now_s`` is the monotonic clock, ``now_ms`` the wall clock; ``usage`` is what the
        mailbox holds now. On return the put's rate tokens are spent and it counts as load.
        Keyword-only: two of the arguments are 32-byte strings that must not be swapped.
        """
        required, ip_key = self._cheap_checks(source_ip, mailbox_id, blob_len, proof, now_s)
        assert proof is not None  # _cheap_checks refuses a missing proof
        # 5. The proof itself: one SHA-256, plus its freshness (ExpiredError) and hash
        # (VerificationError) as pow.verify judges them.
        pow.verify(proof, payload_hash, required=required, now_ms=now_ms)
        # 6. Quota: the only check that depends on what the backend holds.
        self.quota.check_quota(usage.blobs, usage.bytes, blob_len)
        # Admitted: now, and only now, change state.
        self.per_ip.check(ip_key, now_s)
        self.per_mailbox.check(mailbox_id, now_s)
        self.pow.record_put(now_s)

    def refund_put(self, *, mailbox_id: bytes, now_s: float) -> None:
        """Give back the mailbox's rate token ``admit_put`` spent for a put the backend
        then refused for the quota (judged again at the write: puts admitted meanwhile had
        filled the mailbox): the mailbox's budget, shared by all its senders, pays only
        for what it stored. The source's token stays spent: its put cost the node a writer
        job (which a refusal at admission does not), and given back it let a client that
        keeps its mailbox one short of full have more writer jobs than its rate. The put
        stays counted in the proof-of-work load too: it did cost the node its work."""
        self.per_mailbox.refund(mailbox_id, now_s, 1.0)

    def precheck_delete(self, *, source_ip: str, unheld: int, now_s: float) -> None:
        """``admit_delete``'s rate check alone (no state change): run before the mailbox's
        tombstones are read, so a flood refused for its rate costs no second read."""
        self._delete_rate(source_ip, unheld, now_s)

    def admit_delete(
        self, *, source_ip: str, unheld: int, tombstones: int, node_unheld: int, now_s: float
    ) -> None:
        """Admit a delete naming ``unheld`` IDs this node holds neither as blobs nor as
        tombstones, or raise why not, changing nothing (docs/storage.md "Deletes").

        Only those IDs cost: a delete of held blobs frees room and is never slowed (the
        owner's cleanup). Each unheld ID is a token of the source's delete bucket
        (`RateLimited`, ``rate``); ``tombstones`` (what the mailbox holds) plus ``unheld``
        must stay within ``max_tombstones_unheld``, and ``node_unheld`` (the node's
        tombstones stored for IDs not held, every mailbox's) plus ``unheld`` within
        ``node_max_tombstones_unheld`` (`CapacityError`, ``tombstones``, both). A mailbox
        costs nothing to make, so the first bound caps what one mailbox can pin, the rate
        what one source can, and the node's bound what many sources with many mailboxes
        can. The counts are read before the write, so the backend judges the bounds again
        where it writes (``tombstone_bounds``, ``MailboxBackend.delete``): a refusal there
        gives the tokens back (``refund_delete``)."""
        if unheld <= 0:
            return
        ip_key, cost = self._delete_rate(source_ip, unheld, now_s)
        self.tombstone_bounds.check(tombstones, node_unheld, unheld)
        self.deletes_per_ip.check(ip_key, now_s, cost)

    def refund_delete(self, *, source_ip: str, unheld: int, now_s: float) -> None:
        """Give back what ``admit_delete`` spent for a delete the backend then refused
        (``TombstoneBounds`` judged again at the write: concurrent deletes had filled the
        bound meanwhile), so a refused delete spends no token."""
        if unheld <= 0:
            return
        ip_key, cost = self._delete_cost(source_ip, unheld)
        self.deletes_per_ip.refund(ip_key, now_s, cost)

    def _delete_cost(self, source_ip: str, unheld: int) -> tuple[str, float]:
        """The source's key and the delete's cost in tokens: what ``admit_delete`` spends
        and ``refund_delete`` gives back, one formula."""
        ip_key = source_key(source_ip, ipv6_prefix_len=self.config.ipv6_prefix_len)
        return ip_key, min(float(max(unheld, 1)), self.deletes_per_ip.burst)

    def _delete_rate(self, source_ip: str, unheld: int, now_s: float) -> tuple[str, float]:
        """The source's key and the delete's cost in tokens, or raise `RateLimited`."""
        ip_key, cost = self._delete_cost(source_ip, unheld)
        wait, tier = self.deletes_per_ip.refusal(ip_key, now_s, cost)
        if wait > 0:
            who, rate, burst = self.deletes_per_ip.budget(tier)
            raise RateLimited(
                f"rate limit: {who} over {rate:g} deleted IDs/s not held here "
                f"(burst {burst:g}); retry after {wait:.3f} s",
                wait,
            )
        return ip_key, cost

    def _cheap_checks(
        self, source_ip: str, mailbox_id: bytes, blob_len: int, proof: Proof | None, now_s: float
    ) -> tuple[int, str]:
        """Checks 1-4; returns the required PoW bits and the source's rate-limit key."""
        c = self.config
        # 1. A full disk refuses everything, whatever the request.
        if self.high_water.tripped:
            raise NodeFullError(
                "storage node is over its disk high-water mark; try another replica"
            )
        # 2. Size: an integer comparison.
        if blob_len > c.max_blob_bytes:
            raise MalformedError(
                f"blob too large: {blob_len} bytes > {c.max_blob_bytes}", kind="size"
            )
        # 3. The proof's claimed difficulty: an integer comparison, no hashing yet.
        required = self.pow.required(now_s)
        if proof is None or proof.difficulty < required:
            have = "missing" if proof is None else f"{proof.difficulty} bits"
            raise PowRequired(f"proof of work: {required} bits required, proof {have}", required)
        # 4. Rate limits: peeked, both of them, and spent only at the end of admit_put.
        ip_key = source_key(source_ip, ipv6_prefix_len=c.ipv6_prefix_len)
        ip_wait, tier = self.per_ip.refusal(ip_key, now_s)
        mailbox_wait = self.per_mailbox.peek(mailbox_id, now_s)
        if ip_wait > 0 or mailbox_wait > 0:
            if ip_wait >= mailbox_wait:
                which, rate, burst = self.per_ip.budget(tier)
            else:
                which, rate, burst = "mailbox", self.per_mailbox.rate, self.per_mailbox.burst
            wait = max(ip_wait, mailbox_wait)  # the retry has to pass both
            raise RateLimited(
                f"rate limit: {which} over {rate:g} puts/s (burst {burst:g}); "
                f"retry after {wait:.3f} s",
                wait,
            )
        return required, ip_key
