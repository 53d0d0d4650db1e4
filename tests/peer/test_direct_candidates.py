"""Which addresses become host candidates (RFC 8445 section 5.1.1.1) and in which order
(RFC 8421), and how many fit a presence record: `dna_peer.direct.candidates`,
`link.publish_order` and `presence.fit_reach`."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import time

import aioice
import pytest
from aioice.candidate import candidate_priority
from dna_core.crypto import Identity
from dna_core.errors import DnaError
from dna_core.overlay import identity_proof
from dna_peer.direct.candidates import (
    IFA_F_DEPRECATED,
    IFA_F_TEMPORARY,
    IFA_F_TENTATIVE,
    Inet6Entry,
    IPAddress,
    interleaved,
    local_preferences,
    loopback_servers,
    parse_if_inet6,
    select_host_addresses,
)
from dna_peer.direct.link import (
    MAX_REMOTE_CANDIDATES,
    OFFER_MAX_BYTES,
    OFFER_TAG,
    DirectError,
    IceConfig,
    _rank_hosts,
    dial,
    offer_datagram,
    publish_order,
    remote_candidates,
)
from dna_peer.network import ice_config
from dna_peer.presence import Reach, fit_reach, presence_record, read_presence

NOW = 1_800_000_000_000


def test_only_addresses_another_host_can_reach_are_gathered() -> None:
    found = ["127.0.0.1", "127.1.2.3", "::1", "fe80::1%eth0", "fe80::2", "169.254.1.1",
             "::ffff:192.0.2.1", "::192.0.2.1", "fec0::1", "0.0.0.0", "::", "ff02::1",
             "198.51.100.7", "2001:db8::7", "fd00:1::7", "10.0.0.7", "2001:db8::7"]  # fmt: skip
    assert select_host_addresses(found) == ["198.51.100.7", "2001:db8::7", "fd00:1::7",
                                            "10.0.0.7"]  # fmt: skip


def test_kernel_flags_and_privacy_addresses() -> None:
    ip = ipaddress.IPv6Address
    table: dict[IPAddress, Inet6Entry] = {
        ip("2001:db8:1::aa"): Inet6Entry("eth0", 64, 0),  # stable, beside a temporary one
        ip("2001:db8:1::bb"): Inet6Entry("eth0", 64, IFA_F_TEMPORARY),
        ip("2001:db8:2::aa"): Inet6Entry("eth0", 64, 0),  # stable, no temporary in its prefix
        ip("2001:db8:3::aa"): Inet6Entry("eth0", 64, IFA_F_TENTATIVE),  # DAD not done
        ip("2001:db8:4::aa"): Inet6Entry("eth0", 64, IFA_F_DEPRECATED | IFA_F_TEMPORARY),
        ip("2001:db8:1::cc"): Inet6Entry("wlan0", 64, 0),  # same prefix, other interface
    }
    found = ["2001:db8:1::aa", "2001:db8:1::bb", "2001:db8:2::aa", "2001:db8:3::aa",
             "2001:db8:4::aa", "2001:db8:1::cc", "192.0.2.1"]  # fmt: skip
    assert select_host_addresses(found, table) == ["2001:db8:1::bb", "2001:db8:2::aa",
                                                   "2001:db8:1::cc", "192.0.2.1"]  # fmt: skip


def test_if_inet6_lines_parse_and_garbage_is_skipped() -> None:
    text = ("20010db8000100000000000000000001 02 40 00 01     eth0\n"
            "fe800000000000000000000000000001 02 40 20 80     eth0\n"
            "not a line\n" "zz010db8000100000000000000000001 02 40 00 01 eth0\n")  # fmt: skip
    assert parse_if_inet6(text) == {
        ipaddress.IPv6Address("2001:db8:1::1"): Inet6Entry("eth0", 64, 0x01),
        ipaddress.IPv6Address("fe80::1"): Inet6Entry("eth0", 64, 0x80),
    }


def test_ipv6_first_and_the_families_interleaved() -> None:
    addresses = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "2001:db8::1", "2001:db8::2"]
    assert interleaved(addresses) == ["2001:db8::1", "10.0.0.1", "2001:db8::2", "10.0.0.2",
                                      "10.0.0.3"]  # fmt: skip
    prefs = local_preferences(addresses)
    assert prefs["2001:db8::1"] == 65535 and prefs["10.0.0.1"] == 65534
    assert prefs["10.0.0.3"] == 65531


def _candidate(kind: str, host: str, port: int, related: str | None = None) -> aioice.Candidate:
    foundation = hashlib.sha256(f"{kind}{host}".encode()).hexdigest()[:32]  # as aioice's
    return aioice.Candidate(foundation=foundation, component=1,
                            transport="udp", priority=candidate_priority(1, kind), host=host,
                            port=port, type=kind, related_address=related,
                            related_port=port if related else None)  # fmt: skip


def _multihomed() -> list[aioice.Candidate]:
    """A device with 8 IPv4 and 8 IPv6 addresses, a reflexive and a relayed candidate."""
    hosts = [_candidate("host", f"192.168.{i}.23", 50000 + i) for i in range(8)]
    hosts += [_candidate("host", f"2001:db8:{i:x}:1:a2b3:c4d5:e6f7:890a", 51000 + i)
              for i in range(8)]  # fmt: skip
    srflx = _candidate("srflx", "203.0.113.5", 60000, related="192.168.0.23")
    relay = _candidate("relay", "198.51.100.9", 49999, related="203.0.113.5")
    gathered = [*hosts, srflx, relay]
    _rank_hosts(gathered)
    return gathered


def test_a_multihomed_device_publishes_its_best_candidates(alice: Identity, bob: Identity) -> None:
    gathered = _multihomed()
    ordered = [c.to_sdp() for c in publish_order(gathered)]
    assert ordered[0].split()[4] == "2001:db8:0:1:a2b3:c4d5:e6f7:890a"  # best IPv6 host
    assert ordered[1].split()[4] == "192.168.0.23"  # best IPv4 host
    assert [s.split()[7] for s in ordered[2:4]] == ["srflx", "relay"]
    reach = Reach(b"d" * 16, "ufra", "p" * 22, "call", "q" * 22, tuple(ordered))
    contacts = [bob.public] * 6  # the most a record seals to: the least room for the reach
    proof = identity_proof(alice.fingerprint, now_ms=NOW)
    fitted = fit_reach(reach, len(contacts), proof)
    assert 4 < len(fitted.candidates) < len(reach.candidates)  # the head kept, the tail cut
    assert fitted.candidates == reach.candidates[: len(fitted.candidates)]
    raw = presence_record(alice, contacts, fitted, now_ms=NOW, proof=proof)
    assert read_presence(raw, alice.public, bob, now_ms=NOW).reach == fitted
    small = Reach(b"d" * 16, "ufra", "p" * 22, "call", "q" * 22, tuple(ordered[:4]))
    assert fit_reach(small, len(contacts), proof) == small  # what fits is left alone


def test_dna_stun_may_name_the_servers_ipv6_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DNA_STUN", "198.51.100.9:3478,[2001:db8::9]:3479")
    config = ice_config()
    assert config.stun == ("198.51.100.9", 3478) and config.stun6 == ("2001:db8::9", 3479)
    monkeypatch.setenv("DNA_STUN", "stun.example.org:3478")  # a name: its AAAA, at gathering
    assert ice_config().stun == ("stun.example.org", 3478) and ice_config().stun6 is None
    monkeypatch.setenv("DNA_TURN", "198.51.100.9:3478,[2001:db8::9]:3478")
    with pytest.raises(DnaError, match="one TURN server"):
        ice_config()


def test_a_multihomed_callers_offer_is_one_unfragmented_datagram() -> None:
    gathered = [c for c in _multihomed() if c.type != "relay"]
    datagram = offer_datagram(gathered, "p" * 22)
    assert len(datagram) <= OFFER_MAX_BYTES
    offered = json.loads(datagram[len(OFFER_TAG) + 32 :])
    assert 4 < len(offered) < len(gathered)
    assert offered == [c.to_sdp() for c in publish_order(gathered)][: len(offered)]


def sdp(host: str, port: int = 40000, kind: str = "host") -> str:
    return aioice.Candidate(foundation="1", component=1, transport="udp", priority=1,
                            host=host, port=port, type=kind).to_sdp()  # fmt: skip


HOSTILE = [sdp("127.0.0.1", 22), sdp("::1"), sdp("0.0.0.0"), sdp("255.255.255.255"),
           sdp("224.0.0.251", 5353), sdp("ff02::1"), sdp("169.254.169.254", 80),
           sdp("fe80::1"), sdp("240.0.0.1"), sdp("::ffff:127.0.0.1"), sdp("10.0.0.9", 0),
           sdp("metadata.internal"), "not a candidate line"]  # fmt: skip


def test_a_contacts_candidates_are_checked_only_toward_addresses_a_peer_may_have() -> None:
    """A presence record (or a caller's offer) is text the contact wrote: its candidates
    were checked toward whatever they named (this device's loopback services, a metadata
    address, broadcast, a DNS name) and as many as fit. Now only addresses another host can
    use, at most MAX_REMOTE_CANDIDATES of them."""
    good = [sdp("10.0.0.9"), sdp("2001:db8::9", kind="srflx"), sdp("198.51.100.7", kind="relay")]
    chosen = remote_candidates(HOSTILE + good)
    assert [(c.host, c.type) for c in chosen] == [
        ("10.0.0.9", "host"), ("2001:db8::9", "srflx"), ("198.51.100.7", "relay")]  # fmt: skip
    many = [sdp(f"10.0.{n // 250}.{n % 250 + 1}") for n in range(1000)]
    assert len(remote_candidates(many)) == MAX_REMOTE_CANDIDATES


def test_a_presence_that_names_nowhere_a_peer_may_be_is_not_dialled_at_all() -> None:
    """With nothing left to check toward, the dial fails at once (the message takes the
    mailbox), before any socket is opened or packet sent; it used to check toward every
    address named until its 4 s deadline."""

    async def dial_hostile() -> None:
        them, us = aioice.Connection(ice_controlling=False), aioice.Connection(ice_controlling=True)
        await dial(IceConfig(), them.local_username, them.local_password, us.local_username,
                   us.local_password, tuple(HOSTILE), timeout=deadline_s)  # fmt: skip

    # "At once" is "long before the deadline": a deadline far over what a loaded machine
    # takes to fail at once, so the bound means the deadline was not waited out, not luck.
    deadline_s = 60.0
    started = time.monotonic()
    with pytest.raises(DirectError, match="no candidate of the contact's"):
        asyncio.run(dial_hostile())
    assert time.monotonic() - started < deadline_s / 4


def test_a_testnet_on_one_host_dials_relayed_candidates_on_its_own_loopback_relay() -> None:
    """`dna-testnet` runs its TURN relay on a loopback address: both ends' relayed candidates are
    there, and refusing every loopback candidate left the demo no direct path. Only our
    own STUN/TURN server's loopback address is dialled; other loopback addresses stay out."""
    local = loopback_servers(("127.1.0.11", 3478), ("127.1.0.11", 3478))
    assert local == {"127.1.0.11"}
    assert loopback_servers(("turn.example.net", 3478), ("198.51.100.7", 3478), None) == set()
    lines = [sdp("127.1.0.11", 50000, kind="relay"), sdp("127.0.0.1", 22), sdp("127.1.0.12")]
    chosen = remote_candidates(lines, local)
    assert [(c.host, c.port) for c in chosen] == [("127.1.0.11", 50000)]
    with pytest.raises(DirectError):
        remote_candidates(lines)  # a device whose relay is not on loopback: none of them
