"""Admission control (sans-I/O): token buckets, LRU-bounded rate limiters, adaptive proof of
work, quotas, the disk high-water mark, and their composition in `Admission.admit_put`.

Time is injected (``now_s`` monotonic seconds, ``now_ms`` wall-clock milliseconds): nothing
sleeps. Exactness tests use rates and instants that are exact in binary floating point.
Proofs of work are solved for real, at low difficulties except where the default config
itself is under test, and cached per (payload, bits, timestamp).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from dna_core.crypto import pow
from dna_core.crypto.pow import Proof
from dna_core.errors import (
    CapacityError,
    ExpiredError,
    MalformedError,
    ProtocolError,
    VerificationError,
)
from dna_core.ratelimit import grpc_peer_ip
from dna_storage.admission import (
    Admission,
    AdmissionConfig,
    HighWaterMark,
    NodeFullError,
    PowPolicy,
    PowRequired,
    Quota,
    RateLimited,
    RateLimiter,
    TokenBucket,
    source_key,
)
from dna_storage.backends.base import StorageFullError, Usage
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

NOW_MS = 1_700_000_000_000  # wall clock of every proof unless a test says otherwise
T0 = 1000.0  # monotonic seconds
EMPTY = Usage(blobs=0, bytes=0)
BLOB = b"an opaque envelope"
MINUTE_MS = 60_000

# Small, fast parameters: 4-bit proofs, low limits that tests reach in a few calls.
SMALL = AdmissionConfig(
    max_blob_bytes=500,
    ip_rate_per_s=1.0,
    ip_burst=3.0,
    mailbox_rate_per_s=2.0,
    mailbox_burst=3.0,
    pow_base_bits=4,
    pow_max_bits=8,
    pow_target_puts_per_s=100.0,
    pow_window_s=2,
    quota_max_blobs=5,
    quota_max_bytes=1000,
)


def mbox(n: int) -> bytes:
    return hashlib.sha256(b"mailbox %d" % n).digest()


def payload_hash(mailbox: bytes, blob: bytes = BLOB) -> bytes:
    return hashlib.sha256(mailbox + blob).digest()


@functools.cache
def solved(mailbox: bytes, bits: int, ts_ms: int = NOW_MS) -> Proof:
    proof, _ = pow.solve(payload_hash(mailbox), bits, now_ms=ts_ms)
    return proof


def forged(mailbox: bytes, bits: int) -> Proof:
    """A proof claiming ``bits`` whose hash does not meet them (found, not guessed)."""
    good = solved(mailbox, bits)
    for delta in range(1, 10_000):
        bad = Proof(bits, good.timestamp_ms, (good.nonce + delta) % 2**64)
        try:
            pow.verify(bad, payload_hash(mailbox), required=bits, now_ms=NOW_MS)
        except VerificationError:
            return bad
    raise AssertionError("no failing nonce found")


def put(
    adm: Admission,
    *,
    ip: str = "198.51.100.1",
    mailbox: bytes | None = None,
    blob_len: int = len(BLOB),
    proof: Proof | str | None = "solve",
    now_s: float = T0,
    now_ms: int = NOW_MS,
    usage: Usage = EMPTY,
) -> None:
    """One put; ``proof="solve"`` solves one at the difficulty currently required."""
    mailbox = mbox(0) if mailbox is None else mailbox
    if proof == "solve":
        proof = solved(mailbox, adm.required_bits(now_s))
    assert proof is None or isinstance(proof, Proof)
    adm.admit_put(
        source_ip=ip,
        mailbox_id=mailbox,
        blob_len=blob_len,
        proof=proof,
        payload_hash=payload_hash(mailbox),
        now_s=now_s,
        now_ms=now_ms,
        usage=usage,
    )


def admitted(call: Callable[[], None]) -> bool:
    try:
        call()
    except RateLimited:
        return False
    return True


def snapshot(adm: Admission, now: float) -> tuple[object, ...]:
    """Everything a request could change, observed at ``now``."""
    return (
        [(k, adm.per_ip.tokens(k, now)) for k in adm.per_ip.by_recency()],
        [(k, adm.per_mailbox.tokens(k, now)) for k in adm.per_mailbox.by_recency()],
        adm.pow.puts_in_window(now),
        adm.required_bits(now),
    )


# --- TokenBucket -----------------------------------------------------------------------------


def test_bucket_starts_full_and_admits_its_burst_at_once() -> None:
    bucket = TokenBucket(rate=2.0, burst=4.0)
    assert [bucket.take(T0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(T0) == 0.5  # one token at 2/s


def test_bucket_refills_exactly_and_caps_at_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=4.0)
    for _ in range(4):
        bucket.take(T0)
    assert bucket.tokens(T0) == 0.0
    assert bucket.tokens(T0 + 0.25) == 0.5
    assert bucket.tokens(T0 + 1.0) == 2.0
    assert bucket.tokens(T0 + 2.0) == 4.0
    assert bucket.tokens(T0 + 100.0) == 4.0  # never above the burst
    assert bucket.take(T0 + 1.0, cost=2.0) == 0.0
    assert bucket.tokens(T0 + 1.0) == 0.0
    assert bucket.tokens(T0 + 1.5) == 1.0


def test_retry_after_is_precise() -> None:
    bucket = TokenBucket(rate=2.0, burst=4.0)
    for _ in range(4):
        bucket.take(T0)
    assert bucket.take(T0) == 0.5
    assert bucket.take(T0 + 0.125) == 0.375
    assert bucket.take(T0, cost=3.0) == 1.5
    assert bucket.take(T0 + 0.5) == 0.0  # exactly when it said
    # A rate that is not exact in binary, at a large monotonic time: waiting the
    # retry-after given is always enough, waiting visibly less is not.
    bucket = TokenBucket(rate=20.0, burst=40.0)
    now = 12_345_678.9
    for _ in range(40):
        assert bucket.take(now) == 0.0
    wait = bucket.take(now)
    assert wait == pytest.approx(0.05, abs=1e-9)
    assert bucket.take(now + wait - 1e-4) > 0
    assert bucket.take(now + wait) == 0.0


def test_bucket_refusal_changes_nothing() -> None:
    bucket = TokenBucket(rate=2.0, burst=4.0)
    for _ in range(4):
        bucket.take(T0)
    before = [bucket.tokens(T0 + dt) for dt in (0.0, 0.25, 0.5, 3.0)]
    for dt in (0.0, 0.1, 0.25, 0.4):
        assert bucket.take(T0 + dt) > 0
    assert [bucket.tokens(T0 + dt) for dt in (0.0, 0.25, 0.5, 3.0)] == before


def test_a_refund_gives_back_what_a_take_spent_never_past_the_burst() -> None:
    """A delete refused at the write (its bound reached meanwhile) gives its tokens back:
    the bucket is as if the take had not happened, or fuller, never above the burst."""
    bucket = TokenBucket(rate=2.0, burst=4.0)
    bucket.take(T0, cost=3.0)
    bucket.refund(T0, 3.0)
    assert bucket.tokens(T0) == 4.0
    bucket.take(T0, cost=3.0)
    bucket.refund(T0 + 1.0, 3.0)  # 1 token left, 2 refilled meanwhile, 3 given back
    assert bucket.tokens(T0 + 1.0) == 4.0
    limiter = RateLimiter(rate=2.0, burst=4.0, max_keys=2)
    assert limiter.check("a", T0, 4.0) == 0.0
    limiter.refund("a", T0, 4.0)
    assert limiter.tokens("a", T0) == 4.0
    limiter.refund("never seen", T0, 4.0)  # nothing to give back to: no key inserted
    assert "never seen" not in limiter


def test_clock_going_backwards_neither_refills_nor_crashes() -> None:
    bucket = TokenBucket(rate=2.0, burst=2.0)
    bucket.take(T0)
    bucket.take(T0)
    assert bucket.take(T0 - 5.0) == 0.5  # no refill from the past, no negative wait
    assert bucket.tokens(T0 - 5.0) == 0.0
    assert bucket.take(T0 + 0.5) == 0.0


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(0.0, 1.0), (-1.0, 1.0), (float("inf"), 1.0), (1.0, 0.5), (1.0, float("nan"))],
)
def test_bucket_rejects_bad_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_bucket_rejects_a_cost_it_could_never_admit() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0)
    for cost in (0.0, -1.0, 2.5):
        with pytest.raises(ValueError):
            bucket.take(T0, cost)


STEPS = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=2.0),  # time since the previous request
        st.sampled_from([1.0, 1.0, 1.0, 0.5, 2.0, 3.5]),  # cost (capped at the burst)
    ),
    min_size=1,
    max_size=150,
)


@settings(max_examples=150)
@given(
    rate=st.floats(min_value=0.05, max_value=200.0),
    burst=st.floats(min_value=1.0, max_value=50.0),
    start=st.floats(min_value=0.0, max_value=1e7),
    steps=STEPS,
)
def test_bucket_never_admits_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: float, start: float, steps: list[tuple[float, float]]
) -> None:
    bucket = TokenBucket(rate, burst)
    now = start
    taken: list[tuple[float, float]] = []
    for dt, cost in steps:
        now += dt
        if bucket.take(now, min(cost, burst)) == 0.0:
            taken.append((now, min(cost, burst)))
    for i, (t_i, _) in enumerate(taken):
        total = 0.0
        for j in range(i, len(taken)):
            t_j, cost = taken[j]
            total += cost
            # slack: the 1e-6-token rounding allowance per admission, and float noise
            slack = 1e-6 * (j - i + 1) + 1e-9 * total
            assert total <= burst + rate * (t_j - t_i) + slack


@settings(max_examples=150)
@given(
    rate=st.floats(min_value=0.05, max_value=200.0),
    burst=st.floats(min_value=1.0, max_value=50.0),
    start=st.floats(min_value=0.0, max_value=1e7),
    steps=STEPS,
)
def test_bucket_retry_after_is_exact_and_refusals_change_nothing(
    rate: float, burst: float, start: float, steps: list[tuple[float, float]]
) -> None:
    bucket = TokenBucket(rate, burst)
    now = start
    for dt, raw_cost in steps:
        now += dt
        cost = min(raw_cost, burst)
        before = bucket.tokens(now)
        wait = bucket.take(now, cost)
        if wait == 0.0:
            continue
        assert wait > 0
        assert bucket.tokens(now) == before  # the refusal took nothing
        assert bucket.peek(now + wait, cost) == 0.0  # waiting what it said is enough
        early = 1e-5 / rate  # short by 1e-5 token: clearly more than the rounding allowance
        if early < wait:
            assert bucket.peek(now + wait - early, cost) > 0


# --- RateLimiter -----------------------------------------------------------------------------


def test_limiter_keys_have_independent_buckets() -> None:
    limiter = RateLimiter(rate=1.0, burst=2.0, max_keys=10)
    assert limiter.check("a", T0) == 0.0
    assert limiter.check("a", T0) == 0.0
    assert limiter.check("a", T0) == 1.0
    assert limiter.check("b", T0) == 0.0
    assert limiter.check(b"\x00" * 32, T0) == 0.0  # mailbox IDs are keys too
    assert limiter.tokens("b", T0) == 1.0


def test_lru_bound_holds_and_evicts_the_least_recently_used() -> None:
    limiter = RateLimiter(rate=1.0, burst=2.0, max_keys=3)
    for key in ("a", "b", "c"):
        limiter.check(key, T0)
    limiter.check("a", T0)  # a is now the most recent
    limiter.check("d", T0)
    assert limiter.by_recency() == ["c", "a", "d"]  # b, least recently used, went
    for n in range(1000):
        limiter.check(f"k{n}", T0 + n)
        assert len(limiter) <= 3
    assert limiter.by_recency() == ["k997", "k998", "k999"]


def test_an_evicted_key_restarts_with_a_full_bucket() -> None:
    limiter = RateLimiter(rate=1.0, burst=2.0, max_keys=2)
    limiter.check("a", T0)
    limiter.check("a", T0)
    assert limiter.check("a", T0) > 0
    limiter.check("b", T0)
    limiter.check("c", T0)  # evicts a
    assert "a" not in limiter
    assert limiter.tokens("a", T0) == 2.0
    assert limiter.check("a", T0) == 0.0


def test_limiter_refusal_spends_nothing_but_refreshes_recency() -> None:
    limiter = RateLimiter(rate=1.0, burst=2.0, max_keys=3)
    limiter.check("a", T0)
    limiter.check("a", T0)
    limiter.check("b", T0)
    assert limiter.check("a", T0 + 0.5) == 0.5
    assert limiter.tokens("a", T0 + 0.5) == 0.5
    assert limiter.by_recency() == ["b", "a"]  # a hammering key is the last to be forgotten


def test_limiter_peek_changes_nothing() -> None:
    limiter = RateLimiter(rate=1.0, burst=2.0, max_keys=3)
    limiter.check("a", T0)
    limiter.check("b", T0)
    assert limiter.peek("new", T0) == 0.0
    assert limiter.peek("a", T0) == 0.0
    assert "new" not in limiter
    assert limiter.by_recency() == ["a", "b"]
    assert limiter.tokens("a", T0) == 1.0


def test_a_flood_on_one_key_leaves_other_keys_untouched() -> None:
    limiter = RateLimiter(rate=20.0, burst=40.0, max_keys=100)
    for i in range(2000):  # 200/s for 10 s: 10x the rate
        limiter.check("flood", T0 + i / 200)
    assert limiter.tokens("victim", T0 + 10) == 40.0
    assert all(limiter.check("victim", T0 + 10) == 0.0 for _ in range(40))


def test_source_key_groups_ipv6_by_prefix() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:2:ffff:1:2:3") == source_key("2001:db8:1:2::9")
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("2001:db8:1:3::1", ipv6_prefix_len=48) == "2001:db8:1::/48"
    assert source_key("fe80::1%eth0") == "fe80::/64"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert source_key("192.0.2.1") == "192.0.2.1"
    assert source_key("unix:/run/dna.sock") == "unix:/run/dna.sock"


def test_grpc_peers_give_their_address_and_ipv6_ones_group_by_64() -> None:
    assert grpc_peer_ip("ipv4:192.0.2.1:5000") == "192.0.2.1"
    assert grpc_peer_ip("ipv6:[2001:db8:1:2::1]:5000") == "2001:db8:1:2::1"
    # how grpcio writes an IPv6 peer: escaped, it was a rate-limit key per address
    assert grpc_peer_ip("ipv6:%5B2001:db8:1:2::1%5D:5000") == "2001:db8:1:2::1"
    assert source_key(grpc_peer_ip("ipv6:%5B2001:db8:1:2::77%5D:1")) == "2001:db8:1:2::/64"
    assert grpc_peer_ip("unknown") == "unknown"


def site_hosts(site: str, count: int) -> list[str]:
    """One address in each of ``count`` /64s of the /48 ``site`` ("2001:db8:a")."""
    return [f"{site}:{subnet:x}::1" for subnet in range(count)]


def test_puts_from_many_64s_of_one_48_stop_at_the_site_budget() -> None:
    adm = Admission(SMALL)  # 3 puts per /64 at once; the /48: 8 times that
    flood = [ip for ip in site_hosts("2001:db8:a", 50) for _ in range(3)]
    outcomes = [
        admitted(functools.partial(put, adm, ip=ip, mailbox=mbox(n))) for n, ip in enumerate(flood)
    ]
    assert outcomes.count(True) == 24  # 8 x 3, not 50 x 3
    with pytest.raises(RateLimited, match=r"source's IPv6 /48 .* over 8 puts/s \(burst 24\)"):
        put(adm, ip="2001:db8:a:ffff::1", mailbox=mbox(999))
    other_site = [functools.partial(put, adm, ip="2001:db8:b:1::1", mailbox=mbox(1000 + n))
                  for n in range(3)]  # fmt: skip
    assert all(admitted(call) for call in other_site)  # another /48: its own budget
    ipv4 = [
        functools.partial(put, adm, ip=f"198.51.100.{n}", mailbox=mbox(2000 + n)) for n in range(50)
    ]
    assert all(admitted(call) for call in ipv4)  # IPv4 addresses: no site tier


def test_the_site_share_and_prefix_are_configurable() -> None:
    one = Admission(SMALL.model_copy(update={"ipv6_site_share": 1}))
    flood = [ip for ip in site_hosts("2001:db8:a", 4) for _ in range(3)]
    outcomes = [
        admitted(functools.partial(put, one, ip=ip, mailbox=mbox(n))) for n, ip in enumerate(flood)
    ]
    assert outcomes.count(True) == 3  # the whole /48 shares one /64's budget
    off = Admission(SMALL.model_copy(update={"ipv6_site_prefix_len": 64}))  # no second tier
    outcomes = [
        admitted(functools.partial(put, off, ip=ip, mailbox=mbox(n))) for n, ip in enumerate(flood)
    ]
    assert outcomes.count(True) == 12
    with pytest.raises(ValidationError, match="ipv6_site_share"):
        AdmissionConfig(ipv6_site_share=0)


def test_deletes_from_many_64s_of_one_48_stop_at_the_site_budget() -> None:
    adm = Admission(SMALL)  # one full delete (1,000 IDs not held) per /64 at once

    def delete(ip: str) -> None:
        adm.admit_delete(source_ip=ip, unheld=1000, tombstones=0, node_unheld=0, now_s=T0)

    outcomes = [admitted(functools.partial(delete, ip)) for ip in site_hosts("2001:db8:a", 30)]
    assert outcomes.count(True) == 8
    with pytest.raises(RateLimited, match=r"source's IPv6 /48 .* deleted IDs/s"):
        adm.precheck_delete(source_ip="2001:db8:a:ffff::1", unheld=1, now_s=T0)
    delete("2001:db8:b::1")  # another /48: admitted


# --- PowPolicy -------------------------------------------------------------------------------


def policy() -> PowPolicy:
    return PowPolicy(base_bits=12, max_bits=24, target_puts_per_s=200.0, window_s=10)


@pytest.mark.parametrize(
    ("puts_in_window", "bits"),
    [(0, 12), (1999, 12), (3999, 12), (4000, 13), (7999, 13), (8000, 14), (16_000, 15)],
)
def test_pow_adds_one_bit_per_doubling_over_the_target(puts_in_window: int, bits: int) -> None:
    p = policy()  # target 200/s over 10 s: 2,000 puts; twice that adds the first bit
    for i in range(puts_in_window):
        p.record_put(T0 + (i % 10))
    assert p.required(T0 + 9.5) == bits


def test_pow_extra_is_capped_at_max_bits() -> None:
    p = PowPolicy(base_bits=12, max_bits=16, target_puts_per_s=1.0, window_s=1)
    for _ in range(1 << 10):  # 1024x the target: 10 doublings, capped at 4
        p.record_put(T0)
    assert p.required(T0) == 16


def test_pow_rises_under_a_burst_and_decays_when_load_falls() -> None:
    p = policy()
    assert p.required(T0) == 12
    for second in range(10):  # 2,000 puts/s, 10x the target, for 10 s
        for _ in range(2000):
            p.record_put(T0 + second + 0.5)
    assert p.observed_rate(T0 + 9.9) == 2000.0
    assert p.required(T0 + 9.9) == 15  # floor(log2(10)) = 3 extra bits
    # Load stops: each second one loaded second leaves the window (ratio 9, 8, ... 0).
    decay = [p.required(T0 + s) for s in range(10, 21)]
    assert decay == [15, 15, 14, 14, 14, 14, 13, 13, 12, 12, 12]


def test_pow_ring_forgets_seconds_older_than_the_window() -> None:
    p = policy()
    for _ in range(5000):
        p.record_put(T0)
    assert p.required(T0) == 13
    # 7 window lengths later the ring slot is reused for another second: nothing remains.
    assert p.puts_in_window(T0 + 70) == 0
    p.record_put(T0 + 70)
    assert p.puts_in_window(T0 + 70) == 1
    p.record_put(T0 + 5)  # a late timestamp counts in the latest second, never back in time
    assert p.puts_in_window(T0 + 70) == 2


@pytest.mark.parametrize(
    ("base", "top", "target", "window"),
    [(-1, 8, 1.0, 1), (9, 8, 1.0, 1), (0, 65, 1.0, 1), (0, 8, 0.0, 1), (0, 8, 1.0, 0)],
)
def test_pow_policy_rejects_bad_parameters(base: int, top: int, target: float, window: int) -> None:
    with pytest.raises(ValueError):
        PowPolicy(base, top, target, window)


# --- Quota and HighWaterMark -----------------------------------------------------------------


def test_quota_counts_blobs_and_bytes() -> None:
    quota = Quota(max_blobs=10_000, max_bytes=64 * 1024 * 1024)
    quota.check_quota(9_999, 0, 1)
    quota.check_quota(0, 64 * 1024 * 1024 - 10, 10)  # exactly full is allowed
    with pytest.raises(CapacityError, match="10000 blobs"):
        quota.check_quota(10_000, 0, 1)
    with pytest.raises(CapacityError, match="bytes"):
        quota.check_quota(0, 64 * 1024 * 1024 - 10, 11)


def test_high_water_trips_and_clears_with_hysteresis() -> None:
    mark = HighWaterMark(0.90)
    assert not mark.update(89, 100)
    assert mark.update(90, 100)
    assert mark.update(89, 100)  # still over the resume mark (0.88): no flapping
    assert not mark.update(87, 100)
    assert mark.update(5, 0)  # unknown capacity: refuse writes, don't crash
    assert mark.tripped


# --- Admission -------------------------------------------------------------------------------


def test_default_config_matches_the_design() -> None:
    c = AdmissionConfig()
    assert c.max_blob_bytes == 256 * 1024
    assert (c.ip_rate_per_s, c.ip_burst) == (20.0, 40.0)
    assert (c.mailbox_rate_per_s, c.mailbox_burst) == (10.0, 50.0)
    assert (c.pow_base_bits, c.pow_max_bits, c.pow_target_puts_per_s) == (12, 24, 200.0)
    assert (c.quota_max_blobs, c.quota_max_bytes) == (10_000, 64 * 1024 * 1024)
    assert c.disk_high_water == 0.90
    with pytest.raises(ValidationError, match="frozen"):
        c.max_blob_bytes = 1
    with pytest.raises(ValueError):
        AdmissionConfig(max_blob_bytes=0)


def test_a_valid_put_is_admitted_and_spends_one_token_each() -> None:
    adm = Admission()  # the default config, 12-bit proofs
    assert adm.ready
    put(adm, ip="192.0.2.7", mailbox=mbox(1))
    assert adm.per_ip.tokens("192.0.2.7", T0) == 39.0
    assert adm.per_mailbox.tokens(mbox(1), T0) == 49.0
    assert adm.pow.puts_in_window(T0) == 1


def test_pow_required_carries_the_required_bits() -> None:
    adm = Admission()
    with pytest.raises(PowRequired) as missing:
        put(adm, proof=None)
    assert missing.value.required_bits == 12
    assert missing.value.grpc_code == "PERMISSION_DENIED"
    with pytest.raises(PowRequired) as low:
        put(adm, proof=solved(mbox(0), 11))
    assert low.value.required_bits == 12
    for _ in range(4000):  # 400 puts/s over the 10 s window: 2x the 200/s target
        adm.pow.record_put(T0)
    with pytest.raises(PowRequired, match="13 bits required") as raised:
        put(adm, proof=solved(mbox(0), 12))
    assert raised.value.required_bits == 13
    put(adm, proof=solved(mbox(0), 13))  # the retry at the difficulty given passes


def test_admitted_load_raises_the_difficulty_and_idle_time_lowers_it() -> None:
    config = AdmissionConfig(
        pow_base_bits=2, pow_max_bits=6, pow_target_puts_per_s=5.0, pow_window_s=2
    )
    adm = Admission(config)
    for i in range(20):  # 20 puts in a 2 s window = 10/s = 2x the target
        put(adm, ip=f"192.0.2.{i}", mailbox=mbox(100 + i))
    assert adm.required_bits(T0) == 3
    with pytest.raises(PowRequired) as raised:
        put(adm, ip="192.0.2.200", mailbox=mbox(200), proof=solved(mbox(200), 2))
    assert raised.value.required_bits == 3
    assert adm.required_bits(T0 + 2) == 2


def test_oversized_blob_is_malformed() -> None:
    adm = Admission()
    put(adm, blob_len=256 * 1024)
    with pytest.raises(MalformedError, match="blob too large") as raised:
        put(adm, blob_len=256 * 1024 + 1)
    assert type(raised.value) is MalformedError
    assert raised.value.grpc_code == "INVALID_ARGUMENT"


def test_per_ip_rate_limit_with_a_precise_retry_after() -> None:
    adm = Admission(AdmissionConfig(pow_base_bits=4))
    for i in range(40):
        put(adm, ip="192.0.2.1", mailbox=mbox(i))
    with pytest.raises(RateLimited, match="source") as raised:
        put(adm, ip="192.0.2.1", mailbox=mbox(40))
    assert raised.value.retry_after_s == pytest.approx(1 / 20, abs=1e-9)
    assert raised.value.retry_after_s > 0
    assert raised.value.grpc_code == "RESOURCE_EXHAUSTED"
    put(adm, ip="192.0.2.1", mailbox=mbox(40), now_s=T0 + raised.value.retry_after_s)


def test_per_mailbox_rate_limit_with_a_precise_retry_after() -> None:
    adm = Admission(AdmissionConfig(pow_base_bits=4))
    for i in range(50):
        put(adm, ip=f"192.0.2.{i}", mailbox=mbox(7))
    with pytest.raises(RateLimited, match="mailbox") as raised:
        put(adm, ip="192.0.2.99", mailbox=mbox(7))
    assert raised.value.retry_after_s == pytest.approx(1 / 10, abs=1e-9)
    assert "192.0.2.99" not in adm.per_ip  # the refusal did not charge the source


def test_ipv6_sources_share_a_bucket_per_64() -> None:
    adm = Admission(AdmissionConfig(pow_base_bits=4))
    for i in range(40):
        put(adm, ip=f"2001:db8:0:1::{i + 1:x}", mailbox=mbox(i))
    with pytest.raises(RateLimited):
        put(adm, ip="2001:db8:0:1:ffff::1", mailbox=mbox(41))
    put(adm, ip="2001:db8:0:2::1", mailbox=mbox(42))


def test_over_quota_is_a_capacity_error() -> None:
    adm = Admission()
    put(adm, usage=Usage(blobs=9_999, bytes=0))
    with pytest.raises(CapacityError, match="quota") as raised:
        put(adm, usage=Usage(blobs=10_000, bytes=0))
    assert type(raised.value) is CapacityError
    with pytest.raises(CapacityError, match="quota"):
        put(adm, usage=Usage(blobs=1, bytes=64 * 1024 * 1024 - len(BLOB) + 1))


def test_stale_future_and_forged_proofs() -> None:
    adm = Admission(AdmissionConfig(pow_base_bits=4))
    stale = solved(mbox(0), 4, NOW_MS - 11 * MINUTE_MS)
    future = solved(mbox(0), 4, NOW_MS + 2 * MINUTE_MS)
    with pytest.raises(ExpiredError, match="too old"):
        put(adm, proof=stale)
    with pytest.raises(ExpiredError, match="future"):
        put(adm, proof=future)
    with pytest.raises(VerificationError, match="does not meet") as raised:
        put(adm, proof=forged(mbox(0), 4))
    assert not isinstance(raised.value, PowRequired)


def test_disk_high_water_refuses_writes_and_turns_unready() -> None:
    adm = Admission(AdmissionConfig(pow_base_bits=4))
    adm.high_water.update(used_bytes=95, capacity_bytes=100)
    assert not adm.ready
    with pytest.raises(NodeFullError) as raised:
        put(adm)
    assert raised.value.grpc_code == "RESOURCE_EXHAUSTED"
    adm.high_water.update(used_bytes=50, capacity_bytes=100)
    assert adm.ready
    put(adm)


def test_check_order_is_cheapest_first() -> None:
    adm = Admission(SMALL)
    for i in range(3):  # drain the source's bucket
        put(adm, ip="192.0.2.1", mailbox=mbox(i))
    # size before PoW: an oversized blob without a proof is reported as oversized
    with pytest.raises(MalformedError):
        put(adm, ip="192.0.2.1", blob_len=501, proof=None)
    # the claimed difficulty before the rate: no proof from a limited source
    with pytest.raises(PowRequired):
        put(adm, ip="192.0.2.1", proof=None)
    # the rate before hashing: a forged proof from a limited source is rate limited
    with pytest.raises(RateLimited):
        put(adm, ip="192.0.2.1", mailbox=mbox(9), proof=forged(mbox(9), 4))
    # hashing before the quota: a forged proof for a full mailbox fails on the proof
    with pytest.raises(VerificationError):
        put(adm, ip="192.0.2.2", mailbox=mbox(9), proof=forged(mbox(9), 4), usage=Usage(5, 0))
    # the disk before everything
    adm.high_water.update(99, 100)
    with pytest.raises(NodeFullError):
        put(adm, ip="192.0.2.1", blob_len=501, proof=None)


LIMITED_IP = "203.0.113.9"
FULL_MAILBOX = mbox(90)
Refusal = tuple[type[ProtocolError], Callable[[Admission, float], None]]

# Each refusal is a put by a fresh source to a fresh mailbox unless the case needs otherwise.
REFUSALS: dict[str, Refusal] = {
    "size": (MalformedError, lambda adm, now: put(adm, now_s=now, blob_len=501)),
    "pow-missing": (PowRequired, lambda adm, now: put(adm, now_s=now, proof=None)),
    "pow-low": (PowRequired, lambda adm, now: put(adm, now_s=now, proof=solved(mbox(0), 3))),
    "pow-stale": (
        ExpiredError,
        lambda adm, now: put(adm, now_s=now, proof=solved(mbox(0), 4, NOW_MS - 11 * MINUTE_MS)),
    ),
    "pow-future": (
        ExpiredError,
        lambda adm, now: put(adm, now_s=now, proof=solved(mbox(0), 4, NOW_MS + 2 * MINUTE_MS)),
    ),
    "pow-forged": (
        VerificationError,
        lambda adm, now: put(adm, now_s=now, proof=forged(mbox(0), 4)),
    ),
    "rate-ip": (RateLimited, lambda adm, now: put(adm, now_s=now, ip=LIMITED_IP)),
    "rate-mailbox": (RateLimited, lambda adm, now: put(adm, now_s=now, mailbox=FULL_MAILBOX)),
    "quota-blobs": (CapacityError, lambda adm, now: put(adm, now_s=now, usage=Usage(5, 0))),
    "quota-bytes": (CapacityError, lambda adm, now: put(adm, now_s=now, usage=Usage(1, 1000))),
    "disk": (NodeFullError, lambda adm, now: put(adm, now_s=now)),
}


def drained(case: str) -> Admission:
    """An admission where LIMITED_IP and FULL_MAILBOX are out of tokens (and, for "disk",
    the disk is over its high-water mark)."""
    adm = Admission(SMALL)
    for i in range(3):
        put(adm, ip=LIMITED_IP, mailbox=mbox(10 + i))  # drains the source
        put(adm, ip=f"192.0.2.{10 + i}", mailbox=FULL_MAILBOX)  # drains the mailbox
    put(adm, ip="192.0.2.50", mailbox=mbox(30))  # a partly spent key, the most recent one
    if case == "disk":
        adm.high_water.update(95, 100)
    return adm


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_every_refusal_leaves_state_unchanged(case: str) -> None:
    adm = drained(case)
    error, refused_put = REFUSALS[case]
    now = T0 + 0.25
    before = snapshot(adm, now)
    with pytest.raises(error) as raised:
        refused_put(adm, now)
    assert type(raised.value) is error
    assert snapshot(adm, now) == before
    assert raised.value.kind == case.partition("-")[0]  # its metrics label


PRECHECKED = {"size", "pow-missing", "pow-low", "rate-ip", "rate-mailbox", "disk"}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_the_precheck_refuses_all_that_needs_no_hash_nor_storage_read(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the service asks before it reads the mailbox's usage: a flood refused for its
    rate costs no storage read. The rest (proof hash and age, quota) is left to admit_put."""
    adm = drained(case)
    error, refused_put = REFUSALS[case]
    now = T0 + 0.25
    before = snapshot(adm, now)

    def precheck_only(*, payload_hash: bytes, now_ms: int, usage: Usage, **cheap: Any) -> None:
        adm.precheck_put(**cheap)

    monkeypatch.setattr(adm, "admit_put", precheck_only)
    if case in PRECHECKED:
        with pytest.raises(error):
            refused_put(adm, now)
    else:
        refused_put(adm, now)
    assert snapshot(adm, now) == before


