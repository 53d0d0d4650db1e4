"""The direct path beside store-and-forward, same run (docs/nat.md).

Two in-process peers on a local testnet (3 bootstrap + 6 storage processes); the peers'
ICE runs on a veth pair ``d-bench0``/``d-bench1`` (10.77.9.1) made for the run, since
aioice gathers no host candidate on loopback: run it as root inside a network namespace,
``ip netns exec NS uv run --locked python -m bench.direct_path``. Figures (latency, p50
and p99 in ms, BENCH.md lines): the first direct message (presence lookup, ICE,
handshake, ACK), then direct send -> stored in the recipient's cache -> ACK over the
link, against store-and-forward put -> the recipient's next sync (the baseline).
``--firsts N`` times N first messages (each a fresh dial to the listener the recipient
published after the previous call); ``--ipv6`` gives the veth an IPv6 address as well
(fd77:9::1/64): a dual-stack pair, twice the ICE pairs. ``--ice-only N`` (no testnet;
implies ``--ipv6``) times N ICE connections alone, a caller's gather and checks against
a published listener, IPv4 host candidates only against both families, interleaved."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dna_peer.direct.link import IceConfig, Listener, answer, dial
from dna_peer.peer import DIRECT, Peer
from dna_testnet.harness import LOOPBACK
from dna_testnet.network import Testnet

from bench.harness import (
    arg_parser,
    detail,
    n_from,
    percentile,
    print_machine,
    report,
    run_main,
    scratch_dir,
)

VETH, VETH_PEER, ADDRESS, ADDRESS6 = "d-bench0", "d-bench1", "10.77.9.1/24", "fd77:9::1/64"


@contextmanager
def veth(ipv6: bool = False) -> Iterator[None]:
    subprocess.run(["ip", "link", "del", VETH], capture_output=True, check=False)
    subprocess.run(["ip", "link", "add", VETH, "type", "veth", "peer", "name", VETH_PEER],
                   check=True)  # fmt: skip
    try:
        subprocess.run(["ip", "addr", "add", ADDRESS, "dev", VETH], check=True)
        if ipv6:  # nodad: usable at once, not "tentative" for a second
            subprocess.run(["ip", "-6", "addr", "add", ADDRESS6, "dev", VETH, "nodad"], check=True)
        for end in (VETH, VETH_PEER):
            subprocess.run(["ip", "link", "set", end, "up"], check=True)
        yield
    finally:
        subprocess.run(["ip", "link", "del", VETH], check=False)


async def friends(root: Path, net: Testnet) -> tuple[Peer, Peer]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from peers import People

    people = People(root, net.seeds)
    alice, bob = await people.new("alice"), await people.new("bob")
    await alice.add_contact(people.name("bob"))
    await bob.add_contact(people.name("alice"))
    return alice, bob


async def timed_sends(alice: Peer, bob: Peer, n: int, *, direct: bool) -> list[float]:
    contact = alice.find_contact(bob.fingerprint.hex()[:16])
    samples = []
    for i in range(n):
        started = time.perf_counter()
        sent = await alice.send(contact, f"message {i}")
        if direct:
            assert sent.path == DIRECT, "the direct path went away mid-run"
        else:
            while sent.message_id not in {m.message_id for m in (await bob.sync()).new_messages}:
                pass
        samples.append((time.perf_counter() - started) * 1000)
    return sorted(samples)


async def first_messages(alice: Peer, bob: Peer, count: int) -> tuple[list[float], set[str]]:
    """``count`` first messages, each over a fresh dial: alice closes the link, then waits
    until she sees the listener bob published after the call (off the clock)."""
    assert alice.direct is not None and bob.direct is not None
    contact = alice.find_contact(bob.fingerprint.hex()[:16])
    samples: list[float] = []
    routes = set()  # the IP versions the pairs ran on
    for _ in range(count):
        assert bob.direct.listener is not None
        used = bob.direct.listener.agent.local_username
        samples += await timed_sends(alice, bob, 1, direct=True)
        link = alice.direct.links.pop(bob.fingerprint, None)
        if link is not None and hasattr(link, "route_ip"):  # (absent before IPv6)
            routes.add(link.route_ip())
        if link is not None:
            await link.close()
        while True:
            presence = await alice.presence_of(contact)
            if (
                presence is not None
                and presence.reach is not None
                and presence.reach.ufrag not in (used, None)
            ):
                break
            await asyncio.sleep(0.05)
    return sorted(samples), routes


class _IPv4Only(IceConfig):
    def host_addresses(self) -> list[str]:
        return [a for a in super().host_addresses() if ":" not in a]


async def ice_connect_ms(config: IceConfig) -> tuple[float, str]:
    """One caller's gather and ICE against a fresh listener: (ms, the pair's IP version)."""
    called = asyncio.Event()
    listener = Listener(config, lambda _: called.set())
    await listener.gather()
    started = time.perf_counter()
    agent = listener.agent
    caller = asyncio.ensure_future(
        dial(config, agent.local_username, agent.local_password, listener.caller_ufrag,
             listener.caller_pwd, listener.candidates(), timeout=4)
    )  # fmt: skip
    await called.wait()
    answering = asyncio.ensure_future(answer(agent, timeout=4))
    connected = await caller
    elapsed = (time.perf_counter() - started) * 1000
    await answering
    pair = connected._nominated[1]  # aioice keeps the selected pair private
    version = f"IPv{ipaddress.ip_address(pair.remote_candidate.host).version}"
    await connected.close()
    await listener.close()
    return elapsed, version


async def ice_only(n: int) -> None:
    samples: dict[str, list[float]] = {"ipv4_only": [], "dual_stack": []}
    versions: dict[str, set[str]] = {"ipv4_only": set(), "dual_stack": set()}
    for _ in range(n):
        for name, config in (("ipv4_only", _IPv4Only()), ("dual_stack", IceConfig())):
            ms, version = await ice_connect_ms(config)
            samples[name].append(ms)
            versions[name].add(version)
    for name, values in samples.items():
        values.sort()
        detail({"ice_connect_ms": name, "n": n, "p50": round(percentile(values, 0.5), 2),
                "p90": round(percentile(values, 0.9), 2),
                "route_ip": sorted(versions[name])})  # fmt: skip


async def bench() -> int:
    parser = arg_parser(__doc__ or "")
    parser.add_argument("--firsts", type=int, default=1, help="first messages timed")
    parser.add_argument("--ipv6", action="store_true", help="a dual-stack pair")
    parser.add_argument("--ice-only", type=int, default=0, help="ICE connections timed alone")
    args = parser.parse_args()
    n = n_from(args, default=50, quick=5)
    print_machine()
    if args.ice_only:
        with veth(ipv6=True):
            await ice_only(args.ice_only)
        return 0
    with scratch_dir("direct") as root, veth(args.ipv6):
        net = Testnet(root / "net", addresses=LOOPBACK.take(9))
        try:
            net.up()
            alice, bob = await friends(root, net)
            await bob.go_direct(IceConfig(), listen=True)
            await alice.go_direct(IceConfig(), listen=False)
            first, routes = await first_messages(alice, bob, args.firsts)
            detail({"first_direct_message_ms": [round(f, 1) for f in first],
                    "p50": round(percentile(first, 0.5), 1), "ipv6": args.ipv6,
                    "route_ip": sorted(routes)})  # fmt: skip
            direct = await timed_sends(alice, bob, n, direct=True)
            alice.direct = None  # the mailbox only, from here
            stored = await timed_sends(alice, bob, n, direct=False)
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                report(f"direct_path.send_to_stored.{name}", "ms", percentile(direct, q),
                       {"store_and_forward": percentile(stored, q)}, n,
                       {"mode": "seq"}, kind="latency")  # fmt: skip
            await alice.close()
            await bob.close()
        finally:
            net.down()
    return 0


if __name__ == "__main__":
    sys.exit(run_main("direct_path", bench, watchdog_s=600))
