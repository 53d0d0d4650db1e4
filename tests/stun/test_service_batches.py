"""The asyncio adapter's batches: a wakeup's datagrams go through the core in one call, a
socket is drained past one batch, IPv6 addresses reach the core as (host, port), a bug
costs the datagram that raised it, not its batch, and a relay socket closes only after its
batch's sends. A real `StunServer` on real sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import pytest
from dna_core.interfaces import interface_addresses
from dna_stun import attributes as attr
from dna_stun.config import StunServiceConfig
from dna_stun.core import Addr, Datagram, Send
from dna_stun.message import Class, Message, Method, channel_data, encode, parse
from dna_stun.service import BATCH, StunServer
from dna_testnet.harness import LOOPBACK
from turn_client import Client, error_code, is_success

PEER = LOOPBACK.one()  # not the server's address


def _config(host: str, **server: str) -> StunServiceConfig:
    return StunServiceConfig.model_validate(
        {
            "log_level": "warning",
            "server": {"host": host, "udp_port": 0, **server},
            "auth": {"realm": "test", "users": ["u:p"]},
            "relay": {"allowed_peers": ["127.0.0.0/8"]},
            "ops": {"http_host": "127.0.0.1", "http_port": 0},
        }
    )


async def _server(host: str) -> StunServer:
    server = StunServer(_config(host))
    await server.start()
    return server


def _with_server(host: str, body: Callable[[StunServer], Awaitable[None]]) -> None:
    async def main() -> None:
        server = await _server(host)
        try:
            await body(server)
        finally:
            await server.stop()

    asyncio.run(main())


def _client(family: int, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


async def _answers(sock: socket.socket, count: int, timeout: float = 5.0) -> list[bytes]:
    loop = asyncio.get_running_loop()
    return [await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout) for _ in range(count)]


def _binding(tid: bytes) -> bytes:
    return encode(Method.BINDING, Class.REQUEST, tid)


def test_more_than_a_batch_is_answered_in_order() -> None:
    _with_server("127.0.0.1", _more_than_a_batch)


async def _more_than_a_batch(server: StunServer) -> None:
    assert server.udp_addr is not None
    count = BATCH + 44  # more than one wakeup reads
    tids = [os.urandom(12) for _ in range(count)]
    with _client(socket.AF_INET, "127.0.0.1") as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for tid in tids:
            client.sendto(_binding(tid), server.udp_addr)
        answers = [parse(data) for data in await _answers(client, count)]
        mapped = {
            attr.decode_xor_address(a.get(attr.XOR_MAPPED_ADDRESS) or b"", a.transaction_id)
            for a in answers
        }
        assert [a.transaction_id for a in answers] == tids
        assert mapped == {client.getsockname()}
    assert server.core is not None and server.core.stats.requests["binding"] == count


def test_ipv6_clients_reach_the_core_as_host_and_port() -> None:
    _with_server("::1", _ipv6_binding)


async def _ipv6_binding(server: StunServer) -> None:
    assert server.udp_addr is not None
    with _client(socket.AF_INET6, "::1") as client:
        tid = os.urandom(12)
        client.sendto(_binding(tid), server.udp_addr)
        [answer] = [parse(data) for data in await _answers(client, 1)]
        value = answer.get(attr.XOR_MAPPED_ADDRESS) or b""
        assert attr.decode_xor_address(value, tid) == client.getsockname()[:2]


@pytest.mark.parametrize(
    ("host", "server"),
    [("::", {}), ("127.0.0.1", {"host_ipv6": "::1"})],
    ids=["one dual-stack socket", "a socket per family"],
)
def test_both_families_are_served_each_in_its_own(host: str, server: dict[str, str]) -> None:
    """IPv4 and IPv6 clients on one port: each is answered at, and told, its own address
    (XOR-MAPPED-ADDRESS family 0x01 for IPv4: a dual-stack socket sees it IPv4-mapped), and
    an allocation without REQUESTED-ADDRESS-FAMILY relays over IPv4 (RFC 8656 section 7.2),
    an IPv6 client's too, whose Data indications go back over IPv6."""
    config = _config(host, relay_host="127.0.0.1", relay_host_ipv6="::1", **server)

    async def main() -> None:
        stun = StunServer(config)
        await stun.start()
        try:
            await _both_families(stun)
        finally:
            await stun.stop()

    asyncio.run(main())