def test_a_refusal_class_names_its_kind_unless_the_raise_site_does() -> None:
    """``kind`` is the metrics label (dna_core.errors); the service counts a refused put
    under it (tests/storage/test_storage_refusal_labels.py)."""
    assert RateLimited("r", 1.0).kind == "rate"
    assert PowRequired("p", 12).kind == "pow"
    assert NodeFullError("d").kind == "disk"
    assert StorageFullError("s").kind == "disk"
    assert CapacityError("c").kind == "capacity"
    assert ExpiredError("e").kind == "expired"
    assert VerificationError("v").kind == "verification"
    assert MalformedError("m").kind == "malformed"
    assert ProtocolError("x").kind == "other"
    assert MalformedError("m", kind="size").kind == "size"
    assert MalformedError("m").kind == "malformed"  # an instance's kind is its own


def test_a_flood_at_ten_times_the_rate_does_not_spend_other_sources_tokens() -> None:
    """The fairness property: victims' outcomes and buckets are the same with and without
    a flood from one source at 200 puts/s (10x its 20/s limit) to 1,000 mailboxes."""
    config = AdmissionConfig(pow_base_bits=0, pow_max_bits=0)

    def run(flood: bool) -> tuple[list[bool], list[float], int]:
        adm = Admission(config)
        outcomes: list[bool] = []
        flood_admitted = 0
        for tick in range(1000):  # 5 s in steps of 5 ms
            now = T0 + tick / 200
            if flood:
                flood_admitted += admitted(
                    functools.partial(put, adm, ip="192.0.2.66", mailbox=mbox(tick), now_s=now)
                )
            if tick % 20 == 0:  # each victim at 10/s, within its 20/s
                for v in range(3):
                    ip, mailbox = f"198.51.100.{v}", mbox(5000 + v)
                    outcomes.append(
                        admitted(functools.partial(put, adm, ip=ip, mailbox=mailbox, now_s=now))
                    )
        end = T0 + 5
        tokens = [adm.per_ip.tokens(f"198.51.100.{v}", end) for v in range(3)]
        return outcomes, tokens, flood_admitted

    quiet_outcomes, quiet_tokens, _ = run(flood=False)
    flood_outcomes, flood_tokens, flood_admitted = run(flood=True)
    assert all(quiet_outcomes) and len(quiet_outcomes) == 150
    assert flood_outcomes == quiet_outcomes
    assert flood_tokens == quiet_tokens
    # the flooder itself got its burst plus its rate over 4.995 s, and no more
    assert 40 + 99 <= flood_admitted <= 40 + 20 * 4.995 + 1


