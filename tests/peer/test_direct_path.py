"""Presence and direct messaging between real peers: a real local testnet (bootstrap and
storage processes), real UDP sockets, real ICE (aioice), Debian's coturn for TURN.

aioice skips loopback when it gathers host candidates, so the peers' ICE runs on a veth
pair ``d-ice0``/``d-ice1`` (10.77.1.1 and 10.77.2.1) made in this network namespace for
the module; coturn listens on 10.77.2.1. Blocking the direct path is an iptables DROP
on 10.77.0.0/16 in this namespace, removed after the test (the overlay and the mailboxes
stay on 127.0.0.x, untouched). Run it as root inside a network namespace (HELPERS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import free_ips
from dna_core.crypto import seal
from dna_core.crypto.envelope import decode_envelope
from dna_core.errors import DnaError
from dna_core.wire import envelope_pb2
from dna_peer.direct import service as direct_service
from dna_peer.direct.link import IceConfig
from dna_peer.direct.link import dial as real_dial
from dna_peer.keyserver import now_ms
from dna_peer.link import accept_link, offer_link
from dna_peer.peer import DIRECT, STORED, Peer
from dna_testnet.network import Testnet
from peers import PASSPHRASE, People
from process_mark import starts_processes
from stun_node import StunNode, stun_node
from support import BIN, SETTLE_S, lines, run_script, until_async, wait_for

ICE_HOST, TURN_HOST, TURN_PORT = "10.77.1.1", "10.77.2.1", 3478
# Only the pair's addresses: the machine's own interfaces (eth0, docker0) would give ICE a
# path the DROP rules below do not block.
ICE_NETWORKS = ("10.77.0.0/16",)
IFACE, PEER_END = "d-ice0", "d-ice1"
DROP_DIRECT = ["OUTPUT", "-p", "udp", "-d", "10.77.0.0/16", "-j", "DROP"]
# Everything but coturn's traffic (its port, and its relay ports below the kernel's
# ephemeral range, which the peers' sockets draw from): no host or reflexive pair works.
RELAY_PORTS = (20000, 20100)
TURN_PORTS = f"{TURN_PORT},{RELAY_PORTS[0]}:{RELAY_PORTS[1]}"
DROP_ALL_BUT_TURN = ["OUTPUT", "-p", "udp", "-d", "10.77.0.0/16", "-m", "multiport", "!",
                     "--ports", TURN_PORTS, "-j", "DROP"]  # fmt: skip
TURN_USER, TURN_PASSWORD = "u", "p"
ENV = {"DNA_PASSPHRASE": PASSPHRASE}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
@starts_processes
def ice_interface() -> Iterator[str]:
    subprocess.run(
        ["ip", "link", "del", IFACE], capture_output=True, check=False
    )  # a crashed run's
    _ip("link", "add", IFACE, "type", "veth", "peer", "name", PEER_END)
    try:
        _ip("addr", "add", f"{ICE_HOST}/24", "dev", IFACE)
        _ip("addr", "add", f"{TURN_HOST}/24", "dev", PEER_END)
        _ip("link", "set", IFACE, "up")
        _ip("link", "set", PEER_END, "up")
        yield ICE_HOST
    finally:
        _ip("link", "del", IFACE)


@contextlib.contextmanager
def _iptables(rule: list[str]) -> Iterator[None]:
    subprocess.run(["iptables", "-A", *rule], check=True)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True)


@pytest.fixture
@starts_processes
def udp_blocked(ice_interface: str) -> Iterator[None]:
    with _iptables(DROP_DIRECT):
        yield


@pytest.fixture
@starts_processes
def host_pairs_blocked(ice_interface: str) -> Iterator[None]:
    with _iptables(DROP_ALL_BUT_TURN):
        yield


@pytest.fixture(scope="module")
@starts_processes
def coturn(ice_interface: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IceConfig]:
    turnserver = shutil.which("turnserver")
    assert turnserver, "coturn is not installed (scripts/bootstrap.sh installs it)"
    log = tmp_path_factory.mktemp("coturn") / "turn.log"
    proc = subprocess.Popen(
        [turnserver, "-n", f"--listening-ip={TURN_HOST}", f"--relay-ip={TURN_HOST}",
         f"--listening-port={TURN_PORT}", "--lt-cred-mech", f"--user={TURN_USER}:{TURN_PASSWORD}",
         "--realm=test", "--no-tls", "--no-dtls", "--allow-loopback-peers", "--no-cli",
         f"--log-file={log}", "--simple-log", f"--min-port={RELAY_PORTS[0]}",
         f"--max-port={RELAY_PORTS[1]}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_udp_listening(TURN_HOST, TURN_PORT)
        yield IceConfig(turn=(TURN_HOST, TURN_PORT), turn_username=TURN_USER,
                        turn_password=TURN_PASSWORD, host_networks=ICE_NETWORKS)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_udp_listening(host: str, port: int) -> None:
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        out = subprocess.run(["ss", "-Hlun", f"src {host}:{port}"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        if out.stdout.strip():
            return
        time.sleep(0.1)
    raise AssertionError(f"coturn did not listen on {host}:{port}")


async def _friends(people: People) -> tuple[Peer, Peer]:
    """alice and bob, each pinned by the other (bob seals his presence to alice)."""
    alice, bob = await people.new("alice"), await people.new("bob")
    await alice.add_contact(people.name("bob"))
    await bob.add_contact(people.name("alice"))
    return alice, bob


def _held(peer: Peer, message_id: bytes) -> int:
    return sum(1 for m in peer.cache.messages(limit=-1) if m.message_id == message_id)


def run(testnet: Testnet, tmp_path: Path, scenario: object) -> None:
    asyncio.run(scenario(People(tmp_path, testnet.seeds)))  # type: ignore[operator]


def test_a_new_address_is_published_and_reached_at_the_next_refresh(
    testnet: Testnet, ice_interface: str, tmp_path: Path
) -> None:
    """A device that changes networks while online: the refresh gathers a listener on its
    new addresses before signing the record again, and contacts reach it there."""
    moved = "10.77.3.1"

    async def scenario(people: People) -> None:
        alice, bob = await _friends(people)
        direct = await bob.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=True)
        await alice.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=False)
        contact = alice.find_contact(people.name("bob"))
        before = direct.listener
        assert before is not None and ICE_HOST in before.addresses
        assert moved not in before.addresses
        _ip("addr", "add", f"{moved}/24", "dev", PEER_END)
        try:
            direct.republish()
            deadline = time.monotonic() + SETTLE_S
            while not any(moved in c for c in await _published(alice, contact)):
                assert time.monotonic() < deadline, "the new address was never published"
                await asyncio.sleep(0.1)
            assert direct.listener is not before and before.agent._protocols == []  # closed
            sent = await alice.send(contact, "to where bob is now")
            assert sent.path == DIRECT and _held(bob, sent.message_id) == 1
        finally:
            _ip("addr", "del", f"{moved}/24", "dev", PEER_END)
        await alice.close()
        await bob.close()

    run(testnet, tmp_path, scenario)


def _restarted(relay: StunNode) -> StunNode:
    """The relay SIGKILLed and started again from its file, on the same ports: every
    allocation it held is gone."""
    relay.proc.kill()
    relay.proc.wait(10)
    config = relay.log.parent / "stun.toml"
    with relay.log.open("ab") as out:
        proc = subprocess.Popen(
            [str(BIN / "dna-stun"), "run", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    deadline = time.monotonic() + SETTLE_S
    while not _answers(relay):  # the old process is gone: the new one answers
        assert proc.poll() is None and time.monotonic() < deadline, relay.log.read_text()
        time.sleep(0.1)
    return StunNode(proc, relay.udp, relay.http, relay.log)


def _answers(relay: StunNode) -> bool:
    try:
        return httpx.get(f"{relay.http}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_relay_that_restarts_is_published_anew_at_the_next_refresh(
    testnet: Testnet, tmp_path: Path
) -> None:
    """A device online through a TURN relay (the local testnet's peers, relay-only) when
    the relay restarts: its allocation is gone. The refresh found the addresses unchanged
    and signed the record with the dead relayed candidate again, for as long as the device
    stayed online (a `dna watch` across a testnet restart: every contact's send failed ICE,
    then took the mailbox). Now the refresh finds the allocation lost, gathers a new one and
    publishes that, and contacts reach the device directly again."""
    (tmp_path / "relay").mkdir()
    with stun_node(tmp_path / "relay") as relay:

        async def scenario(people: People) -> None:
            alice, bob = await _friends(people)
            config = IceConfig(turn=relay.udp, turn_username="u", turn_password="p",
                               relay_only=True)  # fmt: skip
            direct = await bob.go_direct(config, listen=True)
            await alice.go_direct(config, listen=False)
            contact = alice.find_contact(people.name("bob"))
            assert (await alice.send(contact, "before")).path == DIRECT
            before = await _published(alice, contact)
            assert direct.listener is not None and not await direct.listener.relay_lost()
            restarted = _restarted(relay)
            try:
                direct.republish()
                deadline = time.monotonic() + SETTLE_S
                while (now := await _published(alice, contact)) in ((), before):
                    assert time.monotonic() < deadline, f"still published: {now}"
                    await asyncio.sleep(0.2)
                # alice's link from before runs through the lost allocations too: the
                # first send finds it dead and dials the new record (before, it took the
                # mailbox, and only the next send dialled)
                first = await alice.send(contact, "after the relay restarted")
                assert first.path == DIRECT and _held(bob, first.message_id) == 1
                sent = await alice.send(contact, "and again")
                assert sent.path == DIRECT and _held(bob, sent.message_id) == 1
            finally:
                await alice.close()
                await bob.close()
                restarted.proc.kill()
                restarted.proc.wait(10)

        run(testnet, tmp_path, scenario)


def test_a_watch_back_from_an_outage_republishes_its_presence_at_once(
    ice_interface: str, tmp_path: Path
) -> None:
    """A `watch` whose network went away and came back: its presence puts failed
    meanwhile, and the record stayed as it was (or expired) until the next refresh, up to
    a minute later. Now "network back" republishes at once (the refresh is set far off
    here, so only that can publish)."""
    net = Testnet(tmp_path / "net", bootstraps=1, storage=3, addresses=free_ips(4))
    net.up()
    try:

        async def scenario(people: People) -> None:
            alice, bob = await _friends(people)
            direct = await bob.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=True)
            direct.refresh_s = 3600.0
            contact = alice.find_contact(people.name("bob"))
            heard: list[tuple[str, int]] = []
            watch = asyncio.create_task(
                bob.watch(lambda report: None, interval=0.2,
                          on_network=lambda text: heard.append((text, now_ms())))
            )  # fmt: skip
            try:
                await asyncio.to_thread(net.down)
                await until_async(lambda: heard, "the watch saw the network go")
                await asyncio.to_thread(net.up)
                await alice.reconnect()
                back = await until_async(
                    lambda: [ms for text, ms in heard if text.startswith("network back")],
                    "the watch saw the network come back",
                )
                deadline = time.monotonic() + SETTLE_S  # the refresh is an hour off
                while (seen := await _last_seen(alice, contact)) < back[0]:
                    assert time.monotonic() < deadline, f"signed at {seen}, back at {back[0]}"
                    await asyncio.sleep(0.2)
                assert await _published(alice, contact)
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
                await alice.close()
                await bob.close()

        asyncio.run(scenario(People(tmp_path, net.seeds)))
    finally:
        net.down()


async def _last_seen(alice: Peer, contact: Any) -> int:
    """When the contact's presence record alice finds was signed (0: none, or no answer)."""
    try:
        presence = await alice.presence_of(contact)
    except DnaError:
        return 0
    return 0 if presence is None else presence.last_seen_ms


async def _published(alice: Peer, contact: Any) -> tuple[str, ...]:
    presence = await alice.presence_of(contact)
    return () if presence is None or presence.reach is None else presence.reach.candidates


def test_present_contact_gets_the_message_directly_exactly_once(
    testnet: Testnet, ice_interface: str, tmp_path: Path
) -> None:
    async def scenario(people: People) -> None:
        alice, bob = await _friends(people)
        await bob.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=True)
        await alice.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=False)
        contact = alice.find_contact(people.name("bob"))
        sent = await alice.send(contact, "hello over the direct path")
        assert sent.path == DIRECT and sent.stored_on == 0
        assert _held(bob, sent.message_id) == 1
        assert alice.cache.messages(contact.conversation)[-1].delivered  # the ACK
        again = await alice.send(contact, "and again, over the same link")
        assert again.path == DIRECT
        report = await bob.sync()  # nothing went through the mailbox
        assert report.new_messages == [] and _held(bob, sent.message_id) == 1
        bodies = [m.body for m in bob.cache.messages(limit=-1)]
        assert bodies == ["hello over the direct path", "and again, over the same link"]
        # nothing of them is on a replica to delete: the daily prune forgets their blob
        # rows (they were kept forever, and each clean-up that deletes every blob held
        # named them to the mailbox's replicas)
        assert bob.cache.undeleted_blobs() == []
        await alice.close()
        await bob.close()

    run(testnet, tmp_path, scenario)


