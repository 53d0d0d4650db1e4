"""The NAT matrix: real peers (the `dna` CLI) in their own network namespaces, behind NAT
routers built with iptables, against a testnet (bootstrap, storage, our dna-stun for STUN
and TURN) in a "public" namespace.

Topology (made once for the module, every name prefixed ``n-``, removed at the end):

* ``n-pub`` holds the bridge ``n-br`` (198.51.100.0/24, the "internet") and the testnet's
  processes on its addresses; this (pytest's) namespace joins the bridge as
  198.51.100.254 to make identities and read mailboxes in-process;
* a public peer: a namespace on the bridge (198.51.100.2x);
* a peer behind a NAT: ``n-<peer>`` on 10.88.k.2/24 behind a router namespace
  ``n-r<peer>`` (LAN 10.88.k.1, WAN 198.51.100.3k) that masquerades: plain MASQUERADE
  keeps the source port (endpoint-independent mapping, "cone"; conntrack still filters
  unsolicited inbound packets), ``--random-fully`` draws a new port per destination
  ("symmetric").

In every cell bob runs `dna watch` (online: presence published) and alice `dna send`;
the test asserts the path (`direct` with the candidate pair, or `stored`), that bob's
watcher printed the message exactly once, and that no copy is left in his mailbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dna_stun.auth import auth_secret_password
from dna_testnet.network import UDP_PORT, LocalNode, wait_ready
from dna_testnet.topology import STUN_PORT, TESTNET_ADMISSION, TESTNET_TURN_SECRET, stun_toml
from peers import PASSPHRASE, People
from process_mark import starts_processes
from support import BIN, lines, wait_for

pytestmark = pytest.mark.process
PUBLIC_NS, BRIDGE, HUB = "n-pub", "n-br", "198.51.100.1"
HERE, HERE_LINK = "198.51.100.254", "n-h0"  # this namespace's leg on the bridge
BOOT, STORAGE, STUN = (
    "198.51.100.2",
    ["198.51.100.3", "198.51.100.4", "198.51.100.5"],
    "198.51.100.9",
)
SEEDS = f"{BOOT}:{UDP_PORT}"
PREFIX6 = "2001:db8:100::"  # the bridge's IPv6 network (/64): public peers are dual-stack
STUN6 = f"{PREFIX6}9"  # dna-stun listens on both families


@dataclass(frozen=True)
class Site:
    """Where a peer sits: on the bridge, or behind a NAT router of a kind."""

    name: str  # the peer's namespace
    nat: str | None  # None, "cone" or "symmetric"
    index: int
    # Public peers only: its IPv4 address reaches the testnet's addresses alone (no IPv4
    # route to any other peer), so between two such peers only IPv6 goes.
    ipv6_only_between_peers: bool = False
    nat6: bool = False  # behind a NAT: its router masquerades IPv6 too (NAT66, a ULA LAN)
    # With ipv6_only_between_peers: not even dna-stun over IPv4 (STUN and TURN over IPv6).
    stun_over_ipv6: bool = False

    @property
    def router(self) -> str:
        return f"n-r{self.name[2:]}"

    @property
    def public_ip(self) -> str:
        return f"198.51.100.{(20 if self.nat is None else 30) + self.index}"

    @property
    def public_ip6(self) -> str:
        return f"{PREFIX6}{(20 if self.nat is None else 30) + self.index}"


SITES = {
    "pub1": Site("n-pub1", None, 1),
    "pub2": Site("n-pub2", None, 2),
    "cone1": Site("n-cone1", "cone", 3),
    "cone2": Site("n-cone2", "cone", 4),
    "sym1": Site("n-sym1", "symmetric", 5),
    "sym2": Site("n-sym2", "symmetric", 6),
    "v6a": Site("n-v6a", None, 7, ipv6_only_between_peers=True),
    "v6b": Site("n-v6b", None, 8, ipv6_only_between_peers=True),
    "cone66": Site("n-c66", "cone", 9, nat6=True),
    "v6c": Site("n-v6c", None, 10, ipv6_only_between_peers=True, stun_over_ipv6=True),
    "v6d": Site("n-v6d", None, 11, ipv6_only_between_peers=True, stun_over_ipv6=True),
}
# Every UDP datagram but the overlay's own (a peer must reach the network to be a peer):
# no STUN, no TURN, no packet between the peers. (One rule with both ports negated
# drops the overlay's datagrams too with this kernel's iptables: three rules.)
BLOCK_UDP = [
    ["FORWARD", "-p", "udp", "--dport", str(UDP_PORT), "-j", "ACCEPT"],
    ["FORWARD", "-p", "udp", "--sport", str(UDP_PORT), "-j", "ACCEPT"],
    ["FORWARD", "-p", "udp", "-j", "DROP"],
]


def sh(*args: str, ns: str | None = None) -> None:
    argv = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def _veth(a: str, a_ns: str | None, b: str, b_ns: str) -> None:
    """A veth pair ``a`` (in ``a_ns``, None: here) and ``b`` (in ``b_ns``)."""
    sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
    sh("ip", "link", "set", b, "netns", b_ns)
    if a_ns is not None:
        sh("ip", "link", "set", a, "netns", a_ns)


def _up(ns: str | None, link: str, cidr: str | None = None) -> None:
    if cidr is not None:
        sh("ip", "addr", "add", cidr, "dev", link, ns=ns)
    sh("ip", "link", "set", link, "up", ns=ns)


def _on_bridge(ns: str | None, link: str, cidr: str) -> None:
    """A leg from ``ns`` onto the bridge, addressed ``cidr``."""
    bridge_end = f"{link}b"
    _veth(link, ns, bridge_end, PUBLIC_NS)
    sh("ip", "link", "set", bridge_end, "master", BRIDGE, ns=PUBLIC_NS)
    _up(PUBLIC_NS, bridge_end)
    _up(ns, link, cidr)


def _build_site(site: Site) -> None:
    sh("ip", "netns", "add", site.name)
    _up(site.name, "lo")
    short = site.name[2:]
    if site.nat is None:
        link = f"n-{short}"
        mask = 32 if site.ipv6_only_between_peers else 24
        _on_bridge(site.name, link, f"{site.public_ip}/{mask}")
        # nodad: usable at once (duplicate detection would hold it "tentative" ~1 s)
        sh("ip", "-6", "addr", "add", f"{site.public_ip6}/64", "dev", link, "nodad", ns=site.name)
        if site.ipv6_only_between_peers:
            for ip in [BOOT, *STORAGE, HERE, *([] if site.stun_over_ipv6 else [STUN])]:
                sh("ip", "route", "add", f"{ip}/32", "dev", link, ns=site.name)
        return
    sh("ip", "netns", "add", site.router)
    _up(site.router, "lo")
    wan, lan, inside = f"n-w{short}", f"n-l{short}", f"n-i{short}"
    _on_bridge(site.router, wan, f"{site.public_ip}/24")
    _veth(lan, site.router, inside, site.name)
    _up(site.router, lan, f"10.88.{site.index}.1/24")
    _up(site.name, inside, f"10.88.{site.index}.2/24")
    sh("ip", "route", "add", "default", "via", f"10.88.{site.index}.1", ns=site.name)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=site.router)
    masquerade = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE"]
    if site.nat == "symmetric":
        masquerade.append("--random-fully")
    sh(*masquerade, ns=site.router)
    # Like a home router, it answers nothing on its WAN side: an unsolicited packet is
    # dropped before conntrack keeps it, so it cannot claim the mapping a hole punch
    # toward its sender is about to use.
    sh("iptables", "-A", "INPUT", "-i", wan, "-j", "DROP", ns=site.router)
    if site.nat6:
        _nat66(site, wan, lan, inside)


def _nat66(site: Site, wan: str, lan: str, inside: str) -> None:
    """The same router for IPv6: a ULA LAN masqueraded to its WAN address (NAT66, as some
    home and mobile routers do), filtering like the IPv4 side."""
    lan6 = f"fd00:88:{site.index}::"
    for ns, link, cidr in (
        (site.router, wan, f"{site.public_ip6}/64"),
        (site.router, lan, f"{lan6}1/64"),
        (site.name, inside, f"{lan6}2/64"),
    ):
        sh("ip", "-6", "addr", "add", cidr, "dev", link, "nodad", ns=ns)  # fmt: skip
    sh("ip", "-6", "route", "add", "default", "via", f"{lan6}1", ns=site.name)
    sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=site.router)
    sh("ip6tables", "-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE", ns=site.router)
    for ndp in ("neighbour-solicitation", "neighbour-advertisement"):  # IPv6's ARP
        sh("ip6tables", "-A", "INPUT", "-i", wan, "-p", "ipv6-icmp", "--icmpv6-type", ndp,
           "-j", "ACCEPT", ns=site.router)  # fmt: skip
    sh("ip6tables", "-A", "INPUT", "-i", wan, "-j", "DROP", ns=site.router)


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith("n-")]


def _teardown() -> None:
    with contextlib.suppress(RuntimeError):
        sh("ip", "link", "del", HERE_LINK)
    for ns in _namespaces():
        with contextlib.suppress(RuntimeError):
            sh("ip", "netns", "del", ns)


@pytest.fixture(scope="module")
@starts_processes
def nat_net() -> Iterator[dict[str, Site]]:
    _teardown()  # a crashed run's
    try:
        sh("ip", "netns", "add", PUBLIC_NS)
        _up(PUBLIC_NS, "lo")
        sh("ip", "link", "add", BRIDGE, "type", "bridge", ns=PUBLIC_NS)
        _up(PUBLIC_NS, BRIDGE, f"{HUB}/24")
        sh("ip", "-6", "addr", "add", f"{PREFIX6}1/64", "dev", BRIDGE, "nodad", ns=PUBLIC_NS)
        for ip in [BOOT, *STORAGE, STUN]:
            sh("ip", "addr", "add", f"{ip}/24", "dev", BRIDGE, ns=PUBLIC_NS)
        sh("ip", "-6", "addr", "add", f"{STUN6}/64", "dev", BRIDGE, "nodad", ns=PUBLIC_NS)
        _on_bridge(None, HERE_LINK, f"{HERE}/24")
        for site in SITES.values():
            _build_site(site)
        yield SITES
    finally:
        _teardown()


class PublicNode(LocalNode):
    """A testnet process started inside the public namespace."""

    def write_config(self) -> None:
        if self.role == "stun":  # peers and relays are on the "internet" (a test network)
            # Both families, a socket each (the bridge holds many addresses: a wildcard
            # socket would answer from whichever the kernel picks); relays of either.
            extra = f'host_ipv6 = "{STUN6}"\nrelay_host_ipv6 = "{STUN6}"\n'
            text = stun_toml(self.ip, http_host=self.ip, server_toml=extra,
                             allowed_peers=["198.51.100.0/24", f"{PREFIX6}/64"])  # fmt: skip
            self.config_path.write_text(text)
            return
        super().write_config()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", PUBLIC_NS, str(BIN / self.command), "run",
                 "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("DNA_")},
            )  # fmt: skip


@pytest.fixture(scope="module")
@starts_processes
def public_testnet(
    nat_net: dict[str, Site], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[tuple[str, int]]]:
    root = tmp_path_factory.mktemp("nat-testnet")
    nodes: list[LocalNode] = [PublicNode("boot", BOOT, root, [SEEDS])]
    nodes += [PublicNode(f"store{i}", ip, root, [SEEDS], command="dna-storage-node",
                         extra_toml=TESTNET_ADMISSION) for i, ip in enumerate(STORAGE)]  # fmt: skip
    nodes.append(PublicNode("stun", STUN, root, [], command="dna-stun"))
    try:
        for node in nodes:
            node.start()
        wait_ready(nodes, 90)
        yield [(BOOT, UDP_PORT)]
    finally:
        for node in nodes:
            if node.alive():
                node.terminate()


def ice_env(site: Site) -> dict[str, str]:
    """Our dna-stun for STUN and TURN, with a time-limited username (use-auth-secret);
    at its IPv6 address only for a site that does not reach it over IPv4."""
    user = f"{int(time.time()) + 3600}:nat-matrix"
    stun4, stun6 = f"{STUN}:{STUN_PORT}", f"[{STUN6}]:{STUN_PORT}"
    return {"DNA_STUN": stun6 if site.stun_over_ipv6 else f"{stun4},{stun6}",
            "DNA_TURN": stun6 if site.stun_over_ipv6 else stun4,
            "DNA_TURN_USER": user,
            "DNA_TURN_PASSWORD": auth_secret_password(TESTNET_TURN_SECRET, user)}  # fmt: skip


def dna(site: Site, home: Path, *args: str) -> list[str]:
    return ["ip", "netns", "exec", site.name, str(BIN / "dna"), "--home", str(home), "--json",
            "--bootstrap", SEEDS, *args]  # fmt: skip


def _env(site: Site) -> dict[str, str]:
    return {"DNA_PASSPHRASE": PASSPHRASE, "PATH": os.environ["PATH"], **ice_env(site)}


@dataclass(frozen=True)
class Cell:
    alice: str  # the caller's site
    bob: str  # the listener's (online) site
    path: str  # "direct" or "stored"
    routes: tuple[str, ...] = ()  # candidate pairs (alice's side -> bob's) that are right
    block_udp: bool = False
    route_ip: str = "IPv4"  # the IP version of the pair, for the direct path
    bob_srflx6: bool = False  # bob must publish an IPv6 server-reflexive candidate
    block_ipv6: bool = False  # no IPv6 between the two peers either: only their relays


CELLS = {
    # Both dual-stack: IPv6 is checked first (RFC 8421) and wins.
    "public-public": Cell("pub1", "pub2", "direct", ("host->host",), route_ip="IPv6"),
    # No IPv4 route between them: their IPv4 host pair fails, the IPv6 one connects.
    "ipv6-only": Cell("v6a", "v6b", "direct", ("host->host",), route_ip="IPv6"),
    # Bob behind NAT66 (and NAT44): his IPv6 reflexive address comes from dna-stun over
    # IPv6; alice, with no IPv4 route to his router, reaches him through it.
    "ipv6-nat66": Cell(
        "v6a", "cone66", "direct", ("host->srflx", "host->prflx"), route_ip="IPv6", bob_srflx6=True
    ),
    # Neither peer reaches the other, nor dna-stun over IPv4: they relay through it,
    # reached over IPv6, between its IPv4 relayed addresses (aioice asks no IPv6 relay).
    "turn-over-ipv6": Cell(
        "v6c", "v6d", "direct", ("relay->relay", "relay->prflx"), block_ipv6=True
    ),
    # Alice has IPv4 only (behind her NAT), bob both: IPv4.
    "cone-public": Cell("cone1", "pub1", "direct", ("host->host",)),
    "cone-cone": Cell("cone1", "cone2", "direct", ("host->srflx", "host->prflx")),
    "symmetric-symmetric": Cell(
        "sym1", "sym2", "direct", ("relay->relay", "relay->prflx", "host->relay")
    ),
    "udp-blocked": Cell("cone1", "cone2", "stored", block_udp=True),
}


@contextlib.contextmanager
def _udp_blocked(cell: Cell) -> Iterator[None]:
    routers = [SITES[who].router for who in (cell.alice, cell.bob)] if cell.block_udp else []
    sites = [SITES[cell.alice], SITES[cell.bob]]
    # Each peer drops what it would send to the other's IPv6 address.
    ipv6 = [(a.name, b.public_ip6) for a, b in (sites, sites[::-1])] if cell.block_ipv6 else []
    for router in routers:
        for rule in BLOCK_UDP:
            sh("iptables", "-A", *rule, ns=router)
    for ns, other in ipv6:
        sh("ip6tables", "-A", "OUTPUT", "-d", other, "-j", "DROP", ns=ns)
    try:
        yield
    finally:
        for router in routers:
            for rule in BLOCK_UDP:
                sh("iptables", "-D", *rule, ns=router)
        for ns, other in ipv6:
            sh("ip6tables", "-D", "OUTPUT", "-d", other, "-j", "DROP", ns=ns)


async def _friends(people: People) -> None:
    alice, bob = await people.new("alice"), await people.new("bob")
    await alice.add_contact(people.name("bob"))
    await bob.add_contact(people.name("alice"))
    await alice.close()
    await bob.close()


@pytest.mark.parametrize("name", list(CELLS))
def test_one_message_exactly_once_on_the_expected_path(
    name: str, public_testnet: list[tuple[str, int]], tmp_path: Path
) -> None:
    cell = CELLS[name]
    people = People(tmp_path, public_testnet)
    asyncio.run(_friends(people))
    bob = people.profile("bob").home
    with _udp_blocked(cell):
        watcher = subprocess.Popen(
            dna(SITES[cell.bob], bob, "watch", "--interval", "0.5"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(SITES[cell.bob]),
        )  # fmt: skip
        assert watcher.stderr is not None
        lines(watcher.stderr)  # drained: a full pipe would block the watch
        try:
            sent = _send_when_online(cell, people, watcher)
            print(f"{name}: {sent['path']} {sent.get('route', '')} {sent.get('route_ip', '')}")
            assert sent["path"] == cell.path, sent
            if cell.path == "direct":
                assert sent["replicas"] == 0 and sent["route"] in cell.routes, sent
                assert sent["route_ip"] == cell.route_ip, sent
            assert watcher.stdout is not None
            out, seen = lines(watcher.stdout), list[str]()
            wait_for(out, sent["message_id"], 20, seen)
            time.sleep(1.5)  # a mailbox copy, were there one, shows within three polls
        finally:
            watcher.send_signal(signal.SIGINT)
            assert watcher.wait(30) == 0
    shown = [json.loads(line) for line in seen + _drain(out) if line.startswith("{")]
    assert [m["message_id"] for m in shown if not m["outgoing"]] == [sent["message_id"]]
    report = asyncio.run(_sync(people))
    assert report == ([], []), "a copy was left in bob's mailbox"


def _drain(found: queue.Queue[str]) -> list[str]:
    """What the watcher printed after the lines already seen, up to its end."""
    rest = []
    with contextlib.suppress(queue.Empty):
        while True:
            rest.append(found.get(timeout=2))
    return rest


def _send_when_online(cell: Cell, people: People, watcher: subprocess.Popen[str]) -> Any:
    """`dna send` from alice's site once bob's presence record is up (looked up from here,
    in-process: a CLI start-up per poll would cost seconds)."""
    deadline = time.monotonic() + 30
    while not (candidates := asyncio.run(_bob_online(people))):
        assert watcher.poll() is None, watcher.stderr.read() if watcher.stderr else ""
        assert time.monotonic() < deadline, "bob never showed up online"
        time.sleep(0.3)
    if cell.bob_srflx6:
        reflexive6 = [c for c in candidates if c.split()[7] == "srflx" and ":" in c.split()[4]]
        assert reflexive6, candidates
    return _cli(SITES[cell.alice], people.profile("alice").home, "send", people.name("bob"),
                f"hello through {cell}")  # fmt: skip


async def _bob_online(people: People) -> tuple[str, ...]:
    """Bob's published candidates (empty: not online yet)."""
    alice = await people.open("alice")
    try:
        presence = await alice.presence_of(alice.find_contact(people.name("bob")))
        return () if presence is None or presence.reach is None else presence.reach.candidates
    finally:
        await alice.close()


def _cli(site: Site, home: Path, *args: str) -> Any:
    done = subprocess.run(dna(site, home, *args), capture_output=True, text=True, env=_env(site),
                          check=False, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def _sync(people: People) -> tuple[list[bytes], list[str]]:
    bob = await people.open("bob")
    try:
        report = await bob.sync()
        return [m.message_id for m in report.new_messages], [r for _, r in report.rejected]
    finally:
        await bob.close()
