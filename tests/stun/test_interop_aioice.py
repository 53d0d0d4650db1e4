"""aioice, a third-party STUN/TURN client, against a real `dna-stun` process over UDP."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aioice import stun
from aioice.turn import TurnClientUdpProtocol, create_turn_endpoint
from dna_stun.auth import auth_secret_password
from dna_testnet.harness import LOOPBACK
from stun_node import StunNode, stun_node
from support import SETTLE_S, until, until_async

pytestmark = pytest.mark.process

PEER_HOST = LOOPBACK.one()  # not the server's address: relaying there is allowed by the test config


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StunNode]:
    with stun_node(tmp_path_factory.mktemp("stun")) as running:
        yield running


class Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.put_nowait((data, addr))


def test_binding_returns_the_clients_address(node: StunNode) -> None:
    async def main() -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: TurnClientUdpProtocol(node.udp, None, None, 600, 500),
            local_addr=("127.0.0.1", 0), remote_addr=node.udp,
        )  # fmt: skip
        try:
            request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
            response, _ = await protocol.request(request)
            return response.attributes["XOR-MAPPED-ADDRESS"], transport.get_extra_info("sockname")
        finally:
            transport.close()

    mapped, local = asyncio.run(main())
    assert mapped == local[:2]
    assert node.metric("dna_stun_requests_total", method="binding") >= 1


async def _relay_both_ways(
    node: StunNode, username: str, password: str, count: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    peer_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer_sock.bind((PEER_HOST, 0))
    peer_transport, peer = await loop.create_datagram_endpoint(Inbox, sock=peer_sock)
    peer_addr = peer_sock.getsockname()
    turn, client = await create_turn_endpoint(Inbox, node.udp, username, password)
    relay = turn.get_extra_info("sockname")
    try:
        for i in range(count):
            turn.sendto(f"to-peer {i}".encode(), peer_addr)
        to_peer = [await asyncio.wait_for(peer.got.get(), 5) for _ in range(count)]
        for i in range(count):
            peer_transport.sendto(f"to-client {i}".encode(), relay)
        to_client = [await asyncio.wait_for(client.got.get(), 5) for _ in range(count)]
        return {"relay": relay, "peer": peer_addr, "to_peer": to_peer, "to_client": to_client}
    finally:
        turn.close()
        peer_transport.close()
        await asyncio.sleep(0.3)  # the allocation is deleted with a Refresh of lifetime 0


@pytest.mark.parametrize("credential", ["static", "time-limited"])
def test_turn_allocation_relays_both_ways(node: StunNode, credential: str) -> None:
    if credential == "static":
        username, password = "u", "p"
    else:
        username = f"{int(time.time()) + 300}:alice"
        password = auth_secret_password("shared", username)
    before = node.metric("dna_stun_relayed_packets_total", direction="client_to_peer")
    result = asyncio.run(_relay_both_ways(node, username, password, 20))
    relay, peer = tuple(result["relay"]), tuple(result["peer"])
    assert relay[0] == "127.0.0.1" and relay[1] != node.udp[1]
    assert sorted(d for d, _ in result["to_peer"]) == sorted(
        f"to-peer {i}".encode() for i in range(20)
    )
    assert {tuple(a) for _, a in result["to_peer"]} == {relay}
    assert sorted(d for d, _ in result["to_client"]) == sorted(
        f"to-client {i}".encode() for i in range(20)
    )
    assert {tuple(a) for _, a in result["to_client"]} == {peer}
    after = node.metric("dna_stun_relayed_packets_total", direction="client_to_peer")
    assert after - before == 20
    # deleted by the client on close (a Refresh of lifetime 0 the server handles when it can)
    until(lambda: node.metric("dna_stun_allocations") == 0, "the allocation deleted")


def test_wrong_password_is_refused_and_counted(node: StunNode) -> None:
    before = node.metric("dna_stun_auth_failures_total", reason="bad_integrity")

    async def main() -> None:
        await create_turn_endpoint(Inbox, node.udp, "u", "not-p")

    with pytest.raises(stun.TransactionFailed, match="401"):
        asyncio.run(main())
    assert node.metric("dna_stun_auth_failures_total", reason="bad_integrity") == before + 1


def forbidden(node: StunNode) -> float:
    return node.metric("dna_stun_refusals_total", reason="forbidden_peer")


def test_relaying_to_a_forbidden_address_is_refused_and_counted(node: StunNode) -> None:
    before = forbidden(node)

    async def main() -> BaseException | None:
        errors: list[BaseException] = []

        class Catch(Inbox):
            def error_received(self, exc: Exception) -> None:
                errors.append(exc)

        turn, _ = await create_turn_endpoint(Catch, node.udp, "u", "p")
        try:
            turn.sendto(b"x", ("10.0.0.1", 5000))  # a private network: denied by default
            turn.sendto(b"x", node.udp)  # the server's own port: never allowed
            await until_async(lambda: len(errors) == 2, "both permissions refused")
        finally:
            turn.close()
            await asyncio.sleep(0.2)
        return errors[0] if errors else None

    error = asyncio.run(main())
    assert isinstance(error, stun.TransactionFailed) and "403" in str(error)
    until(lambda: forbidden(node) >= before + 2, "both refusals counted")
    assert forbidden(node) == before + 2


async def _allocation_to_allocation(node: StunNode) -> dict[str, Any]:
    """Two clients of one server relay to each other's relayed address (the server's own
    address, on its relay ports), then one tries the server's STUN port and 127.0.0.1."""
    errors: list[BaseException] = []

    class Catch(Inbox):
        def error_received(self, exc: Exception) -> None:
            errors.append(exc)

    a, a_in = await create_turn_endpoint(Catch, node.udp, "u", "p")
    b, b_in = await create_turn_endpoint(Catch, node.udp, "u", "p")
    a_relay, b_relay = a.get_extra_info("sockname"), b.get_extra_info("sockname")
    try:
        got: dict[str, Any] = {}
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:  # until each has permitted the other (by IP)
            a.sendto(b"from a", b_relay)
            b.sendto(b"from b", a_relay)
            await asyncio.sleep(0.1)
            for name, inbox in (("a", a_in), ("b", b_in)):
                while not inbox.got.empty():
                    got[name] = inbox.got.get_nowait()
            if len(got) == 2:
                break
        a.sendto(b"x", node.udp)  # the server's own STUN port: never
        a.sendto(b"x", ("127.0.0.1", 5000))  # loopback, not allow-listed
        await until_async(lambda: len(errors) >= 2, "both permissions refused")
    finally:
        a.close()
        b.close()
        await asyncio.sleep(0.3)
    return {"relays": (a_relay, b_relay), "got": got, "errors": errors}


