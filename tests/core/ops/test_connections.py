"""ConnectionCaps: the accounting behind the gRPC connection guard and the ops HTTP port."""

from __future__ import annotations

import pytest
from dna_core.ops.connections import (
    OVER_SOURCE_CAP,
    OVER_TOTAL_CAP,
    ConnectionCaps,
    ConnectionLimits,
)
from dna_core.overlay.aio.server import ConnectionsSection, OverlayServiceConfig, config_warnings
from hypothesis import given
from hypothesis import strategies as st


def caps(total: int = 4, per_source: int = 2) -> ConnectionCaps:
    return ConnectionCaps(ConnectionLimits(total, per_source))


def test_one_source_is_capped_and_others_still_get_in() -> None:
    c = caps(total=4, per_source=2)
    assert [c.admit("192.0.2.1") for _ in range(3)] == [None, None, OVER_SOURCE_CAP]
    assert c.admit("192.0.2.2") is None
    assert c.open == 3 and c.held_by("192.0.2.1") == 2


def test_the_total_cap_binds_across_sources() -> None:
    c = caps(total=3, per_source=2)
    assert [c.admit(f"192.0.2.{i}") for i in range(4)] == [None, None, None, OVER_TOTAL_CAP]
    assert c.open == 3


def test_release_frees_the_slot_of_its_source() -> None:
    c = caps(total=4, per_source=1)
    assert c.admit("192.0.2.1") is None
    assert c.admit("192.0.2.1") == OVER_SOURCE_CAP
    c.release("192.0.2.1")
    assert c.open == 0 and c.held_by("192.0.2.1") == 0
    assert c.admit("192.0.2.1") is None


def test_a_release_without_an_admitted_connection_is_an_error_and_changes_nothing() -> None:
    c = caps()
    assert c.admit("192.0.2.1") is None
    with pytest.raises(ValueError, match=r"192\.0\.2\.2"):
        c.release("192.0.2.2")
    assert c.open == 1 and c.held_by("192.0.2.1") == 1


def test_ipv6_addresses_of_one_64_are_one_source() -> None:
    c = caps(total=10, per_source=2)
    assert c.admit("2001:db8:1:2::1") is None
    assert c.admit("2001:db8:1:2:ffff::9") is None
    assert c.admit("2001:db8:1:2::77") == OVER_SOURCE_CAP  # the same /64, a new address
    assert c.admit("2001:db8:1:3::1") is None  # the next /64
    assert c.admit("::ffff:192.0.2.1") is None  # IPv4-mapped counts as the IPv4 address
    assert c.held_by("192.0.2.1") == 1


def test_limits_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="caps must be >= 1"):
        ConnectionLimits(0, 1)
    with pytest.raises(ValueError, match="caps must be >= 1"):
        ConnectionLimits(1, 0)


SOURCES = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:db8::1", "2001:db8::2"]


def model_key(source: str) -> str:
    return "2001:db8::/64" if ":" in source else source


@given(
    total=st.integers(1, 6),
    per_source=st.integers(1, 4),
    steps=st.lists(st.tuples(st.booleans(), st.sampled_from(SOURCES)), max_size=60),
)
def test_caps_admit_exactly_what_fits_and_count_what_is_open(
    total: int, per_source: int, steps: list[tuple[bool, str]]
) -> None:
    c = caps(total, per_source)
    held: list[str] = []  # the model: one key per admitted, unreleased connection
    for opening, source in steps:
        key = model_key(source)
        if opening:
            fits = len(held) < total and held.count(key) < per_source
            assert (c.admit(source) is None) == fits
            if fits:
                held.append(key)
        elif key in held:
            c.release(source)
            held.remove(key)
        assert c.open == len(held)
        assert c.held_by(source) == held.count(key)


def test_the_connections_section_checks_its_caps_and_takes_the_guard_switch() -> None:
    assert ConnectionsSection(grpc_connection_guard=False).grpc_connection_guard is False
    with pytest.raises(ValueError, match="grpc_max_connections_per_source"):
        ConnectionsSection(grpc_max_connections_per_source=0)
    limits = ConnectionsSection(grpc_max_connections=9, grpc_max_connections_per_source=3)
    assert limits.grpc_caps().limits == ConnectionLimits(9, 3)


def test_a_node_warns_when_its_caps_need_more_descriptors_than_it_may_open() -> None:
    guarded = OverlayServiceConfig(connections=ConnectionsSection(grpc_max_connections=4096))
    assert guarded.connections.descriptors_needed() == 3 * 4096 + 64 + 256  # 3 fds a relayed one
    (warning,) = [w for w in config_warnings(guarded, 4096) if "file descriptors" in w]
    assert "12608" in warning and "4096" in warning
    assert not [w for w in config_warnings(guarded, 20_000) if "file descriptors" in w]
    unguarded = OverlayServiceConfig(connections=ConnectionsSection(grpc_connection_guard=False))
    assert not [w for w in config_warnings(unguarded, 4800) if "file descriptors" in w]
