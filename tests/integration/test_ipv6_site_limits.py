"""A real `dna-storage-node` process on IPv6, flooded from many /64s of one /48 (what any
customer site is assigned): the per-source caps key an IPv6 client by its /64, so without
the /48 tier (`dna_core.ratelimit.SiteTier`) the flood got a /64's budget per /64 it used.
The addresses are added to this namespace's ``lo`` for the module and removed after."""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from cluster import GRPC_PORT, NodeProcess, idle_connections, sample_value, scrape, wait_ready
from dna_core.overlay.codec import Datagram, FindNode, encode_datagram
from dna_testnet.network import UDP_PORT
from process_mark import starts_processes
from support import datagrams_within, udp_socket, until

NODE_IP = "fd00:5e:ff::1"
SITE = "fd00:5e:a"  # the flooder's /48
FLOOD_HOSTS = [f"{SITE}:{subnet:x}::1" for subnet in range(24)]  # one per /64
OTHER_SITE_HOST = "fd00:5e:b::1"  # another /48
SHARE = 8  # the default `SiteTier.share`
CONNECTIONS_PER_SOURCE = 2
DATAGRAM_BURST = 2
SETTINGS = f"""
grpc_max_connections_per_source = {CONNECTIONS_PER_SOURCE}
grpc_handshake_timeout_s = 8.0
"""
ANSWER_WINDOW_S = 1.0
OVERLAY = f"datagram_rate_per_s = 1.0\ndatagram_burst = {DATAGRAM_BURST}.0\n"


def _ip6(*args: str) -> None:
    subprocess.run(["ip", "-6", "addr", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
@starts_processes
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    addresses = [NODE_IP, *FLOOD_HOSTS, OTHER_SITE_HOST]
    for address in addresses:
        _ip6("replace", f"{address}/128", "dev", "lo", "nodad")
    proc = NodeProcess(
        "storage", NODE_IP, tmp_path_factory.mktemp("ipv6-site"), [],
        command="dna-storage-node", puzzle_bits=0, connections_toml=SETTINGS,
        overlay_toml=OVERLAY,
    )  # fmt: skip
    try:
        proc.start()
        wait_ready([proc])
        yield proc
    finally:
        proc.kill()
        for address in addresses:
            _ip6("del", f"{address}/128", "dev", "lo")


def open_idle(source: str, count: int) -> list[socket.socket]:
    """``count`` TCP connections to the node's gRPC port from ``source``, never sending."""
    return idle_connections(source, NODE_IP, GRPC_PORT, count)


def closed_by_node(sock: socket.socket) -> bool:
    """True once the node closed (or reset) the connection; never blocks."""
    try:
        while data := sock.recv(65536):  # the gRPC server's SETTINGS frame, first
            del data
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False
    return True


def refused(node: NodeProcess, reason: str) -> float:
    return sample_value(scrape(node), "dna_grpc_connections_refused_total", reason=reason)


def test_connections_from_many_64s_of_one_48_are_capped_at_the_site_share(
    node: NodeProcess,
) -> None:
    site_cap = SHARE * CONNECTIONS_PER_SOURCE  # 16, against 24 x 2 = 48 without the tier
    before = refused(node, "site_cap"), refused(node, "source_cap")
    flood = [c for host in FLOOD_HOSTS for c in open_idle(host, CONNECTIONS_PER_SOURCE)]
    other = open_idle(OTHER_SITE_HOST, CONNECTIONS_PER_SOURCE)
    try:
        until(lambda: refused(node, "site_cap") - before[0] >= len(flood) - site_cap,
              "the site's surplus refused at accept")  # fmt: skip
        closed = [closed_by_node(c) for c in flood]
        assert (closed.count(True), closed.count(False)) == (len(flood) - site_cap, site_cap)
        assert refused(node, "site_cap") - before[0] == len(flood) - site_cap
        assert refused(node, "source_cap") == before[1]  # no /64 went over its own cap
        assert not any(closed_by_node(c) for c in other)  # another /48: its own share
    finally:
        for c in flood + other:
            c.close()


def _find_node(rng: random.Random) -> bytes:
    return encode_datagram(Datagram(rng.getrandbits(64), FindNode(rng.randbytes(32))))


def test_datagrams_from_many_64s_of_one_48_get_the_site_budget(node: NodeProcess) -> None:
    site_burst = SHARE * DATAGRAM_BURST  # 16, against 24 x 2 = 48 without the tier
    rejected = "dna_overlay_rejected_total"
    before = sample_value(scrape(node), rejected, reason="datagram_site_rate")
    rng = random.Random(48)
    flooders = [udp_socket(host) for host in FLOOD_HOSTS]
    other = udp_socket(OTHER_SITE_HOST)
    try:
        started = time.monotonic()
        for sock in flooders:
            for _ in range(DATAGRAM_BURST * 5):
                sock.sendto(_find_node(rng), (NODE_IP, UDP_PORT))
        sent_s = time.monotonic() - started
        answered = asyncio.run(datagrams_within(flooders, ANSWER_WINDOW_S))
        # the site's burst, and its rate (8/s) for as long as an answer could come: 24 at
        # most, where each /64's own burst came to 48
        assert 0 < answered <= site_burst + SHARE * (sent_s + ANSWER_WINDOW_S), answered
        dropped = sample_value(scrape(node), rejected, reason="datagram_site_rate") - before
        assert dropped >= len(flooders) * DATAGRAM_BURST - answered, dropped
        other.sendto(_find_node(rng), (NODE_IP, UDP_PORT))
        assert asyncio.run(datagrams_within([other], 2.0)) == 1  # another /48: answered
    finally:
        for sock in [*flooders, other]:
            sock.close()