def test_a_copy_that_also_reaches_the_mailbox_is_dropped_as_a_replay(
    testnet: Testnet, ice_interface: str, tmp_path: Path
) -> None:
    """The ACK of a direct delivery is lost, the sender resends it (on the link, or on a
    new link after a redial) and falls back to put the same envelope (one message ID) on
    the mailbox: the recipient keeps one copy, and the mailbox copy is refused as a replay,
    with the reason logged."""

    async def scenario(people: People) -> None:
        alice, bob = await _friends(people)
        await bob.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=True)
        direct = await alice.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=False)
        contact = alice.find_contact(people.name("bob"))
        payload = envelope_pb2.Payload(text=envelope_pb2.Text(body="twice?"))
        envelope = seal(alice.identity, bob.identity.public, payload.SerializeToString(),
                        now_ms=now_ms(), include_sender_keys=False)  # fmt: skip
        message_id = decode_envelope(envelope).message_id
        assert await direct.send(contact, message_id, envelope)
        assert await direct.send(contact, message_id, envelope)  # resent: acked, not re-held
        # a redial (the link taken for dead) is a new channel, without the old one's IDs:
        # the inbox knows the envelope, acknowledges it and holds it once still
        old = direct.links[contact.fingerprint]
        await direct._drop(contact.fingerprint, old)
        assert await direct.send(contact, message_id, envelope)
        assert direct.links[contact.fingerprint] is not old
        await alice._put(bob.fingerprint, envelope)  # the fallback after a lost ACK
        report = await bob.sync()
        assert report.new_messages == []
        assert [reason for _, reason in report.rejected] == [
            "envelope: message ID already received (replay)"
        ]
        assert _held(bob, message_id) == 1
        await alice.close()
        await bob.close()

    run(testnet, tmp_path, scenario)


