"""Relayed packets per second and throughput through our TURN server (`dna-stun`) and through
Debian's coturn, same client, same run.

``uv run python -m bench.turn [--rounds R] [--quick] [--seconds S]``

Both servers run as processes on 127.0.0.1 (coturn as ``turnserver -n --lt-cred-mech ...
--allow-loopback-peers``; ours with ``allowed_peers = ["127.0.0.0/8"]`` and no bandwidth
cap). One client in this process allocates on each (long-term credentials, ChannelBind to a
peer socket on another loopback address) and, per figure, keeps a window of ``WINDOW``
datagrams in flight for ``--seconds``:

* ``up``: ChannelData from the client, relayed to the peer as plain UDP;
* ``down``: plain UDP from the peer to the relay address, relayed to the client as ChannelData.

Payloads of 120 bytes (a chat message's ciphertext) and 1,200 bytes (a datagram near the safe
MTU). Contenders alternate within each figure of each round (``SLICES`` turns each, so both
see the same noise of a shared machine); the figure is the median round. A window that
stalls for ``STALL_S`` counts its datagrams as lost and goes on. ``cpu_us_per_packet`` is the
server process's CPU (user + system) per relayed packet, also printed as a figure of its own
(``.cpu``, packets per CPU-second): on a loaded machine it moves far less than packets/s.
``ratio`` = ours / coturn (the goal: at least 0.5). Bounded: under a minute with the defaults.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dna_core.hostport import host_port
from dna_stun import attributes as attr
from dna_stun.message import Class, Method, channel_data, encode, long_term_key, parse
from dna_testnet.harness import LOOPBACK

from bench.harness import (
    Deadline,
    arg_parser,
    detail,
    print_machine,
    report,
    rounded,
    scratch_dir,
    timed_rounds,
)

HOST = "127.0.0.1"
USER, PASSWORD, REALM = "u", "p", "test"
WINDOW = 64  # datagrams in flight: enough to keep a server busy, few enough not to overrun it
STALL_S = 0.2
QUIET_S = 0.02
SLICES = 5  # per figure and round, contenders alternate this often (the machine is noisy)
CHANNEL = 0x4000
SIZES = (120, 1200)
DIRECTIONS = ("up", "down")
BUDGET_S = 50.0
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------- the servers


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    addr: tuple[str, int]

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(name: str, argv: list[str], addr: tuple[str, int], log: Path) -> Server:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = Server(name, proc, addr)
    deadline = time.monotonic() + 30
    while not _answers_binding(addr):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    return server


def _answers_binding(addr: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.sendto(encode(Method.BINDING, Class.REQUEST, os.urandom(12)), addr)
        try:
            sock.recvfrom(2048)
        except OSError:
            return False
        return True


def start_ours(root: Path) -> Server:
    port = free_port()
    config = root / "stun.toml"
    config.write_text(
        f'log_level = "warning"\n[server]\nhost = "{HOST}"\nudp_port = {port}\n'
        f'[auth]\nrealm = "{REALM}"\nusers = ["{USER}:{PASSWORD}"]\n'
        f'[relay]\nallowed_peers = ["127.0.0.0/8"]\nbandwidth_bytes_per_s = 0\n'
        f'[ops]\nhttp_host = "{HOST}"\nhttp_port = {free_port()}\n'
    )
    argv = [str(BIN / "dna-stun"), "run", "--config", str(config)]
    return _start("ours", argv, (HOST, port), root / "stun.log")


def start_coturn(root: Path) -> Server | None:
    binary = shutil.which("turnserver")
    if binary is None:
        detail({"warning": "coturn (turnserver) not installed: apt-get install -y coturn"})
        return None
    port = free_port()
    argv = [
        binary, "-n", f"--listening-ip={HOST}", f"--relay-ip={HOST}", f"--listening-port={port}",
        "--lt-cred-mech", f"--user={USER}:{PASSWORD}", f"--realm={REALM}", "--no-tls",
        "--no-dtls", "--allow-loopback-peers", "--no-cli", f"--log-file={root / 'coturn.log'}",
        f"--pidfile={root / 'coturn.pid'}",
    ]  # fmt: skip
    return _start("coturn", argv, (HOST, port), root / "coturn.out")


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)


# ---------------------------------------------------------------------------- the client


class TurnSession:
    """One allocation with a channel to one peer socket, driven with blocking sockets."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.bind((HOST, 0))
        self.client.connect(server)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind((LOOPBACK.one(), 0))  # not the server's address
        for sock in (self.client, self.peer):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            sock.setblocking(False)
        self.key = b""
        self.nonce = b""
        self.relay = self._allocate()
        self._request(Method.CHANNEL_BIND, [
            (attr.CHANNEL_NUMBER, attr.channel_number(CHANNEL)),
        ], peer=self.peer.getsockname())  # fmt: skip
        self.peer.connect(self.relay)

    def _transact(self, data: bytes) -> Any:
        self.client.send(data)
        ready, _, _ = select.select([self.client], [], [], 2.0)
        if not ready:
            raise RuntimeError(f"no answer from {self.server}")
        return parse(self.client.recv(4096))

    def _request(
        self, method: int, attributes: list[tuple[int, bytes]], peer: tuple[str, int] | None = None
    ) -> Any:
        for _ in range(2):  # once more after a 401 or 438 taught the nonce
            tid = os.urandom(12)
            attrs = list(attributes)
            if peer is not None:
                attrs.append((attr.XOR_PEER_ADDRESS, attr.encode_xor_address(peer, tid)))
            key = None
            if self.nonce:
                attrs += [(attr.USERNAME, USER.encode()), (attr.REALM, REALM.encode()),
                          (attr.NONCE, self.nonce)]  # fmt: skip
                key = self.key
            response = self._transact(encode(method, Class.REQUEST, tid, attrs, key=key))
            if response.cls == Class.SUCCESS:
                return response
            nonce = response.get(attr.NONCE)
            if nonce is None:
                break
            self.nonce, self.key = nonce, long_term_key(USER, REALM, PASSWORD)
        code = attr.decode_error_code(response.get(attr.ERROR_CODE) or b"\0\0\x05\0")
        raise RuntimeError(f"TURN request 0x{method:03x} refused: {code}")

    def _allocate(self) -> tuple[str, int]:
        response = self._request(
            Method.ALLOCATE, [(attr.REQUESTED_TRANSPORT, attr.requested_transport())]
        )
        relayed = response.get(attr.XOR_RELAYED_ADDRESS)
        return attr.decode_xor_address(relayed, response.transaction_id)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self._request(Method.REFRESH, [(attr.LIFETIME, attr.uint32(0))])
        self.client.close()
        self.peer.close()

    def flow(self, direction: str, size: int, seconds: float) -> tuple[int, int, float]:
        """(delivered, lost, elapsed) for ``seconds`` of windowed sending one way."""
        if direction == "up":
            sender, receiver, packet = self.client, self.peer, channel_data(CHANNEL, bytes(size))
        else:
            sender, receiver, packet = self.peer, self.client, bytes(size)
        return _windowed(sender, receiver, packet, seconds)


