"""End to end on the local testnet: a message from send to the recipient's cache, vs OpenDHT.

``uv run python -m bench.e2e [--messages N] [--rt-messages N] [--senders 10] [--rounds R]
[--poll-interval S] [--shipped-admission] [--no-guard] [--profile FILE] [--trace DIR]
[--quick]``

What runs (issue 5, "Benchmark"; conventions: shared design/BENCH.md), all in one run:

* **The network.** ``dna_testnet.Testnet``: 3 ``dna-bootstrap`` and 6 ``dna-storage-node``
  processes and the ``dna-stun`` relay of the direct path on loopback addresses from the
  harness's allocator (reported in the setup line), in a temporary directory.
  The storage nodes keep the shipped proof of work (12 bits, raised under load) but get
  per-IP and per-mailbox rate limits far above what the run sends (``ADMISSION``): every
  identity of the run sends from 127.0.0.1, where the per-IP limit (20 puts/s) would
  measure the throttle, not the system. ``--shipped-admission`` keeps the shipped limits.
* **The recipient** (:mod:`bench.e2e_recipient`) is a separate process, so its CPU is not
  the senders' event loop's time but still shares the machine's cores: a ``dna_peer``
  ``Peer`` running ``watch()``, subscribed to its mailbox on the replicas, which push each
  blob as they store it (issue 15: "with the recipient subscribed"); ``--poll-interval S``
  makes it call ``sync()`` in a loop instead, S seconds apart (0: back to back), as it
  received before push delivery. A message counts as delivered when it is decrypted: the
  recipient's ``Peer.on_message`` hook has it, opened and checked, its cache writes made,
  before their commit (the goal's "send -> decrypted", as OpenDHT's ``listen`` callback
  has a value; the inbox says why nothing is lost by showing it before the ``fsync``).
  Each phase's detail line also gives the p50/p99 to the cache commit
  (``committed_p50_ms``/``committed_p99_ms``), the figure before this hook existed.
* **The senders** are ``--senders`` (10) ``Peer`` objects in this process (``Profile`` +
  ``open_peer``, as the CLI opens one), each with its own client overlay node, all sending
  to the recipient: ``Peer.send`` seals (sender keys included, so the envelope is ~7.9 kB),
  solves the proof of work, looks up the mailbox's replicas and puts on all 5 (done at 3),
  then stores the outgoing message in its own cache.

Our figures, each round (send start to the recipient's commit, on ``time.monotonic_ns``,
which every process of the machine shares):

* ``e2e.rt``: one message at a time (send, wait until delivered, next): unloaded latency.
* ``e2e.seq``: one sender, ``--messages`` sequential sends (each awaited, delivery not),
  counted until the recipient holds them all: delivered messages/s and their latencies.
* ``e2e.c10``: the senders at once, ``--messages`` in all, as ``e2e.seq``.
* ``e2e.send.seq``/``e2e.send.c10``: the sends alone (``Peer.send`` returned): messages/s
  and latencies.
* ``e2e.direct.rt``: the direct path (issue 14), one message at a time from the first
  sender over an established direct channel: send to decrypted and stored in the
  recipient's cache (its ``on_direct`` hook), p50/p99. The testnet runs its ``dna-stun``
  relay and both ends are relay-only, so on loopback (where aioice gathers no host
  candidate) the ICE pair is relay->relay through that TURN server: a relayed path, one
  hop more than a direct one. The channel is set up (presence lookup, ICE, handshake)
  before the warm-up; a polling recipient does not poll its mailbox during this phase, and a
  message that fell back to store-and-forward is counted as a failure, not a latency.
  Its line lists the same round's ``e2e.rt`` (store-and-forward) figure beside OpenDHT's.

**Baselines**, in the same process, in the order the goals judge them (issue 15): two
networks of 9 C++ OpenDHT nodes each (``bench.baselines.opendht_net``, the same node count
as the testnet; rate limits off), values of the envelope's size, messages through
``listen`` (``OpenDhtNet.listen_batch``): the reader listens on an inbox key, the writer
puts fresh values there, a message is delivered when the listen callback has it.
``opendht-signed`` is OpenDHT's authenticated path, the way Jami's messages travel: the
clients run with RSA-4096 identities and the writer ``putEncrypted``s to the reader's
public key (the callback gets it decrypted and verified); ``opendht`` is the unsigned
``put`` to ``listen``. One at a time (compared with ``rt`` and ``seq``) or ``--senders``
in flight (``c10``); ``send.*`` latencies are compared with the put's acknowledgement.

Our network and OpenDHT take turns every round, in an order that reverses from round to
round; a polling recipient stops polling during OpenDHT's turns. A figure is the median
round.
``ratio`` is ours / OpenDHT for throughputs, OpenDHT / ours for latencies (above 1.0: we
are ahead). ``e2e.{seq,c10}.cpu`` lines give the CPU ms per delivered message summed over
every process (ours: the senders' process, the recipient and the 9 node processes;
OpenDHT's: this process, which runs its nodes), ``e2e.{rt,seq}.floor`` our p50 beside the
floor of :mod:`bench.floor` (seal + stream round trip + commit + open), and one
``{"goal": ...}`` line per goal of issue 15 says ``PASS`` or ``MISS``. ``{"detail": ...}``
lines give the setup, the CPU each side spent per message (senders, recipient, the 9 node
processes) and failures. ``--profile FILE`` runs cProfile
on this process over the first timed ``seq`` sends, writes the stats to FILE and prints the
CPU per send of its main parts. ``--trace DIR`` has every process note each message's
steps (`dna_core.trace`) and ends with where the time went, per segment, for the slowest
5% and the rest (:mod:`bench.e2e_trace`; its tables go to stderr). Everything is stopped
in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import functools
import json
import pstats
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dna_core import trace
from dna_core.crypto import Identity, PublicKeySet, seal
from dna_core.hostport import host_port
from dna_core.mailbox import REPLICAS, WRITE_QUORUM
from dna_core.ops.heap import freeze_startup_heap
from dna_core.wire.gen.dna.v1 import envelope_pb2
from dna_peer.cache import Contact
from dna_peer.direct.link import IceConfig
from dna_peer.direct.service import DirectService
from dna_peer.peer import DIRECT, Peer, open_peer
from dna_peer.profile import Profile
from dna_testnet.harness import LOOPBACK
from dna_testnet.network import Testnet
from dna_testnet.topology import TESTNET_TURN_PASSWORD, TESTNET_TURN_USER

from bench import e2e_trace, floor, harness
from bench.harness import Deadline, Figure, Goal, Rounds, Workload

if TYPE_CHECKING:  # imported on use (opendht_net): a missing baseline is reported, not fatal
    from bench.baselines.opendht_net import OpenDhtNet

OURS, OPENDHT, OPENDHT_SIGNED = "ours", "opendht", "opendht-signed"
STORE_AND_FORWARD = "store-and-forward"  # our e2e.rt, beside the direct path's figure
DIRECT_RT = "direct.rt"
DIRECT_PATH = "direct, TURN-relayed on loopback (relay->relay through the testnet's dna-stun)"
OPENDHT_NETS = (OPENDHT_SIGNED, OPENDHT)  # the first baseline is the goals' first judge
NODES = 9  # the testnet's 3 bootstrap + 6 storage node processes
PASSPHRASE = "bench passphrase"
POW_BITS = 12  # open_peer's and the storage nodes' default
BODY_CHARS = 100
DEFAULT_SENDERS = 10
DEFAULT_MESSAGES, QUICK_MESSAGES = 200, 6
DEFAULT_RT, QUICK_RT = 30, 2
DEFAULT_ROUNDS, QUICK_ROUNDS = 5, 1
DEFAULT_WARMUP, QUICK_WARMUP = 10, 1
SEND_TIMEOUT_S = 15.0
DELIVERY_TIMEOUT_S = 30.0
OPENDHT_OP_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 60.0
BUDGET_S = 170.0
ADMISSION: dict[str, float] = {
    "ip_rate_per_s": 1_000_000.0,
    "ip_burst": 1_000_000.0,
    "mailbox_rate_per_s": 1_000_000.0,
    "mailbox_burst": 1_000_000.0,
}
ADMISSION_TOML = "[admission]\n" + "".join(f"{k} = {v}\n" for k, v in ADMISSION.items())
PROFILED = (  # (label, file suffix, function): CPU per send in --profile's summary
    ("send", "dna_peer/peer.py", "send"),
    ("pow", "dna_core/crypto/pow.py", "solve"),
    ("seal", "dna_core/crypto/envelope.py", "seal"),
    ("lookup", "dna_core/mailbox/client.py", "storage_nodes"),
    ("put", "dna_core/mailbox/client.py", "put"),
    ("cache", "dna_peer/cache.py", "add_message"),
)


def ns_to_s(ns: int) -> float:
    return ns / 1e9


def percentiles_ms(sorted_s: Sequence[float]) -> dict[str, float]:
    """p50 and p99 in ms of sorted seconds ({} for none)."""
    if not sorted_s:
        return {}
    return {f"p{q}": round(harness.percentile(sorted_s, q / 100) * 1e3, 2) for q in (50, 99)}


# ---------------------------------------------------------------------------- CPU accounting


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds so far of this process (senders), the recipient and the node processes."""

    senders: float
    recipient: float
    nodes: float

    @classmethod
    def take(cls, recipient_pid: int, node_pids: Sequence[int]) -> CpuSample:
        return cls(
            harness.cpu_s(),
            harness.process_cpu_s(recipient_pid),
            sum(harness.process_cpu_s(pid) for pid in node_pids),
        )

    def ms_per_message(self, before: CpuSample, messages: int) -> dict[str, float]:
        per = 1e3 / max(1, messages)
        return {
            "senders": round((self.senders - before.senders) * per, 2),
            "recipient": round((self.recipient - before.recipient) * per, 2),
            "nodes": round((self.nodes - before.nodes) * per, 2),
        }