async def _both_families(server: StunServer) -> None:
    assert server.udp_addr is not None
    port4 = server.udp_addr[1]  # a test's ephemeral ports: one per socket
    port6 = server.udp_addr6[1] if server.udp_addr6 is not None else port4
    for family, host, port in ((socket.AF_INET, "127.0.0.1", port4),
                               (socket.AF_INET6, "::1", port6)):  # fmt: skip
        with _client(family, host) as client:
            tid = os.urandom(12)
            client.sendto(_binding(tid), (host, port))
            [answer] = [parse(data) for data in await _answers(client, 1)]
            value = answer.get(attr.XOR_MAPPED_ADDRESS) or b""
            assert value[1] == (attr.FAMILY_IPV4 if family == socket.AF_INET else attr.FAMILY_IPV6)
            assert attr.decode_xor_address(value, tid) == client.getsockname()[:2]
            relay = await _allocate(client, (host, port))
            assert relay[0] == "127.0.0.1"
    with _client(socket.AF_INET6, "::1") as client, _client(socket.AF_INET, PEER) as peer:
        turn, server_addr = Client("u", "p"), ("::1", port6)
        relay = await _allocate(client, server_addr, turn)
        client.sendto(turn.request(Method.CREATE_PERMISSION, peers=(peer.getsockname(),)),
                      server_addr)  # fmt: skip
        assert is_success(turn.learn((await _answers(client, 1))[0]), Method.CREATE_PERMISSION)
        peer.sendto(b"to an ipv6 client", relay)
        data = parse((await _answers(client, 1))[0])
        assert data.method == Method.DATA and data.get(attr.DATA) == b"to an ipv6 client"


async def _allocate(
    client: socket.socket, server: tuple[str, int], turn: Client | None = None
) -> Addr:
    turn = turn or Client("u", "p")
    for _ in range(2):  # the 401 challenge, then the signed request
        client.sendto(turn.request(Method.ALLOCATE, turn.allocate_attrs()), server)
        response = turn.learn((await _answers(client, 1))[0])
    assert is_success(response, Method.ALLOCATE), error_code(response)
    return attr.decode_xor_address(response.get(attr.XOR_RELAYED_ADDRESS) or b"",
                                   response.transaction_id)  # fmt: skip


def test_a_bug_costs_the_datagram_that_raised_not_its_batch() -> None:
    _with_server("127.0.0.1", _buggy_batch)


async def _buggy_batch(server: StunServer) -> None:
    assert server.core is not None and server.udp_addr is not None
    core = server.core

    def buggy(batch: list[Datagram], now: float) -> list[Send]:
        if any(data == b"boom" for data, _ in batch):
            raise RuntimeError("a bug in the core")
        return core.on_client_datagrams(batch, now)

    handle: Callable[[list[Datagram], float], list[Send]] = buggy
    with _client(socket.AF_INET, "127.0.0.1") as client:
        here: Addr = client.getsockname()
        tids = [os.urandom(12), os.urandom(12)]
        batch = [(_binding(tids[0]), here), (b"boom", here), (_binding(tids[1]), here)]
        server._relay(handle, batch)
        answers = [parse(data) for data in await _answers(client, 2)]
    assert [a.transaction_id for a in answers] == tids
    # Once for the batch, once for the datagram itself when retried alone.
    assert core.stats.refusals["internal_error"] == 2


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "datagram handling failed":
            self.records.append(record)