def test_blocked_udp_falls_back_to_store_and_forward_exactly_once(
    testnet: Testnet, udp_blocked: None, tmp_path: Path
) -> None:
    async def scenario(people: People) -> None:
        alice, bob = await _friends(people)
        await bob.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=True)
        await alice.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=False)
        contact = alice.find_contact(people.name("bob"))
        sent = await alice.send(contact, "through the mailbox")
        assert sent.path == STORED and sent.stored_on >= 3
        assert _held(bob, sent.message_id) == 0
        report = await bob.sync()
        assert [m.message_id for m in report.new_messages] == [sent.message_id]
        assert _held(bob, sent.message_id) == 1
        await alice.close()
        await bob.close()

    run(testnet, tmp_path, scenario)


def test_a_contact_that_leaves_closes_the_link_and_the_next_message_is_stored(
    testnet: Testnet, ice_interface: str, tmp_path: Path
) -> None:
    """bob's device closes: its CLOSE ends alice's link at once, so her next message goes
    to his mailbox without first retransmitting over a dead link until its timeout."""

    async def scenario(people: People) -> None:
        alice, bob = await _friends(people)
        await bob.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=True)
        await alice.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=False)
        contact = alice.find_contact(people.name("bob"))
        assert (await alice.send(contact, "while you are here")).path == DIRECT
        assert alice.direct is not None and contact.fingerprint in alice.direct.links
        links = alice.direct.links
        link = links[contact.fingerprint]
        await bob.close()
        await until_async(lambda: contact.fingerprint not in links, "the link let go")
        assert link.closed_by_peer
        sent = await alice.send(contact, "after you left")
        assert sent.path == STORED and sent.stored_on >= 3
        await alice.close()

    run(testnet, tmp_path, scenario)