DEFECTS = st.sampled_from(
    ["ok", "ok", "ok", "size", "no-proof", "low", "stale", "forged", "over-quota"]
)


def defective_put(adm: Admission, source: int, box: int, now: float, defect: str) -> None:
    mailbox = mbox(box)
    proofs: dict[str, Proof | None] = {
        "no-proof": None,
        "low": solved(mailbox, 3),
        "stale": solved(mailbox, 4, NOW_MS - 20 * MINUTE_MS),
        "forged": forged(mailbox, 4),
    }
    put(
        adm,
        ip=f"192.0.2.{source}",
        mailbox=mailbox,
        now_s=now,
        blob_len=10_000 if defect == "size" else len(BLOB),
        proof=proofs.get(defect, solved(mailbox, 4)),
        usage=Usage(5, 0) if defect == "over-quota" else EMPTY,
    )


@settings(max_examples=60)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 3),  # source
            st.integers(0, 3),  # mailbox
            st.floats(min_value=0.0, max_value=1.0),  # time step
            DEFECTS,
        ),
        min_size=1,
        max_size=40,
    )
)
def test_any_request_is_admitted_or_refused_with_a_protocol_error_changing_nothing(
    steps: list[tuple[int, int, float, str]],
) -> None:
    """h11's fuzz rule for admission: a put is admitted (and counted once) or refused with a
    ProtocolError, never anything else, and a refusal changes nothing."""
    adm = Admission(SMALL)
    now = T0
    for source, box, dt, defect in steps:
        now += dt
        before = snapshot(adm, now)
        puts_before = adm.pow.puts_in_window(now)
        try:
            defective_put(adm, source, box, now, defect)
        except ProtocolError:
            assert snapshot(adm, now) == before
        else:
            assert defect == "ok"
            assert adm.pow.puts_in_window(now) == puts_before + 1