def test_a_flood_of_datagrams_that_raise_logs_a_traceback_a_minute_and_counts_each() -> None:
    """Whoever finds a datagram that raises can send it in a flood: before, each one logged a
    traceback (twice over for a batch: once for it, once retried alone)."""
    clock = [1000.0]
    records = _Records()
    logging.getLogger("dna.stun").addHandler(records)

    async def main() -> None:
        server = StunServer(_config("127.0.0.1"), clock=lambda: clock[0])
        await server.start()
        try:
            assert server.core is not None
            here: Addr = ("127.0.0.1", 9)

            def buggy(batch: list[Datagram], now: float) -> list[Send]:
                raise RuntimeError("a bug in the core")

            server._relay(buggy, [(b"boom", here)] * 50)
            assert server.core.stats.refusals["internal_error"] == 51
            clock[0] += 59.0
            server._relay(buggy, [(b"boom", here)])
            assert len(records.records) == 1
            clock[0] += 2.0
            server._relay(buggy, [(b"boom", here)])
            assert server.core.stats.refusals["internal_error"] == 55
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    finally:
        logging.getLogger("dna.stun").removeHandler(records)
    assert [getattr(r, "suppressed", None) for r in records.records] == [0, 52]
    assert all(r.exc_info is not None for r in records.records)


def test_what_a_client_relayed_before_deallocating_in_the_same_batch_still_goes_out() -> None:
    _with_server("127.0.0.1", _relay_then_deallocate)


async def _transact(sock: socket.socket, server: Addr, client: Client, data: bytes) -> Message:
    sock.sendto(data, server)
    [answer] = await _answers(sock, 1)
    return client.learn(answer)


async def _relay_then_deallocate(server: StunServer) -> None:
    assert server.core is not None and server.udp_addr is not None and server._relays
    client = Client("u", "p")
    with _client(socket.AF_INET, "127.0.0.1") as sock, _client(socket.AF_INET, PEER) as peer:
        here: Addr = sock.getsockname()
        ask = client.allocate_attrs()
        await _transact(sock, server.udp_addr, client, client.request(Method.ALLOCATE, ask))
        allocated = await _transact(
            sock, server.udp_addr, client, client.request(Method.ALLOCATE, ask)
        )
        assert is_success(allocated, Method.ALLOCATE), error_code(allocated)
        relay = attr.decode_xor_address(
            allocated.get(attr.XOR_RELAYED_ADDRESS) or b"", allocated.transaction_id
        )
        number = [(attr.CHANNEL_NUMBER, attr.channel_number(0x4000))]
        bind = client.request(Method.CHANNEL_BIND, number, peers=(peer.getsockname(),))
        bound = await _transact(sock, server.udp_addr, client, bind)
        assert is_success(bound, Method.CHANNEL_BIND), error_code(bound)
        deallocate = client.request(Method.REFRESH, [(attr.LIFETIME, attr.uint32(0))])
        batch = [(channel_data(0x4000, b"last words"), here), (deallocate, here)]
        server._relay(server.core.on_client_datagrams, batch)
        assert await _answers(peer, 1) == [b"last words"]
        assert is_success(client.learn((await _answers(sock, 1))[0]), Method.REFRESH)
    assert relay not in server._relays.sockets and not server._relays.retired


def test_a_wildcard_server_refuses_every_address_of_its_host_but_the_relay_ports() -> None:
    """host = 0.0.0.0 (the container image's setting) serves on every address of the host:
    each is the server's own, so a relay to its other UDP services (DNS, NTP, SNMP on a
    second public address) is refused even where ``allowed_peers`` opens every range."""
    config = StunServiceConfig.model_validate(
        {
            "log_level": "warning",
            "server": {"host": "0.0.0.0", "udp_port": 0, "relay_host": "127.0.0.1"},
            "auth": {"realm": "test", "users": ["u:p"]},
            "relay": {"allowed_peers": ["0.0.0.0/0", "::/0"]},
            "ops": {"http_host": "127.0.0.1", "http_port": 0},
        }
    )

    async def main() -> None:
        stun = StunServer(config)
        await stun.start()
        try:
            policy = stun.core.policy if stun.core is not None else None
            assert policy is not None
            host = interface_addresses()
            assert host, "no interface address to check"
            for address in host:
                assert policy.check(address, 53) == "forbidden_peer", address
                assert policy.check(address, config.server.relay_port_min) is None, address
            assert policy.check("203.0.113.9", 53) is None  # not the host's: allowed
        finally:
            await stun.stop()

    asyncio.run(main())