def test_offline_contact_is_reached_by_store_and_forward_without_trying_ice(
    testnet: Testnet, ice_interface: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dialled: list[object] = []

    async def dial(*args: Any, **kwargs: Any) -> Any:  # the real one, counted
        dialled.append(args)
        return await real_dial(*args, **kwargs)

    monkeypatch.setattr(direct_service, "dial", dial)

    async def scenario(people: People) -> None:
        alice, bob = await _friends(people)
        await bob.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=True)
        await bob.close()  # withdraws the presence record
        await alice.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=False)
        contact = alice.find_contact(people.name("bob"))
        sent = await alice.send(contact, "you were here a moment ago")
        assert sent.path == STORED
        # no ICE attempt against a withdrawn record (counted, not timed: a stored send
        # alone can take the 2 s this once allowed on a loaded machine)
        assert dialled == []
        await alice.close()

    run(testnet, tmp_path, scenario)


def test_relays_through_coturn_when_the_direct_pair_is_blocked(
    testnet: Testnet, coturn: IceConfig, host_pairs_blocked: None, tmp_path: Path
) -> None:
    async def scenario(people: People) -> None:
        alice, bob = await _friends(people)
        await bob.go_direct(
            IceConfig(host_networks=ICE_NETWORKS), listen=True
        )  # bob: host candidates only
        await alice.go_direct(coturn, listen=False)  # alice: host and a relayed candidate
        contact = alice.find_contact(people.name("bob"))
        sent = await alice.send(contact, "through the TURN relay")
        assert sent.path == DIRECT
        assert alice.direct is not None
        assert alice.direct.links[bob.fingerprint].route() == "relay->host"
        assert _held(bob, sent.message_id) == 1
        assert (await bob.sync()).new_messages == []
        await alice.close()
        await bob.close()

    run(testnet, tmp_path, scenario)


