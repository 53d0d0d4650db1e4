"""What one round trip costs between two processes, by transport: the numbers behind the
choice of transport for the overlay and the mailbox data path.

``uv run python -m bench.transport [--n N] [--rounds R] [--quick] [--sections transports,guard]``

An echo server runs in a subprocess on 127.0.0.1 with four endpoints; this process sends
``--n`` requests per figure and round and waits for each echo:

* ``grpc_unary``: a ``grpc.aio`` unary call (what `Mailbox.Put`/`Fetch` and the overlay's
  record RPCs are today): "ours".
* ``grpc_stream``: messages on one ``grpc.aio`` bidirectional stream.
* ``tcp_framed``: length-prefixed frames on one asyncio TCP connection (what a custom
  framed transport would cost at least).
* ``udp``: asyncio datagrams (what the overlay's ping and find-node use; small payload only:
  a datagram stays under 1,200 bytes).

Two payload sizes: 100 bytes (a routing message) and 4,800 bytes (a sealed envelope). Two
modes: ``seq`` (one request at a time) and ``c32`` (32 outstanding: concurrent unary calls,
pipelined frames). Contenders take turns within each round (10 turns each); a figure is
the median round. ``cpu_us_per_trip`` (guard section) is the CPU of both processes, all
threads, per round trip.
``ratio`` = ours / the first baseline for ops/s (below 1.0: the alternative is faster).

Section ``guard`` (``transport.guard.{unary,stream}.{mode}.{size}``): what a node's
connection guard (``dna_core.ops.relay.TcpRelay`` in front of the gRPC server, in the
server's process and event loop, the handler resolving the client's peer as a node's gate
does) costs a call. Ours = gRPC through the guard, baseline = the same gRPC server dialled
directly; also 64 KiB payloads (a page of blobs), where ``mib_per_s`` counts both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
from dna_core.ops.connections import ConnectionCaps, ConnectionLimits
from dna_core.ops.relay import TcpRelay

from bench import harness

SIZES = (100, 4800)
GUARD_SIZES = (100, 4800, 65536)
SECTIONS = ("transports", "guard")
GUARDED = "_guarded"  # a kind's suffix: the same call through the connection guard
CONCURRENCY = 32
WATCHDOG_S = float(os.environ.get("DNA_BENCH_WATCHDOG_S", "600"))
DEFAULT_N, QUICK_N = 2000, 300
TURNS = 10  # turns each contender takes per round
_SERVICE = "dna.bench.Echo"
_GUARDED_SERVICE = "dna.bench.GuardedEcho"  # the same, resolving the peer as a node does
_FRAME = struct.Struct(">I")


def _same(data: bytes) -> bytes:
    return data


# -- the echo server (run with `python -m bench.transport --serve`) -------------------------


class _EchoUdp(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def _echo_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (size,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
            writer.write(_FRAME.pack(size) + await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):  # the client went away
        writer.close()


def _echo_service(name: str, peer_of: Callable[[str], str] | None = None) -> Any:
    async def unary(request: bytes, context: Any) -> bytes:
        if peer_of is not None:
            peer_of(context.peer())
        return request

    async def stream(requests: Any, context: Any) -> Any:
        if peer_of is not None:
            peer_of(context.peer())
        async for request in requests:
            yield request

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _same, _same),
        "Stream": grpc.stream_stream_rpc_method_handler(stream, _same, _same),
    }
    return grpc.method_handlers_generic_handler(name, handlers)


async def serve() -> None:
    server = grpc.aio.server()
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    # the guard as a node runs it: same process and loop, a node's default caps
    guard = TcpRelay(("127.0.0.1", grpc_port), caps=ConnectionCaps(ConnectionLimits(4096, 64)))
    server.add_generic_rpc_handlers(
        (_echo_service(_SERVICE), _echo_service(_GUARDED_SERVICE, guard.grpc_peer))
    )
    await server.start()
    guard_port = await guard.start()
    tcp = await asyncio.start_server(_echo_tcp, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(_EchoUdp, local_addr=("127.0.0.1", 0))
    ports = {
        "grpc": grpc_port,
        "grpc_guarded": guard_port,
        "tcp": tcp.sockets[0].getsockname()[1],
        "udp": udp.get_extra_info("sockname")[1],
    }
    print(json.dumps(ports), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    tcp.close()
    udp.close()
    await guard.close()
    await server.stop(1.0)


# -- the clients -----------------------------------------------------------------------------


Trip = Callable[[bytes], Awaitable[bytes]]


class _Udp(asyncio.DatagramProtocol):
    """Replies matched in order (loopback keeps order; a lost datagram fails the run)."""

    def __init__(self) -> None:
        self.waiting: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.waiting.put_nowait(data)


class Clients:
    def __init__(self, ports: dict[str, int], server_pid: int) -> None:
        self.ports, self.server_pid = ports, server_pid
        self.channels: list[grpc.aio.Channel] = []
        self.unaries: dict[str, Any] = {}  # by kind: grpc_unary, grpc_unary_guarded
        self.streams: dict[str, Any] = {}  # one open bidi stream per kind

    async def open(self) -> None:
        for suffix, port, service in (
            ("", "grpc", _SERVICE), (GUARDED, "grpc_guarded", _GUARDED_SERVICE),
        ):  # fmt: skip
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.ports[port]}")
            self.channels.append(channel)
            self.unaries[f"grpc_unary{suffix}"] = channel.unary_unary(
                f"/{service}/Unary", _same, _same
            )
            self.streams[f"grpc_stream{suffix}"] = channel.stream_stream(
                f"/{service}/Stream", _same, _same
            )()
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.ports["tcp"])
        loop = asyncio.get_running_loop()
        self.udp, self.udp_proto = await loop.create_datagram_endpoint(
            _Udp, remote_addr=("127.0.0.1", self.ports["udp"])
        )

    async def close(self) -> None:
        for stream in self.streams.values():
            await stream.done_writing()
        self.writer.close()
        await self.writer.wait_closed()
        self.udp.close()
        for channel in self.channels:
            await channel.close()

    async def seq(self, kind: str, payload: bytes, n: int) -> float:
        """Seconds for ``n`` round trips, one at a time."""
        start = time.perf_counter()
        for _ in range(n):
            await self._trip(kind, payload)
        return time.perf_counter() - start

    async def _trip(self, kind: str, payload: bytes) -> None:
        if kind in self.unaries:
            await self.unaries[kind](payload)
        elif kind in self.streams:
            await self.streams[kind].write(payload)
            await self.streams[kind].read()
        elif kind == "tcp_framed":
            self.writer.write(_FRAME.pack(len(payload)) + payload)
            await self._tcp_read()
        else:
            self.udp.sendto(payload)
            async with asyncio.timeout(2.0):  # a loss fails the run
                await self.udp_proto.waiting.get()

    async def _tcp_read(self) -> bytes:
        (size,) = _FRAME.unpack(await self.reader.readexactly(_FRAME.size))
        return await self.reader.readexactly(size)

    async def concurrent(self, kind: str, payload: bytes, n: int) -> float:
        """Seconds for ``n`` round trips with ``CONCURRENCY`` outstanding."""
        start = time.perf_counter()
        if kind in self.unaries:
            sem, unary = asyncio.Semaphore(CONCURRENCY), self.unaries[kind]

            async def one() -> None:
                async with sem:
                    await unary(payload)

            await asyncio.gather(*(one() for _ in range(n)))
        else:
            await self._pipelined(kind, payload, n)
        return time.perf_counter() - start

    async def _pipelined(self, kind: str, payload: bytes, n: int) -> None:
        window = asyncio.Semaphore(CONCURRENCY)

        async def send() -> None:
            for _ in range(n):
                await window.acquire()
                if kind in self.streams:
                    await self.streams[kind].write(payload)
                elif kind == "tcp_framed":
                    self.writer.write(_FRAME.pack(len(payload)) + payload)
                    await self.writer.drain()
                else:
                    self.udp.sendto(payload)

        async def receive() -> None:
            for _ in range(n):
                if kind in self.streams:
                    await self.streams[kind].read()
                elif kind == "tcp_framed":
                    await self._tcp_read()
                else:
                    async with asyncio.timeout(2.0):
                        await self.udp_proto.waiting.get()
                window.release()

        await asyncio.gather(send(), receive())


def contenders(size: int) -> list[str]:
    kinds = ["grpc_unary", "grpc_stream", "tcp_framed"]
    return kinds + (["udp"] if size <= 1000 else [])


@dataclass
class Figures:
    """Per kind: round trips per second and CPU per round trip (µs, both processes), each
    the median over rounds."""

    ops: dict[str, float]
    cpu_us: dict[str, float]


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` (ns, /proc/PID/task/*/schedstat: exact, where
    /proc/PID/stat counts 10 ms ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total


async def median_ops(
    clients: Clients, kinds: list[str], payload: bytes, mode: str, n: int, rounds: int
) -> Figures:
    """Each kind's figures over ``rounds`` of ``n`` round trips. Within a round the kinds
    take turns every ``n // TURNS`` trips, so load from other processes on a shared machine
    falls on all of them alike; a kind's round time is the sum of its own turns."""
    run = clients.seq if mode == "seq" else clients.concurrent
    step = max(1, n // TURNS)
    per_round: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        order = kinds if r % 2 == 0 else kinds[::-1]
        for kind in order:
            await run(kind, payload, min(n, 100))  # warm this path up
        seconds, cpu_used = dict.fromkeys(kinds, 0.0), dict.fromkeys(kinds, 0)
        for done in range(0, n, step):
            for kind in order:
                cpu0 = time.process_time_ns() + cpu_ns(clients.server_pid)
                seconds[kind] += await run(kind, payload, min(step, n - done))
                cpu_used[kind] += time.process_time_ns() + cpu_ns(clients.server_pid) - cpu0
        for kind in kinds:
            per_round[kind].append(n / seconds[kind])
            cpu[kind].append(cpu_used[kind] / n / 1000)
    return Figures(
        {k: statistics.median(v) for k, v in per_round.items()},
        {k: round(statistics.median(v), 1) for k, v in cpu.items()},
    )


MODES = ("seq", f"c{CONCURRENCY}")


async def measure(clients: Clients, n: int, rounds: int) -> list[dict[str, Any]]:
    lines = []
    for size in SIZES:
        payload = os.urandom(size)
        for mode in MODES:
            ops = (await median_ops(clients, contenders(size), payload, mode, n, rounds)).ops
            micros = {k: round(1e6 / v, 1) for k, v in ops.items()}
            params = {"payload_bytes": size, "mode": mode, "rounds": rounds, "us_per_trip": micros}
            ours = ops.pop("grpc_unary")
            lines.append(harness.report(f"transport.{mode}.{size}", "ops/s", ours, ops, n, params))
    return lines


async def measure_guard(clients: Clients, n: int, rounds: int) -> list[dict[str, Any]]:
    """Each gRPC call through the connection guard against the same call dialled directly."""
    lines = []
    for size in GUARD_SIZES:
        payload = os.urandom(size)
        trips = max(10, n * 4800 // size) if size > 4800 else n  # ~the bytes of a 4.8 KB run
        for call in ("unary", "stream"):
            direct = f"grpc_{call}"
            for mode in MODES:
                kinds = [direct + GUARDED, direct]
                got = await median_ops(clients, kinds, payload, mode, trips, rounds)
                ops = got.ops
                params = {
                    "payload_bytes": size, "mode": mode, "rounds": rounds,
                    "us_per_trip": {k: round(1e6 / v, 1) for k, v in ops.items()},
                    "mib_per_s": {k: round(v * size * 2 / 2**20, 1) for k, v in ops.items()},
                    "cpu_us_per_trip": got.cpu_us,
                }  # fmt: skip
                name = f"transport.guard.{call}.{mode}.{size}"
                ours, direct_ops = ops[direct + GUARDED], {"direct": ops[direct]}
                lines.append(harness.report(name, "ops/s", ours, direct_ops, trips, params))
                cpu_ours, cpu_direct = got.cpu_us[direct + GUARDED], {"direct": got.cpu_us[direct]}
                lines.append(harness.report(f"{name}.cpu", "µs", cpu_ours, cpu_direct, trips,
                                           params, kind="latency"))  # fmt: skip
    return lines


async def run(n: int, rounds: int, sections: tuple[str, ...] = SECTIONS) -> int:
    harness.print_machine()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.transport", "--serve"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        ports = json.loads(await asyncio.to_thread(server.stdout.readline))
        clients = Clients(ports, server.pid)
        await clients.open()
        lines = []
        try:
            for section in sections:
                measure_section = measure if section == "transports" else measure_guard
                lines += await measure_section(clients, n, rounds)
        finally:
            await clients.close()
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0 if lines else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--serve"]:
        asyncio.run(serve())
        return 0
    parser = harness.arg_parser("Round trips between two processes, by transport.")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"of {', '.join(SECTIONS)}, in order"
    )
    args = parser.parse_args(argv)
    n = harness.n_from(args, DEFAULT_N, QUICK_N)
    rounds = harness.rounds_from(args)
    sections = tuple(s for s in args.sections.split(",") if s)
    if not sections or set(sections) - set(SECTIONS):
        raise SystemExit(f"--sections: choose from {', '.join(SECTIONS)}")
    return harness.run_main(
        "bench.transport", lambda: run(n, rounds, sections), watchdog_s=WATCHDOG_S
    )


if __name__ == "__main__":
    sys.exit(main())