def _windowed(
    sender: socket.socket, receiver: socket.socket, packet: bytes, seconds: float
) -> tuple[int, int, float]:
    sent = delivered = lost = 0
    started = time.perf_counter()
    end = started + seconds
    send, recv = sender.send, receiver.recv
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        while sent - delivered - lost < WINDOW:
            try:
                send(packet)
            except BlockingIOError:
                break
            sent += 1
        got = _drain(recv)
        if not got:
            ready, _, _ = select.select([receiver], [], [], STALL_S)
            if not ready:
                lost += sent - delivered - lost  # the whole window stalled: count it lost
            continue
        delivered += got
    elapsed = time.perf_counter() - started
    # What is still in flight arrives and is thrown away, so the next slice starts empty.
    while select.select([receiver], [], [], QUIET_S)[0]:
        _drain(recv, 1 << 20)
    return delivered, lost, elapsed


def _drain(recv: Any, limit: int = WINDOW) -> int:
    got = 0
    while got < limit:
        try:
            recv(65536)
        except BlockingIOError:
            break
        got += 1
    return got


# ---------------------------------------------------------------------------- the run


@dataclass
class Sample:
    pps: float
    mib_per_s: float
    lost: int
    cpu_us_per_packet: float | None


@dataclass
class Tally:
    delivered: int = 0
    lost: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0

    def add(self, server: Server, session: TurnSession, direction: str, size: int,
            seconds: float) -> None:  # fmt: skip
        cpu_before = server.cpu_s()
        delivered, lost, elapsed = session.flow(direction, size, seconds)
        self.cpu += server.cpu_s() - cpu_before
        self.delivered, self.lost = self.delivered + delivered, self.lost + lost
        self.elapsed += elapsed

    def sample(self, size: int) -> Sample:
        return Sample(
            pps=self.delivered / self.elapsed,
            mib_per_s=self.delivered * size / self.elapsed / (1 << 20),
            lost=self.lost,
            cpu_us_per_packet=self.cpu / self.delivered * 1e6 if self.delivered else None,
        )