# ---------------------------------------------------------------------------- the recipient


class RecipientProcess:
    """``bench.e2e_recipient`` in a subprocess: when each message reached its cache."""

    def __init__(
        self, root: Path, seeds: Sequence[tuple[str, int]], count: int, poll_s: float | None,
        turn: tuple[str, int],
    ) -> None:  # fmt: skip
        self.root, self.seeds, self.count, self.poll_s = root, seeds, count, poll_s
        self.turn = turn
        self.proc: asyncio.subprocess.Process | None = None
        self.cached: dict[bytes, int] = {}  # message ID -> monotonic ns it was decrypted
        self.reported: dict[bytes, int] = {}  # message ID -> monotonic ns sync returned it
        self.committed: dict[bytes, int] = {}  # message ID -> monotonic ns in the cache
        self.fingerprints: list[str] = []
        self.setup_s = 0.0
        self._arrived = asyncio.Condition()
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    async def start(self, timeout_s: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "recipient.log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.e2e_recipient", "--root", str(self.root),
                "--seeds", ",".join(host_port(h, p) for h, p in self.seeds),
                "--recipients", str(self.count), *self._receiving(),
                "--turn", host_port(*self.turn), "--turn-user", TESTNET_TURN_USER,
                "--turn-password", TESTNET_TURN_PASSWORD,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                cwd=Path(__file__).resolve().parents[1], limit=1 << 22,
            )  # fmt: skip
        self._reader = asyncio.create_task(self._read_lines())
        async with asyncio.timeout(timeout_s):
            ready = await self._replies.get()
        if "ready" not in ready:
            raise RuntimeError(f"recipient process: {ready}")
        self.fingerprints = list(ready["ready"]["fingerprints"])
        self.setup_s = float(ready["ready"]["setup_s"])

    def _receiving(self) -> list[str]:
        """Push (the recipient subscribed), or polling every ``poll_s``."""
        return [] if self.poll_s is None else ["--poll", "--poll-interval", str(self.poll_s)]

    async def _read_lines(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            obj = json.loads(line)
            if "got" not in obj:
                await self._replies.put(obj)
                continue
            async with self._arrived:
                for message_id, decrypted_ns, reported_ns, committed_ns in obj["got"]:
                    self.cached[bytes.fromhex(message_id)] = int(decrypted_ns)
                    self.reported[bytes.fromhex(message_id)] = int(reported_ns)
                    self.committed[bytes.fromhex(message_id)] = int(committed_ns)
                self._arrived.notify_all()
        await self._replies.put({"exited": self.proc.returncode, "log": self.log_tail()})

    def log_tail(self, lines: int = 20) -> str:
        log = self.root / "recipient.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    async def wait_for(self, message_ids: set[bytes], timeout_s: float) -> bool:
        """Until the recipient holds every message; False if some are missing at the timeout."""
        async with self._arrived:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._arrived.wait_for(lambda: message_ids <= self.cached.keys())
            return message_ids <= self.cached.keys()

    async def command(
        self, name: str, timeout_s: float = 30.0, argument: str = ""
    ) -> dict[str, Any]:
        """Send a command; its reply's stats (see ``bench.e2e_recipient``)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"{name} {argument}\n".encode())
        await self.proc.stdin.drain()
        async with asyncio.timeout(timeout_s):
            reply = await self._replies.get()
        if name not in reply:
            raise RuntimeError(f"recipient process: {reply}")
        stats: dict[str, Any] = reply[name]
        return stats

    async def close(self, timeout_s: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None and proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.write(b"stop\n")
                proc.stdin.close()
        try:
            async with asyncio.timeout(timeout_s):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


# ---------------------------------------------------------------------------- the senders


@dataclass
class Sender:
    peer: Peer
    contact: Contact  # the recipient it sends to


def create_profiles(root: Path, count: int) -> list[tuple[Profile, Identity]]:
    """New sender identities, locked at rest (Argon2id): run in a thread during start-up."""
    made = []
    for i in range(count):
        identity = Identity.generate()
        profile = Profile(root / f"sender{i}")
        profile.create(identity, PASSPHRASE)
        made.append((profile, identity))
    return made


async def open_senders(
    profiles: Sequence[tuple[Profile, Identity]],
    seeds: list[tuple[str, int]],
    recipients: Sequence[str],
) -> list[Sender]:
    """Open every sender on the network; sender i pins recipient i mod len(recipients)."""
    senders: list[Sender] = []
    try:
        for i, (profile, _) in enumerate(profiles):
            peer = await open_peer(profile, PASSPHRASE, seeds, pow_bits=POW_BITS)
            senders.append(Sender(peer, await peer.add_contact(recipients[i % len(recipients)])))
    except BaseException:
        await close_senders(senders)
        raise
    return senders


async def close_senders(senders: Sequence[Sender]) -> None:
    for sender in senders:
        with contextlib.suppress(Exception):
            await sender.peer.close()


def body(tag: str, i: int) -> str:
    return f"{tag} {i:06d} ".ljust(BODY_CHARS, ".")


def envelope_bytes(sender: Identity, recipient: PublicKeySet) -> int:
    """The size of what ``Peer.send`` stores for one of this run's messages."""
    payload = envelope_pb2.Payload(text=envelope_pb2.Text(body=body("size", 0)))
    plaintext = payload.SerializeToString()
    envelope = seal(sender, recipient, plaintext, now_ms=harness.now_ms(), include_sender_keys=True)
    return len(envelope)


# ---------------------------------------------------------------------------- our phases


@dataclass
class Sends:
    """What a phase sent: when each send started, how long each took, what failed."""

    started_ns: int
    sent_at: dict[bytes, int] = field(default_factory=dict)  # message ID -> send start ns
    send_s: list[float] = field(default_factory=list)
    failures: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    done_ns: int = 0
    paths: dict[bytes, str] = field(default_factory=dict)  # message ID -> DIRECT or STORED

    async def send(self, sender: Sender, text: str) -> bytes | None:
        t0 = time.monotonic_ns()
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                sent = await sender.peer.send(sender.contact, text)
        except Exception as exc:  # a failed send is counted; the phase goes on
            self.failures += 1
            self.errors[harness.failure_reason(exc)] += 1
            return None
        self.send_s.append(ns_to_s(time.monotonic_ns() - t0))
        self.sent_at[sent.message_id] = t0
        self.paths[sent.message_id] = sent.path
        return sent.message_id


@dataclass
class PhaseResult:
    delivered: Figure
    send: Figure | None
    sync_return_p50_ms: float | None
    committed_ms: dict[str, float]  # p50, p99 to the cache commit
    cpu_ms_per_message: dict[str, float]
    errors: dict[str, int]


PhaseRun = Callable[[], Awaitable[PhaseResult]]


class OurNetwork:
    """The senders and the recipient process, with the phases that measure them."""

    def __init__(
        self, senders: list[Sender], recipient: RecipientProcess, node_pids: list[int],
        direct: DirectService,
    ) -> None:  # fmt: skip
        self.senders, self.recipient, self.node_pids = senders, recipient, node_pids
        self.direct = direct  # the first sender's, on only during the direct phase
        self.sequence = 0  # message bodies stay distinct over the whole run

    def cpu(self) -> CpuSample:
        return CpuSample.take(self.recipient.pid, self.node_pids)

    def next_body(self, tag: str) -> str:
        self.sequence += 1
        return body(tag, self.sequence)

    async def round_trips(self, count: int) -> PhaseResult:
        """``count`` messages one at a time: the next is sent once the previous is held."""
        cpu0, sends = self.cpu(), Sends(time.monotonic_ns())
        sender, missing = self.senders[0], 0
        for _ in range(count):
            message_id = await sends.send(sender, self.next_body("rt"))
            if message_id is not None:
                ok = await self.recipient.wait_for({message_id}, DELIVERY_TIMEOUT_S)
                missing += not ok
        wall_s = ns_to_s(time.monotonic_ns() - sends.started_ns)
        return self.result(sends, 1, count, cpu0, missing, wall_s, with_send=False)

    async def direct_round_trips(self, count: int) -> PhaseResult:
        """``count`` messages one at a time over the first sender's direct channel; one that
        fell back to the mailbox is a failure (not waited for: the recipient is not polling)."""
        cpu0, sends = self.cpu(), Sends(time.monotonic_ns())
        sender, missing = self.senders[0], 0
        sender.peer.direct = self.direct
        try:
            for _ in range(count):
                message_id = await sends.send(sender, self.next_body("direct"))
                if message_id is None:
                    continue
                if sends.paths[message_id] != DIRECT:
                    sends.errors["fell_back_to_store_and_forward"] += 1
                    del sends.sent_at[message_id]
                    missing += 1
                    continue
                missing += not await self.recipient.wait_for({message_id}, DELIVERY_TIMEOUT_S)
        finally:
            sender.peer.direct = None  # the other phases measure store-and-forward
        wall_s = ns_to_s(time.monotonic_ns() - sends.started_ns)
        return self.result(sends, 1, count, cpu0, missing, wall_s, with_send=False)

    async def first_direct(self) -> dict[str, Any]:
        """The direct channel's setup, timed: presence lookup, ICE through the relay,
        handshake, then the first message and its ACK."""
        sender = self.senders[0]
        sender.peer.direct = self.direct
        try:
            t0 = time.perf_counter()
            sent = await sender.peer.send(sender.contact, self.next_body("first-direct"))
            ms = (time.perf_counter() - t0) * 1e3
        finally:
            sender.peer.direct = None
        if sent.path != DIRECT:  # the direct figures will show only failures
            return {"error": "the direct path did not come up (the first message was stored)"}
        route = self.direct.route_to(sender.contact.fingerprint)
        return {"first_direct_message_ms": round(ms, 1), "ice_pair": route}

    async def pipelined(self, senders: Sequence[Sender], count: int) -> PhaseResult:
        """``count`` messages over ``senders`` at once, each sender's sends one after another,
        counted until the recipient holds every message sent."""
        cpu0, sends = self.cpu(), Sends(time.monotonic_ns())
        shares = [count // len(senders) + (i < count % len(senders)) for i in range(len(senders))]

        async def send_share(sender: Sender, share: int) -> None:
            for _ in range(share):
                await sends.send(sender, self.next_body("msg"))

        await asyncio.gather(*(send_share(s, n) for s, n in zip(senders, shares, strict=True)))
        sends.done_ns = time.monotonic_ns()
        await self.recipient.wait_for(set(sends.sent_at), DELIVERY_TIMEOUT_S)
        held = [self.recipient.cached[m] for m in sends.sent_at if m in self.recipient.cached]
        missing = len(sends.sent_at) - len(held)
        wall_s = ns_to_s(max(held, default=sends.done_ns) - sends.started_ns)
        return self.result(sends, len(senders), count, cpu0, missing, wall_s, with_send=True)

    def result(
        self,
        sends: Sends,
        concurrency: int,
        count: int,
        cpu0: CpuSample,
        missing: int,
        wall_s: float,
        *,
        with_send: bool,
    ) -> PhaseResult:
        cached, reported = self.recipient.cached, self.recipient.reported
        held = [m for m in sends.sent_at if m in cached]
        latencies = [ns_to_s(cached[m] - sends.sent_at[m]) for m in held]
        cpu = self.cpu().ms_per_message(cpu0, len(held))
        extra = {"cpu_ms_per_op": round(sum(cpu.values()), 3)} if held else {}
        delivered = harness.make_figure(OURS, "deliver", concurrency, latencies,
                                        sends.failures + missing, count, NODES, wall_s,
                                        extra)  # fmt: skip
        send = None
        if with_send:
            send_wall_s = ns_to_s(sends.done_ns - sends.started_ns)
            send = harness.make_figure(OURS, "send", concurrency, sends.send_s, sends.failures,
                                       count, NODES, send_wall_s)  # fmt: skip
        returned = sorted(ns_to_s(reported[m] - sends.sent_at[m]) for m in held)
        committed = sorted(ns_to_s(self.recipient.committed[m] - sends.sent_at[m]) for m in held)
        errors = dict(sends.errors)
        if missing:
            errors["undelivered"] = missing
        return PhaseResult(
            delivered,
            send,
            round(harness.percentile(returned, 0.5) * 1e3, 2) if returned else None,
            percentiles_ms(committed),
            cpu,
            errors,
        )


# ---------------------------------------------------------------------------- OpenDHT


class OpenDhtBaseline:
    """9 OpenDHT nodes in this process; messages put (or ``putEncrypted``) to a ``listen``."""

    def __init__(self, net: OpenDhtNet) -> None:
        self.net = net

    @property
    def name(self) -> str:
        return self.net.name

    async def round_trips(
        self, count: int, concurrency: int, pair: int, deadline: Deadline
    ) -> tuple[Figure, Figure]:
        """The deliveries' figure and their puts' (latencies only)."""
        fig, put_s = await self.net.listen_batch(count, concurrency, deadline, pair=pair)
        extra = {"max_ms": round(max(put_s, default=0.0) * 1e3, 1)}
        put = harness.make_figure(self.name, "put", concurrency, put_s, 0, count, NODES,
                                  fig.elapsed_s, extra)  # fmt: skip
        return fig, put

    async def close(self) -> None:
        await self.net.close()


def opendht_net(value_bytes: int, *, signed: bool = False) -> OpenDhtNet:
    """OpenDHT's nodes, as many as ours, storing values of the envelope's size
    (``signed``: clients with identities, for ``putEncrypted``)."""
    from bench.baselines.opendht_net import OpenDhtNet  # on use: a missing one is reported

    workload = Workload(value_bytes, value_bytes)
    return OpenDhtNet(NODES, op_timeout_s=OPENDHT_OP_TIMEOUT_S, workload=workload, signed=signed)


# ---------------------------------------------------------------------------- rounds


@dataclass(frozen=True)
class Config:
    messages: int
    rt_messages: int
    senders: int
    recipients: int
    rounds: int
    warmup: int
    poll_interval: float | None  # None: the recipient is subscribed (push)
    shipped_admission: bool
    budget_s: float
    profile: Path | None
    quick: bool
    trace: Path | None = None
    guard: bool = True  # the nodes' connection guard (--no-guard, analysis)

    @property
    def receiving(self) -> str:
        return "push" if self.poll_interval is None else f"poll every {self.poll_interval} s"

    @property
    def concurrent(self) -> str:
        return harness.mode_name(self.senders)


@dataclass
class Results(Rounds):
    """Per-round figures by ``(contender, key)`` (e.g. ``("ours", "seq")``), and per-phase
    details."""

    details: list[dict[str, Any]] = field(default_factory=list)

    def figure(self, contender: str, key: str, *, throughput: bool) -> dict[str, Any]:
        """The figure over rounds (all None if there is none); no ops/s for a latency."""
        med = self.median((contender, key)) or {
            "ops_per_s": None, "p50_ms": None, "p99_ms": None, "failures": 0
        }  # fmt: skip
        return med if throughput else {**med, "ops_per_s": None}


class Run:
    """Everything up for the whole run: our network, OpenDHT, the results."""

    def __init__(self, cfg: Config, ours: OurNetwork, opendht: Sequence[OpenDhtBaseline]) -> None:
        self.cfg, self.ours, self.opendht = cfg, ours, list(opendht)
        self.results = Results()
        self.pair = 0
        self.round = -1  # -1: the warm-up

    async def rounds(self, budget: Deadline) -> None:
        """The warm-up, then ``rounds`` rounds. In each, every mode runs ours and OpenDHT back
        to back (which goes first alternates), so load from elsewhere hits both alike."""
        cfg = self.cfg
        freeze_startup_heap()  # the setup of a long-running sender, as in every process
        await self.one_round(cfg.warmup, cfg.warmup, budget, record=False)
        for r in harness.timed_rounds(cfg.rounds, budget, reserve_s=15.0):
            self.round = r
            await self.one_round(cfg.messages, cfg.rt_messages, budget, record=True)

    async def one_round(self, messages: int, rt: int, budget: Deadline, *, record: bool) -> None:
        ours, senders = self.ours, self.ours.senders
        modes: tuple[tuple[int, list[tuple[str, PhaseRun]]], ...] = (
            (1, [("rt", lambda: ours.round_trips(rt)),
                 ("seq", lambda: self.profiled(ours.pipelined(senders[:1], messages), record))]),
            (self.cfg.senders, [(self.cfg.concurrent, lambda: ours.pipelined(senders, messages))]),
        )  # fmt: skip
        ours_first = self.round % 2 == 0
        for concurrency, phases in modes:
            if ours_first:
                await self.our_turn(phases, record)
            await self.opendht_turn(messages, concurrency, budget, record)
            if not ours_first:
                await self.our_turn(phases, record)
            if concurrency == 1:  # the direct path beside the same OpenDHT turn
                await self.our_turn([(DIRECT_RT, lambda: ours.direct_round_trips(rt))], record,
                                    poll=False)  # fmt: skip

    async def our_turn(
        self, phases: list[tuple[str, PhaseRun]], record: bool, *, poll: bool = True
    ) -> None:
        """Our phases, the recipient polling its mailbox (``poll``) or not (the direct
        path needs no polling)."""
        if poll:
            await self.ours.recipient.command("resume")
        for key, phase in phases:
            trace.mark(e2e_trace.PHASE, key.encode())
            result = await phase()
            if record:
                self.results.add((OURS, key), result.delivered)
                self.results.add((OURS, f"send.{key}"), result.send)
                self.results.details.append(
                    {"round": self.round, "ours": key,
                     "sync_return_p50_ms": result.sync_return_p50_ms,
                     "committed_ms": result.committed_ms,
                     "cpu_ms_per_message": result.cpu_ms_per_message, "errors": result.errors}
                )  # fmt: skip
        await self.ours.recipient.command("pause")  # quiet while OpenDHT runs

    async def profiled(self, phase: Awaitable[PhaseResult], record: bool) -> PhaseResult:
        """Run a phase, under cProfile if ``--profile`` asked and not done yet."""
        if self.cfg.profile is None or not record or self.results.figures.get((OURS, "seq")):
            return await phase
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            result = await phase
        finally:
            profiler.disable()
        profiler.dump_stats(self.cfg.profile)
        harness.detail({"profile": profile_summary(profiler, result.send, self.cfg.profile)})
        return result

    async def opendht_turn(
        self, messages: int, concurrency: int, budget: Deadline, record: bool
    ) -> None:
        self.pair += 1  # a fresh writer/reader pair (they wrap around): see opendht_net
        for baseline in self.opendht:
            deadline = budget.sub(DELIVERY_TIMEOUT_S, reserve=10.0)
            fig, put = await baseline.round_trips(messages, concurrency, self.pair, deadline)
            if record:
                key = harness.mode_name(concurrency)
                self.results.add((baseline.name, key), fig)
                self.results.add((baseline.name, f"send.{key}"), put)
                what = {"round": self.round, baseline.name: key,
                        "put_max_ms": put.extra.get("max_ms")}  # fmt: skip
                self.results.details.append({**what, **fig.extra})


def profile_summary(profiler: cProfile.Profile, send: Figure | None, path: Path) -> dict[str, Any]:
    """CPU per send (ms) in this process of ``PROFILED``'s functions, and the top 8 by self
    time. Coroutines count only while they run: their waits on the network are not in here."""
    stats = pstats.Stats(profiler)
    sends = max(1, send.n - send.failures if send else 1)
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    cumulative = {label: 0.0 for label, _, _ in PROFILED}
    for (filename, _, func), (_, _, _, cum, _) in raw.items():
        for label, suffix, name in PROFILED:
            if func == name and filename.endswith(suffix):
                cumulative[label] += cum
    top = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:8]
    return {
        "path": str(path),
        "sends": sends,
        "cpu_ms_per_send": {k: round(v * 1e3 / sends, 3) for k, v in cumulative.items()},
        "top_self_ms_per_send": {
            f"{Path(f).name}:{line}:{func}": round(v[2] * 1e3 / sends, 3)
            for (f, line, func), v in top
        },
    }


# ---------------------------------------------------------------------------- reporting


def goals(concurrent: str) -> list[Goal]:
    """Issue 15's end-to-end goals: p50 and p99 ≥ 1.0x OpenDHT's ``putEncrypted`` →
    ``listen`` and ≥ 0.5x its unsigned ``put`` → ``listen``; CPU per delivered message
    (every process) within 2x of the unsigned path."""
    out = []
    for mode in ("rt", "seq", concurrent):
        for pct in ("p50", "p99"):
            out.append(Goal(f"e2e.{mode}.{pct}", OPENDHT_SIGNED, 1.0))
            out.append(Goal(f"e2e.{mode}.{pct}", OPENDHT, 0.5))
    for mode in ("seq", concurrent):
        out.append(Goal(f"e2e.{mode}.cpu", OPENDHT, 0.5))
    # Issue 14: the direct path at least as fast as OpenDHT's putEncrypted -> listen.
    out += [Goal(f"e2e.{DIRECT_RT}.{pct}", OPENDHT_SIGNED, 1.0) for pct in ("p50", "p99")]
    return out


def report_floor(results: Results, parts: dict[str, Any]) -> list[dict[str, Any]]:
    """Our one-at-a-time p50s beside the floor (``bench.floor``): ratio = floor / ours."""
    lines = []
    for key in ("rt", "seq"):
        ours = results.figure(OURS, key, throughput=False)
        if ours["p50_ms"] is None:
            continue
        params = {"mode": key, "floor_parts": parts, "what": "seal + stream round trip + "
                  "one commit + open", "failures": {OURS: ours["failures"]}}  # fmt: skip
        lines.append(harness.report(f"e2e.{key}.floor", "ms", ours["p50_ms"],
                                    {"floor": parts["seq_ms"]}, ours.get("ops", 0), params,
                                    kind="latency"))  # fmt: skip
    return lines


def report(run: Run, envelope: int) -> list[dict[str, Any]]:
    cfg, results = run.cfg, run.results
    names = [b.name for b in run.opendht]
    conc = cfg.concurrent
    params: dict[str, Any] = {
        "nodes": NODES, "storage_nodes": 6, "replicas": REPLICAS, "write_quorum": WRITE_QUORUM,
        "pow_bits": POW_BITS, "envelope_bytes": envelope, "opendht_value_bytes": envelope,
        "recipients": cfg.recipients, "receiving": cfg.receiving,
        "admission": "shipped" if cfg.shipped_admission else "rate limits off",
    }  # fmt: skip
    figures = (  # (bench name, our key, OpenDHT key, messages per round, senders, what)
        ("e2e.rt", "rt", "seq", cfg.rt_messages, 1, "one at a time, send to cache"),
        (f"e2e.{DIRECT_RT}", DIRECT_RT, "seq", cfg.rt_messages, 1,
         "one at a time over the direct channel, send to decrypted in the recipient's cache"),
        ("e2e.seq", "seq", "seq", cfg.messages, 1, "sequential sends, until all held"),
        (f"e2e.{conc}", conc, conc, cfg.messages, cfg.senders, "concurrent senders"),
        ("e2e.send.seq", "send.seq", "send.seq", cfg.messages, 1, "Peer.send vs OpenDHT put"),
        (f"e2e.send.{conc}", f"send.{conc}", f"send.{conc}", cfg.messages, cfg.senders,
         "Peer.send vs OpenDHT put"),
    )  # fmt: skip
    lines: list[dict[str, Any]] = []
    for name, ours_key, base_key, n, senders, what in figures:
        # One at a time, the next send waits for the sync to return (receipts, deletes
        # done), not for the commit: e2e.rt is a latency figure only.
        ours = results.figure(OURS, ours_key, throughput=ours_key not in ("rt", DIRECT_RT))
        if ours["p50_ms"] is None:
            continue
        base = {b: results.figure(b, base_key, throughput=not base_key.startswith("send."))
                for b in names}  # fmt: skip
        failures = {OURS: ours["failures"], **{b: f["failures"] for b, f in base.items()}}
        fig_params = {
            **params, "mode": ours_key, "senders": senders, "what": what,
            "opendht_op": {OPENDHT_SIGNED: "putEncrypted" if base_key.startswith("send.")
                           else "putEncrypted_then_listen",
                           OPENDHT: "put" if base_key.startswith("send.") else "put_then_listen"},
            "opendht_in_flight": 1 if base_key.endswith("seq") else cfg.senders,
            "rounds": ours["rounds"], "failures": failures,
        }  # fmt: skip
        theirs = {b: f for b, f in base.items() if f["p50_ms"] is not None}
        if ours_key == DIRECT_RT:  # beside OpenDHT: our store-and-forward, same rounds
            theirs[STORE_AND_FORWARD] = results.figure(OURS, "rt", throughput=False)
            fig_params["path"] = DIRECT_PATH
        lines += harness.report_operation(name, ours, theirs, n, fig_params)
        if ours_key in ("seq", conc):
            cpu = {b: (results.median((b, base_key)) or {"extra": {}})["extra"].get(
                "cpu_ms_per_op") for b in names}  # fmt: skip
            mine = (results.median((OURS, ours_key)) or {"extra": {}})["extra"]
            lines += harness.report_cpu(
                f"{name}.cpu",
                mine.get("cpu_ms_per_op"),
                cpu,
                n,
                {**fig_params, "what": "CPU ms per delivered message, every process"},
            )
    for line in results.details:
        harness.detail(line)
    return lines


# ---------------------------------------------------------------------------- the run


def start_testnet(root: Path, cfg: Config) -> Testnet:
    net = Testnet(root, addresses=LOOPBACK.take(NODES + 1), stun=1)  # + the TURN relay
    for node in net.nodes:
        if node.role == "storage" and not cfg.shipped_admission:
            node.extra_toml = ADMISSION_TOML
        if node.role != "stun" and not cfg.guard:
            node.connections_toml += "grpc_connection_guard = false\n"
    try:
        net.up(READY_TIMEOUT_S)
    except BaseException:
        net.kill_all()
        raise
    return net


async def start_opendht(value_bytes: int, setup: dict[str, Any]) -> list[OpenDhtBaseline]:
    """OpenDHT's two networks of 9 nodes (authenticated, unsigned); one that cannot start
    is left out (reported in the setup line)."""
    out = []
    for name in OPENDHT_NETS:
        new_net = functools.partial(opendht_net, value_bytes, signed=name == OPENDHT_SIGNED)
        net = await harness.start_baseline(name, new_net, 30.0, setup)
        if net is not None:
            out.append(OpenDhtBaseline(net))
    return out


async def run(cfg: Config) -> int:
    with harness.scratch_dir("e2e") as root:
        return await run_in(root, cfg)


async def run_in(root: Path, cfg: Config) -> int:
    """The whole run, every node's and person's files under ``root``."""
    budget = Deadline(cfg.budget_s)
    t0 = time.perf_counter()
    net: Testnet | None = None
    recipient: RecipientProcess | None = None
    senders: list[Sender] = []
    direct: DirectService | None = None
    opendht: list[OpenDhtBaseline] = []
    lines: list[dict[str, Any]] = []
    start_trace(cfg.trace)
    try:
        net_up = asyncio.create_task(asyncio.to_thread(start_testnet, root / "net", cfg))
        profiles = await asyncio.to_thread(create_profiles, root / "people", cfg.senders)
        net = await net_up
        ready_s = time.perf_counter() - t0
        turn = net.relays[0].udp
        recipient = RecipientProcess(root / "people", net.seeds, cfg.recipients,
                                     cfg.poll_interval, turn)  # fmt: skip
        await recipient.start(READY_TIMEOUT_S)
        senders = await open_senders(profiles, net.seeds, recipient.fingerprints)
        await senders[0].peer.publish("Direct sender")  # the recipient pins it by its record
        await recipient.command("direct", argument=senders[0].peer.fingerprint.hex())
        direct = await senders[0].peer.go_direct(ice_config(turn), listen=False)
        senders[0].peer.direct = None  # on only during the direct phase
        envelope = envelope_bytes(profiles[0][1], senders[0].contact.keys)
        setup: dict[str, Any] = {}
        opendht = await start_opendht(envelope, setup)
        floor_parts = await floor.measure(BODY_CHARS, n=50 if cfg.quick else 200)
        node_pids = [n.proc.pid for n in net.nodes if n.proc is not None]
        relay_pid = net.relays[0].proc.pid if net.relays[0].proc is not None else 0
        ours = OurNetwork(senders, recipient, node_pids, direct)
        first_direct = await ours.first_direct()
        harness.detail({"setup": {
            "root": str(root), "ips": [n.ip for n in net.nodes],
            "node_pids": node_pids, "recipient_pid": recipient.pid,
            "senders": cfg.senders, "recipients": cfg.recipients, "messages": cfg.messages,
            "rt_messages": cfg.rt_messages, "rounds": cfg.rounds, "warmup": cfg.warmup,
            "envelope_bytes": envelope, "testnet_ready_s": round(ready_s, 2),
            "admission": "shipped" if cfg.shipped_admission else ADMISSION,
            "guard": cfg.guard,
            "receiving": cfg.receiving,
            "recipient_setup_s": recipient.setup_s, "baselines": setup, "floor": floor_parts,
            "ready_s": round(time.perf_counter() - t0, 2), "direct": first_direct,
            "relay": host_port(*turn), "relay_pid": relay_pid,
            "loadavg": harness.loadavg(),
        }})  # fmt: skip
        bench_run = Run(cfg, ours, opendht)
        await bench_run.rounds(budget)
        lines = report(bench_run, envelope)
        lines += report_floor(bench_run.results, floor_parts)
        harness.report_goals(lines, goals(cfg.concurrent))
        stats = await recipient.command("stats")
        harness.detail({"elapsed_s": round(time.perf_counter() - t0, 1), "recipient": stats,
                        "loadavg": harness.loadavg()})  # fmt: skip
        report_trace(cfg.trace)
    finally:
        if direct is not None:
            await direct.stop()  # its channel and relay allocation
        await close_senders(senders)
        if recipient is not None:
            await recipient.close()
        for baseline in reversed(opendht):
            await baseline.close()
        if net is not None:
            net.kill_all()
    return harness.exit_status(lines, OURS)


def start_trace(directory: Path | None) -> None:
    """``--trace``: before any process starts, so that they all inherit it."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        trace.start(str(directory))


def report_trace(directory: Path | None) -> None:
    """``--trace``'s breakdown: a detail line, and its tables on stderr."""
    if directory is not None:
        breakdown = e2e_trace.report(directory)
        harness.detail({"trace": breakdown})
        print(e2e_trace.render(breakdown), file=sys.stderr)


def ice_config(turn: tuple[str, int]) -> IceConfig:
    """The testnet relay, relay-only: loopback gives aioice no host candidate."""
    return IceConfig(turn=turn, turn_username=TESTNET_TURN_USER,
                     turn_password=TESTNET_TURN_PASSWORD, relay_only=True)  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = harness.arg_parser("End to end on the local testnet (send to cache) vs OpenDHT.")
    parser.add_argument(
        "--messages",
        type=int,
        default=None,
        help=f"messages per seq/cN figure and round (default {DEFAULT_MESSAGES})",
    )
    parser.add_argument(
        "--rt-messages",
        type=int,
        default=None,
        help=f"messages per rt figure and round (default {DEFAULT_RT})",
    )
    parser.add_argument(
        "--senders",
        type=int,
        default=DEFAULT_SENDERS,
        help="concurrent sender identities (the cN figures)",
    )
    parser.add_argument(
        "--recipients",
        type=int,
        default=1,
        help="recipient identities; sender i sends to recipient i mod this",
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up messages per phase")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="the recipient polls, S s between syncs (0: back to back), instead of being "
        "subscribed (push, the default)",
    )
    parser.add_argument(
        "--shipped-admission",
        action="store_true",
        help="keep the storage nodes' shipped rate limits (per IP: 20 puts/s)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="cProfile the first timed seq sends into this file",
    )
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="s for the whole run")
    parser.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="trace every message's way through every process into this directory and "
        "print where the time went (bench.e2e_trace)",
    )
    parser.add_argument(
        "--no-guard", dest="guard", action="store_false",
        help="nodes without the connection guard (analysis: what the relay costs)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    cfg = Config(
        messages=harness.sized(args, args.messages or args.n, DEFAULT_MESSAGES, QUICK_MESSAGES),
        rt_messages=harness.sized(args, args.rt_messages, DEFAULT_RT, QUICK_RT),
        senders=args.senders,
        recipients=args.recipients,
        rounds=harness.sized(args, args.rounds, DEFAULT_ROUNDS, QUICK_ROUNDS),
        warmup=harness.sized(args, args.warmup, DEFAULT_WARMUP, QUICK_WARMUP),
        poll_interval=args.poll_interval,
        shipped_admission=args.shipped_admission,
        guard=args.guard,
        budget_s=args.budget,
        profile=args.profile,
        quick=args.quick,
        trace=args.trace,
    )
    if min(cfg.messages, cfg.rt_messages, cfg.senders, cfg.recipients, cfg.rounds) < 1:
        raise SystemExit("--messages, --rt-messages, --senders, --recipients, --rounds >= 1")
    if cfg.senders < 2 or cfg.warmup < 1:
        raise SystemExit("need --senders >= 2 and --warmup >= 1")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    harness.print_machine()
    return harness.run_main("bench.e2e", lambda: run(cfg), cfg.budget_s + 60)


if __name__ == "__main__":
    raise SystemExit(main())
