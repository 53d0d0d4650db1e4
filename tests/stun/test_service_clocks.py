"""The relay times allocations by a monotonic clock and judges time-limited credentials by
Unix time: a step of the wall clock (NTP, an operator's `date -s`) neither drops every
allocation nor stalls them, and a credential still expires when its Unix time passes. A real
`StunServer` on real sockets, its two clocks under the test's hand."""

from __future__ import annotations

import asyncio
import socket

from dna_stun import attributes as attr
from dna_stun.auth import auth_secret_password
from dna_stun.config import StunServiceConfig
from dna_stun.message import Message, Method
from dna_stun.service import StunServer
from dna_testnet.harness import LOOPBACK
from turn_client import Client, error_code, is_success

PEER = LOOPBACK.one()
SECRET = "clock-secret"


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _config(**auth: object) -> StunServiceConfig:
    return StunServiceConfig.model_validate(
        {
            "log_level": "warning",
            "server": {"host": "127.0.0.1", "udp_port": 0},
            "auth": {"realm": "test", "auth_secret": SECRET, **auth},
            "relay": {"allowed_peers": ["127.0.0.0/8"], "bandwidth_bytes_per_s": 10_000},
            "ops": {"http_host": "127.0.0.1", "http_port": 0},
        }
    )


async def _ask(
    sock: socket.socket, server: tuple[str, int], client: Client, data: bytes
) -> Message:
    loop = asyncio.get_running_loop()
    sock.sendto(data, server)
    return client.learn(await asyncio.wait_for(loop.sock_recv(sock, 2048), 5.0))


def test_a_wall_clock_step_changes_no_lifetime_and_credentials_follow_unix_time() -> None:
    asyncio.run(_steps())


async def _steps() -> None:
    monotonic, wall = Clock(1000.0), Clock(1_800_000_000.0)
    server = StunServer(_config(), clock=monotonic, unix_time=wall)
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        assert server.udp_addr is not None
        username = f"{int(wall.now) + 3600}:alice"
        turn = Client(username, auth_secret_password(SECRET, username))
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
        ):
            sock.bind(("127.0.0.1", 0))
            peer.bind((PEER, 0))
            sock.setblocking(False)
            peer.setblocking(False)
            at = server.udp_addr
            await _ask(sock, at, turn, turn.request(Method.ALLOCATE, turn.allocate_attrs()))
            allocated = await _ask(
                sock, at, turn, turn.request(Method.ALLOCATE, turn.allocate_attrs())
            )
            assert is_success(allocated, Method.ALLOCATE), error_code(allocated)
            relay = attr.decode_xor_address(
                allocated.get(attr.XOR_RELAYED_ADDRESS) or b"", allocated.transaction_id
            )
            permit = turn.request(Method.CREATE_PERMISSION, peers=(peer.getsockname(),))
            assert is_success(await _ask(sock, at, turn, permit), Method.CREATE_PERMISSION)
            # The wall clock steps two hours ahead, then two hours back; no time passes.
            for step in (+7200.0, -7200.0):
                wall.now += step
                server.expire()
                assert relay in server.core.by_relay  # type: ignore[union-attr]
                peer.sendto(b"still relayed", relay)
                data = turn.learn(await asyncio.wait_for(loop.sock_recv(sock, 2048), 5.0))
                assert data.method == Method.DATA and data.get(attr.DATA) == b"still relayed"
            # The credential's Unix expiry passes while the monotonic clock stands still.
            wall.now += 3601
            refused = await _ask(sock, at, turn, turn.request(Method.REFRESH))
            assert error_code(refused) == 401
            assert server.core.stats.auth_failures["expired_credential"] == 1  # type: ignore[union-attr]
            monotonic.now += 601  # the allocation's own lifetime (600 s) runs out
            server.expire()
            assert relay not in server.core.by_relay  # type: ignore[union-attr]
    finally:
        await server.stop()


def test_the_configured_maximum_credential_lifetime_is_judged_by_unix_time() -> None:
    asyncio.run(_lifetime_cap())


async def _lifetime_cap() -> None:
    # [auth] max_credential_lifetime_s reaches the core: at 3600 a username expiring in two
    # hours is refused, whatever the monotonic clock reads; one expiring in an hour allocates.
    config = _config(max_credential_lifetime_s=3600)
    wall = Clock(1_800_000_000.0)
    server = StunServer(config, clock=Clock(5.0), unix_time=wall)
    await server.start()
    try:
        assert server.udp_addr is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            for ahead, allowed in ((7200, False), (3600, True)):
                username = f"{int(wall.now) + ahead}:alice"
                turn = Client(username, auth_secret_password(SECRET, username))
                allocate = turn.request(Method.ALLOCATE, turn.allocate_attrs())
                await _ask(sock, server.udp_addr, turn, allocate)  # the 401 challenge
                allocate = turn.request(Method.ALLOCATE, turn.allocate_attrs())
                answer = await _ask(sock, server.udp_addr, turn, allocate)
                assert is_success(answer, Method.ALLOCATE) == allowed, error_code(answer)
        assert server.core is not None
        assert server.core.stats.auth_failures == {"lifetime_too_long": 1}
    finally:
        await server.stop()