def measure_figure(
    running: list[Server], sessions: dict[str, TurnSession], direction: str, size: int,
    seconds: float,
) -> dict[str, Sample]:  # fmt: skip
    """One round of one figure: the contenders take turns in ``SLICES`` slices."""
    tallies = {server.name: Tally() for server in running}
    for _ in range(SLICES):
        for server in running:
            tallies[server.name].add(
                server, sessions[server.name], direction, size, seconds / SLICES
            )
    return {name: tally.sample(size) for name, tally in tallies.items()}


def _median(samples: Sequence[Sample]) -> dict[str, Any]:
    ordered = sorted(samples, key=lambda s: s.pps)
    middle = ordered[len(ordered) // 2]
    cpu = [s.cpu_us_per_packet for s in samples if s.cpu_us_per_packet is not None]
    return {
        "pps": middle.pps,
        "mib_per_s": middle.mib_per_s,
        "lost": sum(s.lost for s in samples),
        "cpu_us_per_packet": rounded(statistics.median(cpu)) if cpu else None,
        "rounds_pps": [round(s.pps) for s in samples],
    }


@contextlib.contextmanager
def servers(root: Path) -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        started.append(start_ours(root))
        coturn = start_coturn(root)
        if coturn is not None:
            started.append(coturn)
        yield started
    finally:
        for server in started:
            stop(server)


def run(rounds: int, seconds: float) -> int:
    print_machine()
    budget = Deadline(BUDGET_S)  # from before the servers start: the whole run stays under 60 s
    with scratch_dir("turn") as root, servers(root) as running:
        sessions = {s.name: TurnSession(s.addr) for s in running}
        detail({"servers": {s.name: host_port(*s.addr) for s in running},
                "window": WINDOW, "seconds_per_figure": seconds})  # fmt: skip
        for server in running:  # warm up: first packets, caches, the allocation's state
            sessions[server.name].flow("up", 120, min(0.3, seconds))
        results: dict[tuple[str, str, int], list[Sample]] = {}
        for _ in timed_rounds(rounds, budget, reserve_s=2.0):
            for direction in DIRECTIONS:
                for size in SIZES:
                    figure = measure_figure(running, sessions, direction, size, seconds)
                    for name, sample in figure.items():
                        results.setdefault((name, direction, size), []).append(sample)
        for session in sessions.values():
            session.close()
    return _report(results, rounds, seconds)


def _report(results: dict[tuple[str, str, int], list[Sample]], rounds: int, seconds: float) -> int:
    status = 0
    for direction in DIRECTIONS:
        for size in SIZES:
            ours = _median(results[("ours", direction, size)])
            theirs_samples = results.get(("coturn", direction, size))
            if theirs_samples is None:
                status = 1
                continue
            theirs = _median(theirs_samples)
            params = {"direction": direction, "payload_bytes": size, "window": WINDOW,
                      "seconds": seconds, "rounds": len(results[("ours", direction, size)]),
                      "ours": ours, "coturn": theirs}  # fmt: skip
            n = int(ours["pps"] * seconds)
            report(f"turn.relay.{direction}.{size}", "packets/s", ours["pps"],
                   {"coturn": theirs["pps"]}, n, params)  # fmt: skip
            report(f"turn.relay.{direction}.{size}.throughput", "MiB/s", ours["mib_per_s"],
                   {"coturn": theirs["mib_per_s"]}, n, {"direction": direction,
                   "payload_bytes": size})  # fmt: skip
            if ours["cpu_us_per_packet"] and theirs["cpu_us_per_packet"]:
                # The server's own CPU per packet: what a busy machine's noise moves least.
                per_cpu_s = {"coturn": 1e6 / theirs["cpu_us_per_packet"]}
                report(f"turn.relay.{direction}.{size}.cpu", "packets/cpu-s",
                       1e6 / ours["cpu_us_per_packet"], per_cpu_s, n,
                       {"direction": direction, "payload_bytes": size})  # fmt: skip
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser(__doc__.splitlines()[0] if __doc__ else "bench.turn")
    parser.add_argument(
        "--seconds", type=float, default=None,
        help="seconds of sending per contender, figure and round (default 1.0, --quick 0.2)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (0.2 if args.quick else 1.0)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1 or seconds <= 0:
        raise SystemExit("--rounds must be at least 1 and --seconds positive")
    return run(rounds, seconds)


if __name__ == "__main__":
    raise SystemExit(main())
