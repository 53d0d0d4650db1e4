"""The peer's encrypted cache with one long conversation: open, list, read, search.

``python -m bench.peer_cache_size --messages 20000``: that many messages (half sent, half
received, ~200 characters each) in one conversation and one message in each of 20 others,
added one ``add_message`` at a time (a commit each, as messages arrive); then, twice (the
second time the conversation is read), the milliseconds of each read a `dna` command makes,
the process's RSS and peak, and the file's size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dna_peer.cache import Cache, Message

from bench.harness import memory_mb

T0 = 1_700_000_000_000


def timed(read: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    read()
    return round((time.perf_counter() - t0) * 1000, 2)


def fill(cache: Cache, conversation: bytes, me: bytes, peer: bytes, count: int) -> None:
    for i in range(count):
        out = i % 2 == 0
        sender, recipient = (me, peer) if out else (peer, me)
        body = f"message {i} " * 20
        cache.add_message(Message(os.urandom(16), conversation, sender, recipient, T0 + i,
                                  body, out, out))  # fmt: skip
    for j in range(20):
        cache.add_message(Message(os.urandom(16), os.urandom(32), peer, me, T0 + j, "hi", False))


def reads(path: Path, key: bytes, conversation: bytes, peer: bytes, count: int) -> None:
    t0 = time.perf_counter()
    cache = Cache.open(path, key)
    figures = {"open_ms": round((time.perf_counter() - t0) * 1000, 2)}
    figures["conversations_ms"] = timed(cache.conversations)
    figures["newest_50_ms"] = timed(lambda: cache.messages(conversation, limit=50))
    figures["all_ms"] = timed(lambda: sum(1 for _ in cache.iter_messages(conversation)))
    figures["search_ms"] = timed(lambda: cache.search("message 1234"))
    figures["last_written_ms"] = timed(cache.last_written)
    figures["has_our_keys_ms"] = timed(lambda: cache.has_our_keys(peer))
    figures["mark_read_ms"] = timed(lambda: cache.mark_read(conversation, T0 + count))
    cache.close()
    print(json.dumps({**figures, **memory_mb()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dna-cache-"))
    try:
        path, key = root / "cache.db", os.urandom(32)
        conversation, me, peer = os.urandom(32), os.urandom(32), os.urandom(32)
        cache = Cache.open(path, key)
        t0 = time.perf_counter()
        fill(cache, conversation, me, peer, args.messages)
        cache.close()
        added_s = time.perf_counter() - t0
        each_ms = round(added_s / args.messages * 1000, 2)
        size_mb = round(path.stat().st_size / 1e6, 1)
        print(json.dumps({"added": args.messages, "ms_each": each_ms, "file_mb": size_mb}))
        for _ in range(2):
            reads(path, key, conversation, peer, args.messages)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
