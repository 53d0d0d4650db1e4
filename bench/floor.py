"""The floor of our data path: what one message costs at least with our transport and crypto.

A message from send to read cannot cost less than sealing it, one gRPC stream round trip
(``bench.transport``'s echo server in a subprocess, a payload of the envelope's size), the
storage node's durable write (a SQLite ``put_many`` through the node's own backend: one
commit when alone, a 1/32 share of one commit when 32 writes are grouped) and opening it.
``bench.storage`` and ``bench.e2e`` print it beside their own latencies (``<bench>.floor``
lines, ratio = floor / ours: how close to the floor we are).

``uv run python -m bench.floor [--n N]`` prints the components alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from dna_core.crypto import Identity, ReplayGuard, open_envelope, seal
from dna_core.mailbox import blob_id
from dna_storage.backends.base import StoredBlob
from dna_storage.backends.sqlite import SqliteBackend

from bench import harness
from bench.transport import Clients

GROUP = 32  # writes grouped into one commit: the benches' c32 mode
DEFAULT_N = 200
DAY_MS = 86_400_000


def _median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1e3


def _time_each(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


async def _time_each_async(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


def crypto_ms(payload_bytes: int, n: int, sender_keys: bool) -> tuple[float, float, int]:
    """Median ms to seal (``sender_keys``: the sender's keys included, as ``Peer.send``
    does) and to open one envelope of ``payload_bytes`` of plaintext, and its size."""
    sender, recipient = Identity.generate(), Identity.generate()
    payload = os.urandom(payload_bytes)
    envelopes: list[bytes] = []

    def seal_one() -> None:
        envelopes.append(
            seal(sender, recipient.public, payload, now_ms=harness.now_ms(),
                 include_sender_keys=sender_keys)
        )  # fmt: skip

    seal_s = _time_each(seal_one, n)
    guard = ReplayGuard()
    todo = iter(list(envelopes))

    def open_one() -> None:
        open_envelope(next(todo), recipient, now_ms=harness.now_ms(), replay_guard=guard)

    if not sender_keys:  # the sender's keys come from the recipient's contacts instead
        guard_resolver = {sender.fingerprint: sender.public}

        def open_one() -> None:
            open_envelope(next(todo), recipient, now_ms=harness.now_ms(), replay_guard=guard,
                          resolve_sender=guard_resolver.get)  # fmt: skip

    open_s = _time_each(open_one, n)
    return _median_ms(seal_s), _median_ms(open_s), len(envelopes[0])


async def stream_round_trip_ms(size: int, n: int) -> float:
    """Median ms of one round trip of ``size`` bytes on one gRPC bidirectional stream to
    another process (``bench.transport``'s echo server)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.transport", "--serve"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        ports = json.loads(await asyncio.to_thread(server.stdout.readline))
        clients = Clients(ports, server.pid)
        await clients.open()
        try:
            payload = os.urandom(size)
            await clients.seq("grpc_stream", payload, min(n, 50))  # warm up
            samples = [await clients.seq("grpc_stream", payload, 1) for _ in range(n)]
        finally:
            await clients.close()
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
    return _median_ms(samples)


async def commit_ms(size: int, n: int) -> tuple[float, float]:
    """Median ms of a durable write of one ``size``-byte blob alone (one commit), and of
    one write's share when ``GROUP`` concurrent writes share a commit."""
    with tempfile.TemporaryDirectory(prefix="dna-bench-floor-") as tmp:
        backend = await SqliteBackend.open(Path(tmp) / "mailboxes.sqlite3")
        try:
            mailbox = os.urandom(32)

            def blob() -> StoredBlob:
                data = os.urandom(size)
                now = harness.now_ms()
                return StoredBlob(mailbox, blob_id(data), data, now, now + DAY_MS)

            alone = await _time_each_async(lambda: backend.put_many([blob()], harness.now_ms()), n)

            async def grouped() -> None:
                now = harness.now_ms()
                await asyncio.gather(*(backend.put_many([blob()], now) for _ in range(GROUP)))

            rounds = max(3, n // GROUP)
            shares = [s / GROUP for s in await _time_each_async(grouped, rounds)]
        finally:
            await backend.close()
    return _median_ms(alone), _median_ms(shares)


async def measure(
    payload_bytes: int, n: int = DEFAULT_N, *, sender_keys: bool = True
) -> dict[str, Any]:
    """The floor's components (ms) and sums: ``seq_ms`` (seal + stream round trip + one
    commit + open), ``c32_ms`` (the same with a 1/32 commit share), and ``put_seq_ms``/
    ``put_c32_ms`` (round trip + commit: a storage put of an envelope sealed beforehand)."""
    seal_ms, open_ms, envelope = await asyncio.to_thread(crypto_ms, payload_bytes, n, sender_keys)
    rt_ms = await stream_round_trip_ms(envelope, n)
    commit_alone_ms, commit_share_ms = await commit_ms(envelope, n)
    parts = {
        "seal_ms": seal_ms, "stream_rt_ms": rt_ms, "commit_ms": commit_alone_ms,
        "commit_share_c32_ms": commit_share_ms, "open_ms": open_ms,
    }  # fmt: skip
    sums = {
        "seq_ms": seal_ms + rt_ms + commit_alone_ms + open_ms,
        "c32_ms": seal_ms + rt_ms + commit_share_ms + open_ms,
        "put_seq_ms": rt_ms + commit_alone_ms,
        "put_c32_ms": rt_ms + commit_share_ms,
        "fetch_ms": rt_ms,
    }
    out: dict[str, Any] = {k: round(v, 3) for k, v in {**parts, **sums}.items()}
    out["envelope_bytes"] = envelope
    out["n"] = n
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.arg_parser("Our data path's floor: seal + stream round trip + commit + open.")
    parser.add_argument("--payload", type=int, default=100, help="plaintext bytes")
    args = parser.parse_args(argv)
    n = harness.n_from(args, DEFAULT_N, 30)
    harness.print_machine()

    async def run() -> int:
        harness.detail({"floor": await measure(args.payload, n)})
        return 0

    return harness.run_main("bench.floor", run, 120.0)


if __name__ == "__main__":
    raise SystemExit(main())