def test_relay_only_ends_publish_and_pair_only_relayed_candidates(
    testnet: Testnet, coturn: IceConfig, tmp_path: Path
) -> None:
    """Both ends relay-only (the local testnet's peers, where loopback gives no host
    candidate): bob's presence carries his relayed candidate alone, though his veth
    address would give a host one, and the pair is relay to relay through coturn."""

    async def scenario(people: People) -> None:
        alice, bob = await _friends(people)
        relay_only = dataclasses.replace(coturn, relay_only=True)
        await bob.go_direct(relay_only, listen=True)
        await alice.go_direct(relay_only, listen=False)
        contact = alice.find_contact(people.name("bob"))
        presence = await alice.presence_of(contact)
        assert presence is not None and presence.reach is not None
        kinds = [sdp.split()[7] for sdp in presence.reach.candidates]
        assert kinds == ["relay"], presence.reach.candidates
        sent = await alice.send(contact, "relay to relay")
        assert sent.path == DIRECT and _held(bob, sent.message_id) == 1
        assert alice.direct is not None
        assert alice.direct.links[bob.fingerprint].route() == "relay->relay"
        await alice.close()
        await bob.close()

    run(testnet, tmp_path, scenario)


def test_a_direct_channel_from_an_unpinned_key_is_refused(
    testnet: Testnet, ice_interface: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """carol had bob's presence sealed to her; bob then forgot her: her ICE may connect,
    her HELLO is refused with the reason logged, and her message goes to the mailbox."""

    async def scenario(people: People) -> None:
        bob, carol = await people.new("bob"), await people.new("carol")
        await carol.add_contact(people.name("bob"))
        await bob.add_contact(people.name("carol"))
        await bob.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=True)  # sealed to carol
        assert bob.cache.forget_contact(carol.fingerprint)
        await carol.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=False)
        sent = await carol.send(carol.find_contact(people.name("bob")), "let me in")
        assert sent.path == STORED
        assert "HELLO from unpinned key" in caplog.text
        assert _held(bob, sent.message_id) == 0  # nothing reached bob over the channel
        assert [m.message_id for m in (await bob.sync()).new_messages] == [sent.message_id]
        await carol.close()
        await bob.close()

    run(testnet, tmp_path, scenario)


