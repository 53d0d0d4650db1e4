"""Ports and numbers read from text take ASCII digits only: ``str.isdigit`` also takes '²'
and other digits ``int()`` refuses, which turned a bad setting into a traceback. And
``host:port`` is written one way (`dna_core.hostport.host_port`): IPv6 in brackets."""

from __future__ import annotations

from pathlib import Path

import pytest
from dna_core.errors import DnaError
from dna_core.hostport import host_port
from dna_core.ops.config import OpsSection
from dna_core.overlay.aio.server import (
    NodeSection,
    OverlaySection,
    OverlayServer,
    OverlayServiceConfig,
    RecordsSection,
    parse_addr,
)
from dna_core.overlay.contact import Scope, address_scope
from dna_core.wire.gen.dna.v1 import common_pb2
from dna_peer.network import parse_seeds
from dna_stun.config import StunServiceConfig
from dna_stun.service import StunServer
from support import status_once_started


@pytest.mark.parametrize("port", ["²", "١٢", "7400²", "-1", "", "99999"])
def test_a_setting_with_a_port_that_is_not_ascii_digits_is_refused_by_name(port: str) -> None:
    with pytest.raises(ValueError, match=r"bootstrap: .* is not host:port"):
        parse_addr(f"10.0.0.1:{port}", key="bootstrap")
    with pytest.raises(DnaError, match="bootstrap address"):
        parse_seeds(f"10.0.0.1:{port}")


def test_ascii_ports_parse() -> None:
    assert parse_addr("[2001:db8::1]:7400") == ("2001:db8::1", 7400)
    assert parse_seeds("10.0.0.1:7400, [::1]:1") == [("10.0.0.1", 7400), ("::1", 1)]


@pytest.mark.parametrize("ip", ["1²7.0.0.1", "10.0.0.\u0661", "1.2.3.4²"])
def test_an_ipv4_address_with_other_digits_is_martian_not_an_error(ip: str) -> None:
    assert address_scope(ip) is Scope.MARTIAN


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [("10.0.0.1", 7400, "10.0.0.1:7400"), ("fd00::1", 7000, "[fd00::1]:7000"),
     ("[::1]", 1, "[::1]:1"), ("node.example", 7401, "node.example:7401")],
)  # fmt: skip
def test_host_port_brackets_ipv6_once_and_reads_back(host: str, port: int, text: str) -> None:
    assert host_port(host, port) == text
    assert parse_addr(text) == (host.strip("[]"), port)


def test_the_status_page_of_a_node_on_ipv6_brackets_its_addresses(tmp_path: Path) -> None:
    """/status showed ``::1:7400`` (the port not to be told from the address); and the
    gRPC listener was bound as ``::1:0``. A whole node on ::1, its ops server too."""
    config = OverlayServiceConfig(
        node=NodeSection(host="::1", udp_port=0, grpc_port=0, key_file=tmp_path / "node.key"),
        overlay=OverlaySection(allow_loopback=True),
        records=RecordsSection(path=tmp_path / "records.sqlite3"),
        ops=OpsSection(http_host="::1", http_port=0),
    )

    shown = status_once_started(lambda: OverlayServer(config, role=common_pb2.NODE_ROLE_BOOTSTRAP))
    for listener in ("udp", "grpc", "http"):
        host, port = parse_addr(shown[listener])
        assert shown[listener] == f"[::1]:{port}" and host == "::1" and port > 0, shown


def test_the_relay_status_page_on_ipv6_brackets_its_addresses() -> None:
    config = StunServiceConfig.model_validate(
        {"server": {"host": "::1", "udp_port": 0}, "ops": {"http_host": "::1", "http_port": 0}}
    )

    shown = status_once_started(lambda: StunServer(config))
    for listener in ("udp", "http"):
        host, port = parse_addr(shown[listener])
        assert shown[listener] == f"[::1]:{port}" and host == "::1" and port > 0, shown