def test_allocations_relay_to_each_other_with_only_the_servers_address_allowed(
    tmp_path: Path,
) -> None:
    """The local testnet's relay setting (docs/nat.md): allow-listed for its own address
    only, two allocations reach each other (the demo's relay->relay ICE pair), and the
    listening port and the rest of 127.0.0.0/8 stay refused."""
    host = LOOPBACK.one()
    assert host != "127.0.0.1"
    with stun_node(tmp_path, host, allowed=(f"{host}/32",)) as relay:
        result = asyncio.run(_allocation_to_allocation(relay))
        until(lambda: forbidden(relay) >= 2, "both refusals counted")
        refused = forbidden(relay)
    a_relay, b_relay = (tuple(r) for r in result["relays"])
    assert a_relay[0] == b_relay[0] == host and a_relay[1] != b_relay[1]
    assert result["got"]["a"] == (b"from b", b_relay)
    assert result["got"]["b"] == (b"from a", a_relay)
    assert len(result["errors"]) == 2, result["errors"]
    assert all("403" in str(e) for e in result["errors"]), result["errors"]
    assert refused == 2


def test_garbage_does_not_hurt_the_server(node: StunNode) -> None:
    before = node.metric("dna_stun_refusals_total", reason="malformed")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for data in (
            b"",
            b"\x00\x01\x00\x04" + bytes(16),
            b"\xff" * 100,
            b"\x00\x01\x00\x00!\x12\xa4B",
        ):
            sock.sendto(data, node.udp)
    until(
        lambda: node.metric("dna_stun_refusals_total", reason="malformed") >= before + 3,
        "the garbage counted",
    )
    test_binding_returns_the_clients_address(node)  # still serving


def test_sigterm_stops_gracefully(tmp_path: Path) -> None:
    with stun_node(tmp_path) as running:
        status = httpx.get(f"{running.http}/status", timeout=5).json()
        assert status["role"] == "stun" and status["config"]["auth"]["users"] == "***"
        assert running.terminate() == 0
        lines = [
            json.loads(line)
            for line in running.log.read_text().splitlines()
            if line.startswith("{")
        ]
        assert [line["msg"] for line in lines][-1] == "stopped"