def test_a_second_device_converges_on_a_directly_delivered_message(
    testnet: Testnet, ice_interface: str, tmp_path: Path
) -> None:
    async def scenario(people: People) -> None:
        alice, bob = await _friends(people)
        offer = await offer_link(bob, "laptop")
        laptop = await accept_link(people.profile("laptop"), offer.code, PASSPHRASE,
                                   people.seeds)  # fmt: skip
        await laptop.sync()
        await bob.sync()  # bob learns of the laptop (its hello)
        await bob.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=True)
        await alice.go_direct(IceConfig(host_networks=ICE_NETWORKS), listen=False)
        sent = await alice.send(alice.find_contact(people.name("bob")), "to all of you")
        assert sent.path == DIRECT
        await bob.close()  # waits for the mirror (a sync transcript) to be put
        report = await laptop.sync()
        assert [m.message_id for m in report.new_messages] == [sent.message_id]
        assert report.new_messages[0].sender == alice.fingerprint
        assert _held(laptop, sent.message_id) == 1
        await laptop.close()
        await alice.close()

    run(testnet, tmp_path, scenario)


def test_the_cli_shows_who_is_online_and_sends_directly(
    testnet: Testnet, ice_interface: str, tmp_path: Path
) -> None:
    """`dna watch` publishes presence, `dna contacts list` shows it, `dna send` takes the
    direct path and the watcher prints the message; stopping the watcher withdraws it."""
    people = People(tmp_path, testnet.seeds)

    async def setup() -> None:  # in-process: four CLI start-ups less
        for peer in await _friends(people):
            await peer.close()

    asyncio.run(setup())
    alice, bob = people.profile("alice").home, people.profile("bob").home
    (before,) = cli(alice, testnet, "contacts", "list", "--online")
    assert before["online"] is False
    watcher = subprocess.Popen(
        [str(BIN / "dna"), "--home", str(bob), "--json", "--bootstrap", seeds(testnet),
         "watch", "--interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, "PATH": str(BIN)},
    )  # fmt: skip
    try:
        assert watcher.stdout is not None and watcher.stderr is not None
        out, seen = lines(watcher.stdout), list[str]()
        err = lines(watcher.stderr)  # drained: a full pipe would block the watch's exit
        deadline = time.monotonic() + 30
        while not cli(alice, testnet, "contacts", "list", "--online")[0]["online"]:
            assert time.monotonic() < deadline, "bob never showed up online"
            time.sleep(0.5)
        sent = cli(alice, testnet, "send", people.name("bob"), "hello bob, directly")
        assert sent["path"] == "direct" and sent["replicas"] == 0
        shown = json.loads(wait_for(out, "hello bob, directly", 20, seen))
        assert shown["from"]["name"] == people.name("alice")
    finally:
        watcher.send_signal(signal.SIGINT)
        try:
            assert watcher.wait(30) == 0
        except subprocess.TimeoutExpired as exc:
            watcher.kill()
            log = list(err.queue)
            raise AssertionError(f"dna watch did not stop on SIGINT; its log: {log}") from exc
    (after,) = cli(alice, testnet, "contacts", "list", "--online")
    assert after["online"] is False  # withdrawn, not left to expire


def test_a_watch_stopped_by_sigterm_goes_offline_at_once(
    testnet: Testnet, ice_interface: str, tmp_path: Path
) -> None:
    """A service manager stops `dna watch` with SIGTERM: a clean stop like Ctrl-C (exit
    0, presence withdrawn), not a kill that leaves the contact "online" for its lifetime."""
    people = People(tmp_path, testnet.seeds)

    async def setup() -> None:
        for peer in await _friends(people):
            await peer.close()

    asyncio.run(setup())
    alice, bob = people.profile("alice").home, people.profile("bob").home
    watcher = subprocess.Popen(
        [str(BIN / "dna"), "--home", str(bob), "--bootstrap", seeds(testnet), "watch"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, "PATH": str(BIN)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not cli(alice, testnet, "contacts", "list", "--online")[0]["online"]:
            assert time.monotonic() < deadline, "bob never showed up online"
            time.sleep(0.5)
    finally:
        watcher.send_signal(signal.SIGTERM)
        _out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0 and "Traceback" not in err, (watcher.returncode, err)
    (after,) = cli(alice, testnet, "contacts", "list", "--online")
    assert after["online"] is False  # withdrawn, not left to expire


def seeds(net: Testnet) -> str:
    return ",".join(f"{h}:{p}" for h, p in net.seeds)


def cli(home: Path, net: Testnet, *args: str) -> Any:
    out = run_script("dna", "--home", str(home), "--bootstrap", seeds(net), "--json", *args,
                     env=ENV)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
