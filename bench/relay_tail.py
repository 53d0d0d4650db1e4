"""The tail a relayed gRPC stream round trip pays: the connection guard against a direct dial.

``uv run python -m bench.relay_tail [--n 3000]``

A ``grpc.aio`` stream echo server and, in the same process, a `TcpRelay` in front of it (the
connection guard's relay). One message at a time on one stream, ``--n`` round trips each
way (direct, then through the relay) per payload size; printed per size: p50, p99, p99.9
and the slowest round trip (ms), ours (relayed) against the direct dial in the same run,
and how many round trips took over 30 ms. A write that waits for a delayed ACK (Nagle's
algorithm left on a relayed socket) shows here as round trips of ~40 ms: that was the
bench.e2e p99 until 2026-12-04 (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from dna_core.ops.relay import TcpRelay

from bench import harness

SIZES = (200, 8000, 40000)
DEFAULT_N, QUICK_N = 3000, 200
STALL_MS = 30.0


def _same(data: bytes) -> bytes:
    return data


async def _echo(requests: AsyncIterator[bytes], _: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def _trips(target: str, payload: bytes, n: int) -> list[float]:
    """Milliseconds of each of ``n`` round trips on one stream, sorted."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream("/bench.Echo/Stream", _same, _same)()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            await call.write(payload)
            await call.read()
            times.append((time.perf_counter() - start) * 1000)
        await call.done_writing()
    return sorted(times)


def _tail(times: Sequence[float]) -> dict[str, float]:
    n = len(times)
    return {"p50": times[n // 2], "p99": times[int(n * 0.99)], "p999": times[int(n * 0.999)],
            "max": times[-1], "stalls": sum(t > STALL_MS for t in times)}  # fmt: skip


async def run(n: int) -> None:
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(_echo, _same, _same)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Stream": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    relay = TcpRelay(("127.0.0.1", port))
    await relay.start()
    try:
        for size in SIZES:
            payload = os.urandom(size)
            direct = _tail(await _trips(f"127.0.0.1:{port}", payload, n))
            relayed = _tail(await _trips(relay.address, payload, n))
            params = {"payload_bytes": size, "relayed": relayed, "direct": direct}
            for figure in ("p99", "p999", "max"):
                harness.report(f"relay_tail.{size}.{figure}", "ms", round(relayed[figure], 3),
                               {"direct": round(direct[figure], 3)}, n, params,
                               kind="latency")  # fmt: skip
    finally:
        await relay.close()
        await server.stop(None)


def main(argv: list[str] | None = None) -> int:
    parser = harness.arg_parser("The tail of a gRPC stream round trip through the guard's relay.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    asyncio.run(run(harness.n_from(args, DEFAULT_N, QUICK_N)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
