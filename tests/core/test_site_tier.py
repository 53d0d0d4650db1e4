"""The /48 tier of every per-source limit (``dna_core.ratelimit.SiteTier``): a source key is
an IPv6 /64, and one /48 holds 65,536 of them; without a second tier one site gets 65,536
times every per-source budget. These floods come from many /64s of one /48."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from dna_core.ops.connections import (
    OVER_SITE_CAP,
    OVER_SOURCE_CAP,
    ConnectionCaps,
    ConnectionLimits,
)
from dna_core.ratelimit import SITE_TIER, SOURCE_TIER, RateLimiter, SiteTier, source_key
from dna_core.rpc_session_server import SharedSlots, SourceCaps

SITE_A = ipaddress.IPv6Network("2001:db8:a::/48")
SITE_B = ipaddress.IPv6Network("2001:db8:b::/48")


def host_in(site: ipaddress.IPv6Network, subnet: int, host: int = 1) -> str:
    """An address of the ``subnet``-th /64 of ``site``."""
    return str(site.network_address + (subnet << 64) + host)


def keys_in(site: ipaddress.IPv6Network, count: int) -> list[str]:
    """The source keys of ``count`` different /64s of ``site``."""
    return [source_key(host_in(site, i)) for i in range(count)]


def test_the_site_of_a_source_key_is_its_48_and_only_ipv6_has_one() -> None:
    tier = SiteTier()
    assert tier.of(source_key("2001:db8:a:7::1")) == "2001:db8:a::/48"
    assert tier.of(source_key("::1")) == "::/48"  # loopback: alone in its /48
    assert tier.of(source_key("192.0.2.1")) is None
    assert tier.of(source_key("::ffff:192.0.2.1")) is None  # counts as its IPv4 address
    assert tier.of("not an address") is None
    assert tier.of(b"\x01" * 32) is None  # a mailbox ID
    assert tier.of(source_key("2001:db8:a::1", ipv6_prefix_len=48)) is None  # its own site
    assert SiteTier(prefix_len=40).of(source_key("2001:db8:a::1")) == "2001:db8::/40"
    with pytest.raises(ValueError, match="share"):
        SiteTier(share=0)


def test_a_flood_from_many_64s_of_one_48_stops_at_the_site_budget() -> None:
    limiter = RateLimiter(rate=1.0, burst=2.0, max_keys=100_000, site=SiteTier(share=8))
    now = 100.0
    admitted = sum(limiter.check(key, now) == 0 for key in keys_in(SITE_A, 1000) for _ in range(2))
    assert admitted == 16  # the site's burst: 8 x 2, not 1000 x 2
    wait, tier = limiter.refusal(keys_in(SITE_A, 1001)[-1], now)
    assert tier == SITE_TIER and wait == pytest.approx(1 / 8)  # the site's rate: 8 x 1/s
    # Over time, the whole site gets the site's rate, however many /64s it spreads over.
    later = sum(limiter.check(key, now + 10) == 0 for key in keys_in(SITE_A, 1000))
    assert later == 16  # 10 s x 8/s = 80 tokens, capped at the site's burst of 16
    # Another /48 and IPv4 sources are not held back by it.
    assert all(limiter.check(key, now) == 0 for key in keys_in(SITE_B, 8) for _ in range(2))
    assert all(limiter.check(f"198.51.{i // 256}.{i % 256}", now) == 0 for i in range(1000))


def test_a_refusal_by_the_site_spends_nothing_and_a_refund_gives_both_back() -> None:
    limiter = RateLimiter(rate=1.0, burst=4.0, max_keys=100, site=SiteTier(share=2))
    first, second, third = keys_in(SITE_A, 3)
    for key in (first, second):
        assert [limiter.check(key, 0.0) for _ in range(4)] == [0.0] * 4
    assert limiter.check(third, 0.0) > 0  # the site's 8 tokens are spent
    assert limiter.tokens(third, 0.0) == 4.0  # its own bucket was not charged
    assert limiter.refusal(third, 0.0)[1] == SITE_TIER
    limiter.refund(first, 0.0, 1.0)
    assert limiter.tokens(first, 0.0) == 1.0
    assert limiter.check(third, 0.0) == 0.0  # the refund came back to the site too


def test_one_64_alone_is_judged_as_before_loopback_included() -> None:
    for host in ("2001:db8:a::1", "::1"):
        limiter = RateLimiter(rate=1.0, burst=3.0, max_keys=10, site=SiteTier())
        key = source_key(host)
        assert [limiter.check(key, 0.0) == 0 for _ in range(4)] == [True, True, True, False]
        wait, tier = limiter.refusal(key, 0.0)
        assert tier == SOURCE_TIER and wait == pytest.approx(1.0)


def test_connections_from_many_64s_of_one_48_stop_at_the_site_cap() -> None:
    caps = ConnectionCaps(ConnectionLimits(10_000, max_connections_per_source=4))
    outcomes = [caps.admit(host_in(SITE_A, i, host)) for i in range(100) for host in (1, 2)]
    assert outcomes.count(None) == 32  # 8 x 4: the site's share, out of 200
    assert set(outcomes) == {None, OVER_SITE_CAP}
    assert caps.admit(host_in(SITE_B, 0)) is None  # another /48 gets in
    assert [caps.admit("192.0.2.1") for _ in range(5)][-1] == OVER_SOURCE_CAP  # IPv4 as before
    caps.release(host_in(SITE_A, 0))
    assert caps.admit(host_in(SITE_A, 99)) is None  # a release frees the site's slot too


def test_sessions_from_many_64s_of_one_48_are_refused_at_the_site_limit() -> None:
    caps = SourceCaps("session", per_source=2, total=1000, site=SiteTier(share=3))
    refusals = [caps.take(key) for key in keys_in(SITE_A, 10) for _ in range(2)]
    taken = [r for r in refusals if r is None]
    assert len(taken) == 6
    refused = next(r for r in refusals if r is not None)
    assert refused.kind == "site_limit"
    assert refused.reason == "session: 6 open from this address's IPv6 /48 (the limit)"
    assert caps.take(keys_in(SITE_B, 1)[0]) is None
    caps.give(keys_in(SITE_A, 1)[0])
    assert caps.take(keys_in(SITE_A, 10)[-1]) is None


def test_shared_slots_hold_a_site_to_its_share_and_wake_it_when_one_is_freed() -> None:
    async def scenario() -> None:
        slots = SharedSlots(per_source=1, total=100, site=SiteTier(share=2))
        a0, a1, a2 = keys_in(SITE_A, 3)
        assert slots.take(a0) and slots.take(a1) and not slots.take(a2)
        waiting = asyncio.create_task(slots.acquire(a2))
        await asyncio.sleep(0)
        assert not waiting.done()  # over the site's share: waits
        assert slots.take(keys_in(SITE_B, 1)[0])  # another site is not held back
        slots.release(a0)
        await asyncio.wait_for(waiting, 1.0)
        assert slots.held.by_source() == {a1: 1, a2: 1, keys_in(SITE_B, 1)[0]: 1}

    asyncio.run(scenario())


def test_an_ipv6_address_carrying_a_client_s_ipv4_counts_as_that_ipv4_address() -> None:
    """6to4, Teredo and NAT64 addresses stand for an IPv4 client: one IPv4 address held a
    whole 6to4 /48 (a site's budget besides its IPv4 one), and every client of one
    translator shared one /64's budget. Fails without `_carried_ipv4` (checked)."""
    assert source_key("2002:cb00:7101:5::1") == "203.0.113.1"  # 6to4: 2002:<IPv4>::/48
    assert source_key("2002:CB00:7101::1") == "203.0.113.1"  # however it is written
    # Teredo: server 65.54.227.120, client 192.0.2.45 (its bits inverted in the address)
    assert source_key("2001:0:4136:e378:8000:63bf:3fff:fdd2") == "192.0.2.45"
    assert source_key("64:ff9b::203.0.113.9") == "203.0.113.9"  # NAT64 well-known prefix
    assert source_key("64:ff9b::cb00:7109") == source_key("64:ff9b::203.0.113.9")
    assert source_key("::ffff:198.51.100.7") == "198.51.100.7"  # IPv4-mapped, as before
    assert SiteTier().of(source_key("2002:cb00:7101:5::1")) is None  # IPv4: no site tier
    assert source_key("2001:db8:a:7::1") == "2001:db8:a:7::/64"  # plain IPv6 unchanged
    assert source_key("64:ff9b:1::1") == "64:ff9b:1::/64"  # RFC 8215's local prefix: as IPv6
