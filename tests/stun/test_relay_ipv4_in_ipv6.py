"""An IPv6 peer address that reaches an IPv4 one is refused as that IPv4 address is, in the
forms a relay's network may translate: a Teredo client's (RFC 4380, obfuscated in the low
bits) and the local-use NAT64 prefix 64:ff9b:1::/48 (RFC 8215), which a site's translator
maps to any of its IPv4 addresses, private ones included (RFC 6052's well-known prefix may
not carry those; this one is for exactly that, and never leaves the site). Both passed
before 2026-12-05 while the IPv4-mapped, compatible, 6to4 and well-known NAT64 forms were
refused. A real `StunServer` on real sockets, relaying over IPv6 (::1), and a TURN client
asking for permissions."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
from dna_stun import attributes as attr
from dna_stun.config import StunServiceConfig
from dna_stun.message import Method
from dna_stun.policy import RelayPolicy
from dna_stun.service import StunServer
from turn_client import Client, error_code, is_success

TEREDO_LOOPBACK = "2001:0:cb00:7101::80ff:fffe"  # client 127.0.0.1 (its bits inverted)
TEREDO_PRIVATE = "2001:0:cb00:7101::f5ff:fffe"  # client 10.0.0.1
LOCAL_NAT64 = "64:ff9b:1:a00:0:100::"  # 10.0.0.1 in a /48 prefix (RFC 6052 section 2.2)
GLOBAL_PEER = "2001:db8::7"


@pytest.mark.parametrize("host", [TEREDO_LOOPBACK, TEREDO_PRIVATE, LOCAL_NAT64])
def test_the_policy_refuses_ipv4_behind_these_forms(host: str) -> None:
    assert RelayPolicy().check(host, 5000) == "forbidden_peer"


def test_teredo_peers_with_a_public_client_address_still_pass() -> None:
    public_client = "2001:0:cb00:7101::3afe:8cf6"  # client 197.1.115.9
    assert RelayPolicy().check(public_client, 5000) is None
    assert RelayPolicy().check(GLOBAL_PEER, 5000) is None


def teredo(server: str, client: str, client_port: int) -> str:
    """The Teredo address (RFC 4380) of a client at ``client``:``client_port`` (both
    obfuscated: bits inverted) served by ``server``."""
    low = ((client_port ^ 0xFFFF) << 32) | (int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF)
    high = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64)
    return str(ipaddress.IPv6Address(high | low))


def test_a_teredo_client_is_judged_at_its_own_port_and_its_server_too() -> None:
    """From the review: the server's own endpoint was judged by the outer port only, so a
    Teredo address carrying the server's IPv4 and its TURN port passed at any outer port;
    and the Teredo server (where the client's bubbles go) was never judged. Fails without
    it (checked)."""
    policy = RelayPolicy()
    policy.add_own_endpoint(("198.51.100.1", 3478))
    assert policy.check(teredo("203.0.113.5", "197.1.115.9", 40000), 50000) is None
    at_own_turn_port = teredo("203.0.113.5", "198.51.100.1", 3478)
    assert policy.check(at_own_turn_port, 50000) == "forbidden_peer"
    own_ssh = teredo("203.0.113.5", "198.51.100.1", 22)
    assert policy.check(own_ssh, 50000) == "forbidden_peer"
    private_server = teredo("10.0.0.1", "197.1.115.9", 40000)
    assert policy.check(private_server, 50000) == "forbidden_peer"


def test_a_relay_refuses_permissions_for_them_with_403() -> None:
    config = StunServiceConfig.model_validate(
        {
            "log_level": "warning",
            "server": {"host": "::1", "udp_port": 0},
            "auth": {"realm": "test", "users": ["u:p"]},
            "ops": {"http_host": "127.0.0.1", "http_port": 0},
        }
    )

    async def main() -> None:
        server = StunServer(config)
        await server.start()
        try:
            assert server.udp_addr is not None
            await _permissions(("::1", server.udp_addr[1]))
        finally:
            await server.stop()

    asyncio.run(main())


async def _permissions(server: tuple[str, int]) -> None:
    turn = Client("u", "p")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))
        sock.settimeout(5)
        v6 = [*turn.allocate_attrs(), (attr.REQUESTED_ADDRESS_FAMILY, b"\x02\x00\x00\x00")]
        for _ in range(2):  # the 401 challenge, then the signed request
            sock.sendto(turn.request(Method.ALLOCATE, v6), server)
            answer = turn.learn(await _answer(sock))
        assert is_success(answer, Method.ALLOCATE), error_code(answer)
        for host, code in ((GLOBAL_PEER, None), (TEREDO_LOOPBACK, 403), (TEREDO_PRIVATE, 403),
                           (LOCAL_NAT64, 403)):  # fmt: skip
            sock.sendto(turn.request(Method.CREATE_PERMISSION, peers=((host, 5000),)), server)
            assert error_code(turn.learn(await _answer(sock))) == code, host


async def _answer(sock: socket.socket) -> bytes:
    return await asyncio.to_thread(sock.recv, 65536)
