"""Opt-in latency trace: timestamped events of one message's way through every process.

``bench.e2e --trace DIR`` sets ``BENCH_TRACE_DIR`` for the run (the testnet's processes
keep their environment except ``DNA_*`` variables, hence the name). Each process that
imports this module then appends, for every `mark`, one line ``event key ns`` to
``DIR/<pid>.trace``: ``key`` is a blob ID in hex (what the sender, the nodes and the
recipient all know), ``ns`` is ``time.monotonic_ns()`` (CLOCK_MONOTONIC, shared by every
process of the machine). `bench.e2e_trace` joins the files into a per-message breakdown.

Unset (always, outside that bench), `mark` is one attribute test and a return. Lines go
out with one ``os.write`` each on an ``O_APPEND`` descriptor, so threads (the SQLite
writer) and a process killed mid-run leave whole lines. Garbage collections longer than
``GC_NOTE_NS`` are noted too (event ``gc.<generation>``, key = the pause in ns): a pause
of the interpreter is a latency of every message in flight.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

ENV = "BENCH_TRACE_DIR"
GC_NOTE_NS = 200_000  # collections shorter than this are not noted


class _Trace:
    def __init__(self) -> None:
        self.fd: int | None = None
        self._gc_started = 0

    def open(self, directory: str) -> None:
        path = os.path.join(directory, f"{os.getpid()}.trace")
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        gc.callbacks.append(self._on_gc)

    def write(self, event: str, key: str, ns: int) -> None:
        if self.fd is not None:
            os.write(self.fd, f"{event} {key} {ns}\n".encode())

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.monotonic_ns()
        if phase == "start":
            self._gc_started = now
        elif now - self._gc_started >= GC_NOTE_NS:
            self.write(f"gc.{info.get('generation', '?')}", str(now - self._gc_started), now)


_trace = _Trace()
if os.environ.get(ENV):
    _trace.open(os.environ[ENV])


def start(directory: str) -> None:
    """Trace this process and the processes it starts from now on into ``directory``."""
    os.environ[ENV] = directory
    if _trace.fd is None:
        _trace.open(directory)


def enabled() -> bool:
    return _trace.fd is not None


def mark(event: str, key: bytes, ns: int | None = None) -> None:
    """Note ``event`` for the blob ``key`` at ``ns`` (default: now), if tracing is on."""
    if _trace.fd is not None:
        _trace.write(event, key.hex()[:16], time.monotonic_ns() if ns is None else ns)


def mark_span(event: str, start_ns: int, end_ns: int, size: int) -> None:
    """Note an operation of no single blob (a group commit of ``size`` writes):
    ``<event> <size>:<start_ns> <end_ns>``."""
    if _trace.fd is not None:
        _trace.write(event, f"{size}:{start_ns}", end_ns)
