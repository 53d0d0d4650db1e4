"""The heap of a long-running process, out of the garbage collector's way.

A node or a watching device keeps what it set up at start (imported modules, keys,
routing tables, gRPC channels and their protobuf classes) for its whole life, yet each
full collection walks all of it again: in ``bench.e2e --trace`` the recipient's full
collections paused it 60-220 ms on a loaded machine, the senders' 50-80 ms, each a
latency of every message in flight. `freeze_startup_heap`, called once the process is
up, moves those objects to the permanent generation, so later collections walk only what
was allocated since (Python's documented use of `gc.freeze`).
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect (garbage is not frozen with the rest), then freeze every object alive now.
    Returns how many objects are frozen. Call it once, when the process is up: in a
    process that starts and drops many things (a test run) cycles created before a freeze
    and dropped after it are never collected."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
